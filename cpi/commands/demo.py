"""``cpi demo``: identifiers and signatures end to end, in one process, no etcd needed.

Creates a national root, delegates Shanghai (CN.31) and China Mobile's industry node
(CN.31.CMCC), issues signed records for a few nodes, verifies them offline from the
anchor alone, and shows that tampering, a namespace trap and revocation are caught.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from cpi.errors import UsageError
from cpi.output import size
from registry import ca, keyfile
from schemas import chain, cpid, dsse, keys
from schemas.models import Accelerator, Attributes, CpuInfo, Location, Record


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "demo",
        help="show IDs and signatures end to end (no etcd needed)",
        description="Keys, anchor and bundles are made in a temporary directory that is "
        "removed at the end, root key included; --keep DIR keeps them in DIR.",
    )
    p.add_argument(
        "--keep",
        "--out",
        dest="keep",
        metavar="DIR",
        help="keep the keys, anchor and bundles in DIR (default: nothing is kept)",
    )
    p.set_defaults(handler=run)


def _record(
    node: keys.Ed25519PrivateKey, ns: str, kind: str, region: str, gpu: str, n: int
) -> Record:
    now = int(time.time())
    c = cpid.derive(ns, kind, keys.public_raw(node))
    return Record(
        cpid=str(c),
        kind=kind,
        public_key=keys.public_to_b64url(node),
        issuer=ns,
        version=1,
        issued_at=now,
        expires_at=now + 30 * 86400,
        location=Location(region=region),
        attributes=Attributes(
            cpu=CpuInfo(model="Intel Xeon", cores=64),
            memory_gib=1024.0,
            accelerators=[Accelerator(vendor="NVIDIA", model=gpu, memory_gib=140.4, count=n)],
        ),
        labels={"tier": "demo"},
    )


def run(args: argparse.Namespace) -> int:
    if args.keep:
        out = Path(args.keep)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"--keep {args.keep}: {exc.strerror}") from exc
        return _run(out, keep=True)
    with tempfile.TemporaryDirectory(prefix="cpi-demo-") as tmp:
        return _run(Path(tmp), keep=False)


def _run(out: Path, *, keep: bool) -> int:
    root, r31, cmcc = keys.generate(), keys.generate(), keys.generate()
    for name, k in (("root", root), ("cn31", r31), ("cmcc", cmcc)):
        keyfile.write_private(out / f"{name}.key", k, overwrite=True)
    anchor = ca.make_anchor("CN", root)
    (out / "anchor.json").write_bytes(anchor.to_json())
    anchors = chain.TrustAnchors([anchor])
    where = f"  (anchor: {out / 'anchor.json'})" if keep else ""
    print(f"national root CN       kid {anchor.kid}{where}")

    c31 = ca.issue_cert(
        issuer_key=root,
        issuer_subject="CN",
        subject="CN.31",
        public_key=r31,
        scopes=["delegate", "issue"],
    )
    c_cmcc = ca.issue_cert(
        issuer_key=r31,
        issuer_subject="CN.31",
        subject="CN.31.CMCC",
        public_key=cmcc,
        scopes=["issue"],
    )
    print(f"delegated CN.31        kid {keys.kid_of(r31)}  scopes delegate,issue")
    print(f"delegated CN.31.CMCC   kid {keys.kid_of(cmcc)}  scopes issue")
    chain_envs = [c_cmcc, c31]

    print("\nnodes registered by CN.31.CMCC:")
    bundles = []
    bundles_written: list[Path] = []
    for gpu, n in (("H100", 8), ("H200", 8), ("910B", 16)):
        node = keys.generate()
        kind = "NPU" if gpu == "910B" else "GPU"
        rec = _record(node, "CN.31.CMCC", kind, "31", gpu, n)
        env = ca.sign_document(rec, cmcc)
        bundle = {"record": env.to_dict(), "chain": [c.to_dict() for c in chain_envs]}
        bundles.append((rec, env, bundle))
        path = out / f"{cpid.parse(rec.cpid).serial.lower()}.json"
        path.write_text(json.dumps(bundle, indent=2))
        result = chain.verify_record(env, chain_envs, anchors=anchors)
        bundles_written.append(path)
        print(
            f"  {rec.cpid:<32} {n:>2} x {gpu:<5} {size(len(env.to_json())):>9}  "
            f"verified: {result.ok}"
        )
        print(f"      dns {cpid.parse(rec.cpid).to_dns('cpi')}")

    print("\nwhat the verifier catches:")
    rec, env, _ = bundles[0]
    tampered = dsse.Envelope(
        env.payload_type, env.payload.replace(b'"count":8', b'"count":80'), env.signatures
    )
    r = chain.verify_record(tampered, chain_envs, anchors=anchors)
    print(f"  tampered payload       -> {r.reason}")
    other = keys.generate()
    forged = ca.sign_document(rec, other)
    r = chain.verify_record(forged, chain_envs, anchors=anchors)
    print(f"  forged signature       -> {r.reason}")
    trap = ca.issue_cert(
        issuer_key=root, issuer_subject="CN", subject="CN.3", public_key=other, scopes=["issue"]
    )
    outside = ca.sign_document(_record(keys.generate(), "CN.31", "GPU", "31", "H100", 8), other)
    r = chain.verify_record(outside, [trap], anchors=anchors)
    print(f"  CN.3 signing CN.31     -> {r.reason}")
    rev = ca.revoke(
        issuer_key=r31, subject="CN.31.CMCC", kid=keys.kid_of(cmcc), reason="key compromise"
    )
    r = chain.verify_record(env, chain_envs, anchors=anchors, revocations={keys.kid_of(cmcc): rev})
    print(f"  registry key revoked   -> {r.reason}")
    try:
        cpid.parse(rec.cpid[:-1] + ("0" if rec.cpid[-1] != "0" else "1"))
    except ValueError as exc:
        print(f"  typo in check char     -> {exc}")
    if keep:
        print(
            f"\nkeys, anchor and bundles kept in {out} (root.key is the root key: keep it "
            f"safe or delete it); verify a bundle with:\n"
            f"  cpi verify {bundles_written[0]} --anchor {out / 'anchor.json'}"
        )
    else:
        print("\nnothing was kept (the keys were in a temporary directory); --keep DIR keeps them")
    return 0
