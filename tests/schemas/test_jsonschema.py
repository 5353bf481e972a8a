"""The JSON Schemas in schemas/json/ are current, and say what the models enforce."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from schemas import jsonschema
from schemas.models import DOCUMENT_TYPES
from tools import gen_schemas

SCHEMA_DIR = Path(jsonschema.__file__).parent / "json"
VECTORS = Path(__file__).resolve().parents[1] / "vectors"
FRESH = gen_schemas.build()
STALE = "schemas/json/{} is stale or missing; regenerate with: python tools/gen_schemas.py"


def test_every_type_has_a_schema() -> None:
    assert set(jsonschema.SCHEMA_TYPES) == {
        *DOCUMENT_TYPES,
        "anchor.v1",
        "endorsement.v1",
        "usage.v1",
        "usagesigner.v1",
    }
    assert set(FRESH) == {f"{t}.json" for t in jsonschema.SCHEMA_TYPES}


@pytest.mark.parametrize("name", sorted(FRESH))
def test_schema_file_is_current(name: str) -> None:
    path = SCHEMA_DIR / name
    current = path.read_text(encoding="utf-8") if path.exists() else None
    assert current == FRESH[name], STALE.format(name)


def test_no_stray_schema_files() -> None:
    extra = {p.name for p in SCHEMA_DIR.glob("*.json")} - set(FRESH)
    assert not extra, f"schemas/json/ has files no model produces: {sorted(extra)}"


def test_generation_is_deterministic() -> None:
    assert gen_schemas.build() == FRESH
    for text in FRESH.values():
        assert text.endswith("}\n")
        assert text.isascii()
        assert json.dumps(json.loads(text), indent=2, sort_keys=True) + "\n" == text


def test_unknown_type() -> None:
    with pytest.raises(ValueError, match=r"^no schema for 'nope\.v1', expected one of cert\.v1, "):
        jsonschema.json_schema("nope.v1")


@pytest.mark.parametrize("doc_type", jsonschema.SCHEMA_TYPES)
def test_schema_shape(doc_type: str) -> None:
    s = jsonschema.json_schema(doc_type)
    assert s["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert s["title"] == doc_type
    assert s["type"] == "object"
    assert s["additionalProperties"] is False
    assert s["required"][0] == "type"
    assert s["properties"]["type"]["const"] == doc_type
    for name, sub in s.get("$defs", {}).items():
        assert sub["additionalProperties"] is False, name


def _props(doc_type: str) -> dict[str, Any]:
    props: dict[str, Any] = jsonschema.json_schema(doc_type)["properties"]
    return props


def test_contract_syntax_is_in_the_schemas() -> None:
    assert _props("status.v1")["cpid"]["pattern"] == jsonschema.CPID_PATTERN
    assert _props("deregister.v1")["cpid"]["maxLength"] == 128
    assert _props("cert.v1")["subject"]["pattern"] == jsonschema.NAMESPACE_PATTERN
    assert _props("register.v1")["public_key"]["pattern"] == jsonschema.PUBLIC_KEY_PATTERN
    assert _props("anchor.v1")["public_key"]["pattern"] == jsonschema.PUBLIC_KEY_PATTERN
    assert _props("record.v1")["kind"]["enum"] == ["CPU", "GPU", "NPU", "CLU", "STO", "NET", "SVC"]
    labels = _props("register.v1")["labels"]
    assert labels["propertyNames"]["pattern"] == r"^[a-z0-9._/-]{1,63}$"
    assert labels["additionalProperties"] == {"type": "string", "maxLength": 256}
    assert labels["maxProperties"] == 32
    assert _props("status.v1")["metrics"]["propertyNames"]["pattern"] == r"^[a-z][a-z0-9_]{0,63}$"
    assert _props("status.v1")["observed_at"]["description"] == "Unix time in milliseconds"
    # record.v1 leaves its cpid to chain rule 5, like the model
    assert "pattern" not in _props("record.v1")["cpid"]


# -- bounds (docs/verification.md): the schemas carry the models' bounds -------------------------

MAX_INT = 2**53 - 1


def _resolve(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    ref = node.get("$ref")
    if ref is None:
        return node
    out: dict[str, Any] = schema["$defs"][ref.removeprefix("#/$defs/")]
    return out


def _walk(
    schema: dict[str, Any], node: Any, path: str, seen: list[tuple[str, dict[str, Any]]]
) -> None:
    if not isinstance(node, dict):
        return
    node = _resolve(schema, node)
    seen.append((path, node))
    for key in ("anyOf", "oneOf", "allOf"):
        for i, sub in enumerate(node.get(key, [])):
            _walk(schema, sub, f"{path}|{i}", seen)
    for name, sub in node.get("properties", {}).items():
        _walk(schema, sub, f"{path}.{name}", seen)
    if isinstance(node.get("items"), dict):
        _walk(schema, node["items"], f"{path}[]", seen)
    if isinstance(node.get("additionalProperties"), dict):
        _walk(schema, node["additionalProperties"], f"{path}{{}}", seen)


@pytest.mark.parametrize("doc_type", jsonschema.SCHEMA_TYPES)
def test_every_integer_list_map_and_string_is_bounded(doc_type: str) -> None:
    schema = jsonschema.json_schema(doc_type)
    seen: list[tuple[str, dict[str, Any]]] = []
    _walk(schema, schema, doc_type, seen)
    kinds = set()
    for path, node in seen:
        t = node.get("type")
        kinds.add(t)
        if t == "integer":
            assert node.get("minimum", -1) >= 0, path
            assert node.get("maximum", MAX_INT + 1) <= MAX_INT, path
        elif t == "array":
            assert "maxItems" in node, path
        elif t == "object" and isinstance(node.get("additionalProperties"), dict):
            assert "maxProperties" in node, path  # a map (labels, metrics)
        elif t == "string" and "const" not in node and "enum" not in node:
            # a length bound, or a pattern that bounds the length
            pattern = node.get("pattern", "")
            assert "maxLength" in node or (pattern.endswith("$") and "*" not in pattern), path
    assert "integer" in kinds or doc_type == "anchor.v1"


def test_bounds_have_the_designs_values() -> None:
    rec = jsonschema.json_schema("record.v1")
    assert rec["properties"]["endpoints"]["maxItems"] == 16
    assert rec["properties"]["labels"]["maxProperties"] == 32
    assert rec["properties"]["version"]["maximum"] == MAX_INT
    assert rec["$defs"]["Attributes"]["properties"]["accelerators"]["maxItems"] == 16
    assert "4096 bytes" in rec["description"]
    assert "4096 bytes" in jsonschema.json_schema("register.v1")["description"]
    status = jsonschema.json_schema("status.v1")
    assert status["properties"]["seq"]["maximum"] == MAX_INT
    assert status["properties"]["metrics"]["maxProperties"] == 32
    rev = jsonschema.json_schema("revocation.v1")["properties"]
    assert any(o.get("pattern") == "^[0-9A-HJKMNP-TV-Z]{16}$" for o in rev["kid"]["anyOf"])
    assert (
        "small-order"
        in jsonschema.json_schema("cert.v1")["properties"]["public_key"]["description"]
    )


# -- the patterns agree with the implementation, on the shared vectors ---------------------------

CPID_VECTORS = json.loads((VECTORS / "cpid.json").read_text(encoding="utf-8"))
KEY_VECTORS = json.loads((VECTORS / "keys.json").read_text(encoding="utf-8"))


def test_cpid_pattern_accepts_every_valid_vector() -> None:
    for v in CPID_VECTORS["valid"]:
        assert re.fullmatch(jsonschema.CPID_PATTERN, v["input"]), v["input"]
        assert len(v["input"]) <= 128


def test_cpid_pattern_rejects_every_syntax_error() -> None:
    # a schema cannot compute the check character; every other error it must see
    for v in CPID_VECTORS["invalid"]:
        matched = re.fullmatch(jsonschema.CPID_PATTERN, v["input"]) and len(v["input"]) <= 128
        if v["error"] == "check" and v["reason"].startswith("check character is"):
            assert matched, v
        else:
            assert not matched, v


def test_public_key_pattern_is_exactly_canonical_base64url() -> None:
    for k in KEY_VECTORS["keys"]:
        pk = k["public_key"]
        assert re.fullmatch(jsonschema.PUBLIC_KEY_PATTERN, pk), pk
        assert not re.fullmatch(jsonschema.PUBLIC_KEY_PATTERN, pk + "=")
        alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
        nudged = pk[:-1] + alphabet[alphabet.index(pk[-1]) + 1]  # same bytes, stray low bits
        assert not re.fullmatch(jsonschema.PUBLIC_KEY_PATTERN, nudged)


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        ("CN", True),
        ("cn.31.cmcc", True),
        ("CN.", False),
        ("C", False),
        ("CN..31", False),
        ("CN.3-1", False),
    ],
)
def test_namespace_pattern(text: str, ok: bool) -> None:
    assert bool(re.fullmatch(jsonschema.NAMESPACE_PATTERN, text)) is ok
