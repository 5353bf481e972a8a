"""Card-hours from the transparency log alone: every usage receipt verified, then totalled.

Trusts only the trust anchors and the log's verifier key.  :func:`audit_usage` reads
the index (through :mod:`registry.index`) at one revision and:

1. verifies the latest checkpoint (``/cpi/v1/log/latest``) with the log's key;
2. rebuilds the Merkle tree from ``/cpi/v1/audit/`` and requires its root at the
   checkpoint's size to be the signed root: an entry deleted, rewritten or skipped
   fails this, and **nothing** is counted then (the log no longer proves anything);
   since every leaf up to the checkpoint is in that tree, each one is included;
3. verifies each ``usagesigner.v1`` under ``/cpi/v1/usagesigners/`` against the anchors;
4. for every ``usage`` leaf up to the checkpoint: reads the receipt it names, checks
   the leaf's digest against the envelope, the signature against a usage signer valid
   for the receipt's CPID and end time, and the payload against the leaf (CPID, claim
   and receipt number); a receipt counted twice is refused the second time.

A receipt that fails a check is reported and not counted.  Receipts stored under
``/cpi/v1/usage/`` that no signed leaf names are reported too (not yet in a checkpoint,
or never logged); they are not counted either.

Totals are in unit-seconds over the part of each receipt's ``[start, end)`` inside
``[since, until)``, and in hours (unit-seconds / 3600): per holder and per namespace
(the CPID's prefix).  A gang's receipt is counted part by part, each on its own CPID
(``--namespace`` keeps the parts inside it), so its parts add up to the gang's units.  Units are accelerators for records with accelerators, CPU cores
otherwise (the claims service's units).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from registry.index import Index, Keys, Prefix, parse_key
from registry.index.auditlog import digest as envelope_digest
from schemas import _json, dsse
from schemas import keys as _keys
from schemas.chain import TrustAnchors
from schemas.checkpoint import Checkpoint, NoteVerifier, open_checkpoint
from schemas.cpid import ns_contains as contains
from schemas.cpid import parse as parse_cpid
from schemas.errors import CPIError
from schemas.merkle import MerkleTree
from schemas.models import Revocation, parse_payload
from schemas.usage import Usage, UsageSigner

__all__ = [
    "CLOCK_SKEW_S",
    "Receipt",
    "Signer",
    "UsageReport",
    "audit_usage",
    "load_signers",
    "revoked_at",
]

CLOCK_SKEW_S: Final = 60
_LATEST: Final = Keys.log("latest")
_PAGE: Final = 1000


@dataclass(frozen=True, slots=True)
class Receipt:
    """A verified receipt (for a gang, one of its parts: ``cpid`` and ``units`` are the
    part's), with the seconds of it that fall in the asked window."""

    leaf: int
    receipt: Usage
    seconds: int
    """``end − start`` clipped to ``[since, until)``."""
    cpid: str = ""
    """The resource counted (the receipt's ``cpid`` unless a gang's part)."""
    units: int = 0
    """Its units (the receipt's ``units`` unless a gang's part)."""

    def __post_init__(self) -> None:
        if not self.cpid:
            object.__setattr__(self, "cpid", self.receipt.cpid)
            object.__setattr__(self, "units", self.receipt.units)

    @property
    def namespace(self) -> str:
        return self.cpid.split("/", 1)[0]

    @property
    def unit_seconds(self) -> int:
        return self.units * self.seconds

    def to_dict(self) -> dict[str, Any]:
        r = self.receipt
        out: dict[str, Any] = {
            "leaf": self.leaf,
            "claim_id": r.claim_id,
            "n": r.n,
            "holder": r.holder,
            "cpid": self.cpid,
            "units": self.units,
            "start": r.start,
            "end": r.end,
            "reason": r.reason,
            "seconds": self.seconds,
            "unit_seconds": self.unit_seconds,
        }
        if r.parts is not None:
            out["gang"] = {"anchor": r.cpid, "units": r.units, "parts": len(r.parts)}
        return out


def _hours(unit_seconds: int) -> float:
    return round(unit_seconds / 3600, 6)


@dataclass(slots=True)
class UsageReport:
    """What :func:`audit_usage` checked, what it counted and what it refused."""

    since: int
    until: int
    holder: str | None = None
    namespace: str | None = None
    checkpoint: Checkpoint | None = None
    checks: list[tuple[str, bool, str]] = field(default_factory=list)
    receipts: list[Receipt] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    """Receipts refused (forged, tampered, missing, duplicated), one line each."""
    unlogged: list[str] = field(default_factory=list)
    """Receipts in ``/usage/`` that no signed leaf names (not counted)."""

    @property
    def ok(self) -> bool:
        """The log verified and no receipt was refused."""
        return all(ok for _, ok, _ in self.checks) and not self.problems

    def add(self, what: str, ok: bool, detail: str = "") -> None:
        self.checks.append((what, ok, detail))

    def totals(self, by: str) -> dict[str, dict[str, Any]]:
        """``{holder or namespace: {"receipts", "unit_seconds", "hours"}}``."""
        out: dict[str, dict[str, Any]] = {}
        counted: set[tuple[str, int]] = set()  # a gang's receipt counts once per name
        for r in self.receipts:
            name = r.receipt.holder if by == "holder" else r.namespace
            t = out.setdefault(name, {"receipts": 0, "unit_seconds": 0, "hours": 0.0})
            if (name, r.leaf) not in counted:
                counted.add((name, r.leaf))
                t["receipts"] += 1
            t["unit_seconds"] += r.unit_seconds
        for t in out.values():
            t["hours"] = _hours(t["unit_seconds"])
        return dict(sorted(out.items()))

    @property
    def unit_seconds(self) -> int:
        return sum(r.unit_seconds for r in self.receipts)

    def to_dict(self) -> dict[str, Any]:
        cp = self.checkpoint
        return {
            "ok": self.ok,
            "since": self.since,
            "until": self.until,
            "holder": self.holder,
            "namespace": self.namespace,
            "checkpoint": None
            if cp is None
            else {"origin": cp.origin, "size": cp.size, "root": cp.root_hash.hex()},
            "unit_seconds": self.unit_seconds,
            "hours": _hours(self.unit_seconds),
            "by_holder": self.totals("holder"),
            "by_namespace": self.totals("namespace"),
            "receipts": [r.to_dict() for r in self.receipts],
            "problems": list(self.problems),
            "unlogged": list(self.unlogged),
            "checks": [{"what": w, "ok": ok, "detail": d} for w, ok, d in self.checks],
        }


# -- signers -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Signer:
    """A usage signing key an anchor vouches for."""

    statement: UsageSigner
    public_key: Ed25519PublicKey
    anchor_key: Ed25519PublicKey
    revoked_at: int | None = None
    """From a ``revocation.v1`` by the same anchor at ``/revoked/<kid>``: receipts ending
    at or after ``revoked_at - 60`` are refused."""


def revoked_at(signer: Signer, kid: str, value: bytes | None) -> int | None:
    """``revoked_at`` of a valid revocation of ``kid`` (signed by the signer's anchor key,
    same subject), else None."""
    if value is None:
        return None
    try:
        env = dsse.Envelope.from_json(value)
        v = dsse.verify(
            env,
            {_keys.kid_of(signer.anchor_key): signer.anchor_key},
            payload_types=(Revocation.media_type(),),
        )
        rev = parse_payload(v.payload_type, v.payload, Revocation)
    except CPIError:
        return None
    if rev.kid != kid or rev.subject != signer.statement.subject:
        return None
    return rev.revoked_at


def load_signers(
    envelopes: Iterable[tuple[str, bytes]], anchors: TrustAnchors, problems: list[str]
) -> dict[str, Signer]:
    """The usage signers, by kid, whose ``usagesigner.v1`` verifies under an anchor key,
    names a subject inside that anchor's and is stored under its own key's kid."""
    out: dict[str, Signer] = {}
    for key, value in envelopes:
        try:
            env = dsse.Envelope.from_json(value)
            found = anchors.get(env.keyid)
            if found is None:
                raise CPIError(f"signed by {env.keyid or 'no key id'}, not an anchor key")
            anchor, anchor_key = found
            v = dsse.verify(env, {env.keyid: anchor_key}, payload_types=(UsageSigner.media_type(),))
            doc = parse_payload(v.payload_type, v.payload, UsageSigner)
            if not contains(anchor.subject, doc.subject):
                raise CPIError(f"subject {doc.subject} is outside the anchor's {anchor.subject}")
            pub = _keys.public_from_b64url(doc.public_key)
            kid = _keys.kid_of(pub)
            if key != Keys.usage_signer(kid):
                raise CPIError(f"stored under {key}, but it names key {kid}")
        except (CPIError, ValueError) as exc:
            problems.append(f"usage signer {key}: {exc}")
            continue
        out[kid] = Signer(doc, pub, anchor_key)
    return out


# -- the audit ---------------------------------------------------------------------------------


def _clip(start: int, end: int, since: int, until: int) -> int:
    return max(0, min(end, until) - max(start, since))


async def audit_usage(
    index: Index,
    *,
    verifier: NoteVerifier,
    anchors: TrustAnchors,
    since: int,
    until: int,
    holder: str | None = None,
    namespace: str | None = None,
) -> UsageReport:
    """Verify the log and total the receipts of ``holder`` (all when None) on resources
    inside ``namespace`` (all when None) over ``[since, until)``.  See the module."""
    rep = UsageReport(since=since, until=until, holder=holder, namespace=namespace)
    found, rev = await index.get_prefix(_LATEST)
    latest = next((kv for kv in found if kv.key == _LATEST), None)
    if latest is None:
        rep.add("checkpoint signed by the log key", False, f"{_LATEST} is absent")
        return rep
    try:
        cp = open_checkpoint(latest.value, verifier, origin=verifier.name)
    except CPIError as exc:
        rep.add("checkpoint signed by the log key", False, str(exc))
        return rep
    rep.checkpoint = cp
    rep.add("checkpoint signed by the log key", True, f"{cp.origin} size {cp.size}")

    tree = MerkleTree()
    leaves: list[bytes] = []
    gap = ""
    async for page in index.iter_prefix(Prefix.AUDIT, page_size=_PAGE, revision=rev):
        for kv in page.kvs:
            try:
                name = parse_key(kv.key).name
            except ValueError:
                name = ""
            if not gap and (not name.isdigit() or int(name) != tree.size + 1):
                gap = f"entry {tree.size + 1} is missing (next key {kv.key})"
            if not gap:
                tree.append(kv.value)
                leaves.append(kv.value)
    if tree.size < cp.size:
        why = gap or f"the stream ends at {tree.size}"
        rep.add(
            "audit stream matches the checkpoint",
            False,
            f"the checkpoint covers {cp.size} entries but only {tree.size} are in order: {why} "
            "(entries were deleted: nothing is counted)",
        )
        return rep
    if tree.root(cp.size) != cp.root_hash:
        rep.add(
            "audit stream matches the checkpoint",
            False,
            f"the root of the first {cp.size} entries is not the signed root: entries were "
            "rewritten (nothing is counted)",
        )
        return rep
    rep.add(
        "audit stream matches the checkpoint",
        True,
        f"root of {cp.size} entries = signed root; {tree.size - cp.size} newer entries unsigned",
    )

    signer_kvs, _ = await index.get_prefix(Prefix.USAGE_SIGNERS, revision=rev)
    signers = load_signers(((kv.key, kv.value) for kv in signer_kvs), anchors, rep.problems)
    for kid, signer in list(signers.items()):
        revoked, _ = await index.get_prefix(Keys.revoked(kid), revision=rev)
        value = next((kv.value for kv in revoked if kv.key == Keys.revoked(kid)), None)
        at = revoked_at(signer, kid, value)
        if at is not None:
            signers[kid] = dataclasses.replace(signer, revoked_at=at)
    rep.add("usage signers named by an anchor", True, f"{len(signers)} key(s)")

    stored_kvs, _ = await index.get_prefix(Prefix.USAGE, revision=rev)
    stored: dict[str, bytes] = {}
    for kv in stored_kvs:
        try:
            stored[parse_key(kv.key).name] = kv.value
        except ValueError:
            rep.unlogged.append(f"{kv.key}: not a receipt key")
    seen: set[str] = set()
    named_later: set[str] = set()
    for i, leaf_bytes in enumerate(leaves):
        try:
            leaf = _json.loads(leaf_bytes)
        except ValueError:
            continue
        if not isinstance(leaf, dict) or leaf.get("op") != "usage":
            continue
        receipt = leaf.get("receipt")
        if i >= cp.size:
            if isinstance(receipt, str):
                named_later.add(receipt)
            continue
        problem = _check_leaf(rep, i, leaf, stored, seen, signers)
        if problem is not None:
            rep.problems.append(f"leaf {i} ({receipt}): {problem}")
    for name in sorted(set(stored) - seen):
        if name in named_later:
            rep.unlogged.append(f"{name}: logged after the checkpoint (not yet signed)")
        else:
            rep.unlogged.append(f"{name}: no log entry names it")
    return rep


def _check_leaf(
    rep: UsageReport,
    i: int,
    leaf: dict[str, Any],
    stored: dict[str, bytes],
    seen: set[str],
    signers: dict[str, Signer],
) -> str | None:
    """Verify one usage leaf; count it when it passes.  The problem otherwise."""
    name = leaf.get("receipt")
    if not isinstance(name, str):
        return "the entry names no receipt"
    if name in seen:
        return "a second entry for the same receipt (not counted again)"
    seen.add(name)
    value = stored.get(name)
    if value is None:
        return f"the receipt {Prefix.USAGE}{name} is missing"
    try:
        env = dsse.Envelope.from_json(value)
    except CPIError as exc:
        return f"not an envelope: {exc}"
    if envelope_digest(env) != leaf.get("digest"):
        return "the stored receipt is not the one logged (digest differs): tampered"
    signer = signers.get(env.keyid)
    if signer is None:
        return f"signed by {env.keyid or 'no key id'}, not a usage signer an anchor names"
    doc, pub = signer.statement, signer.public_key
    try:
        v = dsse.verify(env, {env.keyid: pub}, payload_types=(Usage.media_type(),))
        r = parse_payload(v.payload_type, v.payload, Usage)
    except CPIError as exc:
        return f"forged or unreadable: {exc}"
    claim_id, _, n = name.partition("/")
    if r.claim_id != claim_id or not n.isdigit() or int(n) != r.n:
        return f"the receipt is {r.claim_id}/{r.n}, the entry names {name}"
    if r.cpid != leaf.get("cpid"):
        return f"the receipt is about {r.cpid}, the entry about {leaf.get('cpid')}"
    for cpid, _ in r.split():
        if not contains(doc.subject, parse_cpid(cpid).prefix):
            return f"its signer may sign for {doc.subject} only, not for {cpid}"
    if not doc.not_before - CLOCK_SKEW_S <= r.end <= doc.not_after + CLOCK_SKEW_S:
        return f"it ends at {r.end}, outside its signer's validity"
    if signer.revoked_at is not None and r.end >= signer.revoked_at - CLOCK_SKEW_S:
        return f"its signer was revoked at {signer.revoked_at}"
    if rep.holder is not None and r.holder != rep.holder:
        return None
    seconds = _clip(r.start, r.end, rep.since, rep.until)
    if seconds > 0 or (r.start == r.end and rep.since <= r.start < rep.until):
        for cpid, units in r.split():  # a gang's receipt counts each part on its own CPID
            if rep.namespace is None or contains(rep.namespace, parse_cpid(cpid).prefix):
                rep.receipts.append(Receipt(i, r, seconds, cpid, units))
    return None
