"""Write tests/vectors/*.json: test vectors for other implementations of the CPI contract.

    python tools/gen_vectors.py [--check]

Every key comes from a fixed seed (sha256 of ``SEED_DOMAIN`` + a name) and Ed25519
signatures are deterministic, so the files come out byte for byte the same on every
run; ``--check`` exits 1 when a file on disk differs.  The expected outcomes (which
rule fails, at which link, which CPIDs are invalid and why) are written by hand in
this file, not read back from the implementation, so the files test it rather than
merely describe it.  ``docs/vectors.md`` documents the formats.

The builders here (:func:`root`, :func:`delegate`, :func:`record`, :func:`revocation`)
are also what ``tests/schemas/test_chain.py`` uses to build its chains.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout without installing
    sys.path.insert(0, str(ROOT))

from schemas import _edwards as _ed  # noqa: E402
from schemas import cpid as _cpid  # noqa: E402
from schemas import dsse, keys  # noqa: E402
from schemas.keys import Ed25519PrivateKey  # noqa: E402
from schemas.models import (  # noqa: E402
    Anchor,
    Cert,
    Deregister,
    Document,
    Record,
    Register,
    Revocation,
    Status,
)
from tools._generate import write_or_check  # noqa: E402

OUT_DIR = ROOT / "tests" / "vectors"
SEED_DOMAIN = b"cpi test vectors v1 "
NOW = 1_767_225_600  # 2026-01-01T00:00:00Z, the fixed "now" of every chain case
DAY = 86_400
SKEW = 60

# -- keys -----------------------------------------------------------------------------


def seed(name: str) -> bytes:
    """The 32-byte Ed25519 seed of the test key called ``name``."""
    return hashlib.sha256(SEED_DOMAIN + name.encode("utf-8")).digest()


def key(name: str) -> Ed25519PrivateKey:
    return keys.private_from_seed(seed(name))


def node_key(name: str) -> Ed25519PrivateKey:
    return key(f"node {name}")


def raw(k: Ed25519PrivateKey) -> bytes:
    return keys.public_raw(k)


# -- documents --------------------------------------------------------------------------


def sign_doc(
    doc: Document,
    signer: Ed25519PrivateKey,
    *,
    payload: bytes | None = None,
    payload_type: str | None = None,
    keyid: str | None = None,
) -> dsse.Envelope:
    """Sign ``doc`` (or raw ``payload`` bytes standing in for it) as a DSSE envelope."""
    return dsse.sign(
        payload_type or doc.media_type(),
        doc.to_json() if payload is None else payload,
        signer,
        keyid=keyid,
    )


@dataclass(frozen=True)
class Authority:
    """A namespace key: an anchor (empty chain) or a delegated namespace with its chain."""

    subject: str
    key: Ed25519PrivateKey
    chain: tuple[dsse.Envelope, ...] = ()
    serial: str = ""

    @property
    def public_key(self) -> str:
        return keys.public_to_b64url(self.key)

    @property
    def kid(self) -> str:
        return keys.kid_of(self.key)

    def anchor(self) -> Anchor:
        return Anchor(subject=self.subject, public_key=self.public_key)


def root(subject: str, *, key_name: str | None = None) -> Authority:
    return Authority(subject, key(key_name or f"root {subject}"))


def serial_for(subject: str) -> str:
    return subject.replace(".", "-") + "-1"


def delegate(
    issuer: Authority,
    subject: str,
    *,
    key_name: str | None = None,
    scopes: Sequence[str] = ("delegate", "issue"),
    serial: str | None = None,
    not_before: int = NOW - 30 * DAY,
    not_after: int = NOW + 365 * DAY,
    issuer_field: str | None = None,
    signed_by: Ed25519PrivateKey | None = None,
) -> Authority:
    """``issuer`` certifies ``subject``; the new authority's chain is its cert + the issuer's."""
    k = key(key_name or f"ns {subject}")
    cert = Cert.model_validate(
        {
            "subject": subject,
            "issuer": issuer_field or issuer.subject,
            "public_key": keys.public_to_b64url(k),
            "scopes": list(scopes),
            "serial": serial or serial_for(subject),
            "not_before": not_before,
            "not_after": not_after,
        }
    )
    env = sign_doc(cert, signed_by or issuer.key)
    return Authority(subject, k, (env, *issuer.chain), cert.serial)


def tree() -> dict[str, Authority]:
    """The standard tree: CN -> CN.31 -> CN.31.CMCC (and CN.32), SG -> SG.01."""
    t: dict[str, Authority] = {}
    t["CN"] = root("CN")
    t["CN.31"] = delegate(t["CN"], "CN.31")
    t["CN.31.CMCC"] = delegate(t["CN.31"], "CN.31.CMCC", scopes=("issue",))
    t["CN.32"] = delegate(t["CN"], "CN.32")
    t["SG"] = root("SG")
    t["SG.01"] = delegate(t["SG"], "SG.01")
    return t


def record_doc(
    namespace: str,
    node: Ed25519PrivateKey,
    *,
    kind: str = "GPU",
    issuer: str | None = None,
    cpid: str | None = None,
    record_kind: str | None = None,
    issued_at: int = NOW - DAY,
    expires_at: int = NOW + 7 * DAY,
    region: str = "31",
) -> Record:
    return Record.model_validate(
        {
            "cpid": cpid or _cpid.derive(namespace, kind, raw(node)).to_text(),
            "kind": record_kind or kind,
            "public_key": keys.public_to_b64url(node),
            "issuer": issuer or namespace,
            "version": 1,
            "issued_at": issued_at,
            "expires_at": expires_at,
            "endpoints": [
                {
                    "proto": "https",
                    "host": "gpu-01.example.net",
                    "port": 8443,
                    "purpose": "inference",
                }
            ],
            "location": {"region": region, "site": "LG01"},
            "attributes": {
                "cpu": {"model": "Kunpeng 920", "cores": 128},
                "memory_gib": 1024,
                "accelerators": [
                    {"vendor": "Huawei", "model": "910B", "memory_gib": 64, "count": 8}
                ],
                "network_gbps": 200,
            },
            "labels": {"tier": "gold"},
        }
    )


def record(
    registry: Authority,
    node: Ed25519PrivateKey,
    *,
    namespace: str | None = None,
    signed_by: Ed25519PrivateKey | None = None,
    keyid: str | None = None,
    **fields: Any,
) -> dsse.Envelope:
    """A record for ``node`` under ``namespace`` (default: the registry's subject)."""
    doc = record_doc(
        namespace or registry.subject, node, issuer=fields.pop("issuer", registry.subject), **fields
    )
    return sign_doc(doc, signed_by or registry.key, keyid=keyid)


def revocation(
    by: Authority | Ed25519PrivateKey,
    subject: str,
    *,
    serial: str | None = None,
    kid: str | None = None,
    revoked_at: int = NOW - DAY,
    reason: str = "key compromise",
) -> dsse.Envelope:
    signer = by.key if isinstance(by, Authority) else by
    doc = Revocation(subject=subject, serial=serial, kid=kid, reason=reason, revoked_at=revoked_at)
    return sign_doc(doc, signer)


def tamper(env: dsse.Envelope, payload: bytes) -> dsse.Envelope:
    """The same signatures over different payload bytes."""
    return dsse.Envelope(env.payload_type, payload, env.signatures)


# -- chain cases --------------------------------------------------------------------------


@dataclass(frozen=True)
class ChainCase:
    """One chain verification with its hand-written expected outcome."""

    id: str
    description: str
    record: dsse.Envelope
    chain: tuple[dsse.Envelope, ...]
    anchors: tuple[Anchor, ...]
    revocations: Mapping[str, dsse.Envelope] = field(default_factory=dict)
    now: int = NOW
    rule: int | None = None
    link: int | None = None
    match: str = ""
    """Regex for this implementation's failure detail (not written to the vector file)."""

    @property
    def ok(self) -> bool:
        return self.rule is None


def _deep(depth: int) -> Authority:
    """CN -> CN.1 -> CN.1.2 -> ... with ``depth`` certs."""
    a = root("CN")
    subject = "CN"
    for i in range(1, depth + 1):
        subject = f"{subject}.{i}"
        a = delegate(a, subject)
    return a


def chain_cases() -> list[ChainCase]:
    t = tree()
    cn, sg = t["CN"].anchor(), t["SG"].anchor()
    both = (cn, sg)
    cmcc = t["CN.31.CMCC"]
    n1 = node_key("1")
    good = record(cmcc, n1)
    cases: list[ChainCase] = []

    def add(
        id: str, description: str, rec: dsse.Envelope, chain: Iterable[dsse.Envelope], **kw: Any
    ) -> None:
        cases.append(ChainCase(id, description, rec, tuple(chain), kw.pop("anchors", (cn,)), **kw))

    # -- valid ----------------------------------------------------------------------------
    add(
        "ok-registry", "CN -> CN.31 -> CN.31.CMCC signs a record in its namespace", good, cmcc.chain
    )
    add(
        "ok-regional-registry",
        "CN.31 (delegate+issue) signs a record directly",
        record(t["CN.31"], node_key("2"), kind="CPU"),
        t["CN.31"].chain,
    )
    cmcc_d = delegate(t["CN.31"], "CN.31.CMCC")
    lg01 = delegate(cmcc_d, "CN.31.CMCC.LG01", scopes=("issue",))
    add(
        "ok-sub-namespace-own-key",
        "CN.31.CMCC.LG01, certified by CN.31.CMCC, signs a record in its own namespace",
        record(lg01, node_key("3")),
        lg01.chain,
    )
    add(
        "ok-two-anchors",
        "a record under SG verifies with both CN and SG configured",
        record(t["SG.01"], node_key("4"), kind="SVC", region="01"),
        t["SG.01"].chain,
        anchors=both,
    )
    add(
        "ok-two-anchors-cn",
        "a CN record verifies with both anchors configured",
        good,
        cmcc.chain,
        anchors=both,
    )
    deep8 = _deep(8)
    add(
        "ok-depth-8",
        "a chain of 8 certs (the maximum)",
        record(deep8, node_key("5")),
        deep8.chain,
    )
    skewed_cert = delegate(t["CN.31"], "CN.31.CMCC", scopes=("issue",), not_after=NOW - SKEW)
    add(
        "ok-cert-expired-within-skew",
        "signer's cert expired 60 s ago: inside the clock skew allowance",
        record(skewed_cert, n1),
        skewed_cert.chain,
    )
    early_cert = delegate(t["CN.31"], "CN.31.CMCC", scopes=("issue",), not_before=NOW + SKEW)
    add(
        "ok-cert-starts-within-skew",
        "signer's cert becomes valid in 60 s: inside the clock skew allowance",
        record(early_cert, n1),
        early_cert.chain,
    )
    add(
        "ok-record-expired-within-skew",
        "record expired 60 s ago",
        record(cmcc, n1, expires_at=NOW - SKEW),
        cmcc.chain,
    )
    add(
        "ok-record-issued-within-skew",
        "record issued 60 s in the future",
        record(cmcc, n1, issued_at=NOW + SKEW),
        cmcc.chain,
    )
    add(
        "ok-revocation-by-sibling-ignored",
        "a revocation of CN.31.CMCC's serial signed by CN.32 (not above it) carries no weight",
        good,
        cmcc.chain,
        revocations={cmcc.serial: revocation(t["CN.32"], "CN.31.CMCC", serial=cmcc.serial)},
    )
    add(
        "ok-revocation-by-itself-ignored",
        "a revocation of CN.31.CMCC's key signed by that same key carries no weight",
        good,
        cmcc.chain,
        revocations={cmcc.kid: revocation(cmcc, "CN.31.CMCC", kid=cmcc.kid)},
    )
    add(
        "ok-revocation-other-subject-ignored",
        "a revocation naming another subject does not revoke this cert, even with its serial",
        good,
        cmcc.chain,
        revocations={cmcc.serial: revocation(t["CN.31"], "CN.31.CUCC", serial=cmcc.serial)},
    )
    add(
        "ok-revocation-in-future",
        "a revocation whose revoked_at is an hour away is not yet in force",
        good,
        cmcc.chain,
        revocations={
            cmcc.serial: revocation(
                t["CN.31"], "CN.31.CMCC", serial=cmcc.serial, revoked_at=NOW + 3600
            )
        },
    )

    # -- rule 1 ---------------------------------------------------------------------------
    add(
        "wrong-signer",
        "record signed by a key other than the signer cert's (keyid names the cert's key)",
        record(cmcc, n1, signed_by=key("intruder"), keyid=cmcc.kid),
        cmcc.chain,
        rule=1,
        link=0,
        match=r"record is not validly signed by CN\.31\.CMCC",
    )
    add(
        "wrong-signer-keyid",
        "record signed by another key under its own keyid",
        record(cmcc, n1, signed_by=key("intruder")),
        cmcc.chain,
        rule=1,
        link=0,
        match=r"record is not validly signed by CN\.31\.CMCC",
    )
    add(
        "record-tampered",
        "record payload changed after signing",
        tamper(good, good.payload.replace(b'"version":1', b'"version":2')),
        cmcc.chain,
        rule=1,
        link=0,
        match=r"not validly signed",
    )
    no_issue = delegate(t["CN.31"], "CN.31.CMCC", scopes=("delegate",))
    add(
        "signer-lacks-issue",
        "signer's cert holds only 'delegate'",
        record(no_issue, n1),
        no_issue.chain,
        rule=1,
        link=0,
        match=r"signer 'CN\.31\.CMCC' lacks scope 'issue'",
    )
    add(
        "record-below-signer",
        "CN.31.CMCC signs a record for CN.31.CMCC.LG01: a record is signed by its own "
        "namespace's key, not by a parent's",
        record(cmcc, node_key("3"), namespace="CN.31.CMCC.LG01"),
        cmcc.chain,
        rule=1,
        link=0,
        match=r"CPID prefix 'CN\.31\.CMCC\.LG01' is not the signer's subject 'CN\.31\.CMCC'",
    )
    add(
        "parent-issues-into-delegated",
        "CN.31 (delegate+issue) signs a record for CN.31.CMCC, a namespace it delegated",
        record(t["CN.31"], n1, namespace="CN.31.CMCC", issuer="CN.31"),
        t["CN.31"].chain,
        rule=1,
        link=0,
        match=r"CPID prefix 'CN\.31\.CMCC' is not the signer's subject 'CN\.31'",
    )
    add(
        "cpid-outside-signer",
        "CN.31.CMCC signs a record for CN.31.CUCC",
        record(cmcc, n1, namespace="CN.31.CUCC", issuer="CN.31.CMCC"),
        cmcc.chain,
        rule=1,
        link=0,
        match=r"CPID prefix 'CN\.31\.CUCC' is not the signer's subject 'CN\.31\.CMCC'",
    )
    cn3 = delegate(t["CN"], "CN.3")
    add(
        "string-prefix-record",
        "CN.3 signs a record for CN.31 (a string prefix, not a segment prefix)",
        record(cn3, n1, namespace="CN.31", issuer="CN.3"),
        cn3.chain,
        rule=1,
        link=0,
        match=r"CPID prefix 'CN\.31' is not the signer's subject 'CN\.3'",
    )
    add(
        "record-issuer-mismatch",
        "record names issuer CN.31 but is signed by CN.31.CMCC",
        record(cmcc, n1, issuer="CN.31"),
        cmcc.chain,
        rule=1,
        link=0,
        match=r"record names issuer 'CN\.31' but is signed by 'CN\.31\.CMCC'",
    )
    add(
        "empty-chain",
        "no certificate chain at all",
        good,
        (),
        rule=1,
        link=1,
        match=r"no certificate chain",
    )

    # -- rule 2 ---------------------------------------------------------------------------
    forged = delegate(t["CN.31"], "CN.31.CMCC", scopes=("issue",), signed_by=t["CN.32"].key)
    add(
        "cert-wrong-issuer-key",
        "CN.31.CMCC's cert names CN.31 as issuer but is signed by CN.32's key",
        record(forged, n1),
        forged.chain,
        rule=2,
        link=1,
        match=r"cert is not validly signed by issuer CN\.31",
    )
    add(
        "cert-issuer-field-mismatch",
        "CN.31.CMCC's cert is signed by CN.31 but names CN.32 as issuer",
        record(delegate(t["CN.31"], "CN.31.CMCC", scopes=("issue",), issuer_field="CN.32"), n1),
        delegate(t["CN.31"], "CN.31.CMCC", scopes=("issue",), issuer_field="CN.32").chain,
        rule=2,
        link=1,
        match=r"cert names issuer 'CN\.32' but is signed by 'CN\.31'",
    )
    issue_only = delegate(t["CN"], "CN.31", scopes=("issue",))
    below = delegate(issue_only, "CN.31.CMCC", scopes=("issue",))
    add(
        "issuer-lacks-delegate",
        "CN.31 holds only 'issue' but certifies CN.31.CMCC",
        record(below, n1),
        below.chain,
        rule=2,
        link=1,
        match=r"issuer 'CN\.31' lacks scope 'delegate'",
    )
    outside = delegate(t["CN.31"], "CN.32")
    add(
        "subject-outside-issuer",
        "CN.31 certifies CN.32",
        record(outside, n1),
        outside.chain,
        rule=2,
        link=1,
        match=r"issuer 'CN\.31' does not contain subject 'CN\.32'",
    )
    trap = delegate(cn3, "CN.31")
    add(
        "string-prefix-delegation",
        "CN.3 certifies CN.31 (a string prefix, not a segment prefix)",
        record(trap, n1),
        trap.chain,
        rule=2,
        link=1,
        match=r"issuer 'CN\.3' does not contain subject 'CN\.31'",
    )
    add(
        "chain-missing-top",
        "the chain stops below the anchor (CN.31's cert left out)",
        good,
        cmcc.chain[:1],
        rule=2,
        link=1,
        match=r"top cert is signed by key '[0-9A-Z]{16}', which is not an anchor",
    )
    add(
        "chain-out-of-order",
        "the chain's certs in the wrong order",
        good,
        tuple(reversed(cmcc.chain)),
        rule=2,
        link=2,
        match=r"which is not an anchor",
    )
    impostor = root("CN", key_name="impostor root CN")
    fake = delegate(delegate(impostor, "CN.31"), "CN.31.CMCC", scopes=("issue",))
    add(
        "impostor-root",
        "a chain up to a key that calls itself CN but is not the configured anchor",
        record(fake, n1),
        fake.chain,
        rule=2,
        link=2,
        match=r"which is not an anchor \(anchors: CN\)",
    )
    add(
        "other-anchor-only",
        "a CN chain with only SG configured",
        good,
        cmcc.chain,
        anchors=(sg,),
        rule=2,
        link=2,
        match=r"which is not an anchor \(anchors: SG\)",
    )
    cross = delegate(t["SG"], "CN.31")
    add(
        "cross-root-delegation",
        "SG's root certifies CN.31 (with both anchors configured)",
        record(cross, n1),
        cross.chain,
        anchors=both,
        rule=2,
        link=1,
        match=r"issuer 'SG' does not contain subject 'CN\.31'",
    )
    deep9 = _deep(9)
    add(
        "depth-9",
        "a chain of 9 certs (one more than allowed)",
        record(deep9, node_key("5")),
        deep9.chain,
        rule=2,
        link=9,
        match=r"chain depth 9 exceeds 8",
    )
    wrong_type = Cert.model_validate(
        {
            "subject": "CN.31",
            "issuer": "CN",
            "public_key": t["CN.31"].public_key,
            "scopes": ["delegate", "issue"],
            "serial": "CN-31-1",
            "not_before": NOW - DAY,
            "not_after": NOW + DAY,
        }
    )
    add(
        "cert-wrong-payload-type",
        "the root's signature is over a cert payload sent as a record.v1 payloadType",
        good,
        (cmcc.chain[0], sign_doc(wrong_type, t["CN"].key, payload_type=Record.media_type())),
        rule=2,
        link=2,
        match=r"payloadType 'application/vnd\.cpi\.record\.v1\+json' is not one of",
    )

    # -- rule 3 ---------------------------------------------------------------------------
    old31 = delegate(t["CN"], "CN.31", not_after=NOW - DAY)
    old_cmcc = delegate(old31, "CN.31.CMCC", scopes=("issue",))
    add(
        "cert-expired",
        "CN.31's cert expired a day ago",
        record(old_cmcc, n1),
        old_cmcc.chain,
        rule=3,
        link=2,
        match=rf"cert for CN\.31 expired at {NOW - DAY}, now is {NOW}",
    )
    late = delegate(t["CN.31"], "CN.31.CMCC", scopes=("issue",), not_before=NOW + DAY)
    add(
        "cert-not-yet-valid",
        "CN.31.CMCC's cert becomes valid tomorrow",
        record(late, n1),
        late.chain,
        rule=3,
        link=1,
        match=rf"cert for CN\.31\.CMCC not valid before {NOW + DAY}",
    )
    just_old = delegate(t["CN.31"], "CN.31.CMCC", scopes=("issue",), not_after=NOW - SKEW - 1)
    add(
        "cert-expired-beyond-skew",
        "signer's cert expired 61 s ago",
        record(just_old, n1),
        just_old.chain,
        rule=3,
        link=1,
        match=r"expired at",
    )
    just_early = delegate(t["CN.31"], "CN.31.CMCC", scopes=("issue",), not_before=NOW + SKEW + 1)
    add(
        "cert-starts-beyond-skew",
        "signer's cert becomes valid in 61 s",
        record(just_early, n1),
        just_early.chain,
        rule=3,
        link=1,
        match=r"not valid before",
    )
    add(
        "record-expired",
        "record expired an hour ago",
        record(cmcc, n1, expires_at=NOW - 3600),
        cmcc.chain,
        rule=3,
        link=0,
        match=rf"record CN\.31\.CMCC/GPU\.[0-9A-Z]{{12}}-[0-9A-Z] expired at {NOW - 3600}",
    )
    add(
        "record-expired-beyond-skew",
        "record expired 61 s ago",
        record(cmcc, n1, expires_at=NOW - SKEW - 1),
        cmcc.chain,
        rule=3,
        link=0,
        match=r"expired at",
    )
    add(
        "record-not-yet-valid",
        "record issued 61 s in the future",
        record(cmcc, n1, issued_at=NOW + SKEW + 1),
        cmcc.chain,
        rule=3,
        link=0,
        match=r"not valid before",
    )

    # -- rule 4 ---------------------------------------------------------------------------
    add(
        "cert-serial-revoked",
        "CN.31 revoked CN.31.CMCC's cert serial",
        good,
        cmcc.chain,
        revocations={cmcc.serial: revocation(t["CN.31"], "CN.31.CMCC", serial=cmcc.serial)},
        rule=4,
        link=1,
        match=r"CN-31-CMCC-1 \(CN\.31\.CMCC\) revoked at \d+: key compromise",
    )
    add(
        "cert-serial-revoked-by-root",
        "the root (above the issuer) revoked CN.31.CMCC's cert serial",
        good,
        cmcc.chain,
        revocations={cmcc.serial: revocation(t["CN"], "CN.31.CMCC", serial=cmcc.serial)},
        rule=4,
        link=1,
        match=r"CN-31-CMCC-1 \(CN\.31\.CMCC\) revoked",
    )
    add(
        "cert-key-revoked",
        "the root revoked CN.31's key by kid",
        good,
        cmcc.chain,
        revocations={t["CN.31"].kid: revocation(t["CN"], "CN.31", kid=t["CN.31"].kid)},
        rule=4,
        link=2,
        match=rf"{t['CN.31'].kid} \(CN\.31\) revoked",
    )
    add(
        "record-key-revoked",
        "CN.31.CMCC revoked the node's key by kid",
        good,
        cmcc.chain,
        revocations={keys.kid_of(n1): revocation(cmcc, "CN.31.CMCC", kid=keys.kid_of(n1))},
        rule=4,
        link=0,
        match=rf"{keys.kid_of(n1)} \(CN\.31\.CMCC\) revoked",
    )

    # -- rule 5 ---------------------------------------------------------------------------
    other = _cpid.derive("CN.31.CMCC", "GPU", raw(node_key("2"))).to_text()
    add(
        "serial-key-mismatch",
        "the CPID was derived from another key than the record's public_key",
        record(cmcc, n1, cpid=other),
        cmcc.chain,
        rule=5,
        link=0,
        match=r"serial '[0-9A-Z]{12}' does not match public_key",
    )
    right = _cpid.derive("CN.31.CMCC", "GPU", raw(n1))
    wrong_check = _cpid.CROCKFORD[(_cpid.CROCKFORD.index(right.check) + 1) % 32]
    add(
        "bad-check-character",
        "the CPID's check character is wrong",
        record(cmcc, n1, cpid=f"{right.prefix}/{right.kind}.{right.serial}-{wrong_check}"),
        cmcc.chain,
        rule=5,
        link=0,
        match=rf"check character is '{wrong_check}', expected '{right.check}'",
    )
    add(
        "kind-mismatch",
        "the record's kind is CPU but its CPID says GPU",
        record(cmcc, n1, record_kind="CPU"),
        cmcc.chain,
        rule=5,
        link=0,
        match=r"record kind 'CPU' differs from CPID kind 'GPU'",
    )
    add(
        "cpid-unknown-kind",
        "the record's CPID has an unknown kind",
        record(
            cmcc,
            n1,
            cpid="CN.31.CMCC/TPU."
            + right.serial
            + "-"
            + _cpid.check_character("CN31CMCCTPU" + right.serial),
        ),
        cmcc.chain,
        rule=5,
        link=0,
        match=r"unknown kind 'TPU'",
    )
    return cases


# -- CPID vectors ---------------------------------------------------------------------------


def with_check(prefix: str, kind: str, serial: str) -> str:
    """``prefix/kind.serial-check`` with the right check character (body must be alphanumeric)."""
    return (
        f"{prefix}/{kind}.{serial}-{_cpid.check_character(prefix.replace('.', '') + kind + serial)}"
    )


EXAMPLE = "CN.31.CMCC/GPU.4K7Q9M2XH3PT-Z"
LONG_PREFIX = "CN" + ".ABCDEFGHIJKLMNOP" * 6 + ".ABCD"  # 109 characters: CPID of exactly 128


def _cpid_entry(text: str, note: str = "") -> dict[str, Any]:
    c = _cpid.parse(text)
    entry: dict[str, Any] = {
        "input": text,
        "canonical": c.to_text(),
        "prefix": c.prefix,
        "segments": list(c.segments),
        "kind": c.kind,
        "serial": c.serial,
        "check": c.check,
        "dns": c.to_dns(),
        "dns_in_zone_cpi": c.to_dns("cpi."),
    }
    if note:
        entry["note"] = note
    return entry


def cpid_vectors() -> dict[str, Any]:
    derived = [
        _cpid.derive(ns, kind, raw(node_key(n))).to_text()
        for ns, kind, n in [
            ("CN", "CLU", "1"),
            ("CN.13.1307.ALIYUN", "NPU", "2"),
            ("CN.32.3205.CUCC", "STO", "3"),
            ("CN.11.BAIDU", "NET", "4"),
            ("SG.01", "SVC", "5"),
            ("CN.52.HWCLOUD.ABCDEFGHIJKLMNOP", "CPU", "6"),
            (LONG_PREFIX, "GPU", "7"),
        ]
    ]
    valid = [
        _cpid_entry(EXAMPLE, "the example of docs/protocol.md §1"),
        _cpid_entry(EXAMPLE.lower(), "any case is accepted and normalised to upper case"),
        _cpid_entry("Cn.31.CmCc/GpU.4k7Q9m2Xh3pT-z", "mixed case"),
        *[_cpid_entry(t) for t in derived],
        _cpid_entry(
            "CN.31MCMCC/GPU.4K7Q9M2XH3PT-Z",
            "valid, yet also a one-character typo of CN.31.CMCC/GPU.4K7Q9M2XH3PT-Z ('.' "
            "typed as 'M'): the check character is computed with separators removed, so "
            "merging or splitting prefix segments is caught only ~35 times in 36",
        ),
    ]
    s = "4K7Q9M2XH3PT"
    invalid: list[tuple[str, str, str]] = [
        (EXAMPLE[:-1] + "Y", "check", "check character is 'Y', expected 'Z'"),
        (
            with_check("CN.31.CMCC", "GPU", "4K7Q9M2XH3PU"),
            "serial",
            "serial must be 12 characters of Crockford base32, got '4K7Q9M2XH3PU'",
        ),
        (
            "CN.31.CM-CC/GPU.4K7Q9M2XH3PT-Z",
            "segment",
            "segment 3 'CM-CC' has a character outside [0-9A-Z]: '-'",
        ),
        (
            with_check("CN.31.CMCC", "TPU", s),
            "kind",
            "unknown kind 'TPU', expected one of CPU, GPU, NPU, CLU, STO, NET, SVC",
        ),
        *[
            (
                with_check("CN.31.CMCC", "GPU", s[:-1] + c),
                "serial",
                f"serial must be 12 characters of Crockford base32, got '{s[:-1] + c}'",
            )
            for c in "ILO"
        ],
        (
            with_check("CN.31.CMCC", "GPU", s[:-1]),
            "serial",
            f"serial must be 12 characters of Crockford base32, got '{s[:-1]}'",
        ),
        (
            with_check("CN.31.CMCC", "GPU", s + "0"),
            "serial",
            f"serial must be 12 characters of Crockford base32, got '{s}0'",
        ),
        (
            with_check("C1.31", "GPU", s),
            "root",
            "root 'C1' must be two letters (ISO 3166-1 alpha-2)",
        ),
        (
            with_check("CHN.31", "GPU", s),
            "root",
            "root 'CHN' must be two letters (ISO 3166-1 alpha-2)",
        ),
        (with_check("C", "GPU", s), "root", "root 'C' must be two letters (ISO 3166-1 alpha-2)"),
        ("/GPU.4K7Q9M2XH3PT-Z", "prefix", "prefix is empty"),
        (with_check("CN..31", "GPU", s), "segment", "segment 2 is empty"),
        (with_check("CN.31.", "GPU", s), "segment", "segment 3 is empty"),
        (
            with_check("CN.ABCDEFGHIJKLMNOPQ", "GPU", s),
            "segment",
            "segment 2 'ABCDEFGHIJKLMNOPQ' is 17 characters, at most 16 allowed",
        ),
        (with_check(LONG_PREFIX + "E", "GPU", s), "length", "length is 129, at most 128 allowed"),
        (
            "CN.31/CMCC/GPU.4K7Q9M2XH3PT-Z",
            "syntax",
            "must contain exactly one '/' between prefix and suffix",
        ),
        ("CN.31.CMCC", "syntax", "must contain exactly one '/' between prefix and suffix"),
        (
            "CN.31.CMCC%2FGPU.4K7Q9M2XH3PT-Z",
            "syntax",
            "must contain exactly one '/' between prefix and suffix",
        ),
        ("CN.31.CMCC/GPU-4K7Q9M2XH3PT-Z", "syntax", "suffix must be <kind>.<serial>-<check>"),
        ("CN.31.CMCC/GPU.4K7Q9M2XH3PT.Z", "syntax", "suffix must end in '-<check character>'"),
        (
            "CN.31.CMCC/GPU.4K7Q9M2XH3PT-",
            "check",
            "check must be one character of [0-9A-Z], got ''",
        ),
        (
            "CN.31.CMCC/GPU.4K7Q9M2XH3PT-ZZ",
            "check",
            "check must be one character of [0-9A-Z], got 'ZZ'",
        ),
        (
            " CN.31.CMCC/GPU.4K7Q9M2XH3PT-Z",
            "root",
            "root ' CN' must be two letters (ISO 3166-1 alpha-2)",
        ),
        (
            EXAMPLE + " ",
            "check",
            "check must be one character of [0-9A-Z], got 'Z '",
        ),
        (
            "CN.31 .CMCC/GPU.4K7Q9M2XH3PT-Z",
            "segment",
            "segment 2 '31 ' has a character outside [0-9A-Z]: ' '",
        ),
        ("CN.31.CMCC/GPU.4K7Q9M2XH3PT-\uff3a", "ascii", "non-ASCII character '\uff3a'"),
        (
            "CN.31.CMCC/\u017fVC.4K7Q9M2XH3PT-Z",
            "ascii",
            "non-ASCII character '\u017f'",
        ),
        ("", "syntax", "empty"),
    ]
    dns = [
        {"name": "4k7q9m2xh3pt-z.gpu.cmcc.31.cn.", "zone": "", "cpid": EXAMPLE},
        {"name": "4k7q9m2xh3pt-z.gpu.cmcc.31.cn.cpi.", "zone": "cpi.", "cpid": EXAMPLE},
        {"name": "4K7Q9M2XH3PT-Z.GPU.CMCC.31.CN.CPI", "zone": "cpi", "cpid": EXAMPLE},
        {
            "name": "4k7q9m2xh3pt-z.gpu.cmcc.31.cn.id.example.net.",
            "zone": "id.example.net.",
            "cpid": EXAMPLE,
        },
    ]
    dns_invalid = [
        {
            "name": "4k7q9m2xh3pt-z.gpu.cmcc.31.cn.other.",
            "zone": "cpi.",
            "reason": "DNS name is not under zone 'cpi.'",
        },
        {
            "name": "4k7q9m2xh3pt-z.gpu.cmcc.31.cn.xcpi.",
            "zone": "cpi.",
            "reason": "DNS name is not under zone 'cpi.'",
        },
        {
            "name": "gpu.cn.cpi.",
            "zone": "cpi.",
            "reason": "DNS name needs <serial-check>.<kind>.<prefix labels>",
        },
        {
            "name": "4k7q9m2xh3pt-y.gpu.cmcc.31.cn.cpi.",
            "zone": "cpi.",
            "reason": "check character is 'Y', expected 'Z'",
        },
    ]
    contains = [
        ("CN", "CN", True),
        ("CN", "CN.31", True),
        ("CN.31", "CN.31.CMCC", True),
        ("CN.31", "CN.31.CMCC.LG01", True),
        ("CN.3", "CN.31", False),
        ("CN.31", "CN.3", False),
        ("CN.31", "CN", False),
        ("CN.31.CMCC", "CN.31.CMCCX", False),
        ("CN", "CNX", False),
        ("CN", "SG.01", False),
        ("CN.31", "CN.32.31", False),
    ]
    bodies = ["CN31CMCCGPU4K7Q9M2XH3PT", "A", "0", "CN", "ZZZZZZZZZZZZ", "CN31MCMCCGPU4K7Q9M2XH3PT"]
    return {
        "description": "CPID vectors (docs/protocol.md §1). 'valid': inputs with their canonical "
        "form, parts and DNS names; 'invalid': inputs every parser must reject, with this "
        "implementation's reason; 'check_character': ISO/IEC 7064 MOD 37,36 over the body "
        "(prefix segments + kind + serial, separators removed); 'ns_contains': segment-wise "
        "namespace containment. See docs/vectors.md and docs/cpid.md.",
        "alphabet": _cpid.CROCKFORD,
        "kinds": list(_cpid.KINDS),
        "max_length": _cpid.MAX_LENGTH,
        "check_character": [{"body": b, "check": _cpid.check_character(b)} for b in bodies],
        "valid": valid,
        "invalid": [{"input": i, "error": e, "reason": r} for i, e, r in invalid],
        "dns": dns,
        "dns_invalid": dns_invalid,
        "ns_contains": [{"outer": o, "inner": i, "contains": c} for o, i, c in contains],
    }


# -- key vectors -------------------------------------------------------------------------------

KEY_NAMES = (
    "root CN",
    "root SG",
    "ns CN.31",
    "ns CN.31.CMCC",
    "node 1",
    "node 2",
)
RFC8032_TEST1_SEED = "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60"


def _key_entry(name: str, seed_bytes: bytes) -> dict[str, Any]:
    k = keys.private_from_seed(seed_bytes)
    pub = raw(k)
    return {
        "name": name,
        "seed_hex": seed_bytes.hex(),
        "public_hex": pub.hex(),
        "public_key": keys.public_to_b64url(k),
        "sha256_hex": hashlib.sha256(pub).hexdigest(),
        "kid": keys.kid(pub),
        "serial": _cpid.derive_serial(pub),
        "cpids": [
            {
                "namespace": ns,
                "kind": kind,
                "cpid": (c := _cpid.derive(ns, kind, pub)).to_text(),
                "dns": c.to_dns("cpi."),
            }
            for ns, kind in [("CN.31.CMCC", "GPU"), ("CN.13.1307", "cpu"), ("SG", "SVC")]
        ],
    }


def key_vectors() -> dict[str, Any]:
    return {
        "description": "Fixed Ed25519 keys: seed_hex -> public key (base64url, no padding), "
        "sha256 of the raw public key, kid (first 16 Crockford base32 characters of that "
        "sha256, most significant bits first), serial (first 12) and CPIDs derived from it. "
        f"Seeds are sha256({SEED_DOMAIN.decode()!r} + name), except the RFC 8032 test 1 key.",
        "keys": [
            _key_entry("RFC 8032 section 7.1 TEST 1", bytes.fromhex(RFC8032_TEST1_SEED)),
            *[_key_entry(n, seed(n)) for n in KEY_NAMES],
        ],
    }


# -- envelope vectors --------------------------------------------------------------------------


def envelope_documents() -> list[tuple[str, Document, str]]:
    """(name, document, signing key name) for one valid document of each type."""
    n1 = node_key("1")
    c = _cpid.derive("CN.31.CMCC", "GPU", raw(n1)).to_text()
    common = record_doc("CN.31.CMCC", n1)
    register = Register.model_validate(
        {
            "namespace": "CN.31.CMCC",
            "kind": "GPU",
            "public_key": keys.public_to_b64url(n1),
            "nonce": "n0nce-0123456789abcdef",
            "timestamp": NOW,
            "endpoints": [e.model_dump() for e in common.endpoints],
            "location": common.location.model_dump(exclude_none=True),
            "attributes": common.attributes.model_dump(exclude_none=True),
            "labels": {"tier": "gold", "team/owner": "ml-platform"},
        }
    )
    return [
        (
            "cert",
            Cert(
                subject="CN.31",
                issuer="CN",
                public_key=keys.public_to_b64url(key("ns CN.31")),
                scopes=["delegate", "issue"],
                serial="CN-31-1",
                not_before=NOW - 30 * DAY,
                not_after=NOW + 365 * DAY,
            ),
            "root CN",
        ),
        ("register", register, "node 1"),
        ("record", common, "ns CN.31.CMCC"),
        (
            "status",
            Status.model_validate(
                {
                    "cpid": c,
                    "seq": 42,
                    "observed_at": NOW * 1000 + 250,
                    "state": "up",
                    "capacity": {"accelerators_free": 6, "cpu_free": 96, "memory_free_gib": 700.5},
                    "metrics": {"gpu_util": 0.25, "power_w": 3100},
                }
            ),
            "node 1",
        ),
        (
            "deregister",
            Deregister(cpid=c, nonce="n0nce-fedcba9876543210", timestamp=NOW),
            "node 1",
        ),
        (
            "revocation",
            Revocation(
                subject="CN.31.CMCC", serial="CN-31-CMCC-1", reason="key compromise", revoked_at=NOW
            ),
            "ns CN.31",
        ),
    ]


def _signer(name: str) -> dict[str, str]:
    k = key(name)
    return {"key": name, "public_key": keys.public_to_b64url(k), "kid": keys.kid_of(k)}


def envelope_vectors() -> dict[str, Any]:
    valid = []
    for name, doc, signer in envelope_documents():
        env = sign_doc(doc, key(signer))
        valid.append(
            {
                "id": name,
                "type": doc.TYPE,
                "payloadType": env.payload_type,
                "payload_text": env.payload.decode("utf-8"),
                "pae_hex": dsse.pae(env.payload_type, env.payload).hex(),
                "signer": _signer(signer),
                "envelope": env.to_dict(),
            }
        )
    docs = {name: (doc, signer) for name, doc, signer in envelope_documents()}
    status, _ = docs["status"]
    record_, _ = docs["record"]
    register, _ = docs["register"]
    assert isinstance(register, Register)
    n1 = key("node 1")
    status_json = status.to_json()
    good_status = sign_doc(status, n1)
    padded = register.to_json().replace(
        register.public_key.encode(), register.public_key.encode() + b"="
    )
    invalid: list[tuple[str, str, dsse.Envelope, str, str, str]] = [
        (
            "payload-tampered",
            "status payload changed after signing",
            tamper(good_status, status_json.replace(b'"seq":42', b'"seq":43')),
            "node 1",
            "status.v1",
            "signature",
        ),
        (
            "wrong-key",
            "signed by another key under the node's key id",
            sign_doc(status, key("intruder"), keyid=keys.kid_of(n1)),
            "node 1",
            "status.v1",
            "signature",
        ),
        (
            "payload-type-not-expected",
            "a valid record envelope presented where a status is expected",
            sign_doc(record_, n1),
            "node 1",
            "status.v1",
            "signature",
        ),
        (
            "type-field-mismatch",
            "payloadType says status.v1, the payload's type says record.v1",
            sign_doc(status, n1, payload=record_.to_json(), payload_type=Status.media_type()),
            "node 1",
            "status.v1",
            "payload",
        ),
        (
            "type-field-missing",
            "payload without its 'type' field",
            sign_doc(status, n1, payload=status_json.replace(b'"type":"status.v1",', b"")),
            "node 1",
            "status.v1",
            "payload",
        ),
        (
            "unknown-field",
            "payload with a field the type does not define",
            sign_doc(status, n1, payload=status_json[:-1] + b',"extra":1}'),
            "node 1",
            "status.v1",
            "payload",
        ),
        (
            "duplicate-member",
            "payload naming 'seq' twice (parsers disagree on which one wins)",
            sign_doc(status, n1, payload=status_json[:-1] + b',"seq":7}'),
            "node 1",
            "status.v1",
            "payload",
        ),
        (
            "nan-metric",
            "payload with NaN, which is not JSON",
            sign_doc(
                status, n1, payload=status_json.replace(b'"gpu_util":0.25', b'"gpu_util":NaN')
            ),
            "node 1",
            "status.v1",
            "payload",
        ),
        (
            "string-for-integer",
            "payload with seq as a string",
            sign_doc(status, n1, payload=status_json.replace(b'"seq":42', b'"seq":"42"')),
            "node 1",
            "status.v1",
            "payload",
        ),
        (
            "non-canonical-public-key",
            "register whose public_key has base64 padding (one key, one spelling)",
            sign_doc(register, n1, payload=padded),
            "node 1",
            "register.v1",
            "payload",
        ),
    ]
    return {
        "description": "DSSE envelopes of every CPI document type, signed with the fixed keys "
        "of keys.json. 'valid': verify under signer.public_key, PAE bytes = pae_hex, payload "
        "bytes = payload_text (UTF-8), then parse as 'type'. 'invalid': must be rejected at "
        "'stage' ('signature': DSSE verification with expected_type's payloadType; "
        "'payload': parsing the verified payload as expected_type).",
        "valid": valid,
        "invalid": [
            {
                "id": i,
                "description": d,
                "envelope": env.to_dict(),
                "signer": _signer(s),
                "expected_type": t,
                "stage": stage,
            }
            for i, d, env, s, t, stage in invalid
        ],
    }


# -- chain vectors ---------------------------------------------------------------------------


def chain_vectors() -> dict[str, Any]:
    out = []
    for c in chain_cases():
        expect: dict[str, Any] = {"ok": c.ok}
        if not c.ok:
            expect.update(rule=c.rule, link=c.link)
        out.append(
            {
                "id": c.id,
                "description": c.description,
                "anchors": [json.loads(a.to_json()) for a in c.anchors],
                "record": c.record.to_dict(),
                "chain": [e.to_dict() for e in c.chain],
                "revocations": {k: v.to_dict() for k, v in c.revocations.items()},
                "now": c.now,
                "expect": expect,
            }
        )
    return {
        "description": "Record verification cases (docs/protocol.md §2–5, the five rules). "
        "Verify 'record' with 'chain' (signer's cert first) against 'anchors', with "
        "'revocations' (cert serial or kid -> revocation.v1 envelope) at time 'now' (Unix "
        f"seconds) and a clock skew of {SKEW} s. 'expect' is ok, or the rule (1-5) and link "
        "(0 = the record, 1 = the signer's cert, 2 = the cert above it, ...) of the failure. "
        "Each failing case has exactly one fault.",
        "skew": SKEW,
        "cases": out,
    }


# -- Ed25519 edge cases ------------------------------------------------------------------------
#
# Built here from the curve arithmetic of schemas/_edwards.py: the 8 small-order points and
# their 6 other encodings as A and as R, S >= L, points with a small-order component, bytes
# that are no point.  Each case's faults and verdicts are written by hand below; build time
# recomputes the faults and both verification equations in pure Python and refuses to write
# a case whose hand-written faults differ (tests/schemas/test_vectors.py then checks that
# libsodium, i.e. schemas.keys.verify_raw, gives exactly the recorded verdicts).

ED_FAULTS = (
    "S not below L",
    "A non-canonical",
    "A small order",
    "A not on curve",
    "R non-canonical",
    "R small order",
    "R not on curve",
    "equation",
)
"""Everything the rule refuses, by name; 'equation': [S]B != R + [k]A on the decoded points."""

KEY_REASONS = {
    "non-canonical": "a non-canonical encoding",
    "small-order": "a small-order point",
    "not-on-curve": "not a point on the curve",
    "mixed-order": "a point outside the prime-order subgroup",
}
"""Key refusal reason code -> the phrase this implementation's error message contains."""


def _ed_scalar(name: str) -> int:
    """A fixed secret scalar, from the vector seed domain."""
    return int.from_bytes(hashlib.sha512(SEED_DOMAIN + name.encode()).digest(), "little") % _ed.L


def _hram(r: bytes, a: bytes, m: bytes) -> int:
    """k = SHA-512(R || A || M) mod L, as libsodium computes it (reduced mod L)."""
    return int.from_bytes(hashlib.sha512(r + a + m).digest(), "little") % _ed.L


def _enc(n: int) -> bytes:
    return n.to_bytes(32, "little")


def _small_order_encodings() -> list[tuple[str, bytes]]:
    """The 8 small-order points (canonical) and the 6 other encodings of some of them."""
    t8 = _ed.decode(
        bytes.fromhex("26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05")
    )
    assert t8 is not None and _ed.order_of_small(t8) == 8
    out = []
    for j in range(8):
        pt = _ed.mul(j, t8)
        out.append((f"order {_ed.order_of_small(pt)}, canonical ({j}T)", _ed.encode(pt)))
    sign = 1 << 255
    out += [
        ("order 4, y = p (non-canonical y)", _enc(_ed.P)),
        ("order 4, y = p, x negative (non-canonical y)", _enc(_ed.P | sign)),
        ("identity, y = p + 1 (non-canonical y)", _enc(_ed.P + 1)),
        ("identity, y = p + 1, sign bit set (non-canonical y and x)", _enc((_ed.P + 1) | sign)),
        ("identity, y = 1, sign bit set (x = 0 marked negative)", _enc(1 | sign)),
        ("order 2, y = p - 1, sign bit set (x = 0 marked negative)", _enc((_ed.P - 1) | sign)),
    ]
    return out


def _torsion8() -> _ed.Point:
    t8 = _ed.decode(
        bytes.fromhex("26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05")
    )
    assert t8 is not None
    return t8


def _off_curve_y() -> bytes:
    """The smallest y (from 2) with no curve point: 32 bytes that decode to nothing."""
    y = 2
    while _ed.decode(_enc(y)) is not None:
        y += 1
    return _enc(y)


def _non_canonical_big() -> bytes:
    """y = p + y0 for the smallest y0 whose point exists and is not of small order."""
    for y0 in range(2, 19):
        pt = _ed.decode(_enc(y0))
        if pt is not None and _ed.order_of_small(pt) is None:
            return _enc(_ed.P + y0)
    raise AssertionError("no such y0")  # pragma: no cover


def _search_message(label: str, r: bytes, a: bytes, ok: Callable[[int], bool]) -> bytes:
    """The first message ``label #i`` whose k = H(R || A || M) mod L satisfies ``ok``."""
    i = 0
    while True:
        m = f"cpi ed25519 vector {label} #{i}".encode()
        if ok(_hram(r, a, m)):
            return m
        i += 1


def _point_faults(data: bytes, which: str) -> list[str]:
    n = int.from_bytes(data, "little")
    y, sign = n & ((1 << 255) - 1), n >> 255
    pt = _ed.decode(data)
    if pt is None:
        return [f"{which} not on curve"]
    out = []
    if y >= _ed.P or (pt[0] == 0 and sign):
        out.append(f"{which} non-canonical")
    if _ed.order_of_small(pt) is not None:
        out.append(f"{which} small order")
    return out


def _equations(pk: bytes, sig: bytes, msg: bytes) -> tuple[bool | None, bool | None]:
    """(cofactorless, cofactored) equation on the leniently decoded points; None: no point."""
    a, r = _ed.decode(pk), _ed.decode(sig[:32])
    if a is None or r is None:
        return None, None
    s = int.from_bytes(sig[32:], "little")
    k = _hram(sig[:32], pk, msg)
    left = _ed.mul(s, _ed.BASE)
    right = _ed.add(r, _ed.mul(k, a))
    return _ed.equal(left, right), _ed.equal(_ed.mul(8, left), _ed.mul(8, right))


def _computed_faults(pk: bytes, sig: bytes, msg: bytes) -> list[str]:
    faults = []
    if int.from_bytes(sig[32:], "little") >= _ed.L:
        faults.append("S not below L")
    faults += _point_faults(pk, "A") + _point_faults(sig[:32], "R")
    if _equations(pk, sig, msg)[0] is False:
        faults.append("equation")
    return sorted(faults, key=ED_FAULTS.index)


@dataclass(frozen=True)
class EdCase:
    id: str
    description: str
    public_key: bytes
    signature: bytes
    message: bytes
    faults: tuple[str, ...]
    """Hand-written: every property the rule refuses (empty: the signature is valid)."""
    key_reason: str | None
    """Hand-written: why the key parser refuses the public key (None: it accepts it)."""


def ed25519_cases() -> list[EdCase]:
    b = _ed.BASE
    t8 = _torsion8()
    a = _ed_scalar("edge A")
    honest = _ed.encode(_ed.mul(a, b))
    mixed_a = _ed.add(_ed.mul(a, b), t8)
    mixed = _ed.encode(mixed_a)
    cases: list[EdCase] = []

    def add(
        id: str,
        description: str,
        pk: bytes,
        r: bytes,
        s: int,
        msg: bytes,
        faults: Sequence[str],
        key_reason: str | None,
    ) -> None:
        cases.append(EdCase(id, description, pk, r + _enc(s), msg, tuple(faults), key_reason))

    # -- valid --------------------------------------------------------------------------------
    rfc = keys.private_from_seed(bytes.fromhex(RFC8032_TEST1_SEED))
    sig = rfc.sign(b"")
    add(
        "valid-rfc8032-test1",
        "RFC 8032 section 7.1 TEST 1: empty message",
        raw(rfc),
        sig[:32],
        int.from_bytes(sig[32:], "little"),
        b"",
        [],
        None,
    )
    signer = key("ed25519 signer")
    msg = b"cpi ed25519 vectors: an honest signature"
    sig = signer.sign(msg)
    s_honest = int.from_bytes(sig[32:], "little")
    add(
        "valid", "an honest signature, for contrast", raw(signer), sig[:32], s_honest, msg, [], None
    )

    # -- S --------------------------------------------------------------------------------------
    add(
        "s-plus-l",
        "the honest signature with S + L in place of S: the same S mod L, the equation holds",
        raw(signer),
        sig[:32],
        s_honest + _ed.L,
        msg,
        ["S not below L"],
        None,
    )

    # -- the forgery that OpenSSL accepts ------------------------------------------------------
    identity = _enc(1)
    add(
        "identity-key-forgery",
        "A = identity, R = identity, S = 0: the cofactorless equation holds for ANY message",
        identity,
        identity,
        0,
        b"any message",
        ["A small order", "R small order"],
        "small-order",
    )

    # -- small-order A: R = [r]B, S = r, a message with [k]A = identity -----------------------
    for i, (what, enc) in enumerate(_small_order_encodings()):
        pt = _ed.decode(enc)
        assert pt is not None
        r = _ed_scalar(f"R for small-order A {i}")
        r_enc = _ed.encode(_ed.mul(r, b))
        m = _search_message(
            f"small-order-a-{i}",
            r_enc,
            enc,
            lambda k, pt=pt: _ed.equal(_ed.mul(k % 8, pt), _ed.IDENTITY),  # type: ignore[misc]
        )
        non_canonical = "non-canonical" in what or "negative" in what
        add(
            f"small-order-a-{i}",
            f"A is a small-order point: {what}; R = [r]B, S = r, [k]A = identity, so the "
            "cofactorless equation holds",
            enc,
            r_enc,
            r,
            m,
            (["A non-canonical"] if non_canonical else []) + ["A small order"],
            "non-canonical" if non_canonical else "small-order",
        )

    # -- small-order R: S = k*a, with A = [a]B (R = identity) or A = [a]B + T (else) ----------
    for i, (what, enc) in enumerate(_small_order_encodings()):
        pt = _ed.decode(enc)
        assert pt is not None
        non_canonical = "non-canonical" in what or "negative" in what
        extra = ["R non-canonical"] if non_canonical else []
        if _ed.equal(pt, _ed.IDENTITY):
            m = f"cpi ed25519 vector small-order-r-{i}".encode()
            k = _hram(enc, honest, m)
            add(
                f"small-order-r-{i}",
                f"R is a small-order point: {what}; A = [a]B, S = k*a: the equation holds",
                honest,
                enc,
                k * a % _ed.L,
                m,
                [*extra, "R small order"],
                None,
            )
            continue
        neg = _ed.neg(pt)
        m = _search_message(
            f"small-order-r-{i}",
            enc,
            mixed,
            lambda k, neg=neg: _ed.equal(_ed.mul(k % 8, t8), neg),  # type: ignore[misc]
        )
        k = _hram(enc, mixed, m)
        add(
            f"small-order-r-{i}",
            f"R is a small-order point: {what}; A = [a]B + T (T of order 8) with [k]T = -R, "
            "S = k*a: the equation holds",
            mixed,
            enc,
            k * a % _ed.L,
            m,
            [*extra, "R small order"],
            "mixed-order",
        )

    # -- points with a small-order component ---------------------------------------------------
    r = _ed_scalar("R for mixed-order A")
    r_enc = _ed.encode(_ed.mul(r, b))
    m = _search_message("mixed-order-a", r_enc, mixed, lambda k: k % 8 == 0)
    k = _hram(r_enc, mixed, m)
    add(
        "mixed-order-a",
        "A = [a]B + T (T of order 8), R = [r]B, [k]T = identity: the cofactorless equation "
        "holds, so the signature is valid; the key parser refuses A",
        mixed,
        r_enc,
        (r + k * a) % _ed.L,
        m,
        [],
        "mixed-order",
    )
    m = _search_message("mixed-order-a-cofactored", r_enc, mixed, lambda k: k % 8 != 0)
    k = _hram(r_enc, mixed, m)
    add(
        "mixed-order-a-cofactored-only",
        "A = [a]B + T, R = [r]B, [k]T != identity: only the cofactored equation holds",
        mixed,
        r_enc,
        (r + k * a) % _ed.L,
        m,
        ["equation"],
        "mixed-order",
    )
    r_mixed = _ed.encode(_ed.add(_ed.mul(r, b), t8))
    m = b"cpi ed25519 vector mixed-order-r"
    k = _hram(r_mixed, honest, m)
    add(
        "mixed-order-r-cofactored-only",
        "A = [a]B, R = [r]B + T (T of order 8), S = r + k*a: only the cofactored equation holds",
        honest,
        r_mixed,
        (r + k * a) % _ed.L,
        m,
        ["equation"],
        None,
    )
    r_mixed3 = _ed.encode(_ed.add(_ed.mul(r, b), _ed.mul(3, t8)))
    m = _search_message("mixed-order-a-r", r_mixed3, mixed, lambda k: (k + 3) % 8 == 0)
    k = _hram(r_mixed3, mixed, m)
    add(
        "mixed-order-a-and-r",
        "A = [a]B + T, R = [r]B + [3]T, [k]T = -[3]T: the small-order components cancel, the "
        "cofactorless equation holds and the signature is valid; the key parser refuses A",
        mixed,
        r_mixed3,
        (r + k * a) % _ed.L,
        m,
        [],
        "mixed-order",
    )

    # -- bytes that are no point, non-canonical encodings of ordinary points ---------------------
    off = _off_curve_y()
    add(
        "a-not-on-curve",
        f"A's y ({int.from_bytes(off, 'little')}) has no x on the curve",
        off,
        sig[:32],
        s_honest,
        msg,
        ["A not on curve"],
        "not-on-curve",
    )
    add(
        "r-not-on-curve",
        f"R's y ({int.from_bytes(off, 'little')}) has no x on the curve",
        raw(signer),
        off,
        s_honest,
        msg,
        ["R not on curve"],
        None,
    )
    big = _non_canonical_big()
    y0 = int.from_bytes(big, "little") - _ed.P
    add(
        "a-non-canonical",
        f"A is encoded with y = p + {y0} (a point that is not of small order)",
        big,
        sig[:32],
        s_honest,
        msg,
        ["A non-canonical", "equation"],
        "non-canonical",
    )
    add(
        "r-non-canonical",
        f"R is encoded with y = p + {y0} (a point that is not of small order)",
        raw(signer),
        big,
        s_honest,
        msg,
        ["R non-canonical", "equation"],
        None,
    )
    for c in cases:
        computed = _computed_faults(c.public_key, c.signature, c.message)
        if list(c.faults) != computed:
            raise AssertionError(
                f"ed25519 case {c.id}: written {list(c.faults)}, computed {computed}"
            )
        found = _ed.describe_public_key(c.public_key)
        if (found is None) != (c.key_reason is None) or (
            c.key_reason is not None and KEY_REASONS[c.key_reason] not in str(found)
        ):
            raise AssertionError(f"ed25519 case {c.id}: key reason {c.key_reason}, found {found}")
    return cases


def ed25519_vectors() -> dict[str, Any]:
    out = []
    for c in ed25519_cases():
        cofactorless, cofactored = _equations(c.public_key, c.signature, c.message)
        out.append(
            {
                "id": c.id,
                "description": c.description,
                "message_hex": c.message.hex(),
                "public_key_hex": c.public_key.hex(),
                "signature_hex": c.signature.hex(),
                "equations": {"cofactorless": cofactorless, "cofactored": cofactored},
                "faults": list(c.faults),
                "verify": "reject" if c.faults else "accept",
                "key": {
                    "verdict": "accept" if c.key_reason is None else "reject",
                    "reason": c.key_reason,
                },
            }
        )
    return {
        "description": "Ed25519 edge cases against the one verification rule of this protocol "
        "(libsodium's crypto_sign_verify_detached, 1.0.18 or later: S < L, canonical A and R, "
        "neither of small order, cofactorless equation) and its key rule (a canonical "
        "encoding of a point of the prime-order subgroup, not of small order). 'verify': "
        "accept or reject the signature_hex over message_hex under public_key_hex, as raw "
        "bytes; 'faults': every property the rule refuses (the verdict does not depend on the "
        "order of the checks); 'equations': [S]B = R + [k]A, and the same times 8, on the "
        "points as decoded leniently (y mod p), k = SHA-512(R || A || M) mod L, null when "
        "a point does not decode; 'key': what parsing public_key_hex as a key gives. "
        "See docs/vectors.md and docs/verification.md.",
        "faults": list(ED_FAULTS),
        "key_reasons": sorted(KEY_REASONS),
        "cases": out,
    }


# -- output ------------------------------------------------------------------------------------

FILES: dict[str, Callable[[], dict[str, Any]]] = {
    "cpid.json": cpid_vectors,
    "keys.json": key_vectors,
    "envelopes.json": envelope_vectors,
    "chains.json": chain_vectors,
    "ed25519.json": ed25519_vectors,
}


def render(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=True) + "\n"


def build() -> dict[str, str]:
    """File name -> file text, for every vector file."""
    return {name: render(make()) for name, make in FILES.items()}


def main(argv: list[str] | None = None) -> int:
    return write_or_check(
        build(),
        out_dir=OUT_DIR,
        root=ROOT,
        script="tools/gen_vectors.py",
        doc=__doc__ or "",
        argv=argv,
    )


if __name__ == "__main__":
    sys.exit(main())
