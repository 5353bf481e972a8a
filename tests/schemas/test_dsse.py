"""DSSE envelopes: the public DSSE test suite, then our own edge cases."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any

import pytest

from schemas import dsse
from schemas.errors import EnvelopeError, SignatureError
from schemas.keys import Ed25519PublicKey, kid_of, private_from_seed, public_raw, verify_raw

SUITE_PATH = Path(__file__).resolve().parents[1] / "vectors" / "dsse.json"
"""The public DSSE test suite, copied into tests/vectors/ (see the README there)."""

SUITE: dict[str, Any] = json.loads(SUITE_PATH.read_text(encoding="utf-8"))
VECTORS: list[dict[str, Any]] = SUITE["vectors"]
SUITE_KEYS = {
    name: private_from_seed(bytes.fromhex(k["seed"])) for name, k in SUITE["keys"].items()
}


def test_suite_keys_match_their_published_public_keys() -> None:
    assert SUITE_KEYS, "the suite names no keys"
    for name, k in SUITE["keys"].items():
        assert k["algorithm"] == "ed25519"
        assert public_raw(SUITE_KEYS[name]).hex() == k["public"]


def test_suite_is_not_empty() -> None:
    assert len(VECTORS) >= 9
    assert {v["expect"] for v in VECTORS} == {"accept", "reject"}


@pytest.mark.parametrize("vector", VECTORS, ids=[v["id"] for v in VECTORS])
def test_dsse_suite(vector: dict[str, Any]) -> None:
    env = dsse.Envelope.from_dict(vector["envelope"])
    trusted: dict[str, Ed25519PublicKey] = {
        name: SUITE_KEYS[name].public_key() for name in vector["trustedKeys"]
    }
    ours = dsse.pae(env.payload_type, env.payload)
    signed = bytes.fromhex(vector["pae"])

    # the vector's PAE is what its signatures cover (checks we read keys and sigs right)
    for s in env.signatures:
        assert any(verify_raw(k, s.sig, signed) for k in trusted.values())

    if vector["expect"] == "accept":
        assert ours == signed
        verified = dsse.verify(
            env,
            trusted,
            payload_types=vector["supportedPayloadTypes"],
            threshold=vector["threshold"],
        )
        assert verified.payload == env.payload
        assert len(verified.keyids) >= vector["threshold"]
    else:
        with pytest.raises(SignatureError):
            dsse.verify(
                env,
                trusted,
                payload_types=vector["supportedPayloadTypes"],
                threshold=vector["threshold"],
            )


TAMPERED_AFTER_SIGNING = {"payload-type-swapped"}
"""Suite vectors whose payloadType was changed after the signatures were made."""


@pytest.mark.parametrize("vector", VECTORS, ids=[v["id"] for v in VECTORS])
def test_dsse_suite_pae(vector: dict[str, Any]) -> None:
    """Our PAE equals the suite's wherever the envelope is the one that was signed; where
    the payloadType was swapped after signing it differs, in the type alone."""
    env = dsse.Envelope.from_dict(vector["envelope"])
    ours = dsse.pae(env.payload_type, env.payload)
    signed = bytes.fromhex(vector["pae"])
    if vector["id"] in TAMPERED_AFTER_SIGNING:
        assert vector["expect"] == "reject"
        assert ours != signed
        # same payload, same length field: only the type part of the PAE differs
        tail = b" %d " % len(env.payload) + env.payload
        assert ours.endswith(tail) and signed.endswith(tail)
        assert signed.startswith(b"DSSEv1 ") and ours.startswith(b"DSSEv1 ")
    else:
        assert ours == signed


def test_pae_layout() -> None:
    assert dsse.pae("t", b"") == b"DSSEv1 1 t 0 "
    assert dsse.pae("application/x", b"a b") == b"DSSEv1 13 application/x 3 a b"
    # lengths are byte counts, not characters
    assert dsse.pae("\u00e4", b"\xff") == b"DSSEv1 2 \xc3\xa4 1 \xff"


# -- our own cases --------------------------------------------------------------------------

KEY_A = SUITE_KEYS["A"]
KEY_B = SUITE_KEYS["B"]
TYPE = "application/vnd.cpi.status.v1+json"
PAYLOAD = b'{"type":"status.v1","x":"\xe2\x82\xac~~~???>>>"}'  # bytes that need '+' and '/'


def _trusted(*ks: Any) -> dict[str, Ed25519PublicKey]:
    return {kid_of(k): k.public_key() for k in ks}


def test_sign_and_verify() -> None:
    env = dsse.sign(TYPE, PAYLOAD, KEY_A)
    assert env.keyid == kid_of(KEY_A)
    v = dsse.verify(env, _trusted(KEY_A), payload_types=[TYPE])
    assert v.payload == PAYLOAD
    assert v.payload_type == TYPE
    assert v.keyids == frozenset({kid_of(KEY_A)})


def test_tampered_payload_is_rejected() -> None:
    env = dsse.sign(TYPE, PAYLOAD, KEY_A)
    bad = dsse.Envelope(env.payload_type, PAYLOAD.replace(b"x", b"y"), env.signatures)
    with pytest.raises(SignatureError, match=r"^0 of 1 required signatures verify"):
        dsse.verify(bad, _trusted(KEY_A))


def test_tampered_payload_type_is_rejected() -> None:
    env = dsse.sign(TYPE, PAYLOAD, KEY_A)
    bad = dsse.Envelope("application/vnd.cpi.record.v1+json", env.payload, env.signatures)
    with pytest.raises(SignatureError, match="0 of 1 required signatures verify"):
        dsse.verify(bad, _trusted(KEY_A))


def test_wrong_key_is_rejected() -> None:
    env = dsse.sign(TYPE, PAYLOAD, KEY_B, keyid=kid_of(KEY_A))
    with pytest.raises(
        SignatureError,
        match=re.escape(f"(signature key ids: {kid_of(KEY_A)}; trusted: {kid_of(KEY_A)})"),
    ):
        dsse.verify(env, _trusted(KEY_A))


def test_untrusted_key_id_is_rejected() -> None:
    env = dsse.sign(TYPE, PAYLOAD, KEY_B)
    with pytest.raises(SignatureError, match=f"signature key ids: {kid_of(KEY_B)}"):
        dsse.verify(env, _trusted(KEY_A))


def test_signature_without_key_id_is_tried_against_every_key() -> None:
    env = dsse.sign(TYPE, PAYLOAD, KEY_B, keyid="")
    assert dsse.verify(env, _trusted(KEY_A, KEY_B)).keyids == {kid_of(KEY_B)}
    with pytest.raises(SignatureError, match=r"signature key ids: <none>"):
        dsse.verify(env, _trusted(KEY_A))


def test_payload_type_not_supported() -> None:
    env = dsse.sign(TYPE, PAYLOAD, KEY_A)
    with pytest.raises(
        SignatureError,
        match=re.escape(f"payloadType {TYPE!r} is not one of ['application/other']"),
    ):
        dsse.verify(env, _trusted(KEY_A), payload_types=["application/other"])


def test_threshold() -> None:
    a = dsse.sign(TYPE, PAYLOAD, KEY_A)
    b = dsse.sign(TYPE, PAYLOAD, KEY_B)
    both = dsse.Envelope(TYPE, PAYLOAD, a.signatures + b.signatures)
    assert len(dsse.verify(both, _trusted(KEY_A, KEY_B), threshold=2).keyids) == 2
    twice = dsse.Envelope(TYPE, PAYLOAD, a.signatures + a.signatures)
    with pytest.raises(SignatureError, match=r"^1 of 2 required signatures verify"):
        dsse.verify(twice, _trusted(KEY_A, KEY_B), threshold=2)
    with pytest.raises(ValueError, match="threshold must be at least 1"):
        dsse.verify(a, _trusted(KEY_A), threshold=0)


def test_no_trusted_keys() -> None:
    env = dsse.sign(TYPE, PAYLOAD, KEY_A)
    with pytest.raises(SignatureError, match=r"trusted: <none>\)$"):
        dsse.verify(env, {})


# -- encoding -----------------------------------------------------------------------------------


def _b64(data: bytes, *, urlsafe: bool, padded: bool) -> str:
    text = (base64.urlsafe_b64encode if urlsafe else base64.b64encode)(data).decode()
    return text if padded else text.rstrip("=")


@pytest.mark.parametrize("urlsafe", [False, True], ids=["standard", "url-safe"])
@pytest.mark.parametrize("padded", [True, False], ids=["padded", "unpadded"])
def test_standard_and_url_safe_base64_are_accepted(urlsafe: bool, padded: bool) -> None:
    env = dsse.sign(TYPE, PAYLOAD, KEY_A)
    sig = env.signatures[0].sig
    doc = {
        "payloadType": TYPE,
        "payload": _b64(PAYLOAD, urlsafe=urlsafe, padded=padded),
        "signatures": [{"keyid": env.keyid, "sig": _b64(sig, urlsafe=urlsafe, padded=padded)}],
    }
    parsed = dsse.Envelope.from_dict(doc)
    assert parsed == env
    assert dsse.verify(parsed, _trusted(KEY_A)).payload == PAYLOAD


def test_standard_base64_is_emitted() -> None:
    out = dsse.sign(TYPE, PAYLOAD, KEY_A).to_dict()
    assert out["payload"] == base64.b64encode(PAYLOAD).decode()
    assert "+" in out["payload"] or "/" in out["payload"]  # the payload was chosen for this
    assert (
        out["signatures"][0]["sig"]
        == base64.b64encode(dsse.sign(TYPE, PAYLOAD, KEY_A).signatures[0].sig).decode()
    )


def test_round_trip_json() -> None:
    env = dsse.sign(TYPE, PAYLOAD, KEY_A)
    text = env.to_json()
    assert json.loads(text) == env.to_dict()
    assert dsse.Envelope.from_json(text) == env
    assert dsse.Envelope.from_json(text.decode()) == env
    assert dsse.Envelope.from_json(dsse.Envelope.from_json(text).to_json()).to_json() == text
    assert set(json.loads(text)) == {"payloadType", "payload", "signatures"}


def test_empty_payload_round_trips() -> None:
    env = dsse.sign(TYPE, b"", KEY_A)
    assert dsse.Envelope.from_json(env.to_json()) == env
    assert dsse.verify(env, _trusted(KEY_A)).payload == b""


# -- malformed envelopes ------------------------------------------------------------------------

GOOD = dsse.sign(TYPE, PAYLOAD, KEY_A).to_dict()


def _with(**changes: Any) -> dict[str, Any]:
    doc = json.loads(json.dumps(GOOD))
    for k, v in changes.items():
        if v is None:
            doc.pop(k)
        else:
            doc[k] = v
    return doc


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (b"", r"^envelope is not valid JSON: Expecting value"),
        (b"{", r"^envelope is not valid JSON"),
        (b"\xff\xfe", r"^envelope is not valid JSON"),
        (b"[]", r"^envelope must be a JSON object, got list"),
        (b'"envelope"', r"^envelope must be a JSON object, got str"),
        (b"null", r"^envelope must be a JSON object, got NoneType"),
        (
            b'{"payloadType":"t","payload":"","payload":"eA==","signatures":[]}',
            r"^envelope is not valid JSON: duplicate member name 'payload'",
        ),
        (
            b'{"payloadType":"t","payload":"","signatures":[{"sig":"","keyid":"a","keyid":"b"}]}',
            r"^envelope is not valid JSON: duplicate member name 'keyid'",
        ),
        (b'{"payloadType":NaN}', r"^envelope is not valid JSON: NaN is not valid JSON"),
    ],
)
def test_malformed_json(text: bytes, match: str) -> None:
    with pytest.raises(EnvelopeError, match=match):
        dsse.Envelope.from_json(text)


@pytest.mark.parametrize(
    ("doc", "match"),
    [
        (_with(extra=1), r"^envelope has unknown fields: extra$"),
        (_with(payload_type=TYPE, b=2), r"^envelope has unknown fields: b, payload_type$"),
        (_with(payloadType=None), r"^envelope field 'payloadType' must be a string$"),
        (_with(payloadType=7), r"^envelope field 'payloadType' must be a string$"),
        (_with(payload=None), r"^envelope field 'payload' is missing$"),
        (_with(payload=7), r"^envelope field 'payload' must be a base64 string, got int$"),
        (_with(payload="not base64!"), r"^envelope field 'payload' is not valid base64$"),
        (_with(payload="eA=x"), r"^envelope field 'payload' is not valid base64$"),
        (_with(payload="A"), r"^envelope field 'payload' is not valid base64$"),
        (_with(payload="\u00e9A=="), r"^envelope field 'payload' is not valid base64$"),
        (_with(signatures=None), r"^envelope field 'signatures' must be a non-empty list$"),
        (_with(signatures=[]), r"^envelope field 'signatures' must be a non-empty list$"),
        (_with(signatures={"sig": "AA=="}), r"must be a non-empty list$"),
        (_with(signatures=["AA=="]), r"^signature 0 must be an object with 'sig'$"),
        (_with(signatures=[{"keyid": "a"}]), r"^signature 0 must be an object with 'sig'$"),
        (
            _with(signatures=[*GOOD["signatures"], {"sig": "AA==", "alg": "ed25519"}]),
            r"^signature 1 has unknown fields: alg$",
        ),
        (
            _with(signatures=[{"sig": "AA==", "keyid": 1}]),
            r"^signature 0 'keyid' must be a string$",
        ),
        (_with(signatures=[{"sig": "A"}]), r"^signature 0 is not valid base64$"),
        (_with(signatures=[{"sig": None}]), r"^signature 0 must be a base64 string, got NoneType$"),
    ],
)
def test_missing_and_unknown_fields(doc: dict[str, Any], match: str) -> None:
    with pytest.raises(EnvelopeError, match=match):
        dsse.Envelope.from_dict(doc)
    with pytest.raises(EnvelopeError, match=match):
        dsse.Envelope.from_json(json.dumps(doc))


def test_oversized_envelope_is_refused_before_parsing() -> None:
    big = b"{" + b" " * dsse.MAX_ENVELOPE_BYTES + b"}"  # would be JSON if it were parsed
    with pytest.raises(
        EnvelopeError,
        match=f"^envelope is {len(big)} bytes, at most {dsse.MAX_ENVELOPE_BYTES} allowed$",
    ):
        dsse.Envelope.from_json(big)
    at_limit = json.dumps(GOOD).encode()
    with pytest.raises(
        EnvelopeError, match=f"^envelope is {len(at_limit)} bytes, at most 100 allowed$"
    ):
        dsse.Envelope.from_json(at_limit, max_bytes=100)
    assert dsse.Envelope.from_json(at_limit, max_bytes=len(at_limit)) == dsse.Envelope.from_dict(
        GOOD
    )


def test_keyid_defaults_to_empty() -> None:
    env = dsse.Envelope.from_dict(
        {"payloadType": TYPE, "payload": "", "signatures": [{"sig": "AA=="}]}
    )
    assert env.keyid == ""
    assert env.signatures[0].sig == b"\x00"
