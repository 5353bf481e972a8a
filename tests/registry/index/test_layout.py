"""registry.index.layout: keys built, parsed and matched by namespace; /alloc/ values."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from registry.index import Index, Keys, Prefix, parse_key, read_units, units_json
from schemas.errors import InvalidDataError

CPID = "CN.31.CMCC/GPU.4K7Q9M2XH3PT-Z"
SHA = "ab" * 32


@pytest.mark.parametrize(
    ("key", "collection", "parts"),
    [
        (Keys.ns("CN.31"), Prefix.NS, ("CN.31",)),
        (Keys.cert("ABCDEFGH12345678"), Prefix.CERTS, ("ABCDEFGH12345678",)),
        (Keys.rec(CPID), Prefix.REC, (CPID,)),
        (Keys.live(CPID), Prefix.LIVE, (CPID,)),
        (Keys.seq(CPID), Prefix.SEQ, (CPID,)),
        (Keys.claim(CPID, "c-0001"), Prefix.CLAIM, (CPID, "c-0001")),
        (Keys.alloc(CPID), Prefix.ALLOC, (CPID,)),
        (Keys.revoked("SERIAL42"), Prefix.REVOKED, ("SERIAL42",)),
        (Keys.log("entry", "7"), Prefix.LOG, ("entry", "7")),
        (Keys.log_entry(7), Prefix.LOG, ("entry", "00000000000000000007")),
        (Keys.log_head(12), Prefix.LOG, ("head", "00000000000000000012")),
        (Keys.token(SHA), Prefix.TOKENS, (SHA,)),
        (Keys.nonce("KID1", "n0nce"), Prefix.NONCE, ("KID1", "n0nce")),
        (Keys.audit(42), Prefix.AUDIT, ("00000000000000000042",)),
        (Keys.claim_token(SHA), Prefix.CLAIM_TOKENS, (SHA,)),
        (Keys.holder("lab-7@cmcc"), Prefix.HOLDERS, ("lab-7@cmcc",)),
        (Keys.meter("CN.3~GPU.X~abc"), Prefix.METER, ("CN.3~GPU.X~abc",)),
        (Keys.usage("CN.3~GPU.X~abc", 2), Prefix.USAGE, ("CN.3~GPU.X~abc", "0" * 19 + "2")),
        (Keys.usage_signer("ABCDEFGH12345678"), Prefix.USAGE_SIGNERS, ("ABCDEFGH12345678",)),
    ],
)
def test_keys_round_trip(key: str, collection: Prefix, parts: tuple[str, ...]) -> None:
    assert key.startswith("/cpi/v1/") and key.startswith(collection)
    parsed = parse_key(key)
    assert parsed.collection is collection
    assert parsed.parts == parts
    assert collection + parsed.name == key


def test_exact_key_strings() -> None:
    assert Keys.rec(CPID) == "/cpi/v1/rec/CN.31.CMCC/GPU.4K7Q9M2XH3PT-Z"
    assert Keys.claim(CPID, "x") == "/cpi/v1/claim/CN.31.CMCC/GPU.4K7Q9M2XH3PT-Z/x"
    assert Keys.claims(CPID) == "/cpi/v1/claim/CN.31.CMCC/GPU.4K7Q9M2XH3PT-Z/"
    assert Keys.nonces("K") == "/cpi/v1/nonce/K/"
    assert Keys.claim_token(SHA) == "/cpi/v1/claimtokens/" + SHA
    assert Keys.holder("lab") == "/cpi/v1/holders/lab"
    with pytest.raises(ValueError, match="64 lower-case hex"):
        Keys.claim_token("AB" * 32)
    with pytest.raises(ValueError, match="holder name"):
        Keys.holder("a/b")
    assert not Keys.claim(CPID, "x").startswith(Prefix.CLAIM_TOKENS)
    assert not Keys.claim_token(SHA).startswith(Prefix.CLAIM)
    assert str(Prefix.REC) == "/cpi/v1/rec/"


def test_sequence_keys_sort_numerically() -> None:
    assert sorted([Keys.audit(10), Keys.audit(9), Keys.audit(100)]) == [
        Keys.audit(9),
        Keys.audit(10),
        Keys.audit(100),
    ]


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: Keys.rec("CN.31"), "expected 1"),
        (lambda: Keys.rec("CN.31/GPU X"), "whitespace"),
        (lambda: Keys.rec("CN.31/a/b"), "expected 1"),
        (lambda: Keys.cert("a/b"), "expected 0"),
        (lambda: Keys.ns(""), "non-empty"),
        (lambda: Keys.claim(CPID, "a/b"), "expected 0"),
        (lambda: Keys.token("ABCD"), "64 lower-case hex"),
        (lambda: Keys.token(SHA.upper()), "64 lower-case hex"),
        (lambda: Keys.audit(-1), "audit sequence"),
        (lambda: Keys.log(), "at least one part"),
        (lambda: Keys.log("..", "x"), r"'\.\.'"),
        (lambda: Keys.prefixes_within(Prefix.CERTS, "CN"), "not keyed by CPID"),
    ],
)
def test_keys_reject_malformed_names(build: Callable[[], str], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build()


@pytest.mark.parametrize(
    "key",
    ["/other/x", "/cpi/v1/unknown/x", "/cpi/v1/rec/CN.31", "/cpi/v1/claim/CN.31/GPU.X-1", ""],
)
def test_parse_key_rejects_keys_outside_the_layout(key: str) -> None:
    with pytest.raises(ValueError):
        parse_key(key)


async def test_namespace_prefixes_match_whole_segments(index: Index) -> None:
    names = ["CN.3/GPU.A-1", "CN.3.X/GPU.B-2", "CN.31/GPU.C-3", "CN.30.Y/GPU.D-4", "CN/GPU.E-5"]
    for name in names:
        await index.put(Keys.rec(name), b"r")
    exact, within = Keys.rec_prefixes_within("CN.3")
    assert exact == Keys.rec_prefix_for_namespace("CN.3") == "/cpi/v1/rec/CN.3/"
    assert within == "/cpi/v1/rec/CN.3."
    got_exact = [parse_key(kv.key).name for kv in (await index.get_prefix(exact))[0]]
    got_sub = [parse_key(kv.key).name for kv in (await index.get_prefix(within))[0]]
    assert got_exact == ["CN.3/GPU.A-1"]
    assert got_sub == ["CN.3.X/GPU.B-2"]
    # a raw string prefix is only a string prefix: it also catches the sibling CN.31
    raw = [parse_key(kv.key).name for kv in (await index.get_prefix(Prefix.REC + "CN.3"))[0]]
    assert raw == ["CN.3.X/GPU.B-2", "CN.3/GPU.A-1", "CN.30.Y/GPU.D-4", "CN.31/GPU.C-3"]


# -- round trips, generated -----------------------------------------------------------------

# one path segment Keys accepts: no "/", no ASCII space or control character, not "." or ".."
_SEGMENT = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="/\x7f", min_codepoint=0x21),
    min_size=1,
    max_size=12,
).filter(lambda s: s not in (".", ".."))
_SHA256 = st.text("0123456789abcdef", min_size=64, max_size=64)
_SEQ = st.integers(min_value=0, max_value=10**20 - 1)


def _cpid(prefix: str, suffix: str) -> str:
    return f"{prefix}/{suffix}"


_BUILT = st.one_of(
    st.tuples(st.just(Prefix.NS), st.tuples(_SEGMENT)),
    st.tuples(st.just(Prefix.CERTS), st.tuples(_SEGMENT)),
    st.tuples(st.just(Prefix.REC), st.tuples(st.builds(_cpid, _SEGMENT, _SEGMENT))),
    st.tuples(st.just(Prefix.LIVE), st.tuples(st.builds(_cpid, _SEGMENT, _SEGMENT))),
    st.tuples(st.just(Prefix.CLAIM), st.tuples(st.builds(_cpid, _SEGMENT, _SEGMENT), _SEGMENT)),
    st.tuples(st.just(Prefix.ALLOC), st.tuples(st.builds(_cpid, _SEGMENT, _SEGMENT))),
    st.tuples(st.just(Prefix.REVOKED), st.tuples(_SEGMENT)),
    st.tuples(st.just(Prefix.LOG), st.lists(_SEGMENT, min_size=1, max_size=4).map(tuple)),
    st.tuples(st.just(Prefix.TOKENS), st.tuples(_SHA256)),
    st.tuples(st.just(Prefix.NONCE), st.tuples(_SEGMENT, _SEGMENT)),
    st.tuples(st.just(Prefix.CLAIM_TOKENS), st.tuples(_SHA256)),
    st.tuples(st.just(Prefix.HOLDERS), st.tuples(_SEGMENT)),
    st.tuples(st.just(Prefix.METER), st.tuples(_SEGMENT)),
    st.tuples(st.just(Prefix.USAGE_SIGNERS), st.tuples(_SEGMENT)),
)

_BUILDERS: dict[Prefix, Callable[..., str]] = {
    Prefix.NS: Keys.ns,
    Prefix.CERTS: Keys.cert,
    Prefix.REC: Keys.rec,
    Prefix.LIVE: Keys.live,
    Prefix.CLAIM: Keys.claim,
    Prefix.ALLOC: Keys.alloc,
    Prefix.REVOKED: Keys.revoked,
    Prefix.LOG: Keys.log,
    Prefix.TOKENS: Keys.token,
    Prefix.NONCE: Keys.nonce,
    Prefix.CLAIM_TOKENS: Keys.claim_token,
    Prefix.HOLDERS: Keys.holder,
    Prefix.METER: Keys.meter,
    Prefix.USAGE_SIGNERS: Keys.usage_signer,
    Prefix.SEQ: Keys.seq,
}


@given(_BUILT)
def test_every_built_key_parses_back_to_its_arguments(
    built: tuple[Prefix, tuple[str, ...]],
) -> None:
    collection, parts = built
    key = _BUILDERS[collection](*parts)
    parsed = parse_key(key)
    assert parsed.collection is collection
    assert parsed.parts == parts
    assert collection + parsed.name == key


@given(_SEQ)
def test_sequence_keys_parse_back_to_their_number(n: int) -> None:
    for build, collection, head in (
        (Keys.audit, Prefix.AUDIT, ()),
        (Keys.log_entry, Prefix.LOG, ("entry",)),
        (Keys.log_head, Prefix.LOG, ("head",)),
    ):
        parsed = parse_key(build(n))
        assert parsed.collection is collection
        assert parsed.parts[: len(head)] == head
        assert int(parsed.parts[-1]) == n and len(parsed.parts[-1]) == 20


@given(
    st.one_of(
        st.text(max_size=40),
        st.builds(str.__add__, st.sampled_from(list(Prefix)), st.text(max_size=30)),
    )
)
def test_any_key_parse_key_accepts_is_rebuilt_by_keys(key: str) -> None:
    try:
        parsed = parse_key(key)
    except ValueError:
        return
    assert parsed.collection + parsed.name == key
    if parsed.collection in (Prefix.AUDIT, Prefix.USAGE):
        return  # any segment parses; Keys.audit and Keys.usage build only zero-padded numbers
    try:
        rebuilt = _BUILDERS[parsed.collection](*parsed.parts)
    except ValueError:
        # token keys must be SHA-256 hex to be built, but parse as any one segment
        assert parsed.collection in (Prefix.TOKENS, Prefix.CLAIM_TOKENS)
        return
    assert rebuilt == key


# -- /alloc/ and /holders/ values -----------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "units"),
    [
        (None, 0),  # no key: nothing claimed
        (b'{"units":3}', 3),
        (b'{"units": 0}', 0),
        (b"7", 7),
        (b" 12 ", 12),
        (b'{"units":5,"by":"x"}', 5),
    ],
)
def test_read_units_reads_what_is_written(value: bytes | None, units: int) -> None:
    assert read_units(value) == units


@pytest.mark.parametrize(
    "value",
    [
        b"garbage",
        b"",
        b"-1",
        b'{"units":-2}',
        b"true",
        b'{"units":true}',
        b"2.5",
        b'{"claimed":3}',
        b'"3"',
        b"[3]",
        b"\xff",
    ],
)
def test_read_units_refuses_anything_else(value: bytes) -> None:
    with pytest.raises(InvalidDataError, match="unreadable units value"):
        read_units(value)


@given(st.integers(min_value=0, max_value=2**63))
def test_units_json_round_trips(units: int) -> None:
    assert units_json(units) == b'{"units":%d}' % units
    assert read_units(units_json(units)) == units


@pytest.mark.parametrize("units", [-1, True, 1.0, "3"])
def test_units_json_refuses_what_read_units_would_refuse(units: object) -> None:
    with pytest.raises(ValueError, match="non-negative integer"):
        units_json(units)  # type: ignore[arg-type]


def test_layout_imports_neither_grpc_nor_the_etcd_client() -> None:
    code = (
        "import sys, registry.index.layout, registry.index.values\n"
        "from registry.index import Keys, parse_key, read_units\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('grpc', 'etcd3aio', 'etcd'))\n"
        "assert not heavy, heavy\n"
        "from registry.index import Index\n"
        "assert 'grpc' in sys.modules and 'etcd3aio' in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
