"""Ed25519 signature checks and key parsing: libsodium's verdict, alone.

:func:`schemas.keys.verify_raw` is libsodium's ``crypto_sign_verify_detached``.  On
honest signatures (valid ones and tampered ones) OpenSSL gives the same answers, which
is checked here as a cross-check; on the edge cases (small-order and non-canonical
points) libsodium refuses what OpenSSL accepts, and libsodium's answer is the rule.
The full edge-case set is ``tests/vectors/ed25519.json`` (``test_vectors.py``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.exceptions import InvalidSignature
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas import _edwards, dsse, keys
from schemas.errors import KeyFileError

VECTOR_DIR = Path(__file__).resolve().parents[1] / "vectors"
ENVELOPES: dict[str, Any] = json.loads((VECTOR_DIR / "envelopes.json").read_text("utf-8"))
# the public DSSE suite (copied into tests/vectors/, see the README there)
DSSE_SUITE: dict[str, Any] = json.loads((VECTOR_DIR / "dsse.json").read_text("utf-8"))

Case = tuple[str, keys.Ed25519PublicKey, bytes, bytes]


def _flip(data: bytes, i: int) -> bytes:
    if not data:
        return b"\x01"
    return data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1 :]


def _tampered(name: str, pub: keys.Ed25519PublicKey, sig: bytes, msg: bytes) -> Iterator[Case]:
    yield name, pub, sig, msg
    yield f"{name}/message-bit", pub, sig, _flip(msg, len(msg) // 2)
    yield f"{name}/message-longer", pub, sig, msg + b" "
    if msg:
        yield f"{name}/message-shorter", pub, sig, msg[:-1]
    yield f"{name}/R-bit", pub, _flip(sig, 3), msg
    yield f"{name}/S-bit", pub, _flip(sig, 40), msg
    yield f"{name}/S-high-bit", pub, sig[:63] + bytes([sig[63] | 0x80]), msg
    yield f"{name}/sig-truncated", pub, sig[:63], msg
    yield f"{name}/sig-extended", pub, sig + b"\x00", msg
    yield f"{name}/sig-empty", pub, b"", msg
    other = keys.Ed25519PublicKey.from_public_bytes(_flip(keys.public_raw(pub), 5))
    yield f"{name}/other-key", other, sig, msg


def _cases() -> Iterator[Case]:
    """Every signature of the DSSE suite and of tests/vectors/envelopes.json (valid and
    invalid) against every key the vector trusts, each also tampered with."""
    suite_keys = {
        name: keys.private_from_seed(bytes.fromhex(k["seed"])).public_key()
        for name, k in DSSE_SUITE["keys"].items()
    }
    for v in DSSE_SUITE["vectors"]:
        env = dsse.Envelope.from_dict(v["envelope"])
        message = dsse.pae(env.payload_type, env.payload)
        for i, s in enumerate(env.signatures):
            for name in v["trustedKeys"]:
                yield from _tampered(f"dsse:{v['id']}:{i}:{name}", suite_keys[name], s.sig, message)
    for group in ("valid", "invalid"):
        for v in ENVELOPES[group]:
            env = dsse.Envelope.from_dict(v["envelope"])
            pub = keys.public_from_b64url(v["signer"]["public_key"])
            message = dsse.pae(env.payload_type, env.payload)
            for i, s in enumerate(env.signatures):
                yield from _tampered(f"{group}:{v['id']}:{i}", pub, s.sig, message)
    key = keys.private_from_seed(bytes(range(32)))
    for msg in (b"", b"x", b"DSSEv1 0  0 ", bytes(range(256)) * 8):
        yield from _tampered(f"fresh:{len(msg)}", key.public_key(), key.sign(msg), msg)


CASES = list(_cases())


def _openssl_verify(pub: keys.Ed25519PublicKey, sig: bytes, msg: bytes) -> bool:
    """OpenSSL's answer, a cross-check in these tests only (never a verdict in the code)."""
    try:
        pub.verify(sig, msg)
    except InvalidSignature:
        return False
    return True


def test_the_cases_hold_both_verdicts() -> None:
    verdicts = {keys.verify_raw(pub, sig, msg) for _, pub, sig, msg in CASES}
    assert verdicts == {True, False}
    assert len(CASES) > 200


@pytest.mark.parametrize(("name", "pub", "sig", "msg"), CASES, ids=[c[0] for c in CASES])
def test_openssl_agrees_on_honest_keys(
    name: str, pub: keys.Ed25519PublicKey, sig: bytes, msg: bytes
) -> None:
    """With honest keys and signatures (tampered or not) the libraries agree; raw bytes
    and key objects give the same verdict."""
    assert keys.verify_raw(pub, sig, msg) is _openssl_verify(pub, sig, msg)
    assert keys.verify_raw(keys.public_raw(pub), sig, msg) is keys.verify_raw(pub, sig, msg)


IDENTITY = bytes([1]) + bytes(31)


def test_identity_key_forgery_is_refused() -> None:
    """The identity point as public key with R = identity and S = 0 satisfies the
    cofactorless equation for any message; OpenSSL accepts it, the rule does not."""
    pub = keys.Ed25519PublicKey.from_public_bytes(IDENTITY)
    sig = IDENTITY + bytes(32)
    for msg in (b"any message", b"", b"DSSEv1 0  0 "):
        assert _openssl_verify(pub, sig, msg) is True
        assert keys.verify_raw(pub, sig, msg) is False
        assert keys.verify_raw(IDENTITY, sig, msg) is False


