"""The strict number parsers and the UTF-8 check of :mod:`schemas.http`."""

from __future__ import annotations

import pytest

from schemas.http import check_utf8_json, parse_int, parse_number


@pytest.mark.parametrize("text", ["0", "7", "42", "12345678901234567890"])
def test_ascii_integers(text: str) -> None:
    assert parse_int(text) == int(text)


@pytest.mark.parametrize(
    "text",
    [
        "",
        " 1",
        "1 ",
        "+1",
        "-1",
        "5_0",
        "\u00b2",
        "\u0663",
        "\uff11",
        "1.0",
        "0x10",
        "1e3",
        "123456789012345678901",
    ],
)
def test_not_ascii_integers(text: str) -> None:
    assert parse_int(text) is None


def test_negative_integers_only_when_asked() -> None:
    assert parse_int("-3", negative=True) == -3
    assert parse_int("--3", negative=True) is None


@pytest.mark.parametrize(("text", "value"), [("12", 12.0), ("12.5", 12.5), ("1e+16", 1e16)])
def test_numbers(text: str, value: float) -> None:
    assert parse_number(text) == value


@pytest.mark.parametrize(
    "text", ["", "inf", "nan", "Infinity", "1_0", "\u0663", "+1", " 1", "1.", ".5", "1e"]
)
def test_not_numbers(text: str) -> None:
    assert parse_number(text) is None


def test_utf8_json_only() -> None:
    doc = '{"a": "\u00e9"}'
    assert check_utf8_json(doc.encode()) is None
    assert "UTF-16" in (check_utf8_json(doc.encode("utf-16")) or "")
    assert "UTF-16" in (check_utf8_json(doc.encode("utf-16-be")) or "")
    assert "UTF-32" in (check_utf8_json(doc.encode("utf-32")) or "")
    assert "byte order mark" in (check_utf8_json(b"\xef\xbb\xbf" + doc.encode()) or "")
    assert "offset" in (check_utf8_json(b'{"a": "\xff"}') or "")
