"""schemas._json.loads: strict JSON with a nesting bound (docs/verification.md: at most 16)."""

from __future__ import annotations

import json

import pytest

from schemas import _json, dsse
from schemas.chain import TrustAnchors
from schemas.errors import EnvelopeError, KeyFileError, PayloadError
from schemas.models import Status, parse_payload


def _nested(depth: int, open_: str = "[", close: str = "]") -> str:
    return open_ * depth + close * depth


@pytest.mark.parametrize("depth", [1, 2, 15, 16])
def test_nesting_up_to_16_levels_parses(depth: int) -> None:
    assert _json.loads(_nested(depth)) == json.loads(_nested(depth))
    obj = '{"a":' * depth + "1" + "}" * depth
    assert _json.loads(obj.encode()) == json.loads(obj)


@pytest.mark.parametrize("depth", [17, 18, 100, 10_000, 100_000])
def test_deeper_nesting_is_a_value_error_naming_the_depth(depth: int) -> None:
    with pytest.raises(ValueError, match=rf"JSON nesting is {depth} levels deep, at most 16"):
        _json.loads(_nested(depth))
    with pytest.raises(ValueError, match=rf"JSON nesting is {depth} levels deep"):
        _json.loads(_nested(depth).encode())


def test_mixed_nesting_counts_objects_and_arrays() -> None:
    doc = '{"a":[' * 8 + "1" + "]}" * 8  # 16 levels
    assert _json.loads(doc)
    with pytest.raises(ValueError, match=r"17 levels deep"):
        _json.loads("[" + doc + "]")


def test_brackets_inside_strings_do_not_count() -> None:
    doc = json.dumps({"s": "[" * 100 + "{" * 100, "t": ['\\"[[[[', "]]]]" * 50]})
    assert _json.loads(doc) == json.loads(doc)


def test_many_shallow_containers_parse() -> None:
    doc = json.dumps([{"a": [1, {"b": [2]}]} for _ in range(2000)])
    assert _json.loads(doc) == json.loads(doc)


def test_unterminated_deep_input_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        _json.loads("[" * 10_000)
    with pytest.raises(ValueError):
        _json.loads('["' + "[" * 100)  # an unterminated string: json's own error


def test_every_parser_reports_deep_input_as_its_error() -> None:
    deep = _nested(10_000).encode()
    with pytest.raises(EnvelopeError, match=r"nesting is 10000 levels deep"):
        dsse.Envelope.from_json(deep)
    with pytest.raises(PayloadError, match=r"nesting is 10000 levels deep"):
        parse_payload(Status.media_type(), deep, Status)
    with pytest.raises(KeyFileError, match=r"nesting is 10000 levels deep"):
        TrustAnchors.from_json(deep)
