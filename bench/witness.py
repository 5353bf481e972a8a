"""Witness cost: one add-checkpoint (verify, prove, cosign, durable state) vs its parts.

    python bench/witness.py [--rounds 300] [--leaves 100000]

In one run, on one machine:

1. baseline: the cryptography a cosignature needs at least, one Ed25519 verification
   (the log's signature) plus one Ed25519 signature (the cosignature), per round;
2. the witness's logic (:meth:`resolver.audit.witness.Witness.add_checkpoint`, no HTTP):
   parse, verify the log's note, check the RFC 9162 consistency proof from the size it
   holds, cosign, and write its state (temporary file, fsync, rename, fsync of the
   directory), for a log that grows by a few leaves every round;
3. the durable state write alone (what fsync costs on this disk);
4. the same over HTTP to the witness app on loopback (aiohttp client and server in one
   process).

Prints the time per checkpoint of each and the ratios to the baseline.  The fsync cost
depends on the disk; the state directory is a temporary directory on the default
filesystem.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aiohttp
from aiohttp import web

from resolver.audit.witness import Witness, WitnessState, create_witness_app
from schemas import keys
from schemas.checkpoint import Checkpoint, NoteVerifier, sign_checkpoint
from schemas.cosignature import format_add_checkpoint
from schemas.merkle import MerkleTree

ORIGIN = "bench.cpi/log"


def requests(rounds: int, leaves: int) -> tuple[NoteVerifier, list[bytes]]:
    """Add-checkpoint bodies for a log of ``leaves`` growing by 1-5 leaves per round."""
    key = keys.generate()
    tree = MerkleTree.from_leaves(b"%d" % i for i in range(leaves))
    out = [format_add_checkpoint(0, [], sign_checkpoint(Checkpoint.create(
        origin=ORIGIN, size=tree.size, root_hash=tree.root()), key))]  # fmt: skip
    for r in range(rounds):
        old = tree.size
        for i in range(1 + r % 5):
            tree.append(b"x%d-%d" % (r, i))
        cp = Checkpoint.create(origin=ORIGIN, size=tree.size, root_hash=tree.root())
        out.append(
            format_add_checkpoint(old, tree.consistency_proof(old), sign_checkpoint(cp, key))
        )
    return NoteVerifier.from_public_key(ORIGIN, key), out


def baseline(rounds: int) -> float:
    key = keys.generate()
    other = keys.generate()
    pub = key.public_key()
    msg = b"bench.cpi/log\n100000\n" + b"A" * 44 + b"\n"
    sig = key.sign(msg)
    t0 = time.perf_counter()
    for _ in range(rounds):
        keys.verify_raw(pub, sig, msg)
        other.sign(msg)
    return (time.perf_counter() - t0) / rounds


async def direct(verifier: NoteVerifier, bodies: list[bytes], tmp: Path) -> float:
    w = Witness("bench/w", keys.generate(), {ORIGIN: [verifier]}, WitnessState(tmp / "d"))
    assert (await w.add_checkpoint(bodies[0])).status == 200
    t0 = time.perf_counter()
    for body in bodies[1:]:
        answer = await w.add_checkpoint(body)
        assert answer.status == 200, answer.body
    dt = (time.perf_counter() - t0) / (len(bodies) - 1)
    w.state.close()
    return dt


def state_writes(rounds: int, tmp: Path) -> float:
    from resolver.audit.witness import LogState

    st = WitnessState(tmp / "s")
    note = b"x" * 400
    t0 = time.perf_counter()
    for i in range(rounds):
        st.put(LogState(ORIGIN, i, b"\0" * 32, note))
    dt = (time.perf_counter() - t0) / rounds
    st.close()
    return dt


async def over_http(verifier: NoteVerifier, bodies: list[bytes], tmp: Path) -> float:
    w = Witness("bench/w", keys.generate(), {ORIGIN: [verifier]}, WitnessState(tmp / "h"))
    runner = web.AppRunner(create_witness_app(w), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    url = f"http://127.0.0.1:{port}/add-checkpoint"
    try:
        async with aiohttp.ClientSession() as http:
            async with http.post(url, data=bodies[0]) as resp:
                assert resp.status == 200
            t0 = time.perf_counter()
            for body in bodies[1:]:
                async with http.post(url, data=body) as resp:
                    assert resp.status == 200, await resp.text()
                    await resp.read()
            return (time.perf_counter() - t0) / (len(bodies) - 1)
    finally:
        await runner.cleanup()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=300)
    ap.add_argument("--leaves", type=int, default=100_000)
    args = ap.parse_args()
    verifier, bodies = requests(args.rounds, args.leaves)
    base = baseline(args.rounds)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        logic = asyncio.run(direct(verifier, bodies, tmp))
        http = asyncio.run(over_http(verifier, bodies, tmp))
        writes = state_writes(args.rounds, tmp)
    print(f"{args.rounds} checkpoints of a log of {args.leaves:,}+ leaves, 1-5 new per round")
    print(f"baseline  Ed25519 verify + sign     {base * 1e6:9.0f} µs   1.00")
    print(f"witness   add_checkpoint (no HTTP)  {logic * 1e6:9.0f} µs  {logic / base:5.2f}")
    print(f"  of which the durable state write  {writes * 1e6:9.0f} µs  {writes / base:5.2f}")
    print(f"witness   POST /add-checkpoint      {http * 1e6:9.0f} µs  {http / base:5.2f}")
    print(f"          {1 / http:,.0f} checkpoints/s over HTTP, one client")


if __name__ == "__main__":
    main()
