"""Issuing signed documents: root anchors, delegation certs, revocations, records.

These are the national node's and the registries' signing operations; they build
payload models and sign them, and never touch the index themselves.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterable

from schemas import dsse, keys
from schemas.cpid import ns_contains, parse_namespace
from schemas.errors import OutsideNamespaceError
from schemas.keys import Ed25519PrivateKey, Ed25519PublicKey
from schemas.models import Anchor, Cert, Document, Revocation

__all__ = ["issue_cert", "make_anchor", "new_serial", "revoke", "sign_document"]

DAY = 86_400


def new_serial() -> str:
    """A random certificate serial (128 bits, hex)."""
    return secrets.token_hex(16)


def sign_document(doc: Document, key: Ed25519PrivateKey) -> dsse.Envelope:
    return dsse.sign(doc.media_type(), doc.to_json(), key)


def make_anchor(subject: str, key: Ed25519PrivateKey | Ed25519PublicKey) -> Anchor:
    return Anchor(subject=parse_namespace(subject), public_key=keys.public_to_b64url(key))


def issue_cert(
    *,
    issuer_key: Ed25519PrivateKey,
    issuer_subject: str,
    subject: str,
    public_key: Ed25519PublicKey | Ed25519PrivateKey,
    scopes: Iterable[str],
    days: float = 365,
    serial: str | None = None,
    now: int | None = None,
) -> dsse.Envelope:
    """Delegate ``subject`` (inside ``issuer_subject``) to ``public_key``; returns a cert.v1."""
    issuer_ns = parse_namespace(issuer_subject)
    subject_ns = parse_namespace(subject)
    if not ns_contains(issuer_ns, subject_ns):
        raise OutsideNamespaceError(
            f"subject {subject_ns!r} is outside issuer {issuer_ns!r}; an issuer can only "
            "delegate names at or below its own"
        )
    t = int(time.time()) if now is None else now
    cert = Cert(
        subject=subject_ns,
        issuer=issuer_ns,
        public_key=keys.public_to_b64url(public_key),
        scopes=sorted(set(scopes)),  # type: ignore[arg-type]
        serial=serial or new_serial(),
        not_before=t - 60,
        not_after=t + int(days * DAY),
    )
    return sign_document(cert, issuer_key)


def revoke(
    *,
    issuer_key: Ed25519PrivateKey,
    subject: str,
    serial: str | None = None,
    kid: str | None = None,
    reason: str,
    now: int | None = None,
) -> dsse.Envelope:
    """A revocation.v1 for a cert serial or a key id, signed by the issuer (or an ancestor)."""
    rev = Revocation(
        subject=parse_namespace(subject),
        serial=serial,
        kid=kid,
        reason=reason,
        revoked_at=int(time.time()) if now is None else now,
    )
    return sign_document(rev, issuer_key)
