"""CPID: the hierarchical, self-certifying resource identifier (docs/protocol.md §1).

    CN.31.CMCC/GPU.4K7Q9M2XH3PT-Z
    ^^^^^^^^^^ ^^^ ^^^^^^^^^^^^ ^
    prefix     kind serial      check

The prefix is a namespace, delegated one segment at a time; the serial is the first
12 Crockford base32 characters of sha256(node public key); the check character is
ISO/IEC 7064 MOD 37,36 over prefix and suffix with the separators removed.

Namespaces are compared segment by segment (:func:`ns_contains`), never by string
prefix, so ``CN.3`` does not contain ``CN.31``.
"""

from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass
from typing import Final

from schemas.errors import InvalidCPIDError

__all__ = [
    "CPID",
    "CROCKFORD",
    "KINDS",
    "MAX_LENGTH",
    "b32_digest",
    "check_character",
    "derive",
    "derive_serial",
    "ns_contains",
    "parse",
    "parse_namespace",
]

CROCKFORD: Final = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
KINDS: Final = ("CPU", "GPU", "NPU", "CLU", "STO", "NET", "SVC")
MAX_LENGTH: Final = 128
SERIAL_LENGTH: Final = 12
MAX_SEGMENT: Final = 16

_ALNUM: Final = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_ALNUM_VALUE: Final = {c: i for i, c in enumerate(_ALNUM)}
_CROCKFORD_SET: Final = frozenset(CROCKFORD)
_ALPHA: Final = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ")
_KIND_SET: Final = frozenset(KINDS)
# a well-formed canonical CPID, all parts at once (parse's fast path; any other text takes
# the part-by-part checks, which name the first problem)
_WELL_FORMED: Final = re.compile(
    rf"([A-Z]{{2}}(?:\.[0-9A-Z]{{1,{MAX_SEGMENT}}})*)/({'|'.join(KINDS)})"
    rf"\.([{CROCKFORD}]{{{SERIAL_LENGTH}}})-([0-9A-Z])"
)


def b32_digest(data: bytes, length: int) -> str:
    """First ``length`` Crockford base32 characters of sha256(data), most significant bits first."""
    # two characters (10 bits) per step, from a table: a kid or a serial takes 6 or 8
    # steps instead of 12 or 16
    pairs = (length + 1) // 2
    bits = 10 * pairs
    value = int.from_bytes(hashlib.sha256(data).digest(), "big")
    value = value >> (256 - bits) if bits <= 256 else value << (bits - 256)
    text = "".join([_PAIRS[(value >> s) & 1023] for s in range(bits - 10, -1, -10)])
    return text[:length]


_PAIRS: Final = tuple(a + b for a in CROCKFORD for b in CROCKFORD)


def derive_serial(public_key: bytes) -> str:
    """The 12-character serial of a raw 32-byte Ed25519 public key."""
    return b32_digest(public_key, SERIAL_LENGTH)


def check_character(body: str) -> str:
    """ISO/IEC 7064 MOD 37,36 (hybrid system) check character over ``body``.

    ``body`` is upper-case alphanumeric; separators are removed by the caller.
    """
    modulus = 36
    p = modulus
    for ch in body:
        s = (p + _ALNUM_VALUE[ch]) % modulus
        if s == 0:
            s = modulus
        p = (s * 2) % (modulus + 1)
    return _ALNUM[(modulus + 1 - p) % modulus]


def _segments(text: str, prefix: str) -> tuple[str, ...]:
    """Validate a namespace prefix and return its segments (already upper case)."""
    if not prefix:
        raise InvalidCPIDError(text, "prefix is empty")
    parts = tuple(prefix.split("."))
    root = parts[0]
    if len(root) != 2 or any(c not in _ALPHA for c in root):
        raise InvalidCPIDError(text, f"root {root!r} must be two letters (ISO 3166-1 alpha-2)")
    for number, seg in enumerate(parts[1:], start=2):
        if not seg:
            raise InvalidCPIDError(text, f"segment {number} is empty")
        bad = [c for c in seg if c not in _ALNUM_VALUE]
        if bad:
            raise InvalidCPIDError(
                text, f"segment {number} {seg!r} has a character outside [0-9A-Z]: {bad[0]!r}"
            )
        if len(seg) > MAX_SEGMENT:
            raise InvalidCPIDError(
                text, f"segment {number} {seg!r} is {len(seg)} characters, at most 16 allowed"
            )
    return parts


def _upper(text: str) -> str:
    if not isinstance(text, str):
        raise InvalidCPIDError(repr(text), f"expected a string, got {type(text).__name__}")
    if not text.isascii():
        bad = next(c for c in text if not c.isascii())
        raise InvalidCPIDError(text, f"non-ASCII character {bad!r}")
    return text.upper()


@functools.lru_cache(maxsize=4096)
def parse_namespace(text: str) -> str:
    """Validate a namespace prefix such as ``cn.31.cmcc`` and return its canonical form.

    Cached (a registry sees the same few namespaces on every request; a refusal is an
    exception and is not cached)."""
    upper = _upper(text)
    if len(upper) > MAX_LENGTH:
        raise InvalidCPIDError(text, f"namespace is {len(upper)} characters, at most 128 allowed")
    return ".".join(_segments(text, upper))


