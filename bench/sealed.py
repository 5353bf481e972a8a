"""Records and statuses kept compressed (resolver.sealed): what it saves, what it costs.

    python bench/sealed.py [--records 10000] [--rounds 5]

Makes ``--records`` signed records with a signed status each, as ``bench/resolve.py``
does (the bench's own data; the dictionaries are built from the contract, not from
it), and prints, against the uncompressed form measured in the same run:

1. **size**: mean payload bytes as signed, compressed with the preset dictionaries,
   and compressed without a dictionary;
2. **sealing**: microseconds per envelope to seal it (what the verification workers
   do per record and status), compressed vs not;
3. **memory**: tracemalloc bytes per record (record + status) after applying them to
   a ``ReplicaState`` with inline verification, compressed vs not;
4. **reads**: microseconds per entry for what decompresses (the GET body rendered
   once per entry, a discovery result's view -- record and status parsed again --,
   ranking's score inputs, the record envelope rebuilt), best of ``--rounds``;
5. **snapshot**: bytes per record of the warm-restart file, and its read + restore
   time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import gc
import sys
import tempfile
import time
import tracemalloc
import zlib
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.resolve import World, _gen
from registry.index import Keys
from resolver import entry as entry_mod
from resolver import ranking
from resolver import sealed as sealed_mod
from resolver.entry import Entry
from resolver.sealed import Packed, Sealed, seal
from resolver.snapshot import SnapshotStore, TrustedRunner
from resolver.state import Change, ReplicaState, Restored
from resolver.verify import Context, Job, Outcome, run_jobs
from schemas import keys
from schemas.dsse import Envelope
from schemas.models import Cert, parse_payload


@contextlib.contextmanager
def uncompressed() -> Iterator[None]:
    """The baseline: seal() as before this change (no dictionary, nothing packed)."""
    saved = sealed_mod.DICTIONARIES
    sealed_mod.DICTIONARIES = {}  # type: ignore[misc]
    try:
        yield
    finally:
        sealed_mod.DICTIONARIES = saved  # type: ignore[misc]


async def _inline(ctx: Context, jobs: Sequence[Job]) -> AsyncIterator[list[Outcome]]:
    yield run_jobs(ctx, jobs, keep_documents=False)


def _best(fn: Callable[[], None], n: int, rounds: int) -> float:
    """Best microseconds per item of ``fn`` over ``n`` items."""
    out = []
    for _ in range(rounds):
        gc.collect()
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) / n * 1e6)
    return min(out)


def _line(label: str, plain: float, packed: float, unit: str) -> None:
    print(f"  {label:44s} {plain:9.2f} {packed:9.2f} {unit:3s} ratio {packed / plain:5.2f}")


async def _state(world: World, items: list[tuple[str, bytes, bytes]]) -> ReplicaState:
    rev = 1
    certs = []
    for env in world.certs.values():
        rev += 1
        c = parse_payload(env.payload_type, env.payload, Cert)
        kid = keys.kid(keys.b64url_decode(c.public_key))
        certs.append(Change("put", Keys.cert(kid), env.to_json(), rev))
    state = ReplicaState(anchors=world.anchors)
    await state.apply(certs, rev, check=_inline)
    changes = []
    for cpid, r, s in items:
        rev += 1
        changes.append(Change("put", Keys.rec(cpid), r, rev))
        rev += 1
        changes.append(Change("put", Keys.live(cpid), s, rev))
    for i in range(0, len(changes), 20_000):
        part = changes[i : i + 20_000]
        await state.apply(part, part[-1].revision, check=_inline, emit=False)
    return state


async def _traced(world: World, items: list[tuple[str, bytes, bytes]]) -> tuple[float, Any]:
    gc.collect()
    tracemalloc.start(1)
    base = tracemalloc.get_traced_memory()[0]
    state = await _state(world, items)
    gc.collect()
    used = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    return used / len(items), state


async def _snapshot(state: ReplicaState, world: World, n: int) -> tuple[float, float]:
    store = SnapshotStore(Path(tempfile.mkdtemp()), world.anchors)
    revision, chunks = await SnapshotStore.collect(state)
    size = store.write(revision, chunks)
    del chunks
    t0 = time.perf_counter()
    snap = store.read()
    fresh = ReplicaState(anchors=world.anchors)
    runner = TrustedRunner(snap, _inline)
    for batch in snap.batches():
        if isinstance(batch, Restored):
            again = fresh.restore(batch, snap.revision)
            if again:
                await fresh.apply(again, snap.revision, check=runner, emit=False)
        else:
            await fresh.apply(batch, snap.revision, check=runner, emit=False)
    assert len(fresh.served) == len(state.served)
    return size / n, time.perf_counter() - t0


def _plain(s: Sealed | None) -> Sealed | None:
    return None if s is None else Sealed(s.payload_type, s.keyid, s.blob[:64] + s.payload)


async def main(n: int, rounds: int) -> None:
    world = World(Path(tempfile.mkdtemp()))
    items: list[tuple[str, bytes, bytes]] = []
    for i in range(0, n, 2000):
        items += _gen((i, min(2000, n - i), world.signers))
    print(f"{n} bench records, each with a status; columns: uncompressed, compressed")

    print("size (mean payload bytes; no-dictionary DEFLATE for reference)")
    for name, idx in (("record.v1", 1), ("status.v1", 2)):
        envs = [Envelope.from_json(item[idx]) for item in items]
        raw = sum(len(e.payload) for e in envs) / n
        packed = [seal(e) for e in envs]
        assert all(type(s) is Packed for s in packed)
        small = sum(len(s.blob) - 64 for s in packed) / n
        nodict = sum(len(zlib.compress(e.payload, 9, -15)) for e in envs) / n
        print(f"  {name}: {raw:.0f} B -> {small:.0f} B (ratio {raw / small:.2f}); "
              f"without a dictionary {nodict:.0f} B")  # fmt: skip

        def seal_all(envs: list[Envelope] = envs) -> None:
            for e in envs:
                seal(e)

        with uncompressed():
            before = _best(seal_all, n, rounds)
        _line(f"seal one {name} (us)", before, _best(seal_all, n, rounds), "us")

    print("memory (tracemalloc after applying records + statuses, bytes per record)")
    with uncompressed():
        before_b, state_plain = await _traced(world, items)
    after_b, state = await _traced(world, items)
    _line("ReplicaState", before_b, after_b, "B")

    print("reads (first use per entry, microseconds)")
    packed_entries = list(state.served.values())
    plain_entries = [
        dataclasses.replace(e, sealed=_plain(e.sealed), status_sealed=_plain(e.status_sealed))
        for e in packed_entries
    ]

    def per_entry(fn: Callable[[Entry], object], entries: list[Entry]) -> float:
        def run() -> None:
            entry_mod._cached.clear()
            ranking._cache.clear()
            for e in [dataclasses.replace(e) for e in entries]:  # nothing cached
                fn(e)

        return _best(run, len(entries), rounds)

    reads: list[tuple[str, Callable[[Entry], object]]] = [
        ("GET body, rendered once per entry", lambda e: e.body()),
        ("discovery view (record + status parsed)", lambda e: e.view()),
        ("Entry.record (record parsed)", lambda e: e.record),
        ("ranking.entry_facts (score inputs)", ranking.entry_facts),
        ("Entry.envelope (rebuilt)", lambda e: e.envelope),
    ]
    for label, fn in reads:
        _line(label, per_entry(fn, plain_entries), per_entry(fn, packed_entries), "us")

    print("snapshot (bytes per record; read + restore seconds)")
    size_plain, t_plain = await _snapshot(state_plain, world, n)
    size, t = await _snapshot(state, world, n)
    _line("snapshot file", size_plain, size, "B")
    _line("read + restore", t_plain, t, "s")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=10_000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    asyncio.run(main(args.records, args.rounds))
