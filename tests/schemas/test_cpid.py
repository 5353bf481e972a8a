"""CPID syntax, check character, derivation, DNS form and namespace containment."""

from __future__ import annotations

import base64
import hashlib
import re
import string

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from schemas.cpid import (
    CPID,
    CROCKFORD,
    KINDS,
    MAX_LENGTH,
    b32_digest,
    check_character,
    derive,
    derive_serial,
    ns_contains,
    parse,
    parse_namespace,
)
from schemas.errors import InvalidCPIDError, InvalidDataError
from schemas.keys import kid

EXAMPLE = "CN.31.CMCC/GPU.4K7Q9M2XH3PT-Z"
ALNUM = string.digits + string.ascii_uppercase
SERIAL = "4K7Q9M2XH3PT"

# -- independent reference implementations ------------------------------------------------

_RFC4648 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
_TO_CROCKFORD = str.maketrans(_RFC4648, CROCKFORD)


def ref_b32(data: bytes, n: int) -> str:
    """First n Crockford characters of sha256(data), via the standard base32 codec."""
    return base64.b32encode(hashlib.sha256(data).digest()).decode().translate(_TO_CROCKFORD)[:n]


def ref_is_valid(body_and_check: str) -> bool:
    """ISO/IEC 7064 MOD 37,36 verification: run the hybrid recurrence over the body
    *and* its check character; the last intermediate sum must be 1."""
    p, s = 36, 0
    for ch in body_and_check:
        s = (p + ALNUM.index(ch)) % 36 or 36
        p = (2 * s) % 37
    return s == 1


def ref_check(body: str) -> str:
    (found,) = [c for c in ALNUM if ref_is_valid(body + c)]
    return found


def body_of(text: str) -> str:
    prefix, suffix = text.split("/")
    kind, rest = suffix.split(".")
    return prefix.replace(".", "") + kind + rest.split("-")[0]


def raises_reason(text: object, reason: str) -> pytest.RaisesExc[InvalidCPIDError]:
    shown = text if isinstance(text, str) else repr(text)
    return pytest.raises(
        InvalidCPIDError, match="^" + re.escape(f"invalid CPID {shown!r}: {reason}") + "$"
    )


def with_check(prefix: str, kind: str, serial: str) -> str:
    return f"{prefix}/{kind}.{serial}-{ref_check(prefix.replace('.', '') + kind + serial)}"


LONG_PREFIX = "CN" + ".ABCDEFGHIJKLMNOP" * 6 + ".ABCD"  # + 19 suffix characters = 128

# -- parsing: valid -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        (EXAMPLE, EXAMPLE),
        (EXAMPLE.lower(), EXAMPLE),
        ("Cn.31.CmCc/GpU.4k7Q9m2Xh3pT-z", EXAMPLE),
        (with_check("CN", "CLU", SERIAL), with_check("CN", "CLU", SERIAL)),
        (with_check("SG.01", "SVC", SERIAL), with_check("SG.01", "SVC", SERIAL)),
        (
            with_check("CN.13.1307.ALIYUN", "NPU", SERIAL),
            with_check("CN.13.1307.ALIYUN", "NPU", SERIAL),
        ),
        (
            with_check("CN.ABCDEFGHIJKLMNOP", "STO", SERIAL),
            with_check("CN.ABCDEFGHIJKLMNOP", "STO", SERIAL),
        ),
        (with_check(LONG_PREFIX, "GPU", SERIAL), with_check(LONG_PREFIX, "GPU", SERIAL)),
        (with_check("CN.31", "NET", "0123456789AB"), with_check("CN.31", "NET", "0123456789AB")),
        (with_check("CN.31", "CPU", "CDEFGHJKMNPQ"), with_check("CN.31", "CPU", "CDEFGHJKMNPQ")),
        (with_check("CN.31", "CPU", "RSTVWXYZ0000"), with_check("CN.31", "CPU", "RSTVWXYZ0000")),
    ],
)
def test_valid(text: str, canonical: str) -> None:
    c = parse(text)
    assert c.to_text() == canonical == str(c)
    assert CPID.from_text(text) == c
    assert parse(canonical) == c


