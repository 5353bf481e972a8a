"""Auditor throughput: index sweep rate vs raw Ed25519, and Merkle proofs at a million leaves.

    python bench/audit.py [--records 20000] [--leaves 1000000] [--proofs 2000]

1. Starts a throwaway etcd, publishes a CN -> CN.31 -> CN.31.CMCC delegation and writes
   ``--records`` signed records (plus a status for every other one) with batched
   transactions.  Then runs the full :class:`resolver.audit.sweep.Sweeper` over the index
   (paged reads at one revision, every record, cert, status and revocation verified)
   and reports records verified per second, next to raw Ed25519 verifications per
   second of the same record bytes measured in the same run (before and after the
   sweep; the median is the baseline).
2. Builds a :class:`schemas.merkle.MerkleTree` of ``--leaves`` leaves in memory and
   times inclusion and consistency proof generation (random indices and sizes) and
   their verification.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cpi.etcdproc import EtcdProcess
from registry import ca
from registry.index import Index, Keys, Op
from resolver.audit.sweep import Sweeper
from schemas import cpid, dsse, keys
from schemas.chain import TrustAnchors
from schemas.merkle import MerkleTree, verify_consistency, verify_inclusion
from schemas.models import (
    Accelerator,
    Attributes,
    Capacity,
    CpuInfo,
    Endpoint,
    Location,
    Record,
    Status,
)

BATCH = 100  # etcd's default --max-txn-ops is 128


def raw_rate(env: dsse.Envelope, pub: keys.Ed25519PublicKey, n: int = 5000) -> float:
    message, sig = dsse.pae(env.payload_type, env.payload), env.signatures[0].sig
    t0 = time.perf_counter()
    for _ in range(n):
        pub.verify(sig, message)
    return n / (time.perf_counter() - t0)


async def sweep_bench(records: int) -> None:
    now = int(time.time())
    root, ns31, cmcc = keys.generate(), keys.generate(), keys.generate()
    anchors = TrustAnchors([ca.make_anchor("CN", root)])
    cert31 = ca.issue_cert(
        issuer_key=root,
        issuer_subject="CN",
        subject="CN.31",
        public_key=ns31,
        scopes=["delegate", "issue"],
        now=now,
    )
    cert_cmcc = ca.issue_cert(
        issuer_key=ns31,
        issuer_subject="CN.31",
        subject="CN.31.CMCC",
        public_key=cmcc,
        scopes=["issue"],
        now=now,
    )
    with tempfile.TemporaryDirectory() as tmp:
        etcd = EtcdProcess(
            data_dir=Path(tmp) / "etcd", extra_args=["--quota-backend-bytes=4294967296"]
        )
        etcd.start()
        try:
            etcd.wait_healthy(30.0)
            async with Index(endpoints=[etcd.endpoint], timeout=30.0) as index:
                await index.put(Keys.cert(keys.kid_of(ns31)), cert31.to_json())
                await index.put(Keys.cert(keys.kid_of(cmcc)), cert_cmcc.to_json())
                t0 = time.perf_counter()
                sample: dsse.Envelope | None = None
                ops: list[Op] = []
                for i in range(records):
                    node = keys.generate()
                    c = cpid.derive("CN.31.CMCC", "GPU", keys.public_raw(node)).to_text()
                    rec = Record(
                        cpid=c,
                        kind="GPU",
                        public_key=keys.public_to_b64url(node),
                        issuer="CN.31.CMCC",
                        version=1,
                        issued_at=now,
                        expires_at=now + 86_400,
                        endpoints=[
                            Endpoint(
                                proto="https",
                                host=f"gpu-{i}.sh.example.net",
                                port=443,
                                purpose="inference",
                            )
                        ],
                        location=Location(region="31", site="LG01"),
                        attributes=Attributes(
                            cpu=CpuInfo(model="Intel Xeon Platinum 8480+", cores=112),
                            memory_gib=2048.0,
                            accelerators=[
                                Accelerator(vendor="NVIDIA", model="H100", memory_gib=80.0, count=8)
                            ],
                        ),
                        labels={"tier": "gold"},
                    )
                    env = ca.sign_document(rec, cmcc)
                    sample = sample or env
                    ops.append(Op.put(Keys.rec(c), env.to_json()))
                    if i % 2 == 0:
                        st = Status(
                            cpid=c,
                            seq=1,
                            observed_at=now * 1000,
                            state="up",
                            capacity=Capacity(accelerators_free=8),
                        )
                        ops.append(Op.put(Keys.live(c), ca.sign_document(st, node).to_json()))
                    if len(ops) >= BATCH:
                        await index.txn(success=ops)
                        ops = []
                if ops:
                    await index.txn(success=ops)
                print(
                    f"wrote {records:,} records (+{(records + 1) // 2:,} statuses) in {time.perf_counter() - t0:.1f} s"
                )
                assert sample is not None
                pub = cmcc.public_key()
                rates = [raw_rate(sample, pub)]
                reports = []
                for jobs in (1, os.cpu_count() or 1):
                    reports.append(await Sweeper(index, anchors, page_size=1000, jobs=jobs).run())
                    rates.append(raw_rate(sample, pub))
        finally:
            etcd.stop()
    base = statistics.median(rates)
    print(f"raw Ed25519 verify          {base:>10,.0f} /s   (same run, cryptography, one core)")
    for report in reports:
        assert report.ok, report.failures[:5]
        statuses = report.counts["status"]["valid"]
        total = report.records + statuses
        print(f"sweep, {report.jobs} process(es) (etcd paging + verify everything):")
        print(f"  records verified          {report.records:>10,} in {report.record_seconds:.2f} s")
        print(
            f"  record sweep rate         {report.records_per_s:>10,.0f} records/s"
            f"   ratio to raw Ed25519 {report.records_per_s / base:.2f}"
        )
        print(
            f"  whole sweep               {report.elapsed:>10.2f} s for {total:,} signed documents "
            f"({total / report.elapsed:,.0f}/s), {report.chains_walked} chain walks"
        )


def proof_bench(leaves: int, proofs: int) -> None:
    rng = random.Random(6962)
    t0 = time.perf_counter()
    tree = MerkleTree()
    for i in range(leaves):
        tree.append(i.to_bytes(8, "big") + b"audit-entry")
    build = time.perf_counter() - t0
    root = tree.root()
    idx = [rng.randrange(leaves) for _ in range(proofs)]
    t0 = time.perf_counter()
    incl = [tree.inclusion_proof(i) for i in idx]
    t_incl = (time.perf_counter() - t0) / proofs
    t0 = time.perf_counter()
    for i, p in zip(idx, incl, strict=True):
        verify_inclusion(leaf=tree.leaf_hash(i), index=i, tree_size=leaves, proof=p, root=root)
    t_vincl = (time.perf_counter() - t0) / proofs
    firsts = [rng.randrange(1, leaves) for _ in range(proofs)]
    t0 = time.perf_counter()
    cons = [tree.consistency_proof(m) for m in firsts]
    t_cons = (time.perf_counter() - t0) / proofs
    t0 = time.perf_counter()
    old_roots = [tree.root(m) for m in firsts]
    t_root = (time.perf_counter() - t0) / proofs
    t0 = time.perf_counter()
    for m, r, p in zip(firsts, old_roots, cons, strict=True):
        verify_consistency(first=m, second=leaves, first_root=r, second_root=root, proof=p)
    t_vcons = (time.perf_counter() - t0) / proofs
    print(f"Merkle tree, {leaves:,} leaves (in memory):")
    print(f"  build (append one by one) {build:>8.2f} s  ({leaves / build:,.0f} leaves/s)")
    print(f"  inclusion proof           {t_incl * 1e6:>8.1f} us  ({len(incl[0])} hashes)")
    print(f"  consistency proof         {t_cons * 1e6:>8.1f} us")
    print(f"  root at an earlier size   {t_root * 1e6:>8.1f} us")
    print(f"  verify inclusion          {t_vincl * 1e6:>8.1f} us")
    print(f"  verify consistency        {t_vcons * 1e6:>8.1f} us")


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--records", type=int, default=20_000)
    ap.add_argument("--leaves", type=int, default=1_000_000)
    ap.add_argument("--proofs", type=int, default=2_000)
    args = ap.parse_args()
    asyncio.run(sweep_bench(args.records))
    proof_bench(args.leaves, args.proofs)


if __name__ == "__main__":
    main()
