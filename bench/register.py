"""Registrations per second of one registry process, and etcd writes per heartbeat.

    python bench/register.py [--clients 32] [--per-round 600] [--rounds 3]
                             [--workers 1] [--nodes 1000] [--minutes 10]

Starts its own etcd (``cpi.etcdproc``) in a temporary directory.

**Registrations.** One registry runs as the real ``cpi registry serve`` in a
subprocess; ``--clients`` concurrent aiohttp clients in this process POST fresh
``register.v1`` envelopes (new node keys, signed before the clock starts) with an
unlimited join token.  The baseline is a plain etcd3aio loop with the same number of
concurrent writers sending the transactions a registration ends in: the same
compares (token ``mod_revision``, nonce absent, record absent) and the same puts (a
record signed by the same key, so the same size; the nonce on a lease; an audit
entry), one transaction per registration.  The baseline does none of the registry's
work around those writes: HTTP, the reads before the transaction (token, nonce,
record), signature checks, signing, the audit head.  Rounds alternate between the
two; medians are printed with their ratio.  Both share this machine's CPUs with etcd.
A third case in the same turns runs the registrar in this process
(:meth:`registry.registrar.Registrar.register`, what the HTTP handler calls: every
check, the signing, the group-committed transaction) with ``--clients`` concurrent
callers: the registry's own work without HTTP and without the client processes'
share of the CPUs.  The CPU time this process spends per operation in the baseline and
in-process rounds is printed too, and, for the HTTP rounds, the CPU of the ``cpi
registry serve`` process (from ``/proc``) and of this process's clients per
registration: on a shared machine the rates follow the CPU share each gets, the CPU
per operation does not.  So is etcd's CPU per operation (from ``/proc``), and the etcd
write transactions per operation: the store's revision moves by one per transaction
that writes, so this shows how many registrations the group commit puts into one.
``--workers N`` runs ``cpi registry serve --workers N`` (its CPU is summed over the
worker processes).

**Heartbeats.** ``--nodes`` nodes with records in etcd heartbeat every 10 s for
``--minutes`` simulated minutes against :class:`registry.liveness.Liveness` (its
real etcd writes; a simulated clock so refreshes after ``live_refresh_s`` = 240 s
happen as they would); each heartbeat changes the node's free accelerators with
probability ``--change`` (default 2 %).  Printed: live keys written and etcd
transactions per heartbeat.  ``bench/heartbeat.py`` measures heartbeat throughput
against the raw Ed25519 verify rate.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aiohttp
import etcd3aio  # noqa: F401  (makes etcd's generated ``etcd.api`` modules importable)
from aiohttp import web
from etcd.api.etcdserverpb.rpc_pb2 import Compare, PutRequest, RequestOp
from etcd3aio import Etcd3Client

from bench._common import proc_cpu, publish_namespace, registry_config
from cpi.etcdproc import EtcdProcess, free_port
from registry import ca, tokens
from registry.config import load_config
from registry.index import Index, Keys, Op
from registry.liveness import Liveness
from registry.registrar import Registrar
from registry.service import STATE, create_app
from schemas import cpid, keys
from schemas.models import (
    Accelerator,
    Attributes,
    Capacity,
    CpuInfo,
    Endpoint,
    Location,
    Record,
    Register,
    Status,
)

NAMESPACE = "CN.31"
ATTRS = Attributes(
    cpu=CpuInfo(model="Intel Xeon Platinum 8480+", cores=112),
    memory_gib=2048.0,
    accelerators=[Accelerator(vendor="NVIDIA", model="H800", memory_gib=80.0, count=8)],
    network_gbps=400.0,
)
ENDPOINTS = [Endpoint(proto="https", host="10.31.0.7", port=8443, purpose="inference")]
LOCATION = Location(region="31", site="LG01")


def register_body(node: keys.Ed25519PrivateKey) -> bytes:
    doc = Register(
        namespace=NAMESPACE,
        kind="GPU",
        public_key=keys.public_to_b64url(node),
        nonce=secrets.token_urlsafe(16),
        timestamp=int(time.time()),
        endpoints=ENDPOINTS,
        location=LOCATION,
        attributes=ATTRS,
        labels={"tier": "bench"},
    )
    return ca.sign_document(doc, node).to_json()


def record_env(node: keys.Ed25519PrivateKey, registry_key: keys.Ed25519PrivateKey) -> bytes:
    now = int(time.time())
    rec = Record(
        cpid=cpid.derive(NAMESPACE, "GPU", keys.public_raw(node)).to_text(),
        kind="GPU",
        public_key=keys.public_to_b64url(node),
        issuer=NAMESPACE,
        version=1,
        issued_at=now,
        expires_at=now + 30 * 86400,
        endpoints=ENDPOINTS,
        location=LOCATION,
        attributes=ATTRS,
        labels={"tier": "bench"},
    )
    return ca.sign_document(rec, registry_key).to_json()


# -- the registry side --------------------------------------------------------------------


async def registry_round(url: str, token: str, bodies: list[bytes], clients: int) -> float:
    statuses: Counter[int] = Counter()
    todo = iter(bodies)
    headers = {"Authorization": f"Bearer {token}"}
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            for body in todo:
                async with session.post(
                    f"{url}/v1/registrations", data=body, headers=headers
                ) as resp:
                    await resp.read()
                    statuses[resp.status] += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        elapsed = time.perf_counter() - t0
    if statuses != {201: len(bodies)}:
        raise SystemExit(f"registry answered {dict(statuses)}, expected {len(bodies)} x 201")
    return len(bodies) / elapsed


async def registrar_round(
    registrar: Registrar, token: str, bodies: list[bytes], clients: int
) -> float:
    todo = iter(bodies)

    async def worker() -> None:
        for body in todo:
            await registrar.register(body, token)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    return len(bodies) / (time.perf_counter() - t0)


# -- the baseline ---------------------------------------------------------------------------


def _put(key: str, value: bytes, lease: int = 0) -> RequestOp:
    return RequestOp(request_put=PutRequest(key=key.encode(), value=value, lease=lease))


def _cmp(key: str, target: int, value: int) -> Compare:
    cmp = Compare(result=Compare.EQUAL, target=target, key=key.encode())
    if target == Compare.MOD:
        cmp.mod_revision = value
    else:
        cmp.create_revision = value
    return cmp


async def baseline_round(
    client: Etcd3Client,
    docs: list[tuple[str, bytes, str]],
    token_key: str,
    token_rev: int,
    lease: int,
    seq0: int,
    clients: int,
) -> float:
    assert client.kv is not None
    kv = client.kv
    todo = iter(enumerate(docs))

    async def worker() -> None:
        for i, (cpid_text, rec, nonce_key) in todo:
            audit = json.dumps(
                {
                    "seq": seq0 + i,
                    "op": "register",
                    "cpid": cpid_text,
                    "digest": "0" * 64,
                    "time": int(time.time()),
                }
            ).encode()
            resp = await kv.txn(
                [
                    _cmp(token_key, Compare.MOD, token_rev),
                    _cmp(nonce_key, Compare.CREATE, 0),
                    _cmp(Keys.rec(cpid_text), Compare.MOD, 0),
                ],
                [
                    _put(Keys.rec(cpid_text), rec),
                    _put(nonce_key, b"1700000000", lease),
                    _put(Keys.audit(seq0 + i), audit),
                ],
                timeout=10,
            )
            if not resp.succeeded:
                raise SystemExit(f"baseline transaction for {cpid_text} failed")

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    return len(docs) / (time.perf_counter() - t0)


# -- heartbeats -----------------------------------------------------------------------------


class SimClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


async def heartbeats(endpoint: str, nodes: int, minutes: float, change: float) -> None:
    rng = random.Random(7)
    clock = SimClock()
    async with Index(endpoints=[endpoint], timeout=10) as index:
        keyset = [keys.generate() for _ in range(nodes)]
        cpids = [cpid.derive("CN.31.CUCC", "GPU", keys.public_raw(k)).to_text() for k in keyset]
        for i in range(0, nodes, 100):
            await index.txn(success=[Op.put(Keys.rec(c), b"{}") for c in cpids[i : i + 100]])
        liveness = Liveness(index, heartbeat_s=10, live_refresh_s=240, lease_ttl_s=60, clock=clock)
        await liveness.start(sweep=False)
        free = [rng.randint(0, 8) for _ in range(nodes)]
        seq = [0] * nodes
        rounds = max(1, int(minutes * 60 / 10))  # at least one interval: a ratio needs heartbeats
        wall = 0.0
        try:
            for _ in range(rounds):
                work = []
                for i in range(nodes):
                    if rng.random() < change:
                        free[i] = (free[i] + rng.choice((-1, 1))) % 9
                    seq[i] += 1
                    st = Status(
                        cpid=cpids[i],
                        seq=seq[i],
                        observed_at=int(time.time() * 1000),
                        state="up",
                        capacity=Capacity(accelerators_free=free[i]),
                        metrics={"gpu_util": rng.random()},
                    )
                    env = ca.sign_document(st, keyset[i])
                    node = liveness.get(cpids[i]) or liveness.track(
                        cpids[i], group="CN.31.CUCC", public_key=keys.public_to_b64url(keyset[i])
                    )
                    work.append((node, st, env))
                t0 = time.perf_counter()
                for chunk in range(0, nodes, 100):
                    await asyncio.gather(
                        *(liveness.heartbeat(n, s, e) for n, s, e in work[chunk : chunk + 100])
                    )
                await liveness.sweep()
                wall += time.perf_counter() - t0
                clock.t += 10
        finally:
            await liveness.stop()
        c = liveness.counters
        print(
            f"\nheartbeats: {nodes} nodes x {rounds} intervals of 10 s "
            f"({minutes:g} simulated minutes), capacity change p={change:g} per heartbeat"
        )
        print(f"  heartbeats           {c.heartbeats}")
        print(
            f"  etcd writes          {c.writes}  "
            + ", ".join(f"{k} {v}" for k, v in sorted(c.by_reason.items()))
        )
        print(f"  writes per heartbeat {c.writes / c.heartbeats:.3f}  (live keys)")
        print(
            f"  etcd txns            {c.txns}  ({c.txns / c.heartbeats:.4f} per heartbeat; "
            "live writes due together share one, see registry/liveness.py)"
        )
        print(
            f"  liveness throughput  {c.heartbeats / wall:,.0f} heartbeats/s (incl. its etcd writes)"
        )


# -- main -----------------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="cpi-bench-") as tmp_name:
        tmp = Path(tmp_name)
        etcd = EtcdProcess(data_dir=tmp / "etcd")
        etcd.start()
        proc: subprocess.Popen[bytes] | None = None
        try:
            etcd.wait_healthy(30)
            root = keys.generate()
            (tmp / "anchor.json").write_bytes(ca.make_anchor("CN", root).to_json())
            async with Index(endpoints=[etcd.endpoint]) as index:
                regkey = await publish_namespace(
                    index, tmp, root=root, namespace=NAMESPACE, key_file="cn31.key"
                )
                token = await tokens.create_token(index, namespace=NAMESPACE, ttl_s=3600)
                token_kv = await index.get(Keys.token(tokens.hash_token(token)))
                assert token_kv is not None
                lease = await index.grant_lease(600, revoke_on_exit=False)
            port = free_port()
            config = registry_config(
                port=port, etcd=etcd.endpoint, namespace=NAMESPACE, key_file="cn31.key"
            )
            (tmp / "registry.json").write_text(json.dumps(config))
            proc = start_registry(tmp, args.workers)
            url = f"http://127.0.0.1:{port}"
            await wait_ready(url, proc, tmp / "registry.log")

            inproc = create_app(
                load_config(
                    data={
                        **config,
                        "port": 1,
                        "instance_id": "bench-inproc",
                        "namespaces": [{"namespace": NAMESPACE, "key_file": str(tmp / "cn31.key")}],
                        "anchor_file": str(tmp / "anchor.json"),
                    },
                    env={},
                )
            )
            runner = web.AppRunner(inproc)
            await runner.setup()
            registrar = inproc[STATE].registrar
            client = Etcd3Client([etcd.endpoint])
            await client.connect()
            revs = Index(endpoints=[etcd.endpoint])
            await revs.connect()
            print(
                f"registrations: {args.clients} concurrent clients, {args.per_round} per round, "
                f"{args.rounds} rounds each, interleaved (registry: `cpi registry serve "
                f"--workers {args.workers}` subprocess)"
            )
            rates: dict[str, list[float]] = {"registry": [], "etcd3aio": [], "registrar": []}
            cpu: dict[str, list[float]] = {
                "etcd3aio": [],
                "registrar": [],
                "registry": [],
                "clients": [],
            }
            # etcd write transactions per operation: each one that succeeds moves the
            # store's revision by one (failed compares write nothing; lease grants and
            # the rare liveness write are counted too, so this is an upper bound)
            txns: dict[str, list[float]] = {"registry": [], "etcd3aio": [], "registrar": []}
            etcd_cpu: dict[str, list[float]] = {"registry": [], "etcd3aio": [], "registrar": []}
            assert etcd.pid is not None
            etcd_pid = etcd.pid
            seq0 = 10**12
            # warm-up (connections, imports, caches), not timed
            await registry_round(url, token, [register_body(keys.generate()) for _ in range(50)], 8)
            for r in range(args.rounds):
                bodies = [register_body(keys.generate()) for _ in range(args.per_round)]
                c0, s0, r0 = time.process_time(), proc_cpu(proc.pid), await revs.revision()
                e0 = proc_cpu(etcd_pid)
                rates["registry"].append(await registry_round(url, token, bodies, args.clients))
                cpu["registry"].append((proc_cpu(proc.pid) - s0) / args.per_round)
                etcd_cpu["registry"].append((proc_cpu(etcd_pid) - e0) / args.per_round)
                txns["registry"].append((await revs.revision() - r0) / args.per_round)
                cpu["clients"].append((time.process_time() - c0) / args.per_round)
                docs = []
                for _ in range(args.per_round):
                    node = keys.generate()
                    c = cpid.derive(NAMESPACE, "GPU", keys.public_raw(node)).to_text()
                    nonce_key = Keys.nonce(keys.kid_of(node), secrets.token_urlsafe(16))
                    docs.append((c, record_env(node, regkey), nonce_key))
                c0, r0 = time.process_time(), await revs.revision()
                e0 = proc_cpu(etcd_pid)
                rates["etcd3aio"].append(
                    await baseline_round(
                        client,
                        docs,
                        Keys.token(tokens.hash_token(token)),
                        token_kv.mod_revision,
                        lease.id,
                        seq0 + r * args.per_round,
                        args.clients,
                    )
                )
                cpu["etcd3aio"].append((time.process_time() - c0) / args.per_round)
                etcd_cpu["etcd3aio"].append((proc_cpu(etcd_pid) - e0) / args.per_round)
                txns["etcd3aio"].append((await revs.revision() - r0) / args.per_round)
                bodies = [register_body(keys.generate()) for _ in range(args.per_round)]
                c0, r0 = time.process_time(), await revs.revision()
                e0 = proc_cpu(etcd_pid)
                rates["registrar"].append(
                    await registrar_round(registrar, token, bodies, args.clients)
                )
                cpu["registrar"].append((time.process_time() - c0) / args.per_round)
                etcd_cpu["registrar"].append((proc_cpu(etcd_pid) - e0) / args.per_round)
                txns["registrar"].append((await revs.revision() - r0) / args.per_round)
                print(
                    f"  round {r + 1}: registry {rates['registry'][-1]:7.0f}/s   "
                    f"etcd3aio txn loop {rates['etcd3aio'][-1]:7.0f}/s   "
                    f"registrar in-process {rates['registrar'][-1]:7.0f}/s"
                )
            await client.close()
            await revs.close()
            await runner.cleanup()
            reg = statistics.median(rates["registry"])
            base = statistics.median(rates["etcd3aio"])
            inp = statistics.median(rates["registrar"])
            print(
                f"  median: registry {reg:.0f} registrations/s, etcd3aio loop {base:.0f} txn/s, "
                f"registrar in-process {inp:.0f} registrations/s"
            )
            print(f"  ratio registry (HTTP, own process) / plain etcd3aio loop: {reg / base:.2f}")
            print(f"  ratio registrar in-process / plain etcd3aio loop: {inp / base:.2f}")
            print(
                "  CPU of this process per operation (median; etcd's own CPU not included): "
                f"registrar {statistics.median(cpu['registrar']) * 1e6:.0f} us per "
                f"registration, etcd3aio loop {statistics.median(cpu['etcd3aio']) * 1e6:.0f} "
                "us per transaction"
            )
            print(
                "  etcd write transactions per operation (median; the store's revision moves "
                "by one per transaction): "
                + ", ".join(
                    f"{name} {statistics.median(v):.3f} (~{1 / statistics.median(v):.1f} per txn)"
                    for name, v in txns.items()
                )
            )
            print(
                "  etcd's CPU per operation (median): "
                + ", ".join(
                    f"{name} {statistics.median(v) * 1e6:.0f} us" for name, v in etcd_cpu.items()
                )
            )
            print(
                "  CPU per registration over HTTP (median): the `cpi registry serve` process "
                f"{statistics.median(cpu['registry']) * 1e6:.0f} us, the bench's aiohttp "
                f"clients {statistics.median(cpu['clients']) * 1e6:.0f} us"
            )

            await heartbeats(etcd.endpoint, args.nodes, args.minutes, args.change)
        finally:
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            etcd.stop()


def start_registry(tmp: Path, workers: int) -> subprocess.Popen[bytes]:
    """``cpi registry serve --config tmp/registry.json --workers N``, logging to
    tmp/registry.log."""
    with open(tmp / "registry.log", "wb") as log:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "cpi",
                "registry",
                "serve",
                "--config",
                str(tmp / "registry.json"),
                "--insecure",  # plain HTTP on loopback: the bench measures the registry, not TLS
                "--workers",
                str(workers),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
        )


def _read(path: Path) -> str:
    return path.read_text()


async def wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise SystemExit(f"registry exited:\n{_read(log)}")
            try:
                async with session.get(f"{url}/readyz") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise SystemExit(f"registry not ready after 30 s:\n{_read(log)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--per-round", type=int, default=600)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workers", type=int, default=1, help="cpi registry serve --workers N")
    p.add_argument("--nodes", type=int, default=1000)
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--change", type=float, default=0.02)
    args = p.parse_args()
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