def test_parts_of_the_example() -> None:
    c = parse(EXAMPLE)
    assert (c.prefix, c.kind, c.serial, c.check) == ("CN.31.CMCC", "GPU", SERIAL, "Z")
    assert c.segments == ("CN", "31", "CMCC")
    assert c.root == "CN"
    assert c.suffix == "GPU.4K7Q9M2XH3PT-Z"


def test_longest_cpid_is_128_characters() -> None:
    text = with_check(LONG_PREFIX, "GPU", SERIAL)
    assert len(text) == MAX_LENGTH
    assert parse(text).to_text() == text


# -- parsing: invalid, with exact reasons ---------------------------------------------------


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        # the check character (the protocol's own example)
        ("CN.31.CMCC/GPU.4K7Q9M2XH3PT-Y", "check character is 'Y', expected 'Z'"),
        ("cn.31.cmcc/gpu.4k7q9m2xh3pt-y", "check character is 'Y', expected 'Z'"),
        ("CN.31.CMCC/GPU.4K7Q9M2XH3PT-", "check must be one character of [0-9A-Z], got ''"),
        ("CN.31.CMCC/GPU.4K7Q9M2XH3PT-ZZ", "check must be one character of [0-9A-Z], got 'ZZ'"),
        ("CN.31.CMCC/GPU.4K7Q9M2XH3PT-_", "check must be one character of [0-9A-Z], got '_'"),
        # segments
        (
            "CN.31.CM-CC/GPU.4K7Q9M2XH3PT-Z",
            "segment 3 'CM-CC' has a character outside [0-9A-Z]: '-'",
        ),
        (
            "CN.31.CM_CC/GPU.4K7Q9M2XH3PT-Z",
            "segment 3 'CM_CC' has a character outside [0-9A-Z]: '_'",
        ),
        (with_check("CN..31", "GPU", SERIAL), "segment 2 is empty"),
        (with_check("CN.31.", "GPU", SERIAL), "segment 3 is empty"),
        (
            with_check("CN.ABCDEFGHIJKLMNOPQ", "GPU", SERIAL),
            "segment 2 'ABCDEFGHIJKLMNOPQ' is 17 characters, at most 16 allowed",
        ),
        # root
        (with_check("C1.31", "GPU", SERIAL), "root 'C1' must be two letters (ISO 3166-1 alpha-2)"),
        (
            with_check("CHN.31", "GPU", SERIAL),
            "root 'CHN' must be two letters (ISO 3166-1 alpha-2)",
        ),
        (with_check("C", "GPU", SERIAL), "root 'C' must be two letters (ISO 3166-1 alpha-2)"),
        (with_check("86.31", "GPU", SERIAL), "root '86' must be two letters (ISO 3166-1 alpha-2)"),
        ("/GPU.4K7Q9M2XH3PT-Z", "prefix is empty"),
        # kind
        (
            with_check("CN.31.CMCC", "TPU", SERIAL),
            "unknown kind 'TPU', expected one of CPU, GPU, NPU, CLU, STO, NET, SVC",
        ),
        (
            "CN.31.CMCC/.4K7Q9M2XH3PT-Z",
            "unknown kind '', expected one of CPU, GPU, NPU, CLU, STO, NET, SVC",
        ),
        # serial: 12 Crockford characters; I, L, O and U are not Crockford and are not mapped
        *[
            (
                with_check("CN.31.CMCC", "GPU", SERIAL[:-1] + c),
                f"serial must be 12 characters of Crockford base32, got '{SERIAL[:-1] + c}'",
            )
            for c in "ILOU"
        ],
        (
            with_check("CN.31.CMCC", "GPU", SERIAL[:-1]),
            f"serial must be 12 characters of Crockford base32, got '{SERIAL[:-1]}'",
        ),
        (
            with_check("CN.31.CMCC", "GPU", SERIAL + "0"),
            f"serial must be 12 characters of Crockford base32, got '{SERIAL}0'",
        ),
        # length
        (
            with_check(LONG_PREFIX + "E", "GPU", SERIAL),
            f"length is {MAX_LENGTH + 1}, at most 128 allowed",
        ),
        # structure
        ("", "empty"),
        ("CN.31.CMCC", "must contain exactly one '/' between prefix and suffix"),
        ("CN.31/CMCC/GPU.4K7Q9M2XH3PT-Z", "must contain exactly one '/' between prefix and suffix"),
        (
            "CN.31.CMCC//GPU.4K7Q9M2XH3PT-Z",
            "must contain exactly one '/' between prefix and suffix",
        ),
        (
            "CN.31.CMCC%2FGPU.4K7Q9M2XH3PT-Z",
            "must contain exactly one '/' between prefix and suffix",
        ),
        ("CN.31.CMCC/GPU4K7Q9M2XH3PT-Z", "suffix must be <kind>.<serial>-<check>"),
        ("CN.31.CMCC/GPU-4K7Q9M2XH3PT-Z", "suffix must be <kind>.<serial>-<check>"),
        ("CN.31.CMCC/GPU.4K7Q9M2XH3PTZ", "suffix must end in '-<check character>'"),
        ("CN.31.CMCC/GPU.4K7Q9M2XH3PT.Z", "suffix must end in '-<check character>'"),
        # whitespace is never trimmed
        (" " + EXAMPLE, "root ' CN' must be two letters (ISO 3166-1 alpha-2)"),
        (EXAMPLE + " ", "check must be one character of [0-9A-Z], got 'Z '"),
        (EXAMPLE + "\n", "check must be one character of [0-9A-Z], got 'Z\\n'"),
        ("CN.31 .CMCC/GPU.4K7Q9M2XH3PT-Z", "segment 2 '31 ' has a character outside [0-9A-Z]: ' '"),
        (
            "CN.31.CMCC/GPU.4K7Q9M2X\tH3PT-Z",
            "serial must be 12 characters of Crockford base32, got '4K7Q9M2X\\tH3PT'",
        ),
        # non-ASCII, including characters whose upper() is ASCII ('ſ' -> 'S', 'ı' -> 'I')
        ("CN.31.CMCC/GPU.4K7Q9M2XH3PT-\uff3a", "non-ASCII character '\uff3a'"),
        ("CN.31.CMCC/\u017fVC.4K7Q9M2XH3PT-Z", "non-ASCII character '\u017f'"),
        ("CN.31.CMCC/GPU.4K7Q9M2XH3P\u0131-Z", "non-ASCII character '\u0131'"),
        ("\u0421N.31.CMCC/GPU.4K7Q9M2XH3PT-Z", "non-ASCII character '\u0421'"),
    ],
)
def test_invalid(text: str, reason: str) -> None:
    with raises_reason(text, reason) as info:
        parse(text)
    assert info.value.text == text
    assert info.value.reason == reason


