"""tests/vectors/*.json: our implementation against the vectors other implementations use,
and the files against a fresh run of tools/gen_vectors.py."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from schemas import cpid as cpidmod
from schemas import dsse, keys
from schemas.chain import TrustAnchors, verify_record
from schemas.cpid import CPID, check_character, derive, ns_contains, parse
from schemas.errors import InvalidCPIDError, InvalidDataError, KeyFileError
from schemas.models import DOCUMENT_TYPES, Anchor, media_type, parse_payload
from tools import gen_vectors

VECTOR_DIR = Path(__file__).resolve().parents[1] / "vectors"
FRESH = gen_vectors.build()


def _load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((VECTOR_DIR / name).read_text(encoding="utf-8"))
    return data


CPIDS = _load("cpid.json")
KEYS = _load("keys.json")
ENVELOPES = _load("envelopes.json")
CHAINS = _load("chains.json")
ED25519 = _load("ed25519.json")
SEEDS = {k["name"]: bytes.fromhex(k["seed_hex"]) for k in KEYS["keys"]}


# -- the files are what the generator writes ---------------------------------------------------


EXTERNAL = {"dsse.json", "rfc6962.json", "cosignature.json"}
"""Public suites copied into tests/vectors/, and vectors built by hand without our code
(see its README); not ours to regenerate."""


def test_every_vector_file_is_generated_or_external() -> None:
    assert set(FRESH) == {"cpid.json", "keys.json", "envelopes.json", "chains.json", "ed25519.json"}
    assert not set(FRESH) & EXTERNAL
    assert {p.name for p in VECTOR_DIR.glob("*.json")} == set(FRESH) | EXTERNAL


@pytest.mark.parametrize("name", sorted(FRESH))
def test_vector_file_is_current(name: str) -> None:
    on_disk = (VECTOR_DIR / name).read_text(encoding="utf-8")
    assert on_disk == FRESH[name], (
        f"tests/vectors/{name} differs from a fresh run; if the change is intended, "
        "regenerate with: python tools/gen_vectors.py"
    )


def test_generation_is_deterministic() -> None:
    assert gen_vectors.build() == FRESH


# -- cpid.json ------------------------------------------------------------------------------------


def test_cpid_constants() -> None:
    assert CPIDS["alphabet"] == cpidmod.CROCKFORD
    assert CPIDS["kinds"] == list(cpidmod.KINDS)
    assert CPIDS["max_length"] == cpidmod.MAX_LENGTH


@pytest.mark.parametrize("v", CPIDS["check_character"], ids=lambda v: v["body"])
def test_cpid_check_character(v: dict[str, str]) -> None:
    assert check_character(v["body"]) == v["check"]


@pytest.mark.parametrize("v", CPIDS["valid"], ids=lambda v: v["input"])
def test_cpid_valid(v: dict[str, Any]) -> None:
    c = parse(v["input"])
    assert c.to_text() == v["canonical"]
    assert (c.prefix, c.kind, c.serial, c.check) == (
        v["prefix"],
        v["kind"],
        v["serial"],
        v["check"],
    )
    assert list(c.segments) == v["segments"]
    assert c.to_dns() == v["dns"]
    assert c.to_dns("cpi.") == v["dns_in_zone_cpi"]
    assert CPID.from_dns(v["dns_in_zone_cpi"], "cpi.") == c


@pytest.mark.parametrize("v", CPIDS["invalid"], ids=lambda v: repr(v["input"]))
def test_cpid_invalid(v: dict[str, str]) -> None:
    with pytest.raises(InvalidCPIDError) as info:
        parse(v["input"])
    assert info.value.reason == v["reason"]


@pytest.mark.parametrize("v", CPIDS["dns"], ids=lambda v: v["name"])
def test_cpid_dns(v: dict[str, str]) -> None:
    assert CPID.from_dns(v["name"], v["zone"]).to_text() == v["cpid"]


@pytest.mark.parametrize("v", CPIDS["dns_invalid"], ids=lambda v: v["name"])
def test_cpid_dns_invalid(v: dict[str, str]) -> None:
    with pytest.raises(InvalidCPIDError) as info:
        CPID.from_dns(v["name"], v["zone"])
    assert info.value.reason == v["reason"]


@pytest.mark.parametrize("v", CPIDS["ns_contains"], ids=lambda v: f"{v['outer']}>{v['inner']}")
def test_ns_contains(v: dict[str, Any]) -> None:
    assert ns_contains(v["outer"], v["inner"]) is v["contains"]


# -- keys.json ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", KEYS["keys"], ids=lambda k: k["name"])
def test_key(k: dict[str, Any]) -> None:
    priv = keys.private_from_seed(bytes.fromhex(k["seed_hex"]))
    raw = keys.public_raw(priv)
    assert raw.hex() == k["public_hex"]
    assert keys.public_to_b64url(priv) == k["public_key"]
    assert keys.b64url_decode(k["public_key"]) == raw
    assert hashlib.sha256(raw).hexdigest() == k["sha256_hex"]
    assert keys.kid(raw) == k["kid"]
    assert cpidmod.derive_serial(raw) == k["serial"]
    for c in k["cpids"]:
        derived = derive(c["namespace"], c["kind"], raw)
        assert derived.to_text() == c["cpid"]
        assert derived.to_dns("cpi.") == c["dns"]


def test_rfc8032_key_is_included() -> None:
    first = KEYS["keys"][0]
    assert first["public_hex"] == "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"


# -- envelopes.json ----------------------------------------------------------------------------------


@pytest.mark.parametrize("v", ENVELOPES["valid"], ids=lambda v: v["id"])
def test_envelope_valid(v: dict[str, Any]) -> None:
    env = dsse.Envelope.from_dict(v["envelope"])
    assert env.to_dict() == v["envelope"]
    assert env.payload_type == v["payloadType"] == media_type(v["type"])
    assert env.payload == v["payload_text"].encode("utf-8")
    assert dsse.pae(env.payload_type, env.payload).hex() == v["pae_hex"]
    signer = v["signer"]
    pub = keys.public_from_b64url(signer["public_key"])
    assert keys.kid_of(pub) == signer["kid"] == env.keyid
    verified = dsse.verify(env, {signer["kid"]: pub}, payload_types=[media_type(v["type"])])
    doc = parse_payload(verified.payload_type, verified.payload, DOCUMENT_TYPES[v["type"]])
    assert doc.to_json() == env.payload
    # Ed25519 is deterministic: signing again with the seed gives the same envelope
    priv = keys.private_from_seed(SEEDS[signer["key"]])
    assert dsse.sign(env.payload_type, env.payload, priv) == env


def test_every_document_type_has_an_envelope_vector() -> None:
    assert {v["type"] for v in ENVELOPES["valid"]} == set(DOCUMENT_TYPES)


@pytest.mark.parametrize("v", ENVELOPES["invalid"], ids=lambda v: v["id"])
def test_envelope_invalid(v: dict[str, Any]) -> None:
    env = dsse.Envelope.from_dict(v["envelope"])
    signer = v["signer"]
    trusted = {signer["kid"]: keys.public_from_b64url(signer["public_key"])}
    expected = DOCUMENT_TYPES[v["expected_type"]]
    if v["stage"] == "signature":
        with pytest.raises(InvalidDataError):
            dsse.verify(env, trusted, payload_types=[expected.media_type()])
        return
    assert v["stage"] == "payload"
    verified = dsse.verify(env, trusted, payload_types=[expected.media_type()])
    with pytest.raises(InvalidDataError):
        parse_payload(verified.payload_type, verified.payload, expected)


# -- chains.json --------------------------------------------------------------------------------------


def test_chain_cases_cover_every_rule() -> None:
    rules = {c["expect"].get("rule") for c in CHAINS["cases"]}
    assert rules == {None, 1, 2, 3, 4, 5}
    assert CHAINS["skew"] == 60


@pytest.mark.parametrize("case", CHAINS["cases"], ids=lambda c: c["id"])
def test_chain_case(case: dict[str, Any]) -> None:
    anchors = TrustAnchors(Anchor.model_validate(a) for a in case["anchors"])
    result = verify_record(
        dsse.Envelope.from_dict(case["record"]),
        [dsse.Envelope.from_dict(e) for e in case["chain"]],
        anchors=anchors,
        revocations={k: dsse.Envelope.from_dict(e) for k, e in case["revocations"].items()},
        now=case["now"],
        skew=CHAINS["skew"],
    )
    expect = case["expect"]
    assert result.ok is expect["ok"], result.reason
    if not expect["ok"]:
        assert result.failure is not None
        assert (result.failure.rule, result.failure.link) == (expect["rule"], expect["link"])


# -- ed25519.json --------------------------------------------------------------------------------------


def test_ed25519_cases_cover_the_edge_cases() -> None:
    cases = ED25519["cases"]
    faults = {f for c in cases for f in c["faults"]}
    assert faults == set(ED25519["faults"])  # every fault the rule names is exercised
    assert {c["verify"] for c in cases} == {"accept", "reject"}
    assert {c["key"]["reason"] for c in cases} == {None, *ED25519["key_reasons"]}
    small_a = {c["public_key_hex"] for c in cases if "A small order" in c["faults"]}
    small_r = {c["signature_hex"][:64] for c in cases if "R small order" in c["faults"]}
    assert len(small_a) == len(small_r) == 14  # 8 points, 6 more encodings
    # the forgery OpenSSL accepted: identity key, R = identity, S = 0
    forgery = next(c for c in cases if c["id"] == "identity-key-forgery")
    assert forgery["public_key_hex"] == "01" + "00" * 31
    assert forgery["signature_hex"] == "01" + "00" * 63
    assert forgery["verify"] == "reject"


@pytest.mark.parametrize("case", ED25519["cases"], ids=lambda c: c["id"])
def test_ed25519_verify_verdict(case: dict[str, Any]) -> None:
    pk = bytes.fromhex(case["public_key_hex"])
    sig = bytes.fromhex(case["signature_hex"])
    msg = bytes.fromhex(case["message_hex"])
    assert (case["verify"] == "accept") is (not case["faults"])
    assert keys.verify_raw(pk, sig, msg) is (case["verify"] == "accept")
    # through a key object too, as every caller passes it
    pub = keys.Ed25519PublicKey.from_public_bytes(pk)
    assert keys.verify_raw(pub, sig, msg) is (case["verify"] == "accept")
    # and through a DSSE-style check: a signature over exactly these bytes
    if case["verify"] == "accept":
        assert keys.verify_raw(pub, sig, msg + b"x") is False


@pytest.mark.parametrize("case", ED25519["cases"], ids=lambda c: c["id"])
def test_ed25519_key_verdict(case: dict[str, Any]) -> None:
    pk = bytes.fromhex(case["public_key_hex"])
    text = keys.b64url_encode(pk)
    if case["key"]["verdict"] == "accept":
        assert keys.public_raw(keys.public_from_b64url(text)) == pk
        Anchor.model_validate({"type": "anchor.v1", "subject": "CN", "public_key": text})
        return
    phrase = gen_vectors.KEY_REASONS[case["key"]["reason"]]
    with pytest.raises(KeyFileError) as info:
        keys.public_from_b64url(text)
    assert phrase in str(info.value)
    with pytest.raises(ValueError, match=phrase):
        Anchor.model_validate({"type": "anchor.v1", "subject": "CN", "public_key": text})
