"""Listing a large prefix: windowed pages (``Index.iter_prefix``) against paging through the
rest of the prefix with a plain etcd3aio loop.

    python bench/listing.py [--records 300000] [--page 2000] [--rounds 3]

etcd 3.5 counts every key of a request's range to report the total, also when it returns
a page, so the plain loop ("from the last key to the prefix's end, limit N") makes etcd
walk ~records^2 / (2 * page) keys.  ``Index.iter_prefix`` asks for windows sized from the
key density it has seen.  Both list the same keys at the same revision, alternately, in
the same run; printed: seconds per listing, the keys etcd reported walking (the sum of
each answer's ``count``), requests, and the speed-up.  Keys are shaped like the index's
record keys: 31 regions x 3 operators x 3 kinds, random serials.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import string
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import etcd3aio  # noqa: F401  (makes etcd's generated ``etcd.api`` modules importable)
from etcd3aio import Etcd3Client, prefix_range_end

from cpi.etcdproc import EtcdProcess
from registry.index import Index, Op

PREFIX = "/cpi/rec/"
BATCH = 1000


def keys(n: int) -> list[str]:
    rnd = random.Random(12)
    alphabet = string.digits + "ABCDEFGHJKMNPQRSTVWXYZ"
    spaces = [
        f"CN.{region}.{op}/{kind}"
        for region in range(11, 73, 2)
        for op in ("CMCC", "CTCC", "CUCC")
        for kind in ("GPU", "NPU", "STO")
    ]
    return [
        f"{PREFIX}{rnd.choice(spaces)}.{''.join(rnd.choices(alphabet, k=12))}" for _ in range(n)
    ]


async def plain(client: Etcd3Client, page: int, revision: int) -> tuple[int, int, int]:
    """(keys, keys walked, requests) paging through the rest of the prefix."""
    kv = client.kv
    assert kv is not None, "connect first"
    start, end = PREFIX.encode(), prefix_range_end(PREFIX.encode())
    listed = walked = requests = 0
    while True:
        resp = await kv.get(start, end, revision=revision, limit=page)
        listed, walked, requests = listed + len(resp.kvs), walked + resp.count, requests + 1
        if not resp.more or not resp.kvs:
            return listed, walked, requests
        start = bytes(resp.kvs[-1].key) + b"\x00"


async def windowed(index: Index, page: int, revision: int) -> tuple[int, int, int]:
    listed = walked = requests = 0
    async for p in index.iter_prefix(PREFIX, page_size=page, revision=revision):
        listed, walked, requests = listed + len(p.kvs), walked + p.ranged, requests + 1
    return listed, walked, requests


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=300_000)
    ap.add_argument("--page", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="cpi-bench-listing-") as tmp:
        etcd = EtcdProcess(data_dir=Path(tmp) / "etcd", extra_args=["--max-txn-ops", str(BATCH)])
        etcd.start()
        try:
            etcd.wait_healthy(30)
            async with Index(endpoints=[etcd.endpoint], timeout=60.0) as index:
                t0 = time.perf_counter()
                value = b"v" * 200
                all_keys = keys(args.records)
                for i in range(0, len(all_keys), BATCH):
                    await index.txn(success=[Op.put(k, value) for k in all_keys[i : i + BATCH]])
                revision = await index.revision()
                print(f"set-up: {args.records:,} keys in {time.perf_counter() - t0:.1f} s")
                client = Etcd3Client([etcd.endpoint])
                await client.connect()
                try:
                    times: dict[str, list[float]] = {"plain": [], "windowed": []}
                    for r in range(args.rounds):
                        for name in ("plain", "windowed") if r % 2 == 0 else ("windowed", "plain"):
                            t = time.perf_counter()
                            if name == "plain":
                                listed, walked, requests = await plain(client, args.page, revision)
                            else:
                                listed, walked, requests = await windowed(
                                    index, args.page, revision
                                )
                            times[name].append(time.perf_counter() - t)
                            assert listed == args.records, (name, listed)
                            print(
                                f"round {r + 1} {name:9} {times[name][-1]:7.2f} s  "
                                f"walked {walked:>13,}  requests {requests:,}"
                            )
                finally:
                    await client.close()
        finally:
            etcd.stop()
    p, w = statistics.median(times["plain"]), statistics.median(times["windowed"])
    print(
        f"median: plain loop {p:.2f} s, windowed {w:.2f} s per listing of {args.records:,} "
        f"keys (pages of {args.page:,}): windowed / plain time {w / p:.3f} ({p / w:.1f}x faster)"
    )


if __name__ == "__main__":
    asyncio.run(main())
