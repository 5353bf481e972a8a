"""Strict JSON reading for signed bytes: no duplicate names, no NaN or Infinity.

Signatures cover bytes, not a canonical form, so every implementation must read the
same bytes as the same document.  Duplicate member names (RFC 8259 leaves their
meaning open: some parsers keep the first, most the last, some refuse) and the
non-standard constants ``NaN``/``Infinity`` are exactly where parsers disagree, so
they are refused here.

Nesting is bounded too (docs/verification.md): at most :data:`MAX_DEPTH` levels of arrays
and objects.  Deeper input is a ValueError naming its depth, never the RecursionError
that Python's parser raises at about a thousand levels.  A document with at most 16
brackets cannot be deeper than 16 and is not scanned; only larger ones are.
"""

from __future__ import annotations

import json
import re
from typing import Any, Final

__all__ = ["MAX_DEPTH", "loads"]

MAX_DEPTH: Final = 16
"""The deepest nesting of arrays and objects accepted (the top-level value is level 1)."""

# a JSON string (so that brackets inside strings are skipped), or one bracket
_TOKEN: Final = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]')


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


def _check_depth(text: str) -> None:
    if text.count("[") + text.count("{") <= MAX_DEPTH:
        return  # the common case: too few brackets to nest too deep
    depth = deepest = 0
    for m in _TOKEN.finditer(text):
        c = text[m.start()]
        if c == "[" or c == "{":
            depth += 1
            if depth > deepest:
                deepest = depth
        elif c == "]" or c == "}":
            depth -= 1
    if deepest > MAX_DEPTH:
        raise ValueError(f"JSON nesting is {deepest} levels deep, at most {MAX_DEPTH} allowed")


def loads(data: bytes | str) -> Any:
    """``json.loads`` that raises ValueError on duplicate names, NaN/Infinity and
    nesting deeper than :data:`MAX_DEPTH`."""
    if isinstance(data, str):
        if data.startswith("\ufeff"):  # as json.loads does
            raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", data, 0)
        text = data
    elif isinstance(data, bytes | bytearray):
        text = data.decode(json.detect_encoding(data), "surrogatepass")
    else:
        raise TypeError(
            f"the JSON object must be str, bytes or bytearray, not {type(data).__name__}"
        )
    _check_depth(text)
    return _DECODER.decode(text)
