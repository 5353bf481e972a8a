"""Strict JSON reading for signed bytes: no duplicate names, no NaN or Infinity.

Signatures cover bytes, not a canonical form, so every implementation must read the
same bytes as the same document.  Duplicate member names (RFC 8259 leaves their
meaning open: some parsers keep the first, most the last, some refuse) and the
non-standard constants ``NaN``/``Infinity`` are exactly where parsers disagree, so
they are refused here.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["loads"]


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for name, _ in pairs:
            if name in seen:
                raise ValueError(f"duplicate member name {name!r}")
            seen.add(name)
    return obj


def _constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


# one decoder for every call: json.loads with hooks builds a decoder (and its scanner)
# per call, about a quarter of its time on a record payload
_DECODER = json.JSONDecoder(object_pairs_hook=_object, parse_constant=_constant)


def loads(data: bytes | str) -> Any:
    """``json.loads`` that raises ValueError on duplicate names and NaN/Infinity."""
    if isinstance(data, str):
        if data.startswith("\ufeff"):  # as json.loads does
            raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", data, 0)
        return _DECODER.decode(data)
    if not isinstance(data, bytes | bytearray):
        raise TypeError(
            f"the JSON object must be str, bytes or bytearray, not {type(data).__name__}"
        )
    return _DECODER.decode(data.decode(json.detect_encoding(data), "surrogatepass"))
