"""DSSE envelopes (Dead Simple Signing Envelope), as pinned in docs/protocol.md §2–5.

The signature covers PAE(payloadType, payload):

    "DSSEv1" SP len(type) SP type SP len(payload) SP payload

Verification works on the bytes as received; JSON is parsed only after a signature
holds.  Standard base64 is emitted; standard and URL-safe are both accepted.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from schemas import _json
from schemas.errors import EnvelopeError, SignatureError
from schemas.keys import kid_of, verify_raw

__all__ = [
    "MAX_ENVELOPE_BYTES",
    "Envelope",
    "Signature",
    "Verified",
    "b64decode_any",
    "pae",
    "sign",
    "verify",
]

MAX_ENVELOPE_BYTES = 64 * 1024
"""Envelopes above this size are refused before parsing (records stay well under 2 KiB)."""


def pae(payload_type: str, payload: bytes) -> bytes:
    """Pre-Authentication Encoding: the exact bytes a DSSE signature covers."""
    t = payload_type.encode("utf-8")
    return b"DSSEv1 %d %s %d %s" % (len(t), t, len(payload), payload)


def b64decode_any(text: str, *, what: str) -> bytes:
    """Decode standard or URL-safe base64, with or without padding."""
    if not isinstance(text, str):
        raise EnvelopeError(f"{what} must be a base64 string, got {type(text).__name__}")
    cleaned = text.rstrip("=")
    if "-" in cleaned or "_" in cleaned:
        cleaned = cleaned.replace("-", "+").replace("_", "/")
    try:
        return base64.b64decode(cleaned + "=" * (-len(cleaned) % 4), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise EnvelopeError(f"{what} is not valid base64") from exc


@dataclass(frozen=True, slots=True)
class Signature:
    keyid: str
    sig: bytes

    def __reduce__(self) -> tuple[type[Signature], tuple[str, bytes]]:
        return Signature, (self.keyid, self.sig)


@dataclass(frozen=True, slots=True)
class Envelope:
    """A parsed envelope. ``payload`` holds the decoded bytes, exactly as received."""

    payload_type: str
    payload: bytes
    signatures: tuple[Signature, ...]

    def __reduce__(self) -> tuple[type[Envelope], tuple[str, bytes, tuple[Signature, ...]]]:
        # pickled by value, cheaper than a slotted dataclass's __getstate__/__setstate__
        # (the resolver sends envelopes to verification worker processes)
        return Envelope, (self.payload_type, self.payload, self.signatures)

    @classmethod
    def from_json(cls, data: bytes | str, *, max_bytes: int = MAX_ENVELOPE_BYTES) -> Envelope:
        raw = data.encode("utf-8") if isinstance(data, str) else data
        if len(raw) > max_bytes:
            raise EnvelopeError(f"envelope is {len(raw)} bytes, at most {max_bytes} allowed")
        try:
            obj = _json.loads(raw)
        except ValueError as exc:  # includes UnicodeDecodeError
            raise EnvelopeError(f"envelope is not valid JSON: {exc}") from exc
        return cls.from_dict(obj)

    @classmethod
    def from_dict(cls, obj: Any) -> Envelope:
        if not isinstance(obj, dict):
            raise EnvelopeError(f"envelope must be a JSON object, got {type(obj).__name__}")
        unknown = set(obj) - {"payloadType", "payload", "signatures"}
        if unknown:
            raise EnvelopeError(f"envelope has unknown fields: {', '.join(sorted(unknown))}")
        payload_type = obj.get("payloadType")
        if not isinstance(payload_type, str):
            raise EnvelopeError("envelope field 'payloadType' must be a string")
        if "payload" not in obj:
            raise EnvelopeError("envelope field 'payload' is missing")
        payload = b64decode_any(obj["payload"], what="envelope field 'payload'")
        sigs = obj.get("signatures")
        if not isinstance(sigs, list) or not sigs:
            raise EnvelopeError("envelope field 'signatures' must be a non-empty list")
        parsed = []
        for i, s in enumerate(sigs):
            if not isinstance(s, dict) or "sig" not in s:
                raise EnvelopeError(f"signature {i} must be an object with 'sig'")
            unknown = set(s) - {"keyid", "sig"}
            if unknown:
                raise EnvelopeError(
                    f"signature {i} has unknown fields: {', '.join(sorted(unknown))}"
                )
            keyid = s.get("keyid", "")
            if not isinstance(keyid, str):
                raise EnvelopeError(f"signature {i} 'keyid' must be a string")
            parsed.append(Signature(keyid, b64decode_any(s["sig"], what=f"signature {i}")))
        return cls(payload_type, payload, tuple(parsed))

    def to_dict(self) -> dict[str, Any]:
        return {
            "payloadType": self.payload_type,
            "payload": base64.b64encode(self.payload).decode("ascii"),
            "signatures": [
                {"keyid": s.keyid, "sig": base64.b64encode(s.sig).decode("ascii")}
                for s in self.signatures
            ],
        }

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), separators=(",", ":")).encode("utf-8")

    @property
    def keyid(self) -> str:
        """The key id of the first signature (the signer, for single-signed documents)."""
        return self.signatures[0].keyid


@dataclass(frozen=True, slots=True)
class Verified:
    """What a successful verification proved: this payload, signed by these key ids."""

    payload_type: str
    payload: bytes
    keyids: frozenset[str]


def sign(
    payload_type: str, payload: bytes, key: Ed25519PrivateKey, *, keyid: str | None = None
) -> Envelope:
    """Sign ``payload`` with ``key``; ``keyid`` defaults to the key's kid."""
    kid = kid_of(key) if keyid is None else keyid
    return Envelope(payload_type, payload, (Signature(kid, key.sign(pae(payload_type, payload))),))


def verify(
    envelope: Envelope,
    keys: Mapping[str, Ed25519PublicKey | bytes],
    *,
    payload_types: Collection[str] | None = None,
    threshold: int = 1,
) -> Verified:
    """Check that at least ``threshold`` distinct trusted keys signed the envelope.

    ``keys`` maps key ids to trusted public keys (key objects or their 32 raw bytes,
    already checked by the key rule where they were parsed).  A signature naming a key id is
    checked only against that key; one without a key id is tried against every key.
    Raises :class:`SignatureError` when too few distinct keys verify.
    """
    if threshold < 1:
        raise ValueError("threshold must be at least 1")
    if payload_types is not None and envelope.payload_type not in payload_types:
        raise SignatureError(
            f"payloadType {envelope.payload_type!r} is not one of {sorted(payload_types)}"
        )
    message = pae(envelope.payload_type, envelope.payload)
    good: set[str] = set()
    for s in envelope.signatures:
        candidates = [s.keyid] if s.keyid else list(keys)
        for name in candidates:
            if name in good:
                continue
            pub = keys.get(name)
            if pub is not None and verify_raw(pub, s.sig, message):
                good.add(name)
                break
    if len(good) < threshold:
        named = ", ".join(s.keyid or "<none>" for s in envelope.signatures)
        raise SignatureError(
            f"{len(good)} of {threshold} required signatures verify "
            f"(signature key ids: {named}; trusted: {', '.join(sorted(keys)) or '<none>'})"
        )
    return Verified(envelope.payload_type, envelope.payload, frozenset(good))
