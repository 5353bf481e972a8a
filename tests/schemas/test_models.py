"""Payload models: one valid example per type, then everything they must refuse."""

from __future__ import annotations

import base64
import copy
import json
import re
from typing import Any

import pytest
from pydantic import ValidationError

from schemas.cpid import derive
from schemas.errors import PayloadError
from schemas.keys import kid, private_from_seed, public_raw, public_to_b64url
from schemas.models import (
    DOCUMENT_TYPES,
    Anchor,
    Cert,
    Deregister,
    Document,
    Record,
    Register,
    Revocation,
    Status,
    media_type,
    parse_payload,
    type_of_media,
)

NODE = private_from_seed(bytes(range(32)))
NODE_PK = public_to_b64url(NODE)
CPID = derive("CN.31.CMCC", "GPU", public_raw(NODE)).to_text()
REGION_KEY = public_to_b64url(private_from_seed(bytes(range(1, 33))))
NOW = 1_767_225_600

ENDPOINTS = [{"proto": "https", "host": "gpu-01.example.net", "port": 8443, "purpose": "inference"}]
LOCATION = {"region": "31", "site": "LG01", "lat": 31.23, "lon": 121.47}
ATTRIBUTES = {
    "cpu": {"model": "Kunpeng 920", "cores": 128},
    "memory_gib": 1024,
    "accelerators": [{"vendor": "NVIDIA", "model": "H100", "memory_gib": 80, "count": 8}],
    "storage_tib": 30.5,
    "network_gbps": 400,
}

EXAMPLES: dict[str, dict[str, Any]] = {
    "cert.v1": {
        "type": "cert.v1",
        "subject": "CN.31",
        "issuer": "CN",
        "public_key": REGION_KEY,
        "scopes": ["delegate", "issue"],
        "serial": "CN-31-1",
        "not_before": NOW,
        "not_after": NOW + 86_400,
    },
    "register.v1": {
        "type": "register.v1",
        "namespace": "CN.31.CMCC",
        "kind": "GPU",
        "public_key": NODE_PK,
        "nonce": "n0nce-0123456789abcdef",
        "timestamp": NOW,
        "endpoints": ENDPOINTS,
        "location": LOCATION,
        "attributes": ATTRIBUTES,
        "labels": {"tier": "gold", "k8s.io/zone": "a"},
    },
    "record.v1": {
        "type": "record.v1",
        "cpid": CPID,
        "kind": "GPU",
        "public_key": NODE_PK,
        "issuer": "CN.31.CMCC",
        "version": 1,
        "issued_at": NOW,
        "expires_at": NOW + 86_400,
        "endpoints": ENDPOINTS,
        "location": LOCATION,
        "attributes": ATTRIBUTES,
        "labels": {"tier": "gold"},
    },
    "status.v1": {
        "type": "status.v1",
        "cpid": CPID,
        "seq": 7,
        "observed_at": NOW * 1000 + 250,
        "state": "draining",
        "capacity": {"accelerators_free": 6, "cpu_free": 96, "memory_free_gib": 700.5},
        "metrics": {"gpu_util": 0.25, "power_w": 3100},
    },
    "deregister.v1": {
        "type": "deregister.v1",
        "cpid": CPID,
        "nonce": "n0nce-fedcba9876543210",
        "timestamp": NOW,
    },
    "revocation.v1": {
        "type": "revocation.v1",
        "subject": "CN.31.CMCC",
        "serial": "CN-31-CMCC-1",
        "reason": "key compromise",
        "revoked_at": NOW,
    },
}
MODELS: dict[str, type[Document]] = {
    "cert.v1": Cert,
    "register.v1": Register,
    "record.v1": Record,
    "status.v1": Status,
    "deregister.v1": Deregister,
    "revocation.v1": Revocation,
}
TYPES = list(EXAMPLES)


