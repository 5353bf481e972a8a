"""etcd's database size per record, for sizing the backend quota (docs/operations.md).

    python bench/etcdsize.py [--records 100000] [--refreshes 2]

Starts an etcd (``cpi.etcdproc``: 8 GiB quota, no automatic compaction so the history
stays measurable), writes ``--records`` signed records each with a signed status the
way ``bench/scale.py`` does (the same generator and batched transactions), then
rewrites every status ``--refreshes`` times (what live refreshes and capacity changes
do, leaving history behind).  After each step it prints the member's ``db_size`` and
``db_size_in_use`` (``etcdctl endpoint status`` shows the same) and the bytes per
record; then it compacts, defragments (:class:`registry.index.Maintainer`) and prints
the size again.  From these: records per GB with and without history.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.resolve import World
from bench.scale import write_index
from cpi.etcdproc import EtcdProcess
from registry.index import Index, Keys, Maintainer, Op, Prefix


def line(what: str, db: int, in_use: int, records: int) -> None:
    print(
        f"  {what:<38} db_size {db / 2**20:8.1f} MiB   in use {in_use / 2**20:8.1f} MiB   "
        f"{db / records:7,.0f} B/record   {2**30 / (db / records):11,.0f} records/GiB"
    )


async def run(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="cpi-bench-size-") as tmp_name:
        tmp = Path(tmp_name)
        etcd = EtcdProcess(data_dir=tmp / "etcd", auto_compaction_retention=None)
        etcd.start()
        try:
            etcd.wait_healthy(30)
            world = World(tmp)
            async with Index(endpoints=[etcd.endpoint], timeout=60) as index:
                await world.publish(index)
                _, nbytes, took = await write_index(index, world, args.records)
                n = args.records
                print(
                    f"{n:,} records + statuses written in {took:.0f} s; values "
                    f"{nbytes / n:,.0f} B per record (record + status envelopes)"
                )
                await asyncio.sleep(1)
                st = await index.status()
                line("records + statuses", st.db_size, st.db_size_in_use, n)
                for r in range(args.refreshes):
                    t0 = time.perf_counter()
                    ops: list[Op] = []
                    async for page in index.iter_prefix(Prefix.LIVE, page_size=1000):
                        for kv in page.kvs:
                            ops.append(Op.put(kv.key, kv.value))
                            cpid = kv.key[len(Prefix.LIVE) :]
                            ops.append(Op.put(Keys.seq(cpid), b'{"seq":1,"observed_at":1}'))
                            if len(ops) >= 120:
                                await index.txn(success=ops)
                                ops = []
                    if ops:
                        await index.txn(success=ops)
                    await asyncio.sleep(1)
                    st = await index.status()
                    line(
                        f"after rewrite {r + 1} of /live/ + /seq/",
                        st.db_size,
                        st.db_size_in_use,
                        n,
                    )
                    print(f"    (rewrite took {time.perf_counter() - t0:.0f} s)")

                def open_index(endpoints: list[str]) -> Index:
                    return Index(endpoints=endpoints, timeout=600)

                t0 = time.perf_counter()
                maintainer = Maintainer([etcd.endpoint], open_index, keep_revisions=1)
                report = await maintainer.run_once(force_defrag=True)
                took = time.perf_counter() - t0
                st = await index.status()
                line("after compaction + defragmentation", st.db_size, st.db_size_in_use, n)
                print(f"    (compaction + defragmentation took {took:.1f} s)")
                if report.errors:
                    print(f"  maintenance errors: {report.errors}")
        finally:
            etcd.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--records", type=int, default=100_000)
    p.add_argument("--refreshes", type=int, default=2)
    asyncio.run(run(p.parse_args()))


if __name__ == "__main__":
    main()
