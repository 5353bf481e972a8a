"""What usage receipts cost: claim + release cycles per second with a usage key (each claim
metered, each release appending a signed receipt and its audit entry in its own
transaction) against the same service without one, and the time ``audit_usage`` takes
to verify and total the receipts.

    python bench/usage.py [--clients 16] [--per-round 500] [--rounds 3] [--resources 64]
                          [--gang-parts 8] [--gangs 60] [--gang-clients 4]

Starts its own etcd in a temporary directory and a resolver in this process (as
``bench/claims.py``).  Each round, both services (metered and not) make and release
``--per-round`` one-unit claims with ``--clients`` concurrent clients, spread over
``--resources`` resources; they take turns within each round and medians are printed
with their ratio.  Gangs the same way: ``--gangs`` gang lives per round (claim one unit on
each of ``--gang-parts`` resources, renew, release: with a usage key two receipts
listing every part, one in the renewal's transaction and one in the release's).  Then
the log signer signs a checkpoint and ``audit_usage`` reads and verifies everything the
metered rounds wrote.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.claims import GANG_MODEL, populate
from cpi.etcdproc import EtcdProcess
from registry import ca
from registry.index import Index, Keys
from registry.logsigner import LogSigner
from resolver.audit.usage import audit_usage
from resolver.claims.gang import GangSpec
from resolver.claims.service import ClaimService, ClaimsSettings
from resolver.claims.usage import UsageRecorder
from resolver.core import Resolver, ResolverSettings
from resolver.discovery import Query
from resolver.replica import SyncSettings
from schemas import keys
from schemas.chain import TrustAnchors
from schemas.errors import CPIError
from schemas.usage import sign_usage_signer


async def cycles(claims: ClaimService, targets: list[str], clients: int, tag: str) -> float:
    """Claim then release each target; cycles per second."""
    todo = iter(targets)

    async def worker(w: int) -> None:
        holder = f"{tag}-{w}"
        for c in todo:
            got = await claims.claim(c, units=1, ttl_s=600, holder=holder)
            await claims.release(got.claim_id, holder=holder)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(clients)))
    return len(targets) / (time.perf_counter() - t0)


async def gang_lives(
    claims: ClaimService, parts: int, gangs: int, clients: int, tag: str
) -> tuple[float, int]:
    """Claim a gang of one unit on each of ``parts`` resources, renew it, release it:
    ``(completed gang lives per second, gangs refused)`` (gangs contend for the same
    ``/alloc/`` keys; a claim that loses every attempt is refused with 409)."""
    spec = GangSpec(units=parts, per_min=1, per_max=1)
    query = Query(kind="GPU", accelerator=GANG_MODEL, limit=parts)
    todo = iter(range(gangs))
    done = refused = 0

    async def worker(w: int) -> None:
        nonlocal done, refused
        holder = f"{tag}-{w}"
        for _ in todo:
            try:
                g = await claims.claim_gang(query, spec=spec, ttl_s=600, holder=holder)
            except CPIError:
                refused += 1
                continue
            await claims.renew(g.claim_id, holder=holder, ttl_s=900)
            await claims.release(g.claim_id, holder=holder)
            done += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(clients)))
    return done / (time.perf_counter() - t0), refused


async def run(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="cpi-bench-usage-") as tmpdir:
        etcd = EtcdProcess(data_dir=Path(tmpdir) / "etcd")
        etcd.start()
        try:
            etcd.wait_healthy(30)
            async with Index(endpoints=[etcd.endpoint], timeout=10.0) as index:
                anchors, _pool, spread, _gang = await populate(
                    index, args.resources, args.gang_parts
                )
                # the anchor of populate() signs certs; a usage signer needs its key: use
                # a second anchor of our own for the statement
                root = keys.generate()
                anchors = TrustAnchors([*anchors, ca.make_anchor("CN", root)])
                usage_key = keys.generate()
                statement = sign_usage_signer(
                    root, usage_key, subject="CN", not_before=0, not_after=2**40
                )
                await index.put(Keys.usage_signer(keys.kid_of(usage_key)), statement.to_json())
                settings = ResolverSettings(
                    sync=SyncSettings(probe_interval=1.0, sweep_interval=1.0), verify_workers=0
                )
                async with Resolver(index=index, anchors=anchors, settings=settings) as resolver:
                    async with asyncio.timeout(60):
                        await resolver.wait_ready()
                    plain = ClaimService(index=index, resolver=resolver, settings=ClaimsSettings())
                    metered = ClaimService(
                        index=index,
                        resolver=resolver,
                        settings=ClaimsSettings(),
                        usage=UsageRecorder(index, usage_key),
                    )
                    await cycles(plain, spread[:20], 4, "warm-p")
                    await cycles(metered, spread[:20], 4, "warm-m")
                    n, c = args.per_round, args.clients
                    print(
                        f"usage: {c} concurrent clients, {n} claim+release cycles per round over "
                        f"{len(spread)} resources, {args.rounds} rounds, interleaved"
                    )
                    with_r: list[float] = []
                    without: list[float] = []
                    for r in range(args.rounds):
                        targets = [spread[i % len(spread)] for i in range(n)]
                        without.append(await cycles(plain, targets, c, f"p{r}"))
                        with_r.append(await cycles(metered, targets, c, f"m{r}"))
                        print(
                            f"  round {r + 1}: with receipts {with_r[-1]:.0f}/s, "
                            f"without {without[-1]:.0f}/s"
                        )
                    a, b = statistics.median(with_r), statistics.median(without)
                    print(f"median: with receipts {a:.0f}/s, without {b:.0f}/s; ratio {a / b:.2f}")
                    if args.gangs:
                        p, g, gc = args.gang_parts, args.gangs, args.gang_clients
                        print(
                            f"gangs: {gc} concurrent clients, {g} gang lives (claim {p} parts, "
                            f"renew, release) per round, {args.rounds} rounds, interleaved"
                        )
                        g_with: list[float] = []
                        g_without: list[float] = []
                        for r in range(args.rounds):
                            rate, no = await gang_lives(plain, p, g, gc, f"gp{r}")
                            g_without.append(rate)
                            rate, yes = await gang_lives(metered, p, g, gc, f"gm{r}")
                            g_with.append(rate)
                            print(
                                f"  round {r + 1}: with receipts {g_with[-1]:.1f}/s ({yes} "
                                f"refused), without {g_without[-1]:.1f}/s ({no} refused)"
                            )
                        a, b = statistics.median(g_with), statistics.median(g_without)
                        print(
                            f"median: with receipts {a:.1f} gang lives/s, without {b:.1f}/s; "
                            f"ratio {a / b:.2f}"
                        )
                    log_key = keys.generate()
                    signer = LogSigner(index, log_key)
                    await signer.load()
                    await signer.sign()
                    t0 = time.perf_counter()
                    rep = await audit_usage(
                        index,
                        verifier=signer.verifier,
                        anchors=anchors,
                        since=0,
                        until=2**40,
                    )
                    dt = time.perf_counter() - t0
                    count = len({r.leaf for r in rep.receipts})  # a gang's: one row per part
                    print(
                        f"audit_usage: {count} receipts verified and totalled in {dt:.2f} s "
                        f"({count / dt:.0f}/s; ok={rep.ok}, problems={len(rep.problems)})"
                    )
                    await plain.close()
                    await metered.close()
        finally:
            etcd.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--per-round", type=int, default=500)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--resources", type=int, default=64)
    p.add_argument("--gang-parts", type=int, default=8)
    p.add_argument("--gangs", type=int, default=60, help="gang lives per round (0: none)")
    p.add_argument("--gang-clients", type=int, default=4)
    args = p.parse_args()
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