def _payload(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def _changed(doc_type: str, path: str, value: Any) -> dict[str, Any]:
    """The example with ``path`` (dotted; ``-`` deletes) set to ``value``."""
    doc = copy.deepcopy(EXAMPLES[doc_type])
    *parents, leaf = path.split(".")
    target: Any = doc
    for p in parents:
        target = target[int(p)] if p.isdigit() else target[p]
    if value is DELETE:
        del target[leaf]
    elif isinstance(target, list):
        target[int(leaf)] = value
    else:
        target[leaf] = value
    return doc


DELETE = object()


def _parse(doc_type: str, obj: Any) -> Document:
    return parse_payload(media_type(doc_type), _payload(obj), MODELS[doc_type])


def test_document_types_cover_every_model() -> None:
    assert DOCUMENT_TYPES == MODELS


@pytest.mark.parametrize("doc_type", TYPES)
def test_valid_example(doc_type: str) -> None:
    doc = _parse(doc_type, EXAMPLES[doc_type])
    assert doc_type == doc.TYPE
    assert doc.media_type() == f"application/vnd.cpi.{doc_type}+json"
    # to_json round-trips through parse_payload
    again = parse_payload(doc.media_type(), doc.to_json(), MODELS[doc_type])
    assert again == doc


@pytest.mark.parametrize("doc_type", TYPES)
def test_models_are_frozen(doc_type: str) -> None:
    doc = _parse(doc_type, EXAMPLES[doc_type])
    with pytest.raises(ValidationError, match="frozen"):
        doc.type = "x"  # type: ignore[misc]


def test_normalisation_and_defaults() -> None:
    reg = _parse("register.v1", _changed("register.v1", "namespace", "cn.31.cmcc"))
    assert isinstance(reg, Register)
    assert reg.namespace == "CN.31.CMCC"
    assert reg.attributes.accelerator_units == 8
    assert reg.attributes.memory_gib == 1024.0  # an integer is fine where a number is expected
    minimal = {
        k: v
        for k, v in EXAMPLES["register.v1"].items()
        if k not in ("endpoints", "attributes", "labels")
    }
    reg2 = _parse("register.v1", minimal)
    assert isinstance(reg2, Register)
    assert (reg2.endpoints, reg2.labels, reg2.attributes.accelerators) == ([], {}, [])
    status = _parse("status.v1", _changed("status.v1", "cpid", CPID.lower()))
    assert isinstance(status, Status)
    assert status.cpid == CPID


def test_to_json_omits_absent_optionals() -> None:
    doc = _parse("status.v1", _changed("status.v1", "capacity", {"accelerators_free": 1}))
    assert b"cpu_free" not in doc.to_json()
    assert json.loads(doc.to_json())["type"] == "status.v1"


# -- unknown fields, type and payloadType -------------------------------------------------------


@pytest.mark.parametrize("doc_type", TYPES)
def test_unknown_top_level_field(doc_type: str) -> None:
    with pytest.raises(PayloadError, match=rf"^invalid {doc_type}: extra: unknown field"):
        _parse(doc_type, _changed(doc_type, "extra", 1))


@pytest.mark.parametrize(
    ("doc_type", "path", "where"),
    [
        ("register.v1", "location.altitude", "location.altitude"),
        ("register.v1", "attributes.gpu", "attributes.gpu"),
        ("register.v1", "attributes.accelerators.0.tdp_w", "attributes.accelerators.0.tdp_w"),
        ("record.v1", "endpoints.0.tls", "endpoints.0.tls"),
        ("status.v1", "capacity.npu_free", "capacity.npu_free"),
    ],
)
def test_unknown_nested_field(doc_type: str, path: str, where: str) -> None:
    with pytest.raises(PayloadError, match=rf"{where}: unknown field"):
        _parse(doc_type, _changed(doc_type, path, 1))


@pytest.mark.parametrize("doc_type", TYPES)
def test_wrong_type_field(doc_type: str) -> None:
    other = next(t for t in TYPES if t != doc_type)
    with pytest.raises(
        PayloadError, match=rf"^invalid {doc_type}: type: Input should be '{doc_type}'"
    ):
        _parse(doc_type, _changed(doc_type, "type", other))


@pytest.mark.parametrize("doc_type", TYPES)
def test_missing_type_field(doc_type: str) -> None:
    with pytest.raises(
        PayloadError, match=rf"^payload has no 'type' field, expected '{doc_type}'$"
    ):
        _parse(doc_type, _changed(doc_type, "type", DELETE))


@pytest.mark.parametrize("doc_type", TYPES)
def test_payload_type_mismatch(doc_type: str) -> None:
    other = next(t for t in TYPES if t != doc_type)
    with pytest.raises(
        PayloadError, match=rf"^payloadType is for '{other}', expected '{doc_type}'$"
    ):
        parse_payload(media_type(other), _payload(EXAMPLES[doc_type]), MODELS[doc_type])


@pytest.mark.parametrize(
    "payload_type",
    ["application/json", "application/vnd.cpi.status.v1", "vnd.cpi.status.v1+json", ""],
)
def test_foreign_payload_type(payload_type: str) -> None:
    with pytest.raises(PayloadError, match=r"is not application/vnd\.cpi\.<type>\+json$"):
        parse_payload(payload_type, _payload(EXAMPLES["status.v1"]), Status)
    with pytest.raises(PayloadError):
        type_of_media(payload_type)


def test_media_type_round_trip() -> None:
    for t in TYPES:
        assert type_of_media(media_type(t)) == t


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (b"", r"^status\.v1 payload is not valid JSON: Expecting value"),
        (b"\xff", r"^status\.v1 payload is not valid JSON"),
        (b"[1]", r"^status\.v1 payload must be a JSON object, got list$"),
        (b'"x"', r"^status\.v1 payload must be a JSON object, got str$"),
        (
            _payload(EXAMPLES["status.v1"])[:-1] + b', "seq": 8}',
            r"^status\.v1 payload is not valid JSON: duplicate member name 'seq'$",
        ),
        (
            _payload(EXAMPLES["status.v1"]).replace(b"0.25", b"NaN"),
            r"^status\.v1 payload is not valid JSON: NaN is not valid JSON$",
        ),
        (
            _payload(EXAMPLES["status.v1"]).replace(b"0.25", b"-Infinity"),
            r"^status\.v1 payload is not valid JSON: -Infinity is not valid JSON$",
        ),
        (
            _payload(EXAMPLES["status.v1"]).replace(b"0.25", b"1e999"),
            r"^invalid status\.v1: metrics\.gpu_util: Input should be a finite number",
        ),
    ],
)
def test_not_a_json_object(payload: bytes, match: str) -> None:
    with pytest.raises(PayloadError, match=match):
        parse_payload(media_type("status.v1"), payload, Status)