@pytest.mark.parametrize("value", [None, b"CN.31.CMCC/GPU.4K7Q9M2XH3PT-Z", 42])
def test_non_string_input(value: object) -> None:
    with raises_reason(value, f"expected a string, got {type(value).__name__}"):
        parse(value)  # type: ignore[arg-type]


def test_error_tree() -> None:
    with pytest.raises(InvalidDataError):
        parse("nope")
    with pytest.raises(ValueError, match="invalid CPID"):
        parse("nope")


# -- namespaces ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "canonical"),
    [("cn", "CN"), ("cn.31.cmcc", "CN.31.CMCC"), ("SG.01", "SG.01"), ("CN.13.1307", "CN.13.1307")],
)
def test_parse_namespace(text: str, canonical: str) -> None:
    assert parse_namespace(text) == canonical


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "prefix is empty"),
        ("C", "root 'C' must be two letters (ISO 3166-1 alpha-2)"),
        ("CN.", "segment 2 is empty"),
        ("CN.31/X", "segment 2 '31/X' has a character outside [0-9A-Z]: '/'"),
        ("CN." + "A" * 17, f"segment 2 '{'A' * 17}' is 17 characters, at most 16 allowed"),
        ("CN" + ".A" * 64, "namespace is 130 characters, at most 128 allowed"),
        ("CN.\u0661", "non-ASCII character '\u0661'"),
    ],
)
def test_parse_namespace_invalid(text: str, reason: str) -> None:
    with raises_reason(text, reason):
        parse_namespace(text)