def ns_contains(outer: str, inner: str) -> bool:
    """True when namespace ``inner`` equals ``outer`` or lies below it, segment by segment."""
    a = outer.split(".")
    b = inner.split(".")
    return len(b) >= len(a) and b[: len(a)] == a


@dataclass(frozen=True, slots=True)
class CPID:
    """A parsed, canonical CPID. Build with :func:`parse` or :func:`derive`."""

    prefix: str
    kind: str
    serial: str
    check: str

    @property
    def segments(self) -> tuple[str, ...]:
        return tuple(self.prefix.split("."))

    @property
    def root(self) -> str:
        return self.segments[0]

    @property
    def suffix(self) -> str:
        return f"{self.kind}.{self.serial}-{self.check}"

    def to_text(self) -> str:
        return f"{self.prefix}/{self.suffix}"

    def __str__(self) -> str:
        return self.to_text()

    @classmethod
    def from_text(cls, text: str) -> CPID:
        return parse(text)

    def to_dns(self, zone: str = "") -> str:
        """DNS name form: ``4k7q9m2xh3pt-z.gpu.cmcc.31.cn.<zone>``."""
        labels = [f"{self.serial}-{self.check}", self.kind, *reversed(self.segments)]
        name = ".".join(labels).lower()
        zone = zone.strip(".").lower()
        return f"{name}.{zone}." if zone else f"{name}."

    @classmethod
    def from_dns(cls, name: str, zone: str = "") -> CPID:
        """Inverse of :meth:`to_dns`; the name must end in ``zone``."""
        labels = [lab for lab in name.strip(".").split(".")]
        zone_labels = [lab for lab in zone.strip(".").split(".") if lab]
        if zone_labels:
            tail = [lab.lower() for lab in labels[-len(zone_labels) :]]
            if tail != [z.lower() for z in zone_labels]:
                raise InvalidCPIDError(name, f"DNS name is not under zone {zone!r}")
            labels = labels[: -len(zone_labels)]
        if len(labels) < 3:
            raise InvalidCPIDError(name, "DNS name needs <serial-check>.<kind>.<prefix labels>")
        first, kind, *prefix = labels
        return parse(f"{'.'.join(reversed(prefix))}/{kind}.{first}")

    def matches_key(self, public_key: bytes) -> bool:
        """True when the serial was derived from this raw public key (rule 5)."""
        return derive_serial(public_key) == self.serial


def parse(text: str) -> CPID:
    """Parse and validate a CPID in any case; return it in canonical (upper) form.

    Raises :class:`InvalidCPIDError` naming the first problem and where it is.
    """
    upper = _upper(text)
    if len(upper) <= MAX_LENGTH:
        m = _WELL_FORMED.fullmatch(upper)
        if m is not None:
            prefix, kind, serial, check = m.groups()
            if check == check_character(prefix.replace(".", "") + kind + serial):
                return CPID(prefix=prefix, kind=kind, serial=serial, check=check)
    if not upper:
        raise InvalidCPIDError(text, "empty")
    if len(upper) > MAX_LENGTH:
        raise InvalidCPIDError(text, f"length is {len(upper)}, at most 128 allowed")
    if upper.count("/") != 1:
        raise InvalidCPIDError(text, "must contain exactly one '/' between prefix and suffix")
    prefix, suffix = upper.split("/")
    segments = _segments(text, prefix)
    kind, dot, rest = suffix.partition(".")
    if not dot:
        raise InvalidCPIDError(text, "suffix must be <kind>.<serial>-<check>")
    if kind not in _KIND_SET:
        raise InvalidCPIDError(text, f"unknown kind {kind!r}, expected one of {', '.join(KINDS)}")
    serial, dash, check = rest.rpartition("-")
    if not dash:
        raise InvalidCPIDError(text, "suffix must end in '-<check character>'")
    if len(serial) != SERIAL_LENGTH or any(c not in _CROCKFORD_SET for c in serial):
        raise InvalidCPIDError(
            text, f"serial must be 12 characters of Crockford base32, got {serial!r}"
        )
    if len(check) != 1 or check not in _ALNUM_VALUE:
        raise InvalidCPIDError(text, f"check must be one character of [0-9A-Z], got {check!r}")
    expected = check_character("".join(segments) + kind + serial)
    if check != expected:
        raise InvalidCPIDError(text, f"check character is {check!r}, expected {expected!r}")
    return CPID(prefix=".".join(segments), kind=kind, serial=serial, check=check)


def derive(namespace: str, kind: str, public_key: bytes) -> CPID:
    """The CPID of a node: namespace + kind + sha256(public key), with its check character."""
    prefix = parse_namespace(namespace)
    kind_u = kind.upper()
    if kind_u not in _KIND_SET:
        raise InvalidCPIDError(
            f"{prefix}/{kind}", f"unknown kind {kind!r}, expected one of {', '.join(KINDS)}"
        )
    if len(public_key) != 32:
        raise InvalidCPIDError(
            f"{prefix}/{kind_u}", f"public key must be 32 raw bytes, got {len(public_key)}"
        )
    serial = derive_serial(public_key)
    check = check_character(prefix.replace(".", "") + kind_u + serial)
    cpid = CPID(prefix=prefix, kind=kind_u, serial=serial, check=check)
    if len(cpid.to_text()) > MAX_LENGTH:
        raise InvalidCPIDError(cpid.to_text(), "length is over 128")
    return cpid