# -- field by field -----------------------------------------------------------------------------

PK = NODE_PK
INVALID: list[tuple[str, str, Any, str]] = [
    # strict types: no strings for numbers, no booleans for integers, no floats for integers
    ("status.v1", "seq", "7", r"seq: Input should be a valid integer"),
    ("status.v1", "seq", True, r"seq: Input should be a valid integer"),
    ("status.v1", "seq", 7.0, r"seq: Input should be a valid integer"),
    ("status.v1", "seq", -1, r"seq: Input should be greater than or equal to 0"),
    ("status.v1", "observed_at", "1767225600250", r"observed_at: Input should be a valid integer"),
    ("cert.v1", "not_before", "1767225600", r"not_before: Input should be a valid integer"),
    ("record.v1", "version", 0, r"version: Input should be greater than or equal to 1"),
    ("record.v1", "issued_at", -1, r"issued_at: Input should be greater than or equal to 0"),
    (
        "register.v1",
        "endpoints.0.port",
        "8443",
        r"endpoints\.0\.port: Input should be a valid integer",
    ),
    (
        "register.v1",
        "endpoints.0.port",
        0,
        r"endpoints\.0\.port: Input should be greater than or equal to 1",
    ),
    (
        "register.v1",
        "endpoints.0.port",
        65536,
        r"endpoints\.0\.port: Input should be less than or equal to 65535",
    ),
    (
        "register.v1",
        "endpoints.0.proto",
        "ftp",
        r"endpoints\.0\.proto: Input should be 'http', 'https'",
    ),
    (
        "register.v1",
        "endpoints.0.host",
        "",
        r"endpoints\.0\.host: String should have at least 1 character",
    ),
    (
        "register.v1",
        "attributes.memory_gib",
        "1024",
        r"attributes\.memory_gib: Input should be a valid number",
    ),
    (
        "register.v1",
        "attributes.accelerators.0.count",
        0,
        r"accelerators\.0\.count: Input should be greater than or equal to 1",
    ),
    (
        "register.v1",
        "attributes.cpu.cores",
        "128",
        r"attributes\.cpu\.cores: Input should be a valid integer",
    ),
    (
        "status.v1",
        "capacity.accelerators_free",
        -1,
        r"capacity\.accelerators_free: Input should be greater than or equal to 0",
    ),
    ("status.v1", "capacity", {}, r"capacity\.accelerators_free: Field required"),
    ("status.v1", "state", "UP", r"state: Input should be 'up', 'draining' or 'down'"),
    # location
    ("register.v1", "location.region", "3", r"region '3' must be a GB/T 2260 code"),
    ("register.v1", "location.region", "310", r"region '310' must be a GB/T 2260 code"),
    ("register.v1", "location.region", 31, r"location\.region: Input should be a valid string"),
    ("register.v1", "location.lat", 91, r"location\.lat: Input should be less than or equal to 90"),
    (
        "register.v1",
        "location.lon",
        -181,
        r"location\.lon: Input should be greater than or equal to -180",
    ),
    ("register.v1", "location", DELETE, r"location: Field required"),
    # labels and metrics
    (
        "register.v1",
        "labels",
        {"Tier": "gold"},
        r"label key 'Tier' must match \[a-z0-9\._/-\]\{1,63\}",
    ),
    ("register.v1", "labels", {"a b": "x"}, r"label key 'a b' must match"),
    ("register.v1", "labels", {"": "x"}, r"label key '' must match"),
    ("register.v1", "labels", {"k" * 64: "x"}, r"label key 'k{64}' must match"),
    (
        "register.v1",
        "labels",
        {"tier": "x" * 257},
        r"label 'tier' value is 257 characters, at most 256 allowed",
    ),
    ("register.v1", "labels", {"tier": 1}, r"labels\.tier: Input should be a valid string"),
    (
        "register.v1",
        "labels",
        {f"k{i}": "v" for i in range(33)},
        r"labels: Dictionary should have at most 32 items",
    ),
    ("record.v1", "labels", {"Tier": "gold"}, r"label key 'Tier' must match"),
    (
        "status.v1",
        "metrics",
        {"GPU_util": 1},
        r"metric name 'GPU_util' must match \[a-z\]\[a-z0-9_\]\{0,63\}",
    ),
    (
        "status.v1",
        "metrics",
        {"gpu_util": "high"},
        r"metrics\.gpu_util: Input should be a valid number",
    ),
    # named L0 metrics within their bounds; any metric finite and at most 2**53 - 1
    (
        "status.v1",
        "metrics",
        {"gpu_util": -1},
        r"metric 'gpu_util' is -1 percent: must be between 0 and 100",
    ),
    ("status.v1", "metrics", {"gpu_util": 100.5}, r"metric 'gpu_util' is 100\.5 percent"),
    (
        "status.v1",
        "metrics",
        {"power_w": 1e8},
        r"metric 'power_w' is .* W: must be between 0 and 1e\+07",
    ),
    ("status.v1", "metrics", {"gpu_mem_used_mib": -5}, r"metric 'gpu_mem_used_mib' is -5 MiB"),
    (
        "status.v1",
        "metrics",
        {"fan_rpm": 1e20},
        r"metric 'fan_rpm' is .*magnitude at most 2\*\*53 - 1",
    ),
    # the operator's price and site energy figures
    (
        "record.v1",
        "location",
        {"region": "31", "pue": 0.9},
        r"location\.pue: Input should be greater than or equal to 1",
    ),
    (
        "record.v1",
        "location",
        {"region": "31", "grid_gco2_per_kwh": 2001},
        r"location\.grid_gco2_per_kwh: Input should be less than or equal to 2000",
    ),
    (
        "register.v1",
        "attributes",
        {"price_cny_per_unit_hour": -1},
        r"attributes\.price_cny_per_unit_hour: Input should be greater than or equal to 0",
    ),
    # namespaces, kinds, CPIDs
    (
        "register.v1",
        "namespace",
        "CN.3-1",
        r"namespace: invalid CPID 'CN\.3-1': segment 2 '3-1' has a character",
    ),
    ("register.v1", "kind", "gpu", r"kind: unknown kind 'gpu', expected one of CPU, GPU"),
    ("register.v1", "kind", "TPU", r"kind: unknown kind 'TPU'"),
    ("record.v1", "issuer", "C", r"issuer: invalid CPID 'C': root 'C' must be two letters"),
    (
        "status.v1",
        "cpid",
        CPID[:-1] + ("0" if CPID[-1] != "0" else "1"),
        r"cpid: invalid CPID .*: check character is",
    ),
    ("deregister.v1", "cpid", "CN.31/GPU", r"cpid: invalid CPID 'CN\.31/GPU': suffix must be"),
    ("record.v1", "cpid", "", r"cpid: String should have at least 1 character"),
    ("record.v1", "cpid", "X" * 129, r"cpid: String should have at most 128 characters"),
    # nonces
    ("register.v1", "nonce", "short", r"nonce: String should have at least 16 characters"),
    ("register.v1", "nonce", "n" * 65, r"nonce: String should have at most 64 characters"),
    ("deregister.v1", "nonce", "n0nce 0123456789abcdef", r"nonce: String should match pattern"),
    # certs
    ("cert.v1", "scopes", [], r"scopes: List should have at least 1 item"),
    ("cert.v1", "scopes", ["admin"], r"scopes\.0: Input should be 'delegate' or 'issue'"),
    ("cert.v1", "scopes", ["issue", "issue"], r"scopes \['issue', 'issue'\] repeat a scope"),
    ("cert.v1", "not_after", NOW, rf"not_after {NOW} is not after not_before {NOW}"),
    ("cert.v1", "serial", "CN.31#1", r"serial: String should match pattern"),
    ("cert.v1", "serial", "", r"serial: String should have at least 1 character"),
    # revocations
    ("revocation.v1", "kid", "ABCDEFGHJKMNPQRS", r"exactly one of 'serial' or 'kid' must be given"),
    ("revocation.v1", "serial", DELETE, r"exactly one of 'serial' or 'kid' must be given"),
    ("revocation.v1", "reason", "r" * 257, r"reason: String should have at most 256 characters"),
]