@pytest.mark.parametrize(
    ("outer", "inner", "contains"),
    [
        ("CN", "CN", True),
        ("CN", "CN.31", True),
        ("CN", "CN.31.CMCC.LG01", True),
        ("CN.31", "CN.31.CMCC", True),
        ("CN.3", "CN.31", False),  # a string prefix, not a segment prefix
        ("CN.3", "CN.31.CMCC", False),
        ("CN.31.CMCC", "CN.31.CMCCX", False),
        ("CN", "CNX", False),
        ("CN.31", "CN", False),
        ("CN.31", "CN.32", False),
        ("CN.31", "CN.32.31", False),
        ("CN", "SG", False),
    ],
)
def test_ns_contains_is_segment_wise(outer: str, inner: str, contains: bool) -> None:
    assert ns_contains(outer, inner) is contains


# -- derivation ---------------------------------------------------------------------------------

RFC8032_TEST1_PUBLIC = bytes.fromhex(
    "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"
)


@pytest.mark.parametrize(
    "public_key", [RFC8032_TEST1_PUBLIC, bytes(32), b"\xff" * 32, hashlib.sha256(b"x").digest()]
)
@pytest.mark.parametrize(
    ("namespace", "kind"), [("CN.31.CMCC", "GPU"), ("cn", "clu"), ("SG.01", "Svc")]
)
def test_derive_matches_the_documented_algorithm(
    public_key: bytes, namespace: str, kind: str
) -> None:
    c = derive(namespace, kind, public_key)
    serial = ref_b32(public_key, 12)
    assert c.serial == serial == derive_serial(public_key)
    assert c.prefix == namespace.upper()
    assert c.kind == kind.upper()
    assert c.check == ref_check(namespace.upper().replace(".", "") + kind.upper() + serial)
    assert parse(c.to_text()) == c
    assert c.matches_key(public_key)
    assert not c.matches_key(bytes(31) + b"\x01")
    assert kid(public_key) == ref_b32(public_key, 16)
    assert kid(public_key).startswith(c.serial)


def test_derive_rfc8032_key_known_values() -> None:
    # pinned (computed with the reference functions above) so a change of algorithm shows
    assert ref_b32(RFC8032_TEST1_PUBLIC, 16) == "47Z33QX1AJH62RKB" == kid(RFC8032_TEST1_PUBLIC)
    c = derive("CN.31.CMCC", "GPU", RFC8032_TEST1_PUBLIC)
    assert c.to_text() == "CN.31.CMCC/GPU.47Z33QX1AJH6-3"
    assert ref_is_valid("CN31CMCCGPU47Z33QX1AJH6" + "3")


@pytest.mark.parametrize(
    ("namespace", "kind", "key", "match"),
    [
        ("CN.31", "TPU", bytes(32), r"^invalid CPID 'CN\.31/TPU': unknown kind 'TPU'"),
        ("CN.31", "GPU", bytes(31), r"public key must be 32 raw bytes, got 31"),
        ("C.31", "GPU", bytes(32), r"root 'C' must be two letters"),
        (LONG_PREFIX + "E", "GPU", bytes(32), r"length is over 128"),
    ],
)
def test_derive_invalid(namespace: str, kind: str, key: bytes, match: str) -> None:
    with pytest.raises(InvalidCPIDError, match=match):
        derive(namespace, kind, key)


# -- check character ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "check"),
    [
        ("CN31CMCCGPU4K7Q9M2XH3PT", "Z"),  # the protocol's example
        ("A", "H"),
        ("0", "2"),
    ],
)
def test_check_character_known_values(body: str, check: str) -> None:
    assert check_character(body) == check == ref_check(body)
    assert ref_is_valid(body + check)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=ALNUM, min_size=1, max_size=120))
def test_check_character_agrees_with_reference(body: str) -> None:
    assert check_character(body) == ref_check(body)