def test_no_openssl_fallback() -> None:
    assert keys.VERIFY_BACKEND == "libsodium"
    assert not hasattr(keys, "_openssl_verify")
    assert not hasattr(keys, "_SODIUM")


# -- key parsing ------------------------------------------------------------------------

P = 2**255 - 19
SMALL_ORDER = [
    (IDENTITY, "a small-order point (order 1)"),
    ((P - 1).to_bytes(32, "little"), "a small-order point (order 2)"),
    (bytes(32), "a small-order point (order 4)"),
    (
        bytes.fromhex("c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a"),
        "a small-order point (order 8)",
    ),
    ((P + 1).to_bytes(32, "little"), "a non-canonical encoding (y = p + 1"),
    (bytes([1]) + bytes(30) + b"\x80", "a non-canonical encoding (x = 0 with the sign bit set)"),
]


@pytest.mark.parametrize(("raw", "found"), SMALL_ORDER, ids=[f for _, f in SMALL_ORDER])
def test_key_parsers_refuse_small_order_and_non_canonical(raw: bytes, found: str) -> None:
    text = keys.b64url_encode(raw)
    for parse in (
        lambda: keys.public_from_b64url(text),
        lambda: keys.public_from_text(text.encode()),
        lambda: keys.public_from_raw(raw),
        lambda: keys.check_public_raw(raw),
    ):
        with pytest.raises(KeyFileError) as info:
            parse()
        assert found in str(info.value)
        assert "expected the canonical encoding of a point of the prime-order subgroup" in str(
            info.value
        )


def test_pem_public_key_is_checked_too() -> None:
    pem = keys.public_to_pem(keys.Ed25519PublicKey.from_public_bytes(IDENTITY))
    with pytest.raises(KeyFileError, match=r"^k\.pem: public key AQAA.* is a small-order point"):
        keys.public_from_text(pem, source="k.pem")


def test_honest_keys_parse() -> None:
    for i in range(20):
        key = keys.private_from_seed(bytes([i]) * 32)
        text = keys.public_to_b64url(key)
        assert keys.public_raw(keys.public_from_b64url(text)) == keys.public_raw(key)
        assert keys.public_raw(keys.public_from_text(keys.public_to_pem(key))) == keys.public_raw(
            key
        )


def test_backend_is_named() -> None:
    assert keys.VERIFY_BACKEND == "libsodium"


def test_fast_key_check_refuses_every_small_order_encoding() -> None:
    """check_public_raw_fast (a record's node key): every encoding of the eight small-order
    points and every y >= p is refused, as by the full check; honest keys pass."""
    from schemas import _edwards
    from schemas.keys import check_public_raw, check_public_raw_fast, generate, public_raw

    p = 2**255 - 19
    y8 = 55188659117513257062467267217118295137698188065244968500265048394206261417927
    small_ys: set[int] = set()
    for y in [*range(0, 20), *range(p - 20, 2**255), y8, p - y8]:
        for sign in (0, 1):
            raw = (y | (sign << 255)).to_bytes(32, "little")
            point = _edwards.decode(raw) if y < p else None
            small = point is not None and _edwards.order_of_small(point) is not None
            if y >= p or small:
                with pytest.raises(KeyFileError):
                    check_public_raw_fast(raw)
                with pytest.raises(KeyFileError):
                    check_public_raw(raw)
                if small:
                    small_ys.add(y)
            elif point is not None and _edwards.describe_public_key(raw) is None:
                assert check_public_raw_fast(raw) == raw
    assert len(small_ys) == 5  # the y of the 8 small-order points: 0, 1, p - 1, +-y8
    for _ in range(20):
        raw = public_raw(generate())
        assert check_public_raw_fast(raw) == raw


# -- the full key rule (libsodium) against the pure-Python reference -----------------------

_SMALL_ORDER_POINTS = [
    pt
    for y in (
        0,
        1,
        2**255 - 20,
        *(
            v % (2**255 - 19)
            for v in (
                55188659117513257062467267217118295137698188065244968500265048394206261417927,
                -55188659117513257062467267217118295137698188065244968500265048394206261417927,
            )
        ),
    )
    for sign in (0, 1)
    if (pt := _edwards.decode((y | (sign << 255)).to_bytes(32, "little"))) is not None
]


def test_the_small_order_points_are_eight() -> None:
    distinct = {_edwards.encode(p) for p in _SMALL_ORDER_POINTS}
    assert len(distinct) == 8
    assert all(_edwards.order_of_small(p) is not None for p in _SMALL_ORDER_POINTS)


def _verdict(raw: bytes) -> bool:
    try:
        keys.check_public_raw(raw)
    except KeyFileError:
        return False
    return True


@given(st.binary(min_size=32, max_size=32))
@settings(max_examples=150, deadline=None)
def test_key_rule_is_the_reference_on_random_bytes(raw: bytes) -> None:
    # what a registering key gets: libsodium's verdict, equal to the reference's
    assert _verdict(raw) == (_edwards.describe_public_key(raw) is None)


@given(st.binary(min_size=32, max_size=32), st.sampled_from(_SMALL_ORDER_POINTS))
@settings(max_examples=60, deadline=None)
def test_key_rule_refuses_an_honest_key_plus_any_small_order_point(
    seed: bytes, torsion: _edwards.Point
) -> None:
    honest = _edwards.decode(keys.public_raw(keys.private_from_seed(seed)))
    assert honest is not None
    raw = _edwards.encode(_edwards.add(honest, torsion))
    identity = _edwards.equal(torsion, _edwards.IDENTITY)
    assert _verdict(raw) is identity
    assert (_edwards.describe_public_key(raw) is None) is identity