@pytest.mark.parametrize(
    ("doc_type", "path", "value", "match"),
    INVALID,
    ids=[f"{t}:{p}:{i}" for i, (t, p, _, _) in enumerate(INVALID)],
)
def test_invalid_field(doc_type: str, path: str, value: Any, match: str) -> None:
    with pytest.raises(PayloadError, match=rf"^invalid {doc_type}: .*{match}"):
        _parse(doc_type, _changed(doc_type, path, value))


def test_record_cpid_syntax_is_left_to_chain_rule_5() -> None:
    """record.v1 only length-checks its cpid: a bad check character is reported by chain
    verification (rule 5), with its rule and link, not as a parse error."""
    bad = CPID[:-1] + ("0" if CPID[-1] != "0" else "1")
    rec = _parse("record.v1", _changed("record.v1", "cpid", bad))
    assert isinstance(rec, Record)
    assert rec.cpid == bad


def test_revocation_by_kid() -> None:
    doc = _changed("revocation.v1", "serial", DELETE)
    doc["kid"] = "ABCDEFGHJKMNPQRS"
    rev = _parse("revocation.v1", doc)
    assert isinstance(rev, Revocation)
    assert rev.target == "ABCDEFGHJKMNPQRS"
    assert _parse("revocation.v1", EXAMPLES["revocation.v1"]).target == "CN-31-CMCC-1"  # type: ignore[attr-defined]