# -- DNS form -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("zone", "name"),
    [
        ("", "4k7q9m2xh3pt-z.gpu.cmcc.31.cn."),
        ("cpi.", "4k7q9m2xh3pt-z.gpu.cmcc.31.cn.cpi."),
        ("cpi", "4k7q9m2xh3pt-z.gpu.cmcc.31.cn.cpi."),
        (".cpi.", "4k7q9m2xh3pt-z.gpu.cmcc.31.cn.cpi."),
        ("CPI.", "4k7q9m2xh3pt-z.gpu.cmcc.31.cn.cpi."),
        ("id.Example.NET", "4k7q9m2xh3pt-z.gpu.cmcc.31.cn.id.example.net."),
    ],
)
def test_dns_both_ways(zone: str, name: str) -> None:
    c = parse(EXAMPLE)
    assert c.to_dns(zone) == name
    assert CPID.from_dns(name, zone) == c
    assert CPID.from_dns(name.upper().rstrip("."), zone) == c  # case and trailing dot


@pytest.mark.parametrize(
    ("name", "zone", "match"),
    [
        ("4k7q9m2xh3pt-z.gpu.cmcc.31.cn.other.", "cpi.", r"DNS name is not under zone 'cpi\.'"),
        ("4k7q9m2xh3pt-z.gpu.cmcc.31.cn.xcpi.", "cpi.", r"DNS name is not under zone 'cpi\.'"),
        ("4k7q9m2xh3pt-z.gpu.cmcc.31.cn.", "id.example.net", r"not under zone 'id\.example\.net'"),
        ("gpu.cn.cpi.", "cpi.", r"DNS name needs <serial-check>\.<kind>\.<prefix labels>"),
        ("cpi.", "cpi.", r"DNS name needs"),
        # the name carries a zone the caller did not strip: its labels become the root
        ("4k7q9m2xh3pt-z.gpu.cmcc.31.cn.cpi.", "", r"root 'CPI' must be two letters"),
        ("4k7q9m2xh3pt-y.gpu.cmcc.31.cn.cpi.", "cpi.", r"check character is 'Y', expected 'Z'"),
        ("4k7q9m2xh3pt-z.tpu.cmcc.31.cn.cpi.", "cpi.", r"unknown kind 'TPU'"),
    ],
)
def test_dns_invalid(name: str, zone: str, match: str) -> None:
    with pytest.raises(InvalidCPIDError, match=match):
        CPID.from_dns(name, zone)


# -- properties ---------------------------------------------------------------------------------

roots = st.text(alphabet=string.ascii_uppercase, min_size=2, max_size=2)
segments = st.lists(st.text(alphabet=ALNUM, min_size=1, max_size=16), max_size=6)
namespaces = st.builds(lambda r, s: ".".join([r, *s]), roots, segments)
kinds = st.sampled_from(KINDS)
serials = st.text(alphabet=CROCKFORD, min_size=12, max_size=12)


@st.composite
def derived_cpids(draw: st.DrawFn) -> str:
    return derive(
        draw(namespaces), draw(kinds), draw(st.binary(min_size=32, max_size=32))
    ).to_text()


@st.composite
def serial_cpids(draw: st.DrawFn) -> str:
    return with_check(draw(namespaces), draw(kinds), draw(serials))


valid_cpids = st.one_of(derived_cpids(), serial_cpids())

PROPERTY = settings(max_examples=250, deadline=None)


@PROPERTY
@given(derived_cpids())
def test_round_trip_derived(text: str) -> None:
    assert parse(text).to_text() == text


@PROPERTY
@given(serial_cpids())
def test_round_trip_random_serial(text: str) -> None:
    c = parse(text)
    assert c.to_text() == text
    assert ref_is_valid(body_of(text) + c.check)


@PROPERTY
@given(valid_cpids, st.data())
def test_any_case_round_trips_to_canonical(text: str, data: st.DataObject) -> None:
    flips = data.draw(st.lists(st.booleans(), min_size=len(text), max_size=len(text)))
    mixed = "".join(c.lower() if f else c for c, f in zip(text, flips, strict=True))
    assert parse(mixed).to_text() == text


