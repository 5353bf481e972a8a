"""Envelopes held compactly: what the replica keeps of each record and status.

A verified record or status is kept as received, but as one :class:`Sealed` object:
its payload type and signer's key id (strings the replica shares among records) and
ONE bytes object, the signature then the payload.  An
:class:`~schemas.dsse.Envelope` with its signature tuple, signature object and two
bytes objects cost ~150 bytes more, twice per record.  The verification workers hand
envelopes back sealed (:func:`seal`), so the replica's process keeps what it receives
without copying it.
"""

from __future__ import annotations

from typing import Final

from schemas.dsse import Envelope, Signature

__all__ = ["Sealed", "seal"]

_SIG: Final = 64


class Sealed:
    """A verified-or-pending envelope held compactly: its payload type and signer's key
    id (shared among records) and ONE bytes object, signature then payload.  An
    :class:`~schemas.dsse.Envelope` with its signature tuple, signature object and two
    bytes objects cost ~150 bytes more, twice per record.  :meth:`envelope` rebuilds
    the envelope exactly as received (for rendering, re-verification, snapshots)."""

    __slots__ = ("blob", "keyid", "payload_type")

    def __init__(self, payload_type: str, keyid: str, blob: bytes) -> None:
        self.payload_type = payload_type
        self.keyid = keyid
        self.blob = blob

    def __reduce__(self) -> tuple[type[Sealed], tuple[str, str, bytes]]:
        return Sealed, (self.payload_type, self.keyid, self.blob)

    @property
    def payload(self) -> bytes:
        return self.blob[_SIG:]

    def envelope(self) -> Envelope:
        blob = self.blob
        return Envelope(self.payload_type, blob[_SIG:], (Signature(self.keyid, blob[:_SIG]),))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sealed):
            return NotImplemented
        if type(self) is Sealed and type(other) is Sealed:
            return (
                self.blob == other.blob
                and self.keyid == other.keyid
                and self.payload_type == other.payload_type
            )
        return self.envelope() == other.envelope()

    def __hash__(self) -> int:
        return hash(self.blob)


class _Whole(Sealed):
    """An envelope that does not fit :class:`Sealed` (several signatures, or a signature
    that is not 64 bytes: it will not verify, but is kept as received)."""

    __slots__ = ("whole",)

    def __init__(self, env: Envelope) -> None:
        super().__init__(env.payload_type, env.keyid if env.signatures else "", b"")
        self.whole = env

    def __reduce__(self) -> tuple[type[_Whole], tuple[Envelope]]:  # type: ignore[override]
        return _Whole, (self.whole,)

    @property
    def payload(self) -> bytes:
        return self.whole.payload

    def envelope(self) -> Envelope:
        return self.whole


def seal(env: Envelope, *, payload_type: str | None = None, keyid: str | None = None) -> Sealed:
    """``env`` held compactly (``payload_type``/``keyid``: equal strings to share instead)."""
    sigs = env.signatures
    if len(sigs) != 1 or len(sigs[0].sig) != _SIG:
        return _Whole(env)
    return Sealed(
        env.payload_type if payload_type is None else payload_type,
        sigs[0].keyid if keyid is None else keyid,
        sigs[0].sig + env.payload,
    )