# -- public keys ----------------------------------------------------------------------------------

_RAW = public_raw(NODE)


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


BAD_KEYS = [
    ("", r"an Ed25519 public key is 32 bytes, got 0"),
    (base64.urlsafe_b64encode(_RAW[:31]).decode().rstrip("="), r"32 bytes, got 31"),
    (PK[:-2], r"not base64url"),  # 41 characters cannot be base64
    (base64.urlsafe_b64encode(_RAW + b"\0").decode().rstrip("="), r"32 bytes, got 33"),
    (PK[:20] + "!!!!" + PK[20:], r"not base64url"),  # once silently skipped by the decoder
    (PK[:20] + " " + PK[20:], r"not base64url"),
    (PK + "=", r"is not canonical base64url \(no padding\); expected '" + PK + "'"),
    (base64.b64encode(_RAW).decode(), r"is not canonical base64url"),
]
# the same 32 bytes with non-zero unused low bits in the last character
_LAST = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
_SAME_BYTES = PK[:-1] + _LAST[_LAST.index(PK[-1]) + 1]
BAD_KEYS.append((_SAME_BYTES, r"is not canonical base64url"))
if "+" in base64.b64encode(_RAW).decode() or "/" in base64.b64encode(_RAW).decode():
    BAD_KEYS.append((base64.b64encode(_RAW).decode().rstrip("="), r"is not canonical"))
