"""What usage receipts cost: claim + release cycles per second with a usage key (each claim
metered, each release appending a signed receipt and its audit entry in its own
transaction) against the same service without one, and the time ``audit_usage`` takes
to verify and total the receipts.

    python bench/usage.py [--clients 16] [--per-round 500] [--rounds 3] [--resources 64]

Starts its own etcd in a temporary directory and a resolver in this process (as
``bench/claims.py``).  Each round, both services (metered and not) make and release
``--per-round`` one-unit claims with ``--clients`` concurrent clients, spread over
``--resources`` resources; they take turns within each round and medians are printed
with their ratio.  Then the log signer signs a checkpoint and ``audit_usage`` reads and
verifies everything the metered rounds wrote.
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

from bench.claims import populate
from cpi.etcdproc import EtcdProcess
from registry import ca
from registry.index import Index, Keys
from registry.logsigner import LogSigner
from resolver.audit.usage import audit_usage
from resolver.claims.service import ClaimService, ClaimsSettings
from resolver.claims.usage import UsageRecorder
from resolver.core import Resolver, ResolverSettings
from resolver.replica import SyncSettings
from schemas import keys
from schemas.chain import TrustAnchors
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


async def run(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="cpi-bench-usage-") as tmpdir:
        etcd = EtcdProcess(data_dir=Path(tmpdir) / "etcd")
        etcd.start()
        try:
            etcd.wait_healthy(30)
            async with Index(endpoints=[etcd.endpoint], timeout=10.0) as index:
                anchors, _pool, spread, _gang = await populate(index, args.resources, 0)
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
                    count = len(rep.receipts)
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
    args = p.parse_args()
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
