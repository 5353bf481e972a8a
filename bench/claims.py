"""Successful claims per second, with and without contention, against a plain etcd3aio loop;
gang claims per second next to single claims per second in the same run.

    python bench/claims.py [--clients 32] [--per-round 2000] [--rounds 3] [--resources 256]
                           [--gang-parts 8]

Starts its own etcd (``cpi.etcdproc``) in a temporary directory, writes signed records
and statuses for ``--resources`` GPU nodes (plus one big pool), starts a
:class:`~resolver.core.Resolver` on it and a :class:`~resolver.claims.service.ClaimService`
(reconciler off: it is not on the claim path) in this process.

Two scenarios, each ``--clients`` concurrent clients making ``--per-round`` claims of
one unit (TTL 600 s) per round, one holder per client:

* **contention**: every claim is on one resource with plenty of free units, so every
  claim compares and writes the same ``/alloc/`` key;
* **no contention**: claims spread round-robin over ``--resources`` resources.

The baseline is a plain etcd3aio loop with the same number of concurrent writers,
doing the same writes per claim: grant a lease, then one transaction comparing the
``mod_revision`` of ``/alloc/<cpid>`` and of the holder key, putting both new totals
and the claim key on the lease; on a failed compare it re-reads from the
transaction's failure branch and tries again (unbounded).  It does none of the
service's work around those writes: reading and verifying the live status, the
capacity and quota checks, the per-resource lock.  Service and baseline take turns
within each round; medians are printed with their ratios.  Everything shares this
machine's CPUs with etcd.

A third scenario, **gangs under contention**, runs gang claims and single claims *at
the same time* on the same ``--gang-parts`` resources (their own accelerator model, so
discovery ranks them for the gang's query whatever their free units): half the clients
make gang claims of one unit on each of those resources (``--gang-parts`` parts, one
transaction each), the other half one-unit claims round-robin over them, ``--per-round``
single claims and ``--per-round / --gang-parts`` gangs per round.  Each kind's rate is
its successful claims over the time its clients took; the ratio gang/single says what
an all-or-nothing claim over N resources costs against a claim on one, under the same
load.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import etcd3aio  # noqa: F401  (makes etcd's generated ``etcd.api`` modules importable)
from etcd.api.etcdserverpb.rpc_pb2 import Compare, PutRequest, RangeRequest, RequestOp
from etcd3aio import Etcd3Client

from cpi.etcdproc import EtcdProcess
from registry import ca
from registry.index import Index, Keys, Op
from resolver.claims.gang import GangSpec
from resolver.claims.service import ClaimService, ClaimsSettings, new_claim_id
from resolver.core import Resolver, ResolverSettings
from resolver.discovery import Query
from resolver.replica import SyncSettings
from schemas import cpid as cpid_mod
from schemas import keys
from schemas.chain import TrustAnchors
from schemas.errors import CPIError
from schemas.models import (
    Accelerator,
    Attributes,
    Capacity,
    CpuInfo,
    Location,
    Record,
    Status,
)

NAMESPACE = "CN.31"
TTL = 600
POOL_UNITS = 1_000_000
GANG_MODEL = "B200"


# -- the index ------------------------------------------------------------------------------


def record(node: keys.Ed25519PrivateKey, units: int, model: str = "H800") -> tuple[str, Record]:
    c = cpid_mod.derive(NAMESPACE, "GPU", keys.public_raw(node)).to_text()
    now = int(time.time())
    rec = Record(
        cpid=c,
        kind="GPU",
        public_key=keys.public_to_b64url(node),
        issuer=NAMESPACE,
        version=1,
        issued_at=now - 10,
        expires_at=now + 86_400,
        location=Location(region="31", site="LG01"),
        attributes=Attributes(
            cpu=CpuInfo(model="Xeon", cores=112),
            accelerators=[Accelerator(vendor="NVIDIA", model=model, memory_gib=80.0, count=units)],
        ),
    )
    return c, rec


def status(node: keys.Ed25519PrivateKey, c: str, free: int) -> bytes:
    st = Status(
        cpid=c,
        seq=1,
        observed_at=int(time.time() * 1000),
        state="up",
        capacity=Capacity(accelerators_free=free, cpu_free=112),
    )
    return ca.sign_document(st, node).to_json()


async def populate(
    index: Index, resources: int, gang_parts: int
) -> tuple[TrustAnchors, str, list[str], list[str]]:
    """Root, ``CN.31`` (issue), a pool of POOL_UNITS units, ``resources`` nodes and
    ``gang_parts`` nodes of GANG_MODEL (10,000 units each)."""
    root, ns_key = keys.generate(), keys.generate()
    cert = ca.issue_cert(
        issuer_key=root, issuer_subject="CN", subject=NAMESPACE, public_key=ns_key,
        scopes=["issue"],
    )  # fmt: skip
    await index.put(Keys.cert(keys.kid_of(ns_key)), cert.to_json())
    ops: list[Op] = []
    cpids: list[str] = []
    for i in range(resources + 1 + gang_parts):
        node = keys.generate()
        units = POOL_UNITS if i == 0 else 10_000
        c, rec = record(node, units, GANG_MODEL if i > resources else "H800")
        cpids.append(c)
        ops.append(Op.put(Keys.rec(c), ca.sign_document(rec, ns_key).to_json()))
        ops.append(Op.put(Keys.live(c), status(node, c, units)))
        if len(ops) >= 100:
            await index.txn(success=ops)
            ops = []
    if ops:
        await index.txn(success=ops)
    anchors = TrustAnchors([ca.make_anchor("CN", root)])
    return anchors, cpids[0], cpids[1 : resources + 1], cpids[resources + 1 :]


# -- the two contenders ---------------------------------------------------------------------


async def service_round(claims: ClaimService, targets: list[str], clients: int, tag: str) -> float:
    todo = iter(enumerate(targets))

    async def worker(w: int) -> None:
        for _, c in todo:
            await claims.claim(c, units=1, ttl_s=TTL, holder=f"svc-{tag}-{w}")

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(clients)))
    return len(targets) / (time.perf_counter() - t0)


async def mixed_round(
    claims: ClaimService, gang_cpids: list[str], singles: int, clients: int, tag: str
) -> tuple[float, float, int, int]:
    """Gang claims and single claims at once on ``gang_cpids``: ``(gangs/s, singles/s,
    gangs refused, singles refused)``."""
    parts = len(gang_cpids)
    spec = GangSpec(units=parts, per_min=1, per_max=1)
    query = Query(kind="GPU", accelerator=GANG_MODEL, limit=parts)
    gangs = singles // parts
    gang_todo = iter(range(gangs))
    single_todo = iter(range(singles))
    done = {"gang": 0, "single": 0}
    failed = {"gang": 0, "single": 0}
    took = {"gang": 0.0, "single": 0.0}
    t0 = time.perf_counter()

    async def gang_worker(w: int) -> None:
        for _ in gang_todo:
            try:
                await claims.claim_gang(query, spec=spec, ttl_s=TTL, holder=f"gang-{tag}-{w}")
                done["gang"] += 1
            except CPIError:
                failed["gang"] += 1
        took["gang"] = max(took["gang"], time.perf_counter() - t0)

    async def single_worker(w: int) -> None:
        for i in single_todo:
            try:
                c = gang_cpids[i % parts]
                await claims.claim(c, units=1, ttl_s=TTL, holder=f"one-{tag}-{w}")
                done["single"] += 1
            except CPIError:
                failed["single"] += 1
        took["single"] = max(took["single"], time.perf_counter() - t0)

    half = max(1, clients // 2)
    await asyncio.gather(
        *(gang_worker(w) for w in range(half)), *(single_worker(w) for w in range(half))
    )
    return (
        done["gang"] / took["gang"],
        done["single"] / took["single"],
        failed["gang"],
        failed["single"],
    )


async def gang_scenario(
    claims: ClaimService, gang_cpids: list[str], singles: int, clients: int, rounds: int
) -> tuple[float, float]:
    gang_rates: list[float] = []
    single_rates: list[float] = []
    for r in range(rounds):
        g, s1, gf, sf = await mixed_round(claims, gang_cpids, singles, clients, f"g{r}")
        gang_rates.append(g)
        single_rates.append(s1)
        print(
            f"  round {r + 1}: gang claims {g:7.1f}/s ({gf} refused)   "
            f"single claims {s1:7.0f}/s ({sf} refused)   ratio {g / s1:.3f}"
        )
    g, s1 = statistics.median(gang_rates), statistics.median(single_rates)
    n = len(gang_cpids)
    print(
        f"  median: {g:.1f} gang claims/s ({g * n:.0f} parts/s), {s1:.0f} single claims/s, "
        f"ratio gang/single {g / s1:.3f} (parts/single {g * n / s1:.2f})"
    )
    return g, s1


def _put(key: str, value: bytes, lease: int = 0) -> RequestOp:
    return RequestOp(request_put=PutRequest(key=key.encode(), value=value, lease=lease))


def _get(key: str) -> RequestOp:
    return RequestOp(request_range=RangeRequest(key=key.encode()))


def _cmp_mod(key: str, rev: int) -> Compare:
    return Compare(result=Compare.EQUAL, target=Compare.MOD, key=key.encode(), mod_revision=rev)


async def baseline_round(
    client: Etcd3Client, targets: list[str], clients: int, tag: str
) -> tuple[float, int]:
    """Rate of the plain loop and how many compares it lost (retried)."""
    assert client.kv is not None and client.lease is not None
    kv, lease_svc = client.kv, client.lease
    todo = iter(enumerate(targets))
    known: dict[str, tuple[int, int]] = {}  # key -> (mod_revision, units)
    lost = 0

    async def worker(w: int) -> None:
        nonlocal lost
        holder_key = Keys.holder(f"base-{tag}-{w}")
        for _, c in todo:
            alloc_key = Keys.alloc(c)
            lease = (await lease_svc.grant(TTL)).ID
            claim_id = new_claim_id(c)
            while True:
                a_rev, a_units = known.get(alloc_key, (0, 0))
                h_rev, h_units = known.get(holder_key, (0, 0))
                body = json.dumps(
                    {"claim_id": claim_id, "cpid": c, "holder": holder_key, "units": 1,
                     "created_at": 0, "expires_at": 0}
                ).encode()  # fmt: skip
                resp = await kv.txn(
                    [_cmp_mod(alloc_key, a_rev), _cmp_mod(holder_key, h_rev)],
                    [
                        _put(alloc_key, b'{"units":%d}' % (a_units + 1)),
                        _put(holder_key, b'{"units":%d}' % (h_units + 1)),
                        _put(Keys.claim(c, claim_id), body, lease),
                    ],
                    [_get(alloc_key), _get(holder_key)],
                    timeout=10,
                )
                if resp.succeeded:
                    rev = int(resp.header.revision)
                    known[alloc_key] = (rev, a_units + 1)
                    known[holder_key] = (rev, h_units + 1)
                    break
                lost += 1
                for key, r in zip((alloc_key, holder_key), resp.responses, strict=True):
                    kvs = r.response_range.kvs
                    known[key] = (
                        (int(kvs[0].mod_revision), json.loads(kvs[0].value)["units"])
                        if kvs
                        else (0, 0)
                    )

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(clients)))
    return len(targets) / (time.perf_counter() - t0), lost


# -- main -----------------------------------------------------------------------------------


async def scenario(
    name: str,
    targets_of: Callable[[int], list[str]],
    run_service: Callable[[list[str], str], Awaitable[float]],
    run_base: Callable[[list[str], str], Awaitable[tuple[float, int]]],
    rounds: int,
    retries: Callable[[], float],
) -> tuple[float, float]:
    svc: list[float] = []
    base: list[float] = []
    for r in range(rounds):
        before = retries()
        svc.append(await run_service(targets_of(r), f"{name}{r}"))
        svc_lost = int(retries() - before)
        rate, lost = await run_base(targets_of(r), f"{name}{r}")
        base.append(rate)
        print(
            f"  round {r + 1}: claims service {svc[-1]:7.0f}/s ({svc_lost} retried)   "
            f"etcd3aio txn loop {base[-1]:7.0f}/s ({lost} retried)"
        )
    s, b = statistics.median(svc), statistics.median(base)
    print(f"  median: service {s:.0f} claims/s, etcd3aio loop {b:.0f} claims/s, ratio {s / b:.2f}")
    return s, b


async def run(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="cpi-bench-claims-") as tmpdir:
        etcd = EtcdProcess(data_dir=Path(tmpdir) / "etcd")
        etcd.start()
        try:
            etcd.wait_healthy(30)
            async with Index(endpoints=[etcd.endpoint], timeout=10.0) as index:
                anchors, pool, spread, gang_cpids = await populate(
                    index, args.resources, args.gang_parts
                )
                settings = ResolverSettings(
                    sync=SyncSettings(probe_interval=1.0, sweep_interval=1.0), verify_workers=0
                )
                async with Resolver(index=index, anchors=anchors, settings=settings) as resolver:
                    async with asyncio.timeout(60):
                        await resolver.wait_ready()
                    # reconciler not started: it is not on the claim path
                    claims = ClaimService(index=index, resolver=resolver, settings=ClaimsSettings())
                    client = Etcd3Client([etcd.endpoint])
                    await client.connect()
                    # warm-up (connections, caches), not timed
                    await service_round(claims, [spread[0]] * 50, 4, "warm")
                    await baseline_round(client, [spread[1]] * 50, 4, "warm")

                    def retries() -> float:
                        value = claims.metrics.registry.get_sample_value(
                            "cpi_resolver_claim_retries_total"
                        )
                        return value or 0.0

                    n, c = args.per_round, args.clients
                    print(
                        f"claims: {c} concurrent clients, {n} one-unit claims per round, "
                        f"{args.rounds} rounds, service and baseline interleaved "
                        f"(in-process ClaimService, no HTTP)"
                    )
                    con = free = (0.0, 1.0)
                    if not args.only_gangs:
                        print("contention: every claim on one resource")
                        con = await scenario(
                            "c",
                            lambda r: [pool] * n,
                            lambda t, tag: service_round(claims, t, c, tag),
                            lambda t, tag: baseline_round(client, t, c, tag),
                            args.rounds,
                            retries,
                        )
                        print(f"no contention: claims spread over {len(spread)} resources")
                        free = await scenario(
                            "f",
                            lambda r: [spread[i % len(spread)] for i in range(n)],
                            lambda t, tag: service_round(claims, t, c, tag),
                            lambda t, tag: baseline_round(client, t, c, tag),
                            args.rounds,
                            retries,
                        )
                    await client.close()
                    print(
                        f"gangs under contention: gang claims ({len(gang_cpids)} parts of one "
                        f"unit each) and single claims at once on the same {len(gang_cpids)} "
                        "resources"
                    )
                    gang = await gang_scenario(claims, gang_cpids, n, c, args.rounds)
                    if not args.only_gangs:
                        print(
                            f"summary: service {con[0]:.0f}/s under contention, "
                            f"{free[0]:.0f}/s without; ratios to the plain loop "
                            f"{con[0] / con[1]:.2f} and {free[0] / free[1]:.2f}"
                        )
                    print(
                        f"summary: gangs of {len(gang_cpids)} {gang[0]:.1f}/s next to "
                        f"{gang[1]:.0f} single claims/s in the same run, ratio "
                        f"{gang[0] / gang[1]:.3f}"
                    )
        finally:
            etcd.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--per-round", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--resources", type=int, default=256)
    p.add_argument("--gang-parts", type=int, default=8, help="resources of one gang (at most 63)")
    p.add_argument("--only-gangs", action="store_true", help="run the gang scenario only")
    args = p.parse_args()
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