_P = 2**255 - 19
_EXPECTED_POINT = r"; expected the canonical encoding of a point of the prime-order subgroup"
BAD_KEYS += [
    # (docs/verification.md) small-order points and non-canonical point encodings
    (_b64url(bytes([1]) + bytes(31)), r"is a small-order point \(order 1\)" + _EXPECTED_POINT),
    (_b64url(bytes(32)), r"is a small-order point \(order 4\)"),
    (_b64url((_P - 1).to_bytes(32, "little")), r"is a small-order point \(order 2\)"),
    (
        _b64url(bytes.fromhex("26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05")),
        r"is a small-order point \(order 8\)",
    ),
    (_b64url((_P + 1).to_bytes(32, "little")), r"is a non-canonical encoding \(y = p \+ 1,"),
    (_b64url(bytes([2]) + bytes(31)), r"is not a point on the curve"),
    # the base point plus a point of order 2: outside the prime-order subgroup
    (
        _b64url(bytes.fromhex("9599999999999999999999999999999999999999999999999999999999999999")),
        r"is a point outside the prime-order subgroup",
    ),
]


@pytest.mark.parametrize("doc_type", ["cert.v1", "register.v1", "record.v1"])
@pytest.mark.parametrize(("value", "match"), BAD_KEYS)
def test_bad_public_key(doc_type: str, value: str, match: str) -> None:
    if doc_type == "record.v1":
        # a record's node key passed the full key rule when it was registered; parsing a
        # record repeats the byte-level part only (docs/verification.md §2)
        if (value, match) in BAD_KEYS[-2:]:  # not on the curve, outside the subgroup
            _parse(doc_type, _changed(doc_type, "public_key", value))
            return
        match = match.removesuffix(_EXPECTED_POINT)
    with pytest.raises(PayloadError, match=rf"^invalid {doc_type}: public_key: .*{match}"):
        _parse(doc_type, _changed(doc_type, "public_key", value))


def test_non_canonical_key_decodes_to_the_same_bytes() -> None:
    """Why canonical form is enforced: these spellings all name the one key."""
    from schemas.keys import b64url_decode

    for spelling in (PK + "=", _SAME_BYTES):
        assert b64url_decode(spelling) == _RAW


