"""HTTP conventions shared by the services (no I/O): how a bearer token is sent, how a
query parameter holds a number, which bytes a JSON body may be.

Error answers are ``{"error": {"code", "message"}}`` with the status of the error's
class (``http_status`` in :mod:`schemas.errors`).

Numbers in query parameters (and in ``Last-Event-ID``) are ASCII only: Python's
``int()`` and ``float()`` also take Unicode digits (``"²"``, ``"٣"``), underscores
(``"5_0"``), blanks, ``"inf"`` and ``"nan"``, none of which another implementation
would read the same way.  :func:`parse_int` and :func:`parse_number` accept exactly
``[0-9]+`` (with a leading ``-`` only where negatives are allowed) and JSON's
number form ``-?[0-9]+(.[0-9]+)?([eE][-+]?[0-9]+)?``.
"""

from __future__ import annotations

import re
from typing import Final

__all__ = [
    "MAX_INT_DIGITS",
    "bearer_token",
    "check_utf8_json",
    "parse_int",
    "parse_number",
]

MAX_INT_DIGITS: Final = 20
"""The longest integer accepted in a query parameter (2**64 has 20 digits)."""

_INT: Final = re.compile(r"-?[0-9]{1,20}")
_NUMBER: Final = re.compile(r"-?[0-9]{1,40}(?:\.[0-9]{1,40})?(?:[eE][-+]?[0-9]{1,3})?")


def bearer_token(authorization: str) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header value, or None.

    The scheme is case-insensitive; surrounding blanks are dropped; an empty token,
    another scheme or no header at all give None.
    """
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


def parse_int(text: str, *, negative: bool = False) -> int | None:
    """``text`` as an integer if it is ASCII digits only (at most :data:`MAX_INT_DIGITS`;
    a leading ``-`` when ``negative``), else None.  No blanks, ``+``, ``_`` or Unicode
    digits."""
    if not text.isascii() or not _INT.fullmatch(text):
        return None
    if text.startswith("-") and not negative:
        return None
    return int(text)


def parse_number(text: str) -> float | None:
    """``text`` as a decimal number in JSON's form (``12``, ``-12.5``, ``1.5e+16``: ASCII
    digits only; what ``repr()`` of a finite float gives), else None.  No ``+`` in front,
    blanks, ``_``, ``inf`` or ``nan``."""
    if not text.isascii() or not _NUMBER.fullmatch(text):
        return None
    return float(text)


def check_utf8_json(body: bytes) -> str | None:
    """Why ``body`` is not acceptable as the bytes of a JSON document, or None.

    JSON between the services is UTF-8 without a byte order mark (RFC 8259 section
    8.1; docs/protocol.md section 1); UTF-16 and UTF-32 are refused, not guessed.
    """
    if body.startswith(b"\xef\xbb\xbf"):
        return "JSON must be UTF-8 without a byte order mark (found a UTF-8 BOM)"
    if body[:2] in (b"\xff\xfe", b"\xfe\xff") or (len(body) >= 2 and b"\x00" in body[:4]):
        return "JSON must be UTF-8 (this looks like UTF-16 or UTF-32)"
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as exc:
        return f"JSON must be UTF-8 (byte 0x{body[exc.start]:02x} at offset {exc.start} is not)"
    return None
