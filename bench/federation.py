"""Federation benchmark: what routing over two roots costs, and how fast a withdrawn
endorsement stops a root's records.

    python bench/federation.py [--records 2000] [--rounds 5] [--revocations 20]

One run, real etcd (two bench members in a temporary directory):

1. writes ``--records`` signed records under ``CN.31`` to one etcd and as many under
   ``SG.01`` to the other;
2. **lookups**: in-process ``resolve()`` of CN records per second, a plain
   :class:`~resolver.core.Resolver` over CN (the baseline) against a
   :class:`~resolver.federation.Federation` of CN and SG (interleaved rounds, medians,
   ratio);
3. **discovery**: ``discover(kind=GPU, limit=20)`` per second, the plain resolver over CN
   against the federation restricted to CN (``within=CN``) and spanning both roots;
4. **revocation**: SG endorsed by CN; the endorsement is deleted from CN's etcd and the
   time until ``get()`` of an SG record returns nothing is measured, ``--revocations``
   times (p50, max).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

from bench._common import interleaved  # noqa: E402
from cpi.etcdproc import EtcdProcess  # noqa: E402
from registry import ca  # noqa: E402
from registry.index import Index, Keys, Op  # noqa: E402
from resolver.config import EtcdSettings  # noqa: E402
from resolver.core import Resolver, ResolverSettings  # noqa: E402
from resolver.discovery import Query  # noqa: E402
from resolver.federation import Federation, MemberSpec, endorse_key  # noqa: E402
from resolver.replica import SyncSettings  # noqa: E402
from schemas import keys  # noqa: E402
from schemas.chain import TrustAnchors  # noqa: E402
from schemas.cpid import derive  # noqa: E402
from schemas.endorsement import Endorsement  # noqa: E402
from schemas.models import Accelerator, Anchor, Attributes, Location, Record  # noqa: E402

SETTINGS = ResolverSettings(sync=SyncSettings(probe_interval=0.2, sweep_interval=0.2))


async def _fill(
    index: Index, root: str, ns: str, n: int
) -> tuple[keys.Ed25519PrivateKey, list[str]]:
    root_key, ns_key = keys.generate(), keys.generate()
    cert = ca.issue_cert(
        issuer_key=root_key, issuer_subject=root, subject=ns, public_key=ns_key, scopes=["issue"]
    )
    await index.put(Keys.cert(keys.kid_of(ns_key)), cert.to_json())
    now = int(time.time())
    cpids: list[str] = []
    ops: list[Op] = []
    for i in range(n):
        node = keys.generate()
        cpid = derive(ns, "GPU", keys.public_raw(node)).to_text()
        rec = Record(
            cpid=cpid,
            kind="GPU",
            public_key=keys.public_to_b64url(node),
            issuer=ns,
            version=1,
            issued_at=now - 10,
            expires_at=now + 86_400,
            location=Location(region="31"),
            attributes=Attributes(
                accelerators=[Accelerator(vendor="N", model="H100", memory_gib=80, count=8)]
            ),
            labels={"i": str(i % 7)},
        )
        ops.append(Op.put(Keys.rec(cpid), ca.sign_document(rec, ns_key).to_json()))
        cpids.append(cpid)
        if len(ops) == 100:
            await index.txn(success=ops)
            ops = []
    if ops:
        await index.txn(success=ops)
    return root_key, cpids


def _spec(
    name: str, endpoint: str, anchor: Anchor | None, endorsed_by: str | None = None
) -> MemberSpec:
    return MemberSpec(
        name,
        name,
        (name,),
        EtcdSettings(endpoints=[endpoint]),
        anchor,
        endorsed_by,
    )


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        a = EtcdProcess(data_dir=Path(tmp) / "a")
        b = EtcdProcess(data_dir=Path(tmp) / "b")
        for e in (a, b):
            e.start()
        try:
            for e in (a, b):
                e.wait_healthy(30)
            async with (
                Index(endpoints=[a.endpoint], timeout=30) as ia,
                Index(endpoints=[b.endpoint], timeout=30) as ib,
            ):
                cn_key, cn = await _fill(ia, "CN", "CN.31", args.records)
                sg_key, sg = await _fill(ib, "SG", "SG.01", args.records)
                cn_anchor, sg_anchor = ca.make_anchor("CN", cn_key), ca.make_anchor("SG", sg_key)
                plain = Resolver(
                    index=Index(endpoints=[a.endpoint]),
                    anchors=TrustAnchors([cn_anchor]),
                    settings=SETTINGS,
                    own_index=True,
                )
                fed = Federation(
                    [_spec("CN", a.endpoint, cn_anchor), _spec("SG", b.endpoint, sg_anchor)],
                    settings=SETTINGS,
                )
                async with plain, fed:
                    await plain.wait_ready()
                    await fed.wait_ready()
                    print(f"records: {args.records} per root, two etcd members")
                    it = iter(range(10**12))

                    def look_plain() -> None:
                        plain.resolve(cn[next(it) % len(cn)])

                    def look_fed() -> None:
                        fed.resolve(cn[next(it) % len(cn)])

                    r = interleaved({"plain": look_plain, "fed": look_fed}, 20_000, args.rounds)
                    print(
                        f"lookups/s   plain resolver {r['plain']:>10,.0f}   federation "
                        f"{r['fed']:>10,.0f}   ratio {r['fed'] / r['plain']:.2f}"
                    )
                    q, qcn = Query(kind="GPU", limit=20), Query(kind="GPU", within="CN", limit=20)
                    d = interleaved(
                        {
                            "plain": lambda: plain.discover(q) and None,
                            "fed_cn": lambda: fed.discover(qcn) and None,
                            "fed_both": lambda: fed.discover(q) and None,
                        },
                        300,
                        args.rounds,
                    )
                    print(
                        f"discover/s  plain {d['plain']:>8,.0f}   federation within=CN "
                        f"{d['fed_cn']:>8,.0f} (ratio {d['fed_cn'] / d['plain']:.2f})   both roots "
                        f"{d['fed_both']:>8,.0f} (ratio {d['fed_both'] / d['plain']:.2f})"
                    )
                # revocation: SG endorsed by CN, then the endorsement deleted
                fed2 = Federation(
                    [_spec("CN", a.endpoint, cn_anchor), _spec("SG", b.endpoint, None, "CN")],
                    settings=SETTINGS,
                )
                gaps: list[float] = []
                async with fed2:
                    probe = sg[0]
                    for _ in range(args.revocations):
                        now = int(time.time())
                        doc = Endorsement(
                            issuer="CN",
                            subject="SG",
                            public_key=sg_anchor.public_key,
                            permitted=["SG"],
                            serial="bench",
                            not_before=now - 60,
                            not_after=now + 3600,
                        )
                        await ia.put(endorse_key("SG"), ca.sign_document(doc, cn_key).to_json())
                        while True:
                            m = fed2.members[1]
                            if m.resolver is not None and m.resolver.ready and fed2.get(probe):
                                break
                            await asyncio.sleep(0.01)
                        t0 = time.perf_counter()
                        await ia.delete(endorse_key("SG"))
                        while fed2.get(probe) is not None:  # noqa: ASYNC110 - polling is the measurement
                            await asyncio.sleep(0.0005)
                        gaps.append(time.perf_counter() - t0)
                gaps.sort()
                print(
                    f"revocation to last served (in-process, {len(gaps)} runs): p50 "
                    f"{statistics.median(gaps) * 1000:.1f} ms, max {gaps[-1] * 1000:.1f} ms"
                )
        finally:
            for e in (a, b):
                e.stop()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--records", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--revocations", type=int, default=20)
    asyncio.run(main(p.parse_args()))
