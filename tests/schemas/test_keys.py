"""Ed25519 signature checks: libsodium (PyNaCl) and OpenSSL (cryptography) give one verdict.

:func:`schemas.keys.verify_raw` takes libsodium's acceptance as final and leaves every
rejection to OpenSSL, so its answer must be OpenSSL's on every input; the two backends
must also agree with each other on everything but small-order points, which libsodium
alone refuses.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from schemas import dsse, keys

VECTOR_DIR = Path(__file__).resolve().parents[1] / "vectors"
ENVELOPES: dict[str, Any] = json.loads((VECTOR_DIR / "envelopes.json").read_text("utf-8"))
# the public DSSE suite (copied into tests/vectors/, see the README there)
DSSE_SUITE: dict[str, Any] = json.loads((VECTOR_DIR / "dsse.json").read_text("utf-8"))

needs_sodium = pytest.mark.skipif(keys.VERIFY_BACKEND == "openssl", reason="PyNaCl missing")

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
    other = keys.public_from_b64url(keys.b64url_encode(_flip(keys.public_raw(pub), 5)))
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


def test_the_cases_hold_both_verdicts() -> None:
    verdicts = {keys._openssl_verify(pub, sig, msg) for _, pub, sig, msg in CASES}
    assert verdicts == {True, False}
    assert len(CASES) > 200


@needs_sodium
@pytest.mark.parametrize(("name", "pub", "sig", "msg"), CASES, ids=[c[0] for c in CASES])
def test_backends_agree(name: str, pub: keys.Ed25519PublicKey, sig: bytes, msg: bytes) -> None:
    expected = keys._openssl_verify(pub, sig, msg)
    assert keys._sodium_verify(pub, sig, msg) is expected
    assert keys.verify_raw(pub, sig, msg) is expected


@pytest.mark.parametrize(("name", "pub", "sig", "msg"), CASES[:40], ids=[c[0] for c in CASES[:40]])
def test_openssl_alone_without_pynacl(
    monkeypatch: pytest.MonkeyPatch, name: str, pub: keys.Ed25519PublicKey, sig: bytes, msg: bytes
) -> None:
    monkeypatch.setattr(keys, "_SODIUM", None)
    assert keys.verify_raw(pub, sig, msg) is keys._openssl_verify(pub, sig, msg)
    with pytest.raises(RuntimeError, match="PyNaCl"):
        keys._sodium_verify(pub, sig, msg)


@needs_sodium
def test_small_order_key_keeps_openssls_verdict() -> None:
    """The identity point as public key: R = identity, S = 0 verifies for any message
    under OpenSSL; libsodium refuses small-order points.  verify_raw answers as OpenSSL."""
    identity = bytes([1]) + bytes(31)
    pub = keys.Ed25519PublicKey.from_public_bytes(identity)
    sig = identity + bytes(32)
    assert keys._openssl_verify(pub, sig, b"any message") is True
    assert keys._sodium_verify(pub, sig, b"any message") is False
    assert keys.verify_raw(pub, sig, b"any message") is True


def test_backend_is_named() -> None:
    assert keys.VERIFY_BACKEND in ("libsodium+openssl", "openssl")
