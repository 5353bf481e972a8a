"""Witness cosignatures (C2SP tlog-cosignature, Ed25519 ``cosignature/v1``) and the
request and response bodies of the witness protocol (C2SP tlog-witness). No I/O.

A witness (cosigner) vouches for a checkpoint by adding one more signed-note signature
line to it (:mod:`schemas.checkpoint`)::

    — <witness name> base64(key ID [4] || timestamp [8, big-endian] || Ed25519 signature [64])

* The key ID is ``SHA-256(name || 0x0A || 0x04 || 32-byte public key)[:4]``: the type
  byte 0x04 (not the 0x01 of an ordinary note key) marks a cosignature/v1 key, so the
  log's own verifier never mistakes a cosignature for a log signature or the reverse.
* The signed message is two lines and then the checkpoint's note text (with its final
  newline, without any signature line)::

      cosignature/v1\\n
      time <timestamp, ASCII decimal, no leading zeroes>\\n
      <origin>\\n<size>\\n<root>\\n[<extension lines>\\n]

  The timestamp is the Unix second the witness signed at (below ``2**63``).  The name
  is not signed: a key must serve one witness name only.
* A witness's verifier key is ``<name>+<8 hex digits of key ID>+<base64(0x04 || key)>``.

The statement a cosignature makes: at that time, the checkpoint was the largest
tree head of that log the witness had verified as consistent with everything it had
cosigned before.

Witness protocol bodies: ``POST <prefix>/add-checkpoint`` sends ``old <size>\\n``,
up to 63 base64 consistency-proof lines, an empty line, then the checkpoint note
(:func:`format_add_checkpoint` / :func:`parse_add_checkpoint`); the answer is one or
more cosignature lines (:func:`parse_signature_lines`), or for a size conflict the
witness's size and a newline (``text/x.tlog.size``).
"""

from __future__ import annotations

import base64
import binascii
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import ClassVar, Final

from schemas import keys as _keys
from schemas.checkpoint import (
    MAX_NOTE_BYTES,
    Checkpoint,
    Note,
    NoteSignature,
    NoteVerifier,
    VerifierKey,
    open_note,
    typed_key_id,
)
from schemas.errors import CheckpointError, InvalidDataError, SignatureError
from schemas.keys import Ed25519PrivateKey

__all__ = [
    "MAX_PROOF_LINES",
    "MAX_REQUEST_BYTES",
    "SIG_TYPE_COSIGNATURE_V1",
    "SIZE_CONTENT_TYPE",
    "AddCheckpoint",
    "Cosignature",
    "CosignerVerifier",
    "QuorumError",
    "add_signatures",
    "cosign",
    "cosigned_message",
    "cosigner_key_id",
    "format_add_checkpoint",
    "open_cosigned_checkpoint",
    "parse_add_checkpoint",
    "parse_signature_lines",
    "parse_size_body",
    "verify_cosignatures",
]

SIG_TYPE_COSIGNATURE_V1: Final = 0x04
MAX_PROOF_LINES: Final = 63
MAX_REQUEST_BYTES: Final = MAX_NOTE_BYTES + 8 * 1024
"""A request body is at most the largest note plus the size line and 63 proof lines."""
SIZE_CONTENT_TYPE: Final = "text/x.tlog.size"
_MAX_TIMESTAMP: Final = (1 << 63) - 1
_OLD: Final = re.compile(r"old (0|[1-9][0-9]{0,19})")
_SIZE: Final = re.compile(r"(0|[1-9][0-9]{0,19})\n")
_DASH: Final = "\u2014 "


class QuorumError(SignatureError):
    """Fewer valid witness cosignatures than the policy requires."""

    code = "no_quorum"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def cosigner_key_id(name: str, public_key: bytes) -> int:
    """``SHA-256(name || 0x0A || 0x04 || public key)[:4]`` as a big-endian uint32."""
    return typed_key_id(name, SIG_TYPE_COSIGNATURE_V1, public_key, what="witness name")


def cosigned_message(text: str, timestamp: int) -> bytes:
    """The bytes a cosignature/v1 signs: header line, time line, then the note text."""
    if not 0 <= timestamp <= _MAX_TIMESTAMP:
        raise CheckpointError(f"cosignature timestamp {timestamp} is outside 0..2^63-1")
    if not text.endswith("\n"):
        raise CheckpointError("the cosigned note text must end in a newline")
    return f"cosignature/v1\ntime {timestamp}\n{text}".encode()