@pytest.mark.parametrize("doc_type", ["cert.v1", "register.v1", "record.v1"])
def test_public_key_must_be_a_string(doc_type: str) -> None:
    with pytest.raises(PayloadError, match=r"public_key: Input should be a valid string"):
        _parse(doc_type, _changed(doc_type, "public_key", list(_RAW)))


# -- anchors ------------------------------------------------------------------------------------------


def test_anchor() -> None:
    a = Anchor.model_validate({"type": "anchor.v1", "subject": "cn", "public_key": PK})
    assert a.subject == "CN"
    assert a.kid == kid(_RAW)
    assert json.loads(a.to_json()) == {"type": "anchor.v1", "subject": "CN", "public_key": PK}


@pytest.mark.parametrize(
    ("obj", "match"),
    [
        (
            {"type": "anchor.v2", "subject": "CN", "public_key": PK},
            r"type\s+Input should be 'anchor\.v1'",
        ),
        (
            {"type": "anchor.v1", "subject": "CN", "public_key": PK, "x": 1},
            r"x\s+Extra inputs are not permitted",
        ),
        ({"type": "anchor.v1", "subject": "C", "public_key": PK}, r"root 'C' must be two letters"),
        (
            {"type": "anchor.v1", "subject": "CN", "public_key": PK + "="},
            r"not canonical base64url",
        ),
        ({"type": "anchor.v1", "subject": "CN"}, r"public_key\s+Field required"),
    ],
)
def test_anchor_invalid(obj: dict[str, Any], match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        Anchor.model_validate(obj)


@pytest.mark.parametrize(("value", "match"), BAD_KEYS[-7:])
def test_anchor_refuses_small_order_and_non_canonical_keys(value: str, match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        Anchor.model_validate({"type": "anchor.v1", "subject": "CN", "public_key": value})


# -- bounds (docs/verification.md) -------------------------------------------------------------------

MAX_INT = 2**53 - 1
INTEGER_FIELDS = [
    ("status.v1", "seq"),
    ("status.v1", "observed_at"),
    ("status.v1", "capacity.accelerators_free"),
    ("status.v1", "capacity.cpu_free"),
    ("record.v1", "version"),
    ("record.v1", "issued_at"),
    ("record.v1", "expires_at"),
    ("record.v1", "attributes.cpu.cores"),
    ("record.v1", "attributes.accelerators.0.count"),
    ("register.v1", "timestamp"),
    ("register.v1", "attributes.accelerators.0.count"),
    ("cert.v1", "not_after"),
    ("deregister.v1", "timestamp"),
    ("revocation.v1", "revoked_at"),
]


@pytest.mark.parametrize(("doc_type", "path"), INTEGER_FIELDS)
def test_integers_are_at_most_2_to_the_53_minus_1(doc_type: str, path: str) -> None:
    _parse(doc_type, _changed(doc_type, path, MAX_INT))
    with pytest.raises(
        PayloadError,
        match=rf"^invalid {doc_type}: {re.escape(path)}: Input should be less than or equal "
        rf"to {MAX_INT}",
    ):
        _parse(doc_type, _changed(doc_type, path, MAX_INT + 1))
    with pytest.raises(PayloadError, match=rf"{re.escape(path)}: Input should be less than"):
        _parse(doc_type, _changed(doc_type, path, 2**63))


def _many(n: int, item: Any) -> list[Any]:
    return [copy.deepcopy(item) for _ in range(n)]


LIST_BOUNDS = [
    ("register.v1", "endpoints", _many(16, ENDPOINTS[0]), _many(17, ENDPOINTS[0])),
    ("record.v1", "endpoints", _many(16, ENDPOINTS[0]), _many(17, ENDPOINTS[0])),
    (
        "register.v1",
        "attributes.accelerators",
        _many(16, ATTRIBUTES["accelerators"][0]),  # type: ignore[index]
        _many(17, ATTRIBUTES["accelerators"][0]),  # type: ignore[index]
    ),
    (
        "record.v1",
        "attributes.accelerators",
        _many(8, ATTRIBUTES["accelerators"][0]),  # type: ignore[index]
        _many(17, ATTRIBUTES["accelerators"][0]),  # type: ignore[index]
    ),
    (
        "register.v1",
        "labels",
        {f"k{i}": "v" for i in range(32)},
        {f"k{i}": "v" for i in range(33)},
    ),
    ("record.v1", "labels", {f"k{i}": "v" for i in range(32)}, {f"k{i}": "v" for i in range(33)}),
    (
        "status.v1",
        "metrics",
        {f"m{i}": 1.0 for i in range(32)},
        {f"m{i}": 1.0 for i in range(33)},
    ),
]


@pytest.mark.parametrize(("doc_type", "path", "ok", "too_many"), LIST_BOUNDS)
def test_lists_and_maps_are_bounded(doc_type: str, path: str, ok: Any, too_many: Any) -> None:
    _parse(doc_type, _changed(doc_type, path, ok))
    with pytest.raises(PayloadError, match=rf"^invalid {doc_type}: {re.escape(path)}: .*at most"):
        _parse(doc_type, _changed(doc_type, path, too_many))


STRING_FIELDS = [
    ("record.v1", "location.site"),
    ("record.v1", "attributes.cpu.model"),
    ("record.v1", "attributes.accelerators.0.vendor"),
    ("record.v1", "attributes.accelerators.0.model"),
    ("record.v1", "labels.tier"),
    ("register.v1", "endpoints.0.purpose"),
    ("revocation.v1", "reason"),
]


@pytest.mark.parametrize(("doc_type", "path"), STRING_FIELDS)
def test_strings_are_at_most_256_characters(doc_type: str, path: str) -> None:
    with pytest.raises(PayloadError, match=r"at most (256|64)( characters| allowed)"):
        _parse(doc_type, _changed(doc_type, path, "x" * 257))


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ("A" * 17, r"kid: String should match pattern"),
        ("ABCDEFGHJKMNPQRI", r"kid: String should match pattern"),  # I is not Crockford
        ("x" * 10_000, r"kid: String should match pattern"),
    ],
)
def test_revocation_kid_is_a_key_id(value: str, match: str) -> None:
    doc = _changed("revocation.v1", "serial", DELETE)
    doc["kid"] = value
    with pytest.raises(PayloadError, match=match):
        _parse("revocation.v1", doc)


