"""Signed notes and transparency-log checkpoints (C2SP signed-note, tlog-checkpoint). No I/O.

A signed note (https://c2sp.org/signed-note) is UTF-8 text ending in a newline, a
blank line, then one or more signature lines::

    <text line>\\n ... <text line>\\n
    \\n
    — <key name> <base64(4-byte key ID || Ed25519 signature over the text)>\\n

The dash is U+2014 (EM DASH) followed by one space.  The signature covers the text
*including* its final newline, not the blank line.  For Ed25519 (signature type
0x01) the key ID is ``SHA-256(key name || 0x0A || 0x01 || 32-byte public key)[:4]``,
read as a big-endian uint32.  A verifier key is written, as in Go's sumdb/note, as
``<name>+<8 hex digits of the key ID>+<base64(0x01 || public key)>``.

A checkpoint (https://c2sp.org/tlog-checkpoint) is a note whose text is::

    <origin>\\n
    <tree size, ASCII decimal, no leading zeroes>\\n
    <base64 of the RFC 6962 root hash>\\n
    [<extension line>\\n ...]

Our log adds one extension line, ``cpi-timestamp <unix seconds>``: when the log
signed the checkpoint (integer Unix seconds, like every timestamp in the protocol).
Parsers here accept any non-empty extension lines and expose ours as
:attr:`Checkpoint.timestamp`.

Verification follows the spec: signatures from unknown keys (name or key ID not
matching a trusted verifier) are ignored; a signature from a known key that fails
rejects the whole note; at least one known key must have signed.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import ClassVar, Final, Self

from schemas import keys as _keys
from schemas.errors import CheckpointError, KeyFileError, SignatureError
from schemas.keys import Ed25519PrivateKey, Ed25519PublicKey

__all__ = [
    "MAX_NOTE_BYTES",
    "MAX_SIGNATURES",
    "SIG_TYPE_ED25519",
    "TIMESTAMP_EXTENSION",
    "Checkpoint",
    "Note",
    "NoteSignature",
    "NoteVerifier",
    "format_vkey",
    "key_id",
    "open_checkpoint",
    "open_note",
    "parse_vkey",
    "sign_checkpoint",
    "sign_note",
    "typed_key_id",
]

SIG_TYPE_ED25519: Final = 0x01
TIMESTAMP_EXTENSION: Final = "cpi-timestamp"
MAX_SIGNATURES: Final = 100
MAX_NOTE_BYTES: Final = 64 * 1024
_DASH: Final = "\u2014 "
_SIZE: Final = re.compile(r"0|[1-9][0-9]{0,19}")
_CONTROL: Final = re.compile(r"[\x00-\x09\x0b-\x1f]")
_SPACE: Final = re.compile(r"\s")


def _b64decode(text: str, what: str) -> bytes:
    """Strict standard base64 (RFC 4648 section 4), padding required."""
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError) as exc:
        raise CheckpointError(f"{what} is not standard base64: {text[:60]!r}") from exc


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _check_name(name: str, what: str = "key name") -> str:
    if not isinstance(name, str) or not name:
        raise CheckpointError(f"{what} must be a non-empty string, got {name!r}")
    if "+" in name or _SPACE.search(name) or _CONTROL.search(name):
        raise CheckpointError(f"{what} {name!r} must not contain spaces, '+' or control characters")
    return name


def key_id(name: str, public_key: bytes) -> int:
    """Ed25519 key ID: ``SHA-256(name || 0x0A || 0x01 || public key)[:4]`` as a uint32."""
    return typed_key_id(name, SIG_TYPE_ED25519, public_key)


def typed_key_id(name: str, sig_type: int, public_key: bytes, *, what: str = "key name") -> int:
    """A note key ID: ``SHA-256(name || 0x0A || sig_type || public key)[:4]`` as a
    big-endian uint32 (``sig_type`` 0x01: a note signature, 0x04: a cosignature/v1)."""
    _check_name(name, what)
    if len(public_key) != 32:
        raise CheckpointError(f"an Ed25519 public key is 32 bytes, got {len(public_key)}")
    data = name.encode("utf-8") + b"\n" + bytes([sig_type]) + public_key
    return int.from_bytes(hashlib.sha256(data).digest()[:4], "big")


def parse_vkey(text: str, sig_type: int, *, what: str) -> tuple[str, int, Ed25519PublicKey]:
    """``<name>+<hex key ID>+<base64(sig_type || public key)>`` (Go sumdb/note form) ->
    ``(name, key ID, key)``, the key ID checked against the name and key.  ``what`` names
    the key in errors (``verifier key``, ``witness key``)."""
    parts = text.strip().split("+", 2)  # base64 may contain "+"
    if len(parts) != 3:
        raise CheckpointError(
            f"{what} {text.strip()[:80]!r} must be <name>+<hex key id>+<base64 key>"
        )
    name, hex_id, b64 = parts
    _check_name(name, f"{what} name")
    if not re.fullmatch(r"[0-9a-f]{8}", hex_id):
        raise CheckpointError(f"{what} id {hex_id!r} must be 8 lower-case hex digits")
    raw = _b64decode(b64, what)
    if len(raw) != 33 or raw[0] != sig_type:
        raise CheckpointError(
            f"{what} must be 0x{sig_type:02x} followed by a 32-byte Ed25519 key, got {len(raw)} "
            f"bytes starting {raw[:1].hex() or 'with nothing'}"
        )
    want = typed_key_id(name, sig_type, raw[1:], what=f"{what} name")
    if int(hex_id, 16) != want:
        raise CheckpointError(f"{what} id is {hex_id}, but name and key give {want:08x}")
    try:
        pub = _keys.public_from_b64url(_keys.b64url_encode(raw[1:]))
    except KeyFileError as exc:
        raise CheckpointError(f"{what}: {exc}") from exc
    return name, want, pub


def format_vkey(name: str, key_id: int, sig_type: int, public_key: Ed25519PublicKey) -> str:
    """The ``<name>+<hex key ID>+<base64(sig_type || key)>`` form :func:`parse_vkey` reads."""
    raw = bytes([sig_type]) + _keys.public_raw(public_key)
    return f"{name}+{key_id:08x}+{_b64(raw)}"


@dataclass(frozen=True, slots=True)
class VerifierKey:
    """A named Ed25519 key of one signed-note signature type, in the vkey form
    ``<name>+<hex key ID>+<base64(type || public key)>``: :class:`NoteVerifier` (log
    keys, type 0x01) and :class:`schemas.cosignature.CosignerVerifier` (witnesses, 0x04)
    differ only in the type byte and how the key ID is derived."""

    name: str
    key_id: int
    public_key: Ed25519PublicKey
    SIG_TYPE: ClassVar[int]
    WHAT: ClassVar[str]

    @staticmethod
    def derive_id(name: str, public_key: bytes) -> int:
        raise NotImplementedError

    @classmethod
    def from_public_key(cls, name: str, public_key: Ed25519PublicKey | Ed25519PrivateKey) -> Self:
        raw = _keys.check_public_raw(_keys.public_raw(public_key))
        pub = public_key.public_key() if isinstance(public_key, Ed25519PrivateKey) else public_key
        return cls(name, cls.derive_id(name, raw), pub)

    @classmethod
    def from_vkey(cls, text: str) -> Self:
        """Parse ``<name>+<hex key ID>+<base64(type || public key)>`` (Go sumdb/note form)."""
        return cls(*parse_vkey(text, cls.SIG_TYPE, what=cls.WHAT))

    def to_vkey(self) -> str:
        return format_vkey(self.name, self.key_id, self.SIG_TYPE, self.public_key)


@dataclass(frozen=True, slots=True)
class NoteVerifier(VerifierKey):
    """A trusted note key: its name, key ID and Ed25519 public key (type 0x01)."""

    SIG_TYPE: ClassVar[int] = SIG_TYPE_ED25519
    WHAT: ClassVar[str] = "verifier key"
    derive_id = staticmethod(key_id)


@dataclass(frozen=True, slots=True)
class NoteSignature:
    """One signature line: key name, key ID and signature bytes (verified or not)."""

    name: str
    key_id: int
    signature: bytes

    def to_line(self) -> str:
        return f"{_DASH}{self.name} {_b64(self.key_id.to_bytes(4, 'big') + self.signature)}\n"


@dataclass(frozen=True, slots=True)
class Note:
    """A parsed signed note: its text (with the final newline) and its signature lines."""

    text: str
    signatures: tuple[NoteSignature, ...]

    def to_bytes(self) -> bytes:
        return (self.text + "\n" + "".join(s.to_line() for s in self.signatures)).encode("utf-8")

    @classmethod
    def from_bytes(cls, data: bytes) -> Note:
        """Split a note into text and signature lines and check their syntax (not the signatures)."""
        if len(data) > MAX_NOTE_BYTES:
            raise CheckpointError(f"note is {len(data)} bytes, at most {MAX_NOTE_BYTES} allowed")
        try:
            note = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CheckpointError(f"note is not valid UTF-8: {exc}") from exc
        bad = _CONTROL.search(note)
        if bad:
            raise CheckpointError(
                f"note contains control character {bad.group()!r} at offset {bad.start()}"
            )
        split = note.rfind("\n\n")
        if split < 0:
            raise CheckpointError("note has no blank line between its text and its signatures")
        text, block = note[: split + 1], note[split + 2 :]
        if not block.endswith("\n"):
            raise CheckpointError("note's last signature line does not end in a newline")
        lines = block[:-1].split("\n")
        if len(lines) > MAX_SIGNATURES:
            raise CheckpointError(
                f"note has {len(lines)} signatures, at most {MAX_SIGNATURES} allowed"
            )
        sigs = []
        for number, line in enumerate(lines, start=1):
            if not line.startswith(_DASH):
                raise CheckpointError(
                    f"signature line {number} {line[:60]!r} does not start with '— ' (U+2014, space)"
                )
            name, space, b64 = line[len(_DASH) :].rpartition(" ")
            if not space:
                raise CheckpointError(f"signature line {number} is not '— <key name> <base64>'")
            _check_name(name, f"signature line {number} key name")
            blob = _b64decode(b64, f"signature line {number}")
            if len(blob) < 5:
                raise CheckpointError(
                    f"signature line {number} holds {len(blob)} bytes, expected a 4-byte key id "
                    "and a signature"
                )
            sigs.append(NoteSignature(name, int.from_bytes(blob[:4], "big"), blob[4:]))
        return cls(text, tuple(sigs))


def _check_text(text: str) -> None:
    if not text.endswith("\n"):
        raise CheckpointError("note text must end in a newline")
    if "\n\n" in text or text.startswith("\n"):
        raise CheckpointError(
            "note text must not contain empty lines (only line-structured texts are signed)"
        )
    bad = _CONTROL.search(text)
    if bad:
        raise CheckpointError(f"note text contains control character {bad.group()!r}")


def sign_note(text: str, signers: Iterable[tuple[str, Ed25519PrivateKey]]) -> bytes:
    """Sign ``text`` (ending in a newline) with each ``(key name, key)``; returns the note."""
    _check_text(text)
    sigs = tuple(
        NoteSignature(
            _check_name(name), key_id(name, _keys.public_raw(key)), key.sign(text.encode("utf-8"))
        )
        for name, key in signers
    )
    if not sigs:
        raise ValueError("a note needs at least one signer")
    return Note(text, sigs).to_bytes()


def open_note(data: bytes, verifiers: Sequence[NoteVerifier]) -> tuple[Note, list[NoteVerifier]]:
    """Parse a note and verify it: returns the note and the trusted keys that signed it.

    Raises :class:`CheckpointError` for a malformed note and :class:`SignatureError`
    when a known key's signature fails or no known key signed.
    """
    note = Note.from_bytes(data)
    known = {(v.name, v.key_id): v for v in verifiers}
    message = note.text.encode("utf-8")
    good: list[NoteVerifier] = []
    for sig in note.signatures:
        v = known.get((sig.name, sig.key_id))
        if v is None or v in good:
            continue  # unknown keys are ignored; a repeated known key counts once
        if not _keys.verify_raw(v.public_key, sig.signature, message):
            raise SignatureError(
                f"signature by {v.name} (key id {v.key_id:08x}) does not verify over the note text"
            )
        good.append(v)
    if not good:
        seen = ", ".join(f"{s.name}/{s.key_id:08x}" for s in note.signatures)
        trusted = ", ".join(f"{v.name}/{v.key_id:08x}" for v in verifiers) or "<none>"
        raise SignatureError(f"note is signed by {seen}; none of them is a trusted key ({trusted})")
    return note, good


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A tree head: origin, size, RFC 6962 root hash and optional extension lines."""

    origin: str
    size: int
    root_hash: bytes
    extensions: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.origin or "\n" in self.origin or _CONTROL.search(self.origin):
            raise CheckpointError(f"checkpoint origin {self.origin!r} must be one non-empty line")
        if not 0 <= self.size < 10**20:
            raise CheckpointError(f"checkpoint tree size {self.size} is out of range")
        if len(self.root_hash) != 32:
            raise CheckpointError(
                f"checkpoint root hash is {len(self.root_hash)} bytes, expected 32"
            )
        for ext in self.extensions:
            if not ext or "\n" in ext or _CONTROL.search(ext):
                raise CheckpointError(
                    f"checkpoint extension line {ext!r} must be one non-empty line"
                )

    @classmethod
    def create(
        cls, *, origin: str, size: int, root_hash: bytes, timestamp: int | None = None
    ) -> Checkpoint:
        """A checkpoint carrying our ``cpi-timestamp`` extension when ``timestamp`` is given."""
        ext = () if timestamp is None else (f"{TIMESTAMP_EXTENSION} {int(timestamp)}",)
        return cls(origin, size, bytes(root_hash), ext)

    @property
    def timestamp(self) -> int | None:
        """Unix seconds from the ``cpi-timestamp`` extension line, if present."""
        for ext in self.extensions:
            name, _, value = ext.partition(" ")
            if name == TIMESTAMP_EXTENSION and value.isdigit():
                return int(value)
        return None

    def to_text(self) -> str:
        lines = [self.origin, str(self.size), _b64(self.root_hash), *self.extensions]
        return "".join(line + "\n" for line in lines)

    @classmethod
    def from_text(cls, text: str) -> Checkpoint:
        if not text.endswith("\n"):
            raise CheckpointError("checkpoint text must end in a newline")
        lines = text[:-1].split("\n")
        if len(lines) < 3:
            raise CheckpointError(
                f"checkpoint text has {len(lines)} lines, expected origin, tree size and root hash"
            )
        origin, size, root, *ext = lines
        if not _SIZE.fullmatch(size):
            raise CheckpointError(
                f"checkpoint tree size {size!r} must be ASCII decimal without leading zeroes"
            )
        root_hash = _b64decode(root, "checkpoint root hash")
        if any(not e for e in ext):
            raise CheckpointError("checkpoint extension lines must not be empty")
        return cls(origin, int(size), root_hash, tuple(ext))


def sign_checkpoint(
    checkpoint: Checkpoint, key: Ed25519PrivateKey, *, name: str | None = None
) -> bytes:
    """The signed note of ``checkpoint``; the key name defaults to the origin (as the spec advises)."""
    return sign_note(checkpoint.to_text(), [(name or checkpoint.origin, key)])


def open_checkpoint(
    data: bytes, verifier: NoteVerifier | Sequence[NoteVerifier], *, origin: str | None = None
) -> Checkpoint:
    """Verify a signed checkpoint and parse its text.

    ``origin``, when given, must equal the checkpoint's origin line (a note signed by
    the right key for another log is not this log's checkpoint).
    """
    verifiers = [verifier] if isinstance(verifier, NoteVerifier) else list(verifier)
    note, _ = open_note(data, verifiers)
    cp = Checkpoint.from_text(note.text)
    if origin is not None and cp.origin != origin:
        raise CheckpointError(f"checkpoint origin is {cp.origin!r}, expected {origin!r}")
    return cp