@dataclass(frozen=True, slots=True)
class CosignerVerifier(VerifierKey):
    """A trusted witness: its name, cosignature key ID and Ed25519 public key (type 0x04)."""

    SIG_TYPE: ClassVar[int] = SIG_TYPE_COSIGNATURE_V1
    WHAT: ClassVar[str] = "witness key"
    derive_id = staticmethod(cosigner_key_id)

    def verify(self, text: str, signature: NoteSignature) -> int:
        """Check one signature line by this witness over note ``text``; its timestamp.

        Raises :class:`SignatureError` (wrong length, bad signature) or
        :class:`CheckpointError` (a timestamp of 2^63 or more).
        """
        if (signature.name, signature.key_id) != (self.name, self.key_id):
            raise SignatureError(
                f"signature line is by {signature.name}/{signature.key_id:08x}, "
                f"not by witness {self.name}/{self.key_id:08x}"
            )
        blob = signature.signature
        if len(blob) != 8 + 64:
            raise SignatureError(
                f"cosignature by {self.name} holds {len(blob)} bytes after the key id, "
                "expected an 8-byte timestamp and a 64-byte signature"
            )
        timestamp = int.from_bytes(blob[:8], "big")
        message = cosigned_message(text, timestamp)
        if not _keys.verify_raw(self.public_key, blob[8:], message):
            raise SignatureError(
                f"cosignature by {self.name} (key id {self.key_id:08x}, time {timestamp}) "
                "does not verify over the checkpoint"
            )
        return timestamp


@dataclass(frozen=True, slots=True)
class Cosignature:
    """A verified cosignature: which witness, and when it signed."""

    witness: str
    key_id: int
    timestamp: int


def cosign(
    text: str, name: str, key: Ed25519PrivateKey, *, timestamp: int | None = None
) -> NoteSignature:
    """The cosignature/v1 signature line of witness ``name`` over note ``text``."""
    ts = int(time.time()) if timestamp is None else int(timestamp)
    sig = key.sign(cosigned_message(text, ts))
    kid = cosigner_key_id(name, _keys.public_raw(key))
    return NoteSignature(name, kid, ts.to_bytes(8, "big") + sig)


def verify_cosignatures(
    note: Note,
    witnesses: Sequence[CosignerVerifier],
    *,
    now: float | None = None,
    max_future_s: int = 300,
) -> list[Cosignature]:
    """The valid cosignatures in ``note`` by the ``witnesses`` (one per witness).

    Lines by unknown keys are ignored.  A line by a known witness that does not verify,
    or whose timestamp is more than ``max_future_s`` ahead of ``now`` (when given),
    raises :class:`SignatureError`: a trusted key vouching wrongly rejects the note,
    as in the signed-note rules.
    """
    known = {(w.name, w.key_id): w for w in witnesses}
    out: dict[tuple[str, int], Cosignature] = {}
    for sig in note.signatures:
        ident = (sig.name, sig.key_id)
        w = known.get(ident)
        if w is None or ident in out:
            continue
        ts = w.verify(note.text, sig)
        if now is not None and ts > now + max_future_s:
            raise SignatureError(
                f"cosignature by {w.name} is dated {ts}, {ts - int(now)} s in the future"
            )
        out[ident] = Cosignature(w.name, w.key_id, ts)
    return list(out.values())


def open_cosigned_checkpoint(
    data: bytes,
    log: NoteVerifier | Sequence[NoteVerifier],
    witnesses: Sequence[CosignerVerifier] = (),
    *,
    quorum: int = 0,
    origin: str | None = None,
    now: float | None = None,
) -> tuple[Checkpoint, list[Cosignature]]:
    """Verify the log's signature, then at least ``quorum`` witness cosignatures.

    Raises :class:`CheckpointError`/:class:`SignatureError` as
    :func:`schemas.checkpoint.open_checkpoint` does, and :class:`QuorumError` when
    fewer than ``quorum`` of ``witnesses`` cosigned.
    """
    logs = [log] if isinstance(log, NoteVerifier) else list(log)
    note, _ = open_note(data, logs)
    cp = Checkpoint.from_text(note.text)
    if origin is not None and cp.origin != origin:
        raise CheckpointError(f"checkpoint origin is {cp.origin!r}, expected {origin!r}")
    cosigs = verify_cosignatures(note, witnesses, now=now)
    if len(cosigs) < quorum:
        have = ", ".join(c.witness for c in cosigs) or "none"
        raise QuorumError(
            f"checkpoint {cp.origin} size {cp.size} carries {len(cosigs)} valid cosignature(s) "
            f"of the {len(witnesses)} trusted witnesses ({have}); {quorum} required"
        )
    return cp, cosigs


