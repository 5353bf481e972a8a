"""Heartbeats one registry process verifies and absorbs per second, against the raw
Ed25519 verify rate of this machine measured in the same run.

    python bench/heartbeat.py [--nodes 5000] [--rounds 6] [--change 0.02] [--concurrency 1000]

Starts its own etcd (``cpi.etcdproc``) and the registry app in this process (the real
:func:`registry.service.create_app` start-up: signers, revocations, instance lease,
liveness), registers ``--nodes`` nodes, then runs rounds.  Each round is one heartbeat
interval: every node sends a fresh ``status.v1`` (signed before the clock starts, the
node's free accelerators changed with probability ``--change``) to
:meth:`registry.registrar.Registrar.status`, the method ``PUT /v1/resources/{cpid}/status``
calls: parse the envelope, find the node, check the signing registry and revocations,
verify the node's signature, check the CPID, ``observed_at`` and ``seq`` (memory, and the
index on first contact), write ``/live/`` + ``/seq/`` when the status changed (group
committed).  Up to ``--concurrency`` statuses are in flight at once, as concurrent
HTTP requests would be.  The HTTP layer itself is not in the figure (aiohttp's
per-request cost is the same for every route; ``bench/resolve.py`` measures it).

The baseline, in turns with the registry rounds: ``Ed25519PublicKey.verify`` over
the same envelopes' pre-encoded signing input (DSSE PAE) with pre-loaded keys, in a
plain loop: the raw verify rate of one core.  Printed: both rates per round, medians,
their ratio (target >= 0.5), and etcd transactions and live keys written per heartbeat
(target <= 0.1).  Round 1 is every node's first contact (a read of ``/seq/`` and a
write each) and is printed but left out of the medians.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aiohttp import web

from bench._common import publish_namespace
from cpi.etcdproc import EtcdProcess
from registry import ca, tokens
from registry.config import load_config
from registry.index import Index
from registry.registrar import Registrar
from registry.service import STATE, create_app
from schemas import cpid, dsse, keys
from schemas.dsse import Envelope
from schemas.models import Capacity, Location, Register, Status

NAMESPACE = "CN.31"


class Node:
    def __init__(self, namespace: str = NAMESPACE) -> None:
        self.namespace = namespace
        self.key = keys.generate()
        self.public_key = keys.public_to_b64url(self.key)
        self.cpid = cpid.derive(namespace, "GPU", keys.public_raw(self.key)).to_text()
        self.seq = 0
        self.free = random.randint(0, 8)

    def register(self) -> bytes:
        doc = Register(
            namespace=self.namespace,
            kind="GPU",
            public_key=self.public_key,
            nonce=secrets.token_urlsafe(16),
            timestamp=int(time.time()),
            location=Location(region="31", site="LG01"),
            labels={"tier": "bench"},
        )
        return ca.sign_document(doc, self.key).to_json()

    def status(self, change: float) -> bytes:
        if random.random() < change:
            self.free = (self.free + random.choice((-1, 1))) % 9
        self.seq += 1
        doc = Status(
            cpid=self.cpid,
            seq=self.seq,
            observed_at=int(time.time() * 1000),
            state="up",
            capacity=Capacity(accelerators_free=self.free),
            metrics={"gpu_util": round(random.random(), 3)},
        )
        return ca.sign_document(doc, self.key).to_json()


def raw_verify_rate(nodes: list[Node], bodies: list[bytes]) -> float:
    """Plain ``verify`` calls over the envelopes' signing input, keys pre-loaded."""
    work = []
    for node, body in zip(nodes, bodies, strict=True):
        env = Envelope.from_json(body)
        pub = keys.public_from_b64url(node.public_key)
        work.append((pub, env.signatures[0].sig, dsse.pae(env.payload_type, env.payload)))
    t0 = time.perf_counter()
    for pub, sig, msg in work:
        pub.verify(sig, msg)
    return len(work) / (time.perf_counter() - t0)


async def registry_round(
    registrar: Registrar, nodes: list[Node], bodies: list[bytes], concurrency: int
) -> float:
    sem = asyncio.Semaphore(concurrency)

    async def one(node: Node, body: bytes) -> None:
        async with sem:
            await registrar.status(node.cpid, body)

    t0 = time.perf_counter()
    await asyncio.gather(*(one(n, b) for n, b in zip(nodes, bodies, strict=True)))
    return len(nodes) / (time.perf_counter() - t0)


