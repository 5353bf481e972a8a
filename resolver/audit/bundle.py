"""Offline verification of one record bundle, and the auditor's failure outcomes.

:func:`verify_bundle` checks a record bundle ``{"record", "chain", "status"?}`` as the
resolver serves it, trusting nothing but the anchors: the five rules of
:mod:`schemas.chain`, then the status envelope under the record's key.

Outcomes (:data:`FAILURES`, and ``valid``): ``forged`` (signed by a key without a valid
chain to an anchor, or a cert not signed by its issuer), ``tampered`` (bytes that do
not verify under the key they name, or unreadable), ``expired``, ``revoked``,
``outside_namespace``, ``unauthorized`` (a scope is missing), ``key_mismatch`` (CPID
serial or kind vs the record's key, a cert stored under another key's kid),
``misfiled`` (a valid document under another name's key), ``orphan``, ``invalid``
(anything else), ``unreadable`` (an index value that cannot be read at all: not JSON,
nested too deep, not an envelope, the wrong shape; the sweep's, never a bundle's).  :func:`classify` maps a failed check of the verifier to one of them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from schemas import dsse
from schemas.chain import (
    ChainResult,
    Check,
    TrustAnchors,
    open_signed,
    prepare_chain,
    verify_record_prepared,
)
from schemas.errors import EnvelopeError, InvalidDataError
from schemas.models import Status

__all__ = ["FAILURES", "BundleResult", "classify", "classify_check", "verify_bundle"]

FAILURES: Final = (
    "forged",
    "tampered",
    "expired",
    "revoked",
    "outside_namespace",
    "unauthorized",
    "key_mismatch",
    "misfiled",
    "orphan",
    "invalid",
    "unreadable",
)


def classify_check(rule: int, what: str) -> str:
    """The outcome of a failed check of the verifier: its ``rule`` and ``what``."""
    if rule == 3:
        return "expired"
    if rule == 4:
        return "revoked"
    if rule == 5:
        return "key_mismatch"
    if what in ("certificate chain present", "chain ends at a configured anchor"):
        return "forged"
    if what.startswith("cert signed by issuer"):
        return "forged"
    if what.startswith("record signed by"):
        return "tampered"
    if what in ("signer's subject is the CPID prefix", "issuer contains subject"):
        return "outside_namespace"
    if what in ("signer holds scope issue", "issuer holds delegate"):
        return "unauthorized"
    return "invalid"


def classify(result: ChainResult) -> str:
    """The outcome of a chain or record verification (``valid`` or one of :data:`FAILURES`)."""
    f = result.failure
    return "valid" if f is None else classify_check(f.rule, f.what)


@dataclass(frozen=True, slots=True)
class BundleResult:
    """A record bundle's verification: the chain result, then the status checks."""

    chain: ChainResult
    status_checks: tuple[Check, ...] = ()

    @property
    def checks(self) -> tuple[Check, ...]:
        return self.chain.checks + self.status_checks

    @property
    def failure(self) -> Check | None:
        return next((c for c in self.checks if not c.ok), None)

    @property
    def ok(self) -> bool:
        return self.failure is None

    @property
    def reason(self) -> str:
        if not self.chain.ok:
            return self.chain.reason
        f = self.failure
        return "" if f is None else f"status: {f.detail}"

    def to_dict(self) -> dict[str, Any]:
        out = self.chain.to_dict()
        out["ok"] = self.ok
        out["reason"] = self.reason
        if not self.chain.ok:
            out["outcome"] = classify(self.chain)
        else:
            out["outcome"] = "valid" if self.ok else "invalid"
        out["checks"] = [
            {"rule": c.rule, "link": c.link, "what": c.what, "ok": c.ok, "detail": c.detail}
            for c in self.checks
        ]
        return out


def _status_envelope(bundle: Mapping[str, Any]) -> Any:
    """The status envelope of a bundle: ``status`` (or ``live``) when it is an envelope."""
    for name in ("status", "live"):
        value = bundle.get(name)
        if isinstance(value, dict) and "payloadType" in value:
            return value
    return None


def verify_bundle(
    bundle: Mapping[str, Any],
    *,
    anchors: TrustAnchors,
    revocations: Mapping[str, dsse.Envelope] | None = None,
    now: int | None = None,
) -> BundleResult:
    """Verify ``{"record", "chain", "status"?}``: the five rules, then the status.

    The status must verify under the record's ``public_key`` and name the record's
    CPID (status checks are reported with rule 0, link 0).
    """
    if not isinstance(bundle, Mapping) or "record" not in bundle:
        raise EnvelopeError('expected a bundle {"record": <envelope>, "chain": [...]}')
    chain_docs = bundle.get("chain") or []
    if not isinstance(chain_docs, list):
        raise EnvelopeError(f"bundle 'chain' must be a list, got {type(chain_docs).__name__}")
    record = dsse.Envelope.from_dict(bundle["record"])
    certs = [dsse.Envelope.from_dict(c) for c in chain_docs]
    prepared = prepare_chain(certs, anchors=anchors, revocations=revocations, now=now)
    result = verify_record_prepared(record, prepared)
    status_doc = _status_envelope(bundle)
    if status_doc is None or result.record is None:
        return BundleResult(result)
    rec = result.record
    try:
        st = open_signed(
            dsse.Envelope.from_dict(status_doc), public_key=rec.public_key, expected=Status
        )
        checks = [Check(0, 0, "status signed by the record's key", True)]
        checks.append(
            Check(
                0,
                0,
                "status names the record's CPID",
                st.cpid == rec.cpid,
                "" if st.cpid == rec.cpid else f"status is for {st.cpid}, record is {rec.cpid}",
            )
        )
    except InvalidDataError as exc:
        checks = [Check(0, 0, "status signed by the record's key", False, str(exc))]
    return BundleResult(result, tuple(checks))