@PROPERTY
@given(valid_cpids)
def test_dns_round_trip(text: str) -> None:
    c = parse(text)
    assert CPID.from_dns(c.to_dns("cpi."), "cpi.") == c
    assert CPID.from_dns(c.to_dns(), "") == c


def _prefix_inner_positions(text: str) -> tuple[set[int], set[int]]:
    """(positions of '.' between two non-root segments, positions of characters in non-root
    segments): the places where the separator limitation (docs/cpid.md) applies."""
    prefix = text.split("/")[0]
    root_end = prefix.find(".")
    dots = {i for i, c in enumerate(prefix) if c == "." and i != root_end}
    chars = {i for i, c in enumerate(prefix) if c != "." and root_end != -1 and i > root_end}
    return dots, chars


def substitutions_that_must_fail(text: str, i: int, new: str) -> bool:
    old = text[i]
    if new.isascii() and new.upper() == old:
        return False  # the same character in another case: a valid spelling
    dots, chars = _prefix_inner_positions(text)
    if i in dots and new.upper() in ALNUM:
        return False  # merges two segments: known limitation
    return not (i in chars and new == ".")  # splits a segment: known limitation


@PROPERTY
@given(valid_cpids, st.data())
def test_single_substitution_keeping_separators_is_rejected(text: str, data: st.DataObject) -> None:
    positions = [i for i, c in enumerate(text) if c.isalnum()]
    i = data.draw(st.sampled_from(positions))
    new = data.draw(
        st.one_of(
            st.sampled_from(ALNUM),
            st.sampled_from(string.printable),
            st.characters(codec="utf-8"),
        )
    )
    assume(substitutions_that_must_fail(text, i, new))
    with pytest.raises(InvalidCPIDError):
        parse(text[:i] + new + text[i + 1 :])


@PROPERTY
@given(valid_cpids, st.data())
def test_separator_substitution_is_rejected(text: str, data: st.DataObject) -> None:
    prefix_len = text.index("/")
    # '/', '-', every '.' of the suffix, and the '.' after the root
    positions = [i for i, c in enumerate(text) if c in "/-" or (c == "." and i > prefix_len)]
    if "." in text[:prefix_len]:
        positions.append(text.index("."))
    i = data.draw(st.sampled_from(positions))
    new = data.draw(st.one_of(st.sampled_from(ALNUM + "./-_ "), st.characters(codec="utf-8")))
    assume(new != text[i])
    with pytest.raises(InvalidCPIDError):
        parse(text[:i] + new + text[i + 1 :])


@PROPERTY
@given(valid_cpids, st.data())
def test_prefix_dot_replaced_by_non_alphanumeric_is_rejected(
    text: str, data: st.DataObject
) -> None:
    dots, _ = _prefix_inner_positions(text)
    assume(dots)
    i = data.draw(st.sampled_from(sorted(dots)))
    new = data.draw(st.characters(codec="utf-8"))
    assume(new != "." and not (new.isascii() and new.upper() in ALNUM))
    with pytest.raises(InvalidCPIDError):
        parse(text[:i] + new + text[i + 1 :])


def test_every_single_substitution_of_the_example() -> None:
    """Exhaustive over the example: every printable ASCII character (and a few others)
    at every position is rejected, except the separator cases in the prefix."""
    candidates = string.printable + "\u00e9\u0131\u017f\uff3a\u0000"
    accepted = []
    for i in range(len(EXAMPLE)):
        for new in candidates:
            typo = EXAMPLE[:i] + new + EXAMPLE[i + 1 :]
            if typo.upper() == EXAMPLE:
                continue
            try:
                parse(typo)
            except InvalidCPIDError:
                continue
            accepted.append(typo)
            assert not substitutions_that_must_fail(EXAMPLE, i, new), typo
    assert sorted(accepted) == ["CN.31MCMCC/GPU.4K7Q9M2XH3PT-Z", "CN.31mCMCC/GPU.4K7Q9M2XH3PT-Z"]


# -- the separator limitation (docs/cpid.md) ------------------------------------------------------


