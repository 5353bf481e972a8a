"""Trust-chain verification (docs/protocol.md §2–5, the five rules). No I/O.

A record is valid when, checked segment by segment:

1. its signature verifies under the key of a cert whose subject *is* the CPID's prefix
   (docs/verification.md: a record is signed by its own namespace's certified key; a
   parent does not issue into a namespace below it), and that cert holds ``issue``;
2. each cert is signed by its issuer, the issuer's subject contains the cert's subject,
   the issuer holds ``delegate``, the chain ends at a configured anchor, depth <= 8;
3. every cert and the record are inside their validity windows (+-60 s skew);
4. no cert serial or key in the chain (nor the record's key) is revoked;
5. the CPID's serial matches the record's ``public_key`` and its check character is right.

The chain is walked from the anchor down, so no payload is parsed before the
signature over it has been verified.  :func:`verify_record` and :func:`verify_chain`
return a :class:`ChainResult` (every check made, the first failure); the ``require_*``
wrappers raise :class:`~schemas.errors.ChainError` instead.  Both share one walk.
A caller that needs only the verdict (the resolver, per record) passes
``checks=False`` to :func:`verify_record_prepared`: the same walk then keeps only the
failed check, and formats no message for a check that passes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from schemas import _json, dsse
from schemas import cpid as _cpid
from schemas import keys as _keys
from schemas.endorsement import Endorsement
from schemas.errors import (
    ChainError,
    EnvelopeError,
    ExpiredError,
    InvalidCPIDError,
    InvalidDataError,
    KeyFileError,
    PayloadError,
    RevokedError,
    SignatureError,
)
from schemas.models import Anchor, Cert, Document, Record, Revocation, parse_payload

__all__ = [
    "CLOCK_SKEW",
    "MAX_DEPTH",
    "ChainResult",
    "Check",
    "PreparedChain",
    "TrustAnchors",
    "endorsed_anchors",
    "open_self_signed",
    "open_signed",
    "prepare_chain",
    "require_chain",
    "require_record",
    "verify_chain",
    "verify_endorsement",
    "verify_record",
    "verify_record_prepared",
]

MAX_DEPTH = 8
CLOCK_SKEW = 60

RULES = {
    1: "record signed by a cert whose subject is the CPID's prefix, holding scope issue",
    2: "each cert signed by its issuer, inside it, issuer holds delegate, ends at an anchor, depth <= 8",
    3: "every cert and the record inside their validity windows",
    4: "no cert serial or key in the chain revoked",
    5: "CPID serial matches the record's key and its check character is right",
}

D = TypeVar("D", bound=Document)


@dataclass(frozen=True, slots=True)
class Check:
    """One check made: which rule, at which link (0 = record, 1 = signer's cert, ...)."""

    rule: int
    link: int
    what: str
    ok: bool
    detail: str = ""


@dataclass(frozen=True, slots=True)
class ChainResult:
    """Outcome of a verification: every check in order and, if any, the first failure."""

    checks: tuple[Check, ...]
    certs: tuple[Cert, ...] = ()
    record: Record | None = None

    @property
    def ok(self) -> bool:
        return self.failure is None

    @property
    def failure(self) -> Check | None:
        return next((c for c in self.checks if not c.ok), None)

    @property
    def reason(self) -> str:
        f = self.failure
        return "" if f is None else f"rule {f.rule} failed at link {f.link}: {f.detail}"

    def raise_for_failure(self) -> None:
        f = self.failure
        if f is None:
            return
        cls: type[ChainError] = ChainError
        if f.rule == 3:
            cls = ExpiredError
        elif f.rule == 4:
            cls = RevokedError
        raise cls(self.reason, rule=f.rule, link=f.link, reason=f.detail)

    def to_dict(self) -> dict[str, Any]:
        f = self.failure
        return {
            "ok": f is None,
            "rule": None if f is None else f.rule,
            "link": None if f is None else f.link,
            "reason": self.reason,
            "checks": [
                {"rule": c.rule, "link": c.link, "what": c.what, "ok": c.ok, "detail": c.detail}
                for c in self.checks
            ],
        }


class TrustAnchors:
    """The configured roots of trust, one per root prefix (e.g. ``CN``), looked up by kid."""

    def __init__(
        self,
        anchors: Iterable[Anchor],
        *,
        constraints: Mapping[str, tuple[str, ...]] | None = None,
    ) -> None:
        self._by_kid: dict[str, tuple[Anchor, Ed25519PublicKey]] = {}
        for a in anchors:
            self._by_kid[a.kid] = (a, _keys.public_from_b64url(a.public_key))
        if not self._by_kid:
            raise KeyFileError("at least one trust anchor is required")
        self._permitted: dict[str, tuple[str, ...]] = dict(constraints or {})
        """kid -> the namespaces records under that anchor may have (an endorsed anchor's
        name constraints); kids not in it are unconstrained."""

    def permitted(self, kid: str) -> tuple[str, ...] | None:
        """The name constraints of the anchor with ``kid`` (None: unconstrained)."""
        return self._permitted.get(kid)

    def extended(self, more: Iterable[tuple[Anchor, tuple[str, ...]]]) -> TrustAnchors:
        """These anchors plus ``more`` (each with its name constraints)."""
        extra = list(more)
        constraints = dict(self._permitted)
        for a, permitted in extra:
            constraints[a.kid] = permitted
        return TrustAnchors([*self, *(a for a, _ in extra)], constraints=constraints)

    @classmethod
    def from_json(cls, data: bytes | str) -> TrustAnchors:
        """Parse an anchor file: one ``anchor.v1`` object or a list of them."""
        try:
            obj = _json.loads(data)
        except ValueError as exc:
            raise KeyFileError(f"anchor file is not valid JSON: {exc}") from exc
        items = obj if isinstance(obj, list) else [obj]
        try:
            return cls(Anchor.model_validate(item) for item in items)
        except ValueError as exc:
            raise KeyFileError(f"invalid anchor: {exc}") from exc

    def get(self, kid: str) -> tuple[Anchor, Ed25519PublicKey] | None:
        return self._by_kid.get(kid)

    @property
    def subjects(self) -> list[str]:
        return sorted(a.subject for a, _ in self._by_kid.values())

    def __iter__(self) -> Any:
        return (a for a, _ in self._by_kid.values())


@dataclass(slots=True)
class _Signer:
    subject: str
    kid: str
    key: Ed25519PublicKey
    scopes: frozenset[str]
    is_anchor: bool


class _Stop(Exception):
    pass


Text = str | Callable[[], str]
"""A check's text, or a function that formats it (called only when the text is kept)."""


def _text(t: Text) -> str:
    return t if isinstance(t, str) else t()


@dataclass(slots=True)
class _Walk:
    now: int
    skew: int
    revocations: Mapping[str, dsse.Envelope]
    checks: list[Check] = field(default_factory=list)
    # keys above the current position (anchor first); any may sign a revocation below it
    ancestors: Sequence[_Signer] = ()
    keep: bool = True
    """Keep passing checks too (False: only the failed one, and no text is formatted
    for a check that passes)."""
    permitted: tuple[str, ...] | None = None
    """Name constraints of the chain's anchor (an endorsed root): the record's CPID
    prefix must be inside one of them (None: unconstrained)."""

    def check(self, rule: int, link: int, what: Text, ok: bool, detail: Text = "") -> None:
        if ok:
            if self.keep:
                self.checks.append(Check(rule, link, _text(what), True))
            return
        self.checks.append(Check(rule, link, _text(what), False, _text(detail)))
        raise _Stop

    def window(self, link: int, what: Text, start: int, end: int) -> None:
        now, skew = self.now, self.skew
        ok = start - skew <= now <= end + skew

        def detail() -> str:
            if now < start - skew:
                return f"{_text(what)} not valid before {start}, now is {now}"
            return f"{_text(what)} expired at {end}, now is {now}"

        self.check(3, link, lambda: f"{_text(what)} validity window", ok, detail)

    def revoked(self, link: int, what: Text, idents: Sequence[str], subject: str) -> None:
        for ident in idents:
            env = self.revocations.get(ident)
            if env is None:
                continue
            rev = self._valid_revocation(env)
            if rev is None or rev.target != ident or rev.subject != subject:
                continue
            if self.now >= rev.revoked_at - self.skew:
                self.check(
                    4,
                    link,
                    f"{_text(what)} not revoked",
                    False,
                    f"{ident} ({subject}) revoked at {rev.revoked_at}: {rev.reason}",
                )
        self.check(4, link, lambda: f"{_text(what)} not revoked", True)

    def _valid_revocation(self, env: dsse.Envelope) -> Revocation | None:
        keys = {s.kid: s.key for s in self.ancestors}
        try:
            v = dsse.verify(env, keys, payload_types=(Revocation.media_type(),))
            return parse_payload(v.payload_type, v.payload, Revocation)
        except InvalidDataError:
            return None  # not signed by anyone above this link: carries no weight


def _walk_chain(chain: Sequence[dsse.Envelope], anchors: TrustAnchors, w: _Walk) -> list[Cert]:
    n = len(chain)
    w.check(1, 1, "certificate chain present", n > 0, "no certificate chain")
    w.check(2, n, "chain depth", n <= MAX_DEPTH, f"chain depth {n} exceeds {MAX_DEPTH}")
    top = chain[-1]
    found = anchors.get(top.keyid)
    w.check(
        2,
        n,
        "chain ends at a configured anchor",
        found is not None,
        f"top cert is signed by key {top.keyid!r}, which is not an anchor "
        f"(anchors: {', '.join(anchors.subjects)})",
    )
    assert found is not None
    anchor, anchor_key = found
    w.permitted = anchors.permitted(anchor.kid)
    signer = _Signer(anchor.subject, anchor.kid, anchor_key, frozenset({"delegate", "issue"}), True)
    ancestors = [signer]
    w.ancestors = ancestors
    certs: list[Cert] = [None] * n  # type: ignore[list-item]
    for i in reversed(range(n)):
        link = i + 1
        env = chain[i]
        try:
            v = dsse.verify(env, {signer.kid: signer.key}, payload_types=(Cert.media_type(),))
            cert = parse_payload(v.payload_type, v.payload, Cert)
            sig_detail = ""
        except (SignatureError, PayloadError) as exc:
            cert = None
            sig_detail = (
                f"cert is not validly signed by issuer {signer.subject} ({signer.kid}): {exc}"
            )
        w.check(2, link, f"cert signed by issuer {signer.subject}", cert is not None, sig_detail)
        assert cert is not None
        w.check(
            2,
            link,
            "cert names its signer as issuer",
            cert.issuer == signer.subject,
            f"cert names issuer {cert.issuer!r} but is signed by {signer.subject!r}",
        )
        w.check(
            2,
            link,
            "issuer contains subject",
            _cpid.ns_contains(signer.subject, cert.subject),
            f"issuer {signer.subject!r} does not contain subject {cert.subject!r}",
        )
        w.check(
            2,
            link,
            "issuer holds delegate",
            signer.is_anchor or "delegate" in signer.scopes,
            f"issuer {signer.subject!r} lacks scope 'delegate' (has {sorted(signer.scopes)})",
        )
        w.window(link, f"cert for {cert.subject}", cert.not_before, cert.not_after)
        raw = _keys.b64url_decode(cert.public_key)
        w.revoked(link, f"cert for {cert.subject}", (cert.serial, _keys.kid(raw)), cert.subject)
        certs[i] = cert
        signer = _Signer(
            cert.subject,
            _keys.kid(raw),
            _keys.public_from_b64url(cert.public_key),
            frozenset(cert.scopes),
            False,
        )
        ancestors.append(signer)
    return certs


def _make_walk(
    now: int | None, skew: int, revocations: Mapping[str, dsse.Envelope] | None
) -> _Walk:
    return _Walk(int(time.time()) if now is None else now, skew, revocations or {})


def verify_chain(
    chain: Sequence[dsse.Envelope],
    *,
    anchors: TrustAnchors,
    revocations: Mapping[str, dsse.Envelope] | None = None,
    now: int | None = None,
    skew: int = CLOCK_SKEW,
) -> ChainResult:
    """Verify a cert chain (leaf first) up to an anchor; rules 2, 3 and 4."""
    w = _make_walk(now, skew, revocations)
    try:
        certs = _walk_chain(chain, anchors, w)
    except _Stop:
        return ChainResult(tuple(w.checks))
    return ChainResult(tuple(w.checks), tuple(certs))


@dataclass(frozen=True, slots=True)
class PreparedChain:
    """A cert chain walked once (rules 2-4 for each cert), ready to check many records.

    Build with :func:`prepare_chain`; :func:`verify_record_prepared` then checks a
    record signed by the chain's leaf key without walking the chain again, and gives
    exactly the :class:`ChainResult` that :func:`verify_record` gives (which is built on
    it).  An auditor sweeping a whole index verifies each distinct chain once this way.
    """

    result: ChainResult
    """The chain's own checks; ``result.ok`` is False when the chain itself failed."""
    _ancestors: tuple[_Signer, ...]
    _now: int
    _skew: int
    _revocations: Mapping[str, dsse.Envelope]
    _permitted: tuple[str, ...] | None = None

    @property
    def ok(self) -> bool:
        return self.result.ok


def prepare_chain(
    chain: Sequence[dsse.Envelope],
    *,
    anchors: TrustAnchors,
    revocations: Mapping[str, dsse.Envelope] | None = None,
    now: int | None = None,
    skew: int = CLOCK_SKEW,
) -> PreparedChain:
    """Walk ``chain`` (leaf first) from its anchor down once; see :class:`PreparedChain`."""
    w = _make_walk(now, skew, revocations)
    try:
        certs = tuple(_walk_chain(chain, anchors, w))
    except _Stop:
        certs = ()
    return PreparedChain(
        ChainResult(tuple(w.checks), certs),
        tuple(w.ancestors),
        w.now,
        w.skew,
        w.revocations,
        w.permitted,
    )


def _check_record(record: dsse.Envelope, w: _Walk) -> Record:
    """Rules 1, 3, 4 and 5 for the record itself, under the last signer of ``w``."""
    signer = w.ancestors[-1]
    rec: Record | None = None
    try:
        v = dsse.verify(record, {signer.kid: signer.key}, payload_types=(Record.media_type(),))
        rec = parse_payload(v.payload_type, v.payload, Record)
        detail = ""
    except (SignatureError, PayloadError) as exc:
        detail = f"record is not validly signed by {signer.subject} ({signer.kid}): {exc}"
    w.check(1, 0, lambda: f"record signed by {signer.subject}", rec is not None, detail)
    assert rec is not None
    try:
        parsed: _cpid.CPID | None = _cpid.parse(rec.cpid)
        cpid_error = ""
    except InvalidCPIDError as exc:
        parsed, cpid_error = None, str(exc)
    w.check(
        5,
        0,
        "CPID is well formed with the right check character",
        parsed is not None,
        cpid_error,
    )
    assert parsed is not None
    prefix = parsed.prefix
    w.check(
        1,
        0,
        "signer's subject is the CPID prefix",
        # both canonical (upper case, parsed): equal text is equal segments
        signer.subject == prefix,
        lambda: (
            f"CPID prefix {prefix!r} is not the signer's subject {signer.subject!r}"
            + (
                " (a record is signed by its own namespace's key, not a parent's)"
                if _cpid.ns_contains(signer.subject, prefix)
                else ""
            )
        ),
    )
    permitted = w.permitted
    if permitted is not None:
        w.check(
            2,
            len(w.ancestors) - 1,
            "CPID prefix inside the endorsed root's permitted namespaces",
            any(_cpid.ns_contains(p, prefix) for p in permitted),
            lambda: (
                f"CPID prefix {prefix!r} is outside the namespaces the endorsement of "
                f"{w.ancestors[0].subject!r} permits ({', '.join(permitted)})"
            ),
        )
    w.check(
        1,
        0,
        "signer holds scope issue",
        "issue" in signer.scopes,
        lambda: f"signer {signer.subject!r} lacks scope 'issue' (has {sorted(signer.scopes)})",
    )
    w.check(
        1,
        0,
        "record names its signer as issuer",
        rec.issuer == signer.subject,
        lambda: f"record names issuer {rec.issuer!r} but is signed by {signer.subject!r}",
    )
    w.window(0, lambda: f"record {rec.cpid}", rec.issued_at, rec.expires_at)
    raw = _keys.b64url_decode(rec.public_key)
    w.revoked(0, "record key", (_keys.kid(raw),), prefix)
    w.check(
        5,
        0,
        "CPID serial matches the record's key",
        parsed.matches_key(raw),
        lambda: (
            f"serial {parsed.serial!r} does not match public_key (expected "
            f"{_cpid.derive_serial(raw)!r})"
        ),
    )
    w.check(
        5,
        0,
        "CPID kind matches the record's kind",
        parsed.kind == rec.kind,
        lambda: f"record kind {rec.kind!r} differs from CPID kind {parsed.kind!r}",
    )
    return rec


def verify_record_prepared(
    record: dsse.Envelope, prepared: PreparedChain, *, checks: bool = True
) -> ChainResult:
    """Verify a record against a chain walked by :func:`prepare_chain`: all five rules.

    ``checks=False`` gives the same verdict -- ``ok``, ``failure``, ``reason``, ``record``
    and ``certs`` are exactly those of ``checks=True`` -- but ``result.checks`` then holds
    only the failed check (none when the record verifies), which saves building and
    formatting a dozen checks per record (the resolver verifies every record this way;
    the auditor, which prints every check, does not).
    """
    if not prepared.ok:
        failed = prepared.result.failure
        return ChainResult(prepared.result.checks if checks or failed is None else (failed,))
    w = _Walk(
        prepared._now,
        prepared._skew,
        prepared._revocations,
        list(prepared.result.checks) if checks else [],
        prepared._ancestors,
        checks,
        prepared._permitted,
    )
    try:
        rec = _check_record(record, w)
    except _Stop:
        return ChainResult(tuple(w.checks), prepared.result.certs)
    return ChainResult(tuple(w.checks), prepared.result.certs, rec)


def verify_record(
    record: dsse.Envelope,
    chain: Sequence[dsse.Envelope],
    *,
    anchors: TrustAnchors,
    revocations: Mapping[str, dsse.Envelope] | None = None,
    now: int | None = None,
    skew: int = CLOCK_SKEW,
) -> ChainResult:
    """Verify a record envelope and its chain against the anchors: all five rules.

    ``revocations`` maps a cert serial or key id to its ``revocation.v1`` envelope
    (the ``/cpi/v1/revoked/`` keyspace); a revocation counts only when signed by a key
    above the revoked one in this chain.
    """
    prepared = prepare_chain(chain, anchors=anchors, revocations=revocations, now=now, skew=skew)
    return verify_record_prepared(record, prepared)


def require_record(record: dsse.Envelope, chain: Sequence[dsse.Envelope], **kwargs: Any) -> Record:
    """Like :func:`verify_record` but returns the record or raises ChainError."""
    result = verify_record(record, chain, **kwargs)
    result.raise_for_failure()
    assert result.record is not None
    return result.record


def require_chain(chain: Sequence[dsse.Envelope], **kwargs: Any) -> tuple[Cert, ...]:
    """Like :func:`verify_chain` but returns the certs (leaf first) or raises ChainError."""
    result = verify_chain(chain, **kwargs)
    result.raise_for_failure()
    return result.certs


def open_signed(
    envelope: dsse.Envelope, *, public_key: str, expected: type[D], key_registered: bool = False
) -> D:
    """Verify a document signed by one known key (a node's register, status, deregister).

    ``public_key`` is base64url of the raw key.  Raises SignatureError or PayloadError.
    ``key_registered``: the key comes from a record (it passed the full key rule when it
    was registered): only the byte-level check of
    :func:`~schemas.keys.check_public_raw_fast` is repeated (signature verification
    refuses non-canonical and small-order keys by itself).
    """
    return _open(envelope, public_key, expected, key_registered=key_registered)


def _open(
    envelope: dsse.Envelope,
    public_key: str,
    expected: type[D],
    *,
    key_registered: bool = False,
    parsed: Any = None,
) -> D:
    try:
        decoded = _keys.b64url_decode(public_key)
        if key_registered:
            raw = _keys.check_public_raw_fast(decoded)
        else:
            raw = _keys.check_public_raw(decoded)
    except (KeyFileError, ValueError) as exc:
        raise EnvelopeError(f"invalid public key: {exc}") from exc
    # verified under the raw bytes (libsodium's verdict, as for a key object); no
    # key object is built
    v = dsse.verify(envelope, {_keys.kid(raw): raw}, payload_types=(expected.media_type(),))
    if parsed is None:
        return parse_payload(v.payload_type, v.payload, expected)
    return parse_payload(v.payload_type, v.payload, expected, parsed=parsed)


def open_self_signed(envelope: dsse.Envelope, *, expected: type[D]) -> D:
    """Verify proof of possession: a document signed by the key it carries (``register.v1``).

    Only the ``public_key`` field is read before the signature is checked; the full
    payload is validated after it holds.
    """
    try:
        obj = _json.loads(envelope.payload)
        public_key = obj["public_key"]
        if not isinstance(public_key, str):
            raise TypeError("public_key is not a string")
    except (ValueError, KeyError, TypeError) as exc:
        raise PayloadError(f"{expected.TYPE} payload has no usable 'public_key': {exc}") from exc
    # the payload verified is the one just read: it is validated from that reading
    return _open(envelope, public_key, expected, parsed=obj)


def verify_endorsement(
    envelope: dsse.Envelope,
    *,
    anchors: TrustAnchors,
    now: int | None = None,
    skew: int = CLOCK_SKEW,
) -> Endorsement:
    """Verify an ``endorsement.v1`` envelope against ``anchors`` (docs/protocol.md §10).

    It must be signed by the anchor key of its ``issuer`` root (an unconstrained anchor
    of ``anchors``: an endorsed root does not endorse further), by the one Ed25519 rule
    (§2.1), and ``now`` must be inside its window (±``skew``).  Returns the parsed
    endorsement; raises :class:`~schemas.errors.ChainError` (rule 2: signature, issuer;
    :class:`~schemas.errors.ExpiredError`, rule 3: the window) otherwise.
    """
    now = int(time.time()) if now is None else now
    found = anchors.get(envelope.keyid)
    if found is None or anchors.permitted(envelope.keyid) is not None:
        reason = (
            f"endorsement is signed by key {envelope.keyid!r}, which is not a root anchor "
            f"(anchors: {', '.join(anchors.subjects)})"
        )
        raise ChainError(reason, rule=2, link=1, reason=reason)
    anchor, key = found
    try:
        v = dsse.verify(envelope, {anchor.kid: key}, payload_types=(Endorsement.media_type(),))
        doc = parse_payload(v.payload_type, v.payload, Endorsement)
    except (SignatureError, PayloadError) as exc:
        reason = f"endorsement is not validly signed by root {anchor.subject}: {exc}"
        raise ChainError(reason, rule=2, link=1, reason=reason) from exc
    if doc.issuer != anchor.subject:
        reason = f"endorsement names issuer {doc.issuer!r} but is signed by {anchor.subject!r}"
        raise ChainError(reason, rule=2, link=1, reason=reason)
    if not doc.not_before - skew <= now <= doc.not_after + skew:
        reason = (
            f"endorsement of {doc.subject} by {doc.issuer} is valid from {doc.not_before} "
            f"to {doc.not_after}, now is {now}"
        )
        raise ExpiredError(reason, rule=3, link=1, reason=reason)
    return doc


def endorsed_anchors(
    anchors: TrustAnchors,
    endorsements: Iterable[dsse.Envelope],
    *,
    now: int | None = None,
    skew: int = CLOCK_SKEW,
) -> TrustAnchors:
    """``anchors`` plus the anchor each endorsement vouches for, with its name constraints.

    Every endorsement must verify (:func:`verify_endorsement`; the first that does not
    raises), and must not name a root that ``anchors`` already has.  A record that
    chains to an endorsed anchor must then have its CPID prefix inside the
    endorsement's ``permitted`` namespaces (checked as rule 2 at the anchor's link).
    """
    extra: list[tuple[Anchor, tuple[str, ...]]] = []
    roots = set(anchors.subjects)
    for env in endorsements:
        doc = verify_endorsement(env, anchors=anchors, now=now, skew=skew)
        if doc.subject in roots:
            reason = f"endorsement names root {doc.subject!r}, which is already an anchor"
            raise ChainError(reason, rule=2, link=1, reason=reason)
        roots.add(doc.subject)
        extra.append((Anchor(subject=doc.subject, public_key=doc.public_key), tuple(doc.permitted)))
    return anchors.extended(extra)