def add_signatures(note: bytes, lines: Iterable[NoteSignature]) -> bytes:
    """``note`` with these signature lines appended (a line already present is skipped)."""
    parsed = Note.from_bytes(note)
    sigs = list(parsed.signatures)
    seen = {(s.name, s.key_id) for s in sigs}
    for line in lines:
        if (line.name, line.key_id) in seen:
            continue
        seen.add((line.name, line.key_id))
        sigs.append(line)
    return Note(parsed.text, tuple(sigs)).to_bytes()


# =============================================================================
# Witness protocol bodies
# =============================================================================


@dataclass(frozen=True, slots=True)
class AddCheckpoint:
    """An ``add-checkpoint`` request: old size, consistency proof, checkpoint note."""

    old_size: int
    proof: tuple[bytes, ...]
    note: bytes


def format_add_checkpoint(old_size: int, proof: Sequence[bytes], note: bytes) -> bytes:
    if old_size < 0:
        raise ValueError(f"old size {old_size} must not be negative")
    if len(proof) > MAX_PROOF_LINES:
        raise ValueError(f"a consistency proof of {len(proof)} hashes is too long")
    head = f"old {old_size}\n" + "".join(_b64(h) + "\n" for h in proof) + "\n"
    return head.encode("ascii") + note


def parse_add_checkpoint(body: bytes) -> AddCheckpoint:
    """Parse a request body; :class:`InvalidDataError` (400) when it is malformed."""
    if len(body) > MAX_REQUEST_BYTES:
        raise InvalidDataError(f"request is {len(body)} bytes, at most {MAX_REQUEST_BYTES}")
    head, sep, note = body.partition(b"\n\n")
    if not sep:
        raise InvalidDataError("request has no empty line between the proof and the checkpoint")
    try:
        lines = head.decode("ascii").split("\n")
    except UnicodeDecodeError as exc:
        raise InvalidDataError("the size and proof lines must be ASCII") from exc
    m = _OLD.fullmatch(lines[0])
    if m is None:
        raise InvalidDataError(
            f"first line {lines[0][:40]!r} must be 'old <size>' (decimal, no leading zeroes)"
        )
    if len(lines) - 1 > MAX_PROOF_LINES:
        raise InvalidDataError(
            f"{len(lines) - 1} consistency proof lines, at most {MAX_PROOF_LINES} allowed"
        )
    proof = []
    for i, line in enumerate(lines[1:]):
        try:
            h = base64.b64decode(line.encode("ascii"), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise InvalidDataError(f"proof line {i + 1} is not base64: {line[:60]!r}") from exc
        if len(h) != 32:
            raise InvalidDataError(f"proof line {i + 1} holds {len(h)} bytes, expected 32")
        proof.append(h)
    return AddCheckpoint(int(m.group(1)), tuple(proof), note)


def parse_signature_lines(body: bytes) -> list[NoteSignature]:
    """The signature lines of a witness's 200 answer (each ``— <name> <base64>\\n``)."""
    if not body.endswith(b"\n"):
        raise CheckpointError("witness answer must be signature lines ending in a newline")
    # a note with a one-line dummy text reuses the signature-line parser
    return list(Note.from_bytes(b"x\n\n" + body).signatures)


def parse_size_body(body: bytes) -> int:
    """The witness's size from a 409 ``text/x.tlog.size`` answer."""
    m = _SIZE.fullmatch(body.decode("ascii", "replace"))
    if m is None:
        raise CheckpointError(f"size answer {body[:40]!r} is not '<decimal size>\\n'")
    return int(m.group(1))