def test_revocation_serial_is_bounded_like_a_cert_serial() -> None:
    with pytest.raises(PayloadError, match=r"serial: String should have at most 64 characters"):
        _parse("revocation.v1", _changed("revocation.v1", "serial", "s" * 65))


def _big_record(labels: int, value_len: int) -> dict[str, Any]:
    return _changed(
        "record.v1", "labels", {f"label-{i:02d}": "v" * value_len for i in range(labels)}
    )


def test_record_payload_is_at_most_4_kib() -> None:
    fits = _big_record(16, 200)
    assert len(_payload(fits)) <= 4096
    _parse("record.v1", fits)
    big = _big_record(32, 200)  # every field within its own bound, 7 KiB in all
    payload = _payload(big)
    assert len(payload) > 4096
    with pytest.raises(
        PayloadError, match=rf"record\.v1 payload is {len(payload)} bytes, at most 4096"
    ):
        parse_payload(media_type("record.v1"), payload, Record)
    # and a registry cannot sign one: to_json refuses to emit it
    rec = Record.model_validate(big)
    with pytest.raises(PayloadError, match=r"record\.v1 payload is \d+ bytes, at most 4096"):
        rec.to_json()


def test_register_payload_is_at_most_4_kib() -> None:
    big = _changed("register.v1", "labels", {f"label-{i:02d}": "v" * 200 for i in range(32)})
    payload = _payload(big)
    with pytest.raises(PayloadError, match=r"register\.v1 payload is \d+ bytes, at most 4096"):
        parse_payload(media_type("register.v1"), payload, Register)