def test_known_limitation_merged_segments_can_pass_the_check() -> None:
    """The check character is computed with separators removed (the protocol pins this), so
    a '.' typed as a letter or digit inserts that character into the checked body.  For
    every position exactly one of the 36 characters leaves the check unchanged; found by
    brute force over the example: 'M' in place of the second '.'."""
    accepted = []
    for i, c in enumerate(EXAMPLE.split("/")[0]):
        if c != ".":
            continue
        for new in ALNUM:
            typo = EXAMPLE[:i] + new + EXAMPLE[i + 1 :]
            try:
                parse(typo)
            except InvalidCPIDError:
                continue
            accepted.append(typo)
    assert accepted == ["CN.31MCMCC/GPU.4K7Q9M2XH3PT-Z"]
    typo = parse("CN.31MCMCC/GPU.4K7Q9M2XH3PT-Z")
    assert typo.prefix == "CN.31MCMCC" != parse(EXAMPLE).prefix
    assert typo.check == parse(EXAMPLE).check == "Z"


@pytest.mark.parametrize("n", range(4))
def test_known_limitation_exactly_one_merge_character_per_dot(n: int) -> None:
    """Whatever the serial, exactly one of the 36 alphanumerics passes at each inner '.'
    (the hybrid recurrence is a bijection, so one character maps the state to itself)."""
    text = derive("CN.31.CMCC.LG01", "GPU", hashlib.sha256(bytes([n])).digest()).to_text()
    dots, _ = _prefix_inner_positions(text)
    assert len(dots) == 2
    for i in dots:
        passing = []
        for new in ALNUM:
            try:
                parse(text[:i] + new + text[i + 1 :])
            except InvalidCPIDError:
                continue
            passing.append(new)
        assert len(passing) == 1


def test_known_limitation_moving_a_dot_is_never_caught_by_the_check() -> None:
    """Swapping a '.' with a neighbouring character inside the prefix leaves the checked
    body unchanged; only the structural rules (root of two letters, no empty or long
    segment) can catch it."""
    assert parse("CN.31C.MCC/GPU.4K7Q9M2XH3PT-Z").prefix == "CN.31C.MCC"
    assert parse("CN.3.1CMCC/GPU.4K7Q9M2XH3PT-Z").prefix == "CN.3.1CMCC"
    with pytest.raises(InvalidCPIDError, match="root 'CN3' must be two letters"):
        parse("CN3.1.CMCC/GPU.4K7Q9M2XH3PT-Z")  # the dot after the root moved: structural


def test_adjacent_swaps_of_the_example_are_caught_except_moved_dots() -> None:
    accepted = []
    for i in range(len(EXAMPLE) - 1):
        a, b = EXAMPLE[i], EXAMPLE[i + 1]
        if a == b:
            continue
        typo = EXAMPLE[:i] + b + a + EXAMPLE[i + 2 :]
        try:
            parse(typo)
        except InvalidCPIDError:
            continue
        accepted.append(typo)
    assert accepted == ["CN.3.1CMCC/GPU.4K7Q9M2XH3PT-Z", "CN.31C.MCC/GPU.4K7Q9M2XH3PT-Z"]


def _loop_b32(data: bytes, n: int) -> str:
    """The digit-by-digit definition: 5 bits at a time from the top of the digest."""
    value = int.from_bytes(hashlib.sha256(data).digest(), "big")
    return "".join(CROCKFORD[(value >> (256 - 5 * (i + 1))) & 31] for i in range(n))


@given(st.binary(max_size=64), st.integers(min_value=1, max_value=51))
@settings(max_examples=300)
def test_b32_digest_is_the_bit_by_bit_definition(data: bytes, n: int) -> None:
    assert b32_digest(data, n) == _loop_b32(data, n) == ref_b32(data, n)


def test_parse_namespace_cache_still_refuses() -> None:
    assert parse_namespace("cn.31.cmcc") == "CN.31.CMCC"
    assert parse_namespace("cn.31.cmcc") == "CN.31.CMCC"  # a cached answer
    for _ in range(2):  # a refusal is not cached as an answer
        with pytest.raises(InvalidCPIDError):
            parse_namespace("cn..31")