async def run(args: argparse.Namespace) -> None:
    random.seed(7)
    with tempfile.TemporaryDirectory(prefix="cpi-bench-hb-") as tmp_name:
        tmp = Path(tmp_name)
        etcd = EtcdProcess(data_dir=tmp / "etcd")
        etcd.start()
        runner: web.AppRunner | None = None
        try:
            etcd.wait_healthy(30)
            root = keys.generate()
            (tmp / "anchor.json").write_bytes(ca.make_anchor("CN", root).to_json())
            async with Index(endpoints=[etcd.endpoint]) as index:
                await publish_namespace(
                    index, tmp, root=root, namespace=NAMESPACE, key_file="cn31.key"
                )
                token = await tokens.create_token(index, namespace=NAMESPACE, ttl_s=3600)
            config = load_config(
                data={
                    "host": "127.0.0.1",
                    "port": 1,
                    "instance_id": "bench",
                    "etcd": {"endpoints": [etcd.endpoint], "timeout_s": 30},
                    "namespaces": [{"namespace": NAMESPACE, "key_file": str(tmp / "cn31.key")}],
                    "anchor_file": str(tmp / "anchor.json"),
                    "heartbeat_s": 10,
                    "live_refresh_s": 240,
                },
                env={},
            )
            app = create_app(config)
            runner = web.AppRunner(app)
            await runner.setup()  # the registry's start-up (cleanup_ctx)
            registrar = app[STATE].registrar
            liveness = app[STATE].liveness

            t0 = time.perf_counter()
            nodes = [Node() for _ in range(args.nodes)]
            sem = asyncio.Semaphore(200)

            async def register(node: Node) -> None:
                async with sem:
                    await registrar.register(node.register(), token)

            await asyncio.gather(*(register(n) for n in nodes))
            print(
                f"set-up: etcd, registry app, {args.nodes} nodes registered in "
                f"{time.perf_counter() - t0:.1f} s"
            )
            print(
                f"heartbeats: {args.nodes} nodes x {args.rounds} rounds, capacity change "
                f"p={args.change:g}, {args.concurrency} in flight; raw verify in turns"
            )
            reg_rates: list[float] = []
            raw_rates: list[float] = []
            steady_hb = steady_writes = steady_txns = 0
            for r in range(args.rounds):
                bodies = [n.status(args.change) for n in nodes]
                raw = raw_verify_rate(nodes, bodies)
                c0 = (liveness.counters.heartbeats, liveness.counters.writes)
                txns0 = liveness.counters.txns
                rate = await registry_round(registrar, nodes, bodies, args.concurrency)
                hb = liveness.counters.heartbeats - c0[0]
                writes = liveness.counters.writes - c0[1]
                txns = liveness.counters.txns - txns0
                first = " (first contact: not in the medians)" if r == 0 else ""
                print(
                    f"  round {r + 1}: registry {rate:7.0f} heartbeats/s   raw verify "
                    f"{raw:7.0f}/s   ratio {rate / raw:.2f}   live keys written {writes}, "
                    f"etcd txns {txns}{first}"
                )
                if r > 0:
                    reg_rates.append(rate)
                    raw_rates.append(raw)
                    steady_hb += hb
                    steady_writes += writes
                    steady_txns += txns
            reg, raw = statistics.median(reg_rates), statistics.median(raw_rates)
            print(f"  median: registry {reg:.0f} heartbeats/s, raw Ed25519 verify {raw:.0f}/s")
            print(f"  ratio registry / raw verify: {reg / raw:.2f}   (target >= 0.5)")
            print(
                f"  etcd txns per heartbeat: {steady_txns / steady_hb:.4f}   live keys written "
                f"per heartbeat: {steady_writes / steady_hb:.4f}   (target <= 0.1; "
                f"rounds 2-{args.rounds})"
            )
            c = liveness.counters
            print(
                f"  whole run incl. first contact: {c.heartbeats} heartbeats, {c.txns} etcd "
                f"txns ({c.txns / c.heartbeats:.4f} per heartbeat), {c.writes} live keys "
                f"written ({c.writes / c.heartbeats:.4f} per heartbeat)"
            )
        finally:
            if runner is not None:
                await runner.cleanup()
            etcd.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, default=5000)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--change", type=float, default=0.02)
    p.add_argument("--concurrency", type=int, default=1000)
    args = p.parse_args()
    if args.rounds < 2:
        p.error("--rounds must be at least 2 (round 1 is first contact)")
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
