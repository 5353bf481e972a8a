"""What the replica knows about the chain of each signing key, and failure labels.

Records are verified by the contract's verifier (:mod:`resolver.verify`).  Around it,
the replica needs to know, per signing key id, whether its chain verifies *now* and
until when (:class:`SignerVerdict`, from :func:`schemas.chain.verify_chain`), so that
it re-verifies exactly the records affected when a cert or revocation changes or a
validity window closes, and which chain to serve with each record.

Failure *reasons* are short labels for metrics (``bad_signature``, ``revoked``, ...)
derived from the first failed check of the verifier; :data:`REASONS` lists them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from schemas import dsse
from schemas import keys as _keys
from schemas.bundle import assemble_chain
from schemas.chain import CLOCK_SKEW, TrustAnchors, verify_chain
from schemas.models import Revocation, parse_payload

__all__ = [
    "REASONS",
    "SignerVerdict",
    "label_of",
    "pending_revocation",
    "verify_signer",
]

REASONS = (
    "malformed",  # not a DSSE envelope (bad JSON, bad base64, missing fields)
    "bad_payload",  # wrong payloadType, or the signed payload is not a valid document
    "unsigned",  # no cert in /certs/ for the signing key: no chain at all
    "untrusted",  # the chain does not end at a configured anchor
    "bad_signature",  # a signature (record's or a cert's) does not verify: forged, tampered
    "outside_namespace",  # CPID prefix outside the signer's subject, or a cert outside its issuer
    "scope",  # signer lacks scope issue, or an issuer lacks delegate
    "issuer_mismatch",  # a document names another issuer than the key that signed it
    "chain",  # other chain-shape failures (depth)
    "expired",  # record or cert past its validity window
    "not_yet_valid",  # record or cert before its validity window
    "revoked",  # a cert serial or key in the chain, or the record's key, is revoked
    "invalid_cpid",  # the record's CPID is malformed or its check character wrong
    "key_mismatch",  # the CPID's serial or kind does not match the record's key or kind
    "wrong_key",  # a valid record stored under another CPID's key
)


def label_of(rule: int, what: str, detail: str) -> str:
    """The metrics label for the first failed check (rule, what, detail) of a verification."""
    if rule == 3:
        return "not_yet_valid" if "not valid before" in detail else "expired"
    if rule == 4:
        return "revoked"
    if rule == 5:
        return "invalid_cpid" if "well formed" in what else "key_mismatch"
    if rule == 1:
        if what == "certificate chain present":
            return "unsigned"
        if what.startswith("record signed by"):
            return "bad_signature" if "signatures verify" in detail else "bad_payload"
        if what == "signer's subject is the CPID prefix":
            return "outside_namespace"
        if "scope" in what:
            return "scope"
        if "issuer" in what:
            return "issuer_mismatch"
    if rule == 2:
        if what.startswith("cert signed by"):
            return "bad_signature" if "signatures verify" in detail else "bad_payload"
        if what == "issuer contains subject":
            return "outside_namespace"
        if what == "chain ends at a configured anchor":
            return "untrusted"
        if what == "issuer holds delegate":
            return "scope"
        if what == "cert names its signer as issuer":
            return "issuer_mismatch"
    return "chain"


@dataclass(frozen=True, slots=True)
class SignerVerdict:
    """The outcome of verifying the chain of one signing key id (rules 2-4 for its certs).

    ``valid_until`` is when the verdict must be recomputed at the latest: the end of
    the narrowest cert window, or a revocation that takes effect later.
    ``kids``: every key id whose ``/certs/`` entry the chain assembly looked at (a
    change to any of them invalidates the verdict).
    """

    kid: str
    chain: tuple[dsse.Envelope, ...]
    ok: bool
    reason: str
    detail: str
    rule: int
    what: str = ""
    check_detail: str = ""
    subject: str = ""
    scopes: frozenset[str] = frozenset()
    key: Ed25519PublicKey | None = None
    key_raw: bytes = b""
    ancestors: Mapping[str, Ed25519PublicKey] | None = None
    kids: frozenset[str] = frozenset()
    valid_until: float = math.inf

    def fingerprint(self) -> tuple[object, ...]:
        """What the records signed by this key depend on (compare old and new verdicts)."""
        return (
            self.ok,
            self.reason,
            self.detail,
            self.subject,
            self.scopes,
            self.key_raw,
            tuple(c.signatures for c in self.chain),
            tuple(sorted(self.ancestors or {})),
            self.valid_until,
        )


def _revocation(
    env: dsse.Envelope | None, signers: Mapping[str, Ed25519PublicKey]
) -> Revocation | None:
    """The revocation in ``env`` if one of ``signers`` signed it (else it carries no weight)."""
    if env is None or not signers:
        return None
    try:
        v = dsse.verify(env, signers, payload_types=(Revocation.media_type(),))
        return parse_payload(v.payload_type, v.payload, Revocation)
    except Exception:  # InvalidDataError, or whatever a hostile value raises
        return None


def verify_signer(
    kid: str,
    certs: Callable[[str], dsse.Envelope | None],
    *,
    anchors: TrustAnchors,
    revocations: Mapping[str, dsse.Envelope],
    now: int,
    skew: int = CLOCK_SKEW,
) -> SignerVerdict:
    """Assemble and verify the chain of signing key ``kid`` from the replica's certs."""
    anchor_kids = {a.kid for a in anchors}
    looked: set[str] = set()

    def lookup(k: str) -> dsse.Envelope | None:
        looked.add(k)
        return certs(k)

    chain = tuple(assemble_chain(kid, lookup, anchor_kids=anchor_kids))
    result = verify_chain(chain, anchors=anchors, revocations=revocations, now=now, skew=skew)
    failure = result.failure
    if failure is not None:
        return SignerVerdict(
            kid,
            chain,
            False,
            label_of(failure.rule, failure.what, failure.detail),
            result.reason,
            failure.rule,
            failure.what,
            failure.detail,
            kids=frozenset(looked),
            # a cert that is not valid yet may become valid: look again in a minute
            valid_until=now + 60 if failure.rule == 3 else math.inf,
        )
    certs_ = result.certs
    leaf = certs_[0]
    top = anchors.get(chain[-1].keyid)
    assert top is not None  # verify_chain checked that the chain ends at an anchor
    ancestors: dict[str, Ed25519PublicKey] = {top[0].kid: top[1]}
    for cert in certs_:
        raw = _keys.b64url_decode(cert.public_key)
        ancestors[_keys.kid(raw)] = _keys.public_from_b64url(cert.public_key)
    horizon = float(min(c.not_after for c in certs_) + skew)
    for cert in certs_:
        raw = _keys.b64url_decode(cert.public_key)
        for ident in (cert.serial, _keys.kid(raw)):
            rev = _revocation(revocations.get(ident), ancestors)
            if rev is not None and rev.revoked_at - skew > now:
                horizon = min(horizon, float(rev.revoked_at - skew))
    key_raw = _keys.b64url_decode(leaf.public_key)
    return SignerVerdict(
        kid,
        chain,
        True,
        "",
        "",
        0,
        subject=leaf.subject,
        scopes=frozenset(leaf.scopes),
        key=_keys.public_from_b64url(leaf.public_key),
        key_raw=key_raw,
        ancestors=ancestors,
        kids=frozenset(looked),
        valid_until=horizon,
    )


def pending_revocation(
    record_kid: str,
    prefix: str,
    signer: SignerVerdict,
    revocations: Mapping[str, dsse.Envelope],
    *,
    now: int,
    skew: int = CLOCK_SKEW,
) -> float:
    """When a revocation of the record's own key takes effect, if one is pending.

    A revocation of ``record_kid`` signed by a key of the record's chain and dated in
    the future does not fail verification yet; the replica re-verifies the record at
    that time.  Returns ``inf`` when there is none.
    """
    rev = _revocation(revocations.get(record_kid), signer.ancestors or {})
    if rev is None or rev.target != record_kid or rev.subject != prefix:
        return math.inf
    at = float(rev.revoked_at - skew)
    return at if at > now else math.inf
