"""JSON Schemas (draft 2020-12) for every document type, generated from the models. No I/O.

The pydantic models are the source of truth; :func:`json_schemas` turns them into
schemas other implementations can validate against, and adds what pydantic cannot see
inside the models' Python validators: the syntax of CPIDs, namespaces, public keys,
label keys, metric names and region codes.  The bounds of docs/verification.md (integers
up to 2^53 - 1, list, map and string lengths) come from the models' field constraints.
Some rules stay outside any JSON Schema and are named in each schema's
``description``: the CPID check character, a cert's ``not_after`` > ``not_before``, a
revocation's "exactly one of serial or kid", the 4 KiB payload bound of records and
registrations, a public key being a valid curve point.

``tools/gen_schemas.py`` writes the result to ``schemas/json/<type>.json``;
``tests/schemas/test_jsonschema.py`` fails when those files are stale.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, Final

from pydantic import BaseModel
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaValue
from pydantic_core import core_schema

from schemas import cpid as _cpid
from schemas import models as _models
from schemas import usage as _usage
from schemas.endorsement import Endorsement

__all__ = [
    "CPID_PATTERN",
    "NAMESPACE_PATTERN",
    "PUBLIC_KEY_PATTERN",
    "SCHEMA_TYPES",
    "json_schema",
    "json_schemas",
    "render",
]

DIALECT: Final = "https://json-schema.org/draft/2020-12/schema"


def _any_case(word: str) -> str:
    return "".join(f"[{c}{c.lower()}]" if c.isalpha() else c for c in word)


def _crockford_any_case() -> str:
    letters = "".join(c for c in _cpid.CROCKFORD if c.isalpha())
    return f"[0-9{letters}{letters.lower()}]"


NAMESPACE_PATTERN: Final = r"^[A-Za-z]{2}(\.[0-9A-Za-z]{1,16})*$"
"""A namespace prefix in any case (parsers accept any case and store upper case)."""

CPID_PATTERN: Final = (
    r"^[A-Za-z]{2}(\.[0-9A-Za-z]{1,16})*/"
    f"({'|'.join(_any_case(k) for k in _cpid.KINDS)})"
    rf"\.{_crockford_any_case()}{{12}}-[0-9A-Za-z]$"
)
"""CPID syntax in any case; the check character itself cannot be expressed here."""

PUBLIC_KEY_PATTERN: Final = r"^[A-Za-z0-9_-]{42}[AEIMQUYcgkosw048]$"
"""Canonical base64url of 32 bytes, no padding: 43 characters, the last one's low 2 bits zero."""

_EXTRA: Final[dict[Callable[..., Any], dict[str, Any]]] = {
    _models._check_cpid: {
        "pattern": CPID_PATTERN,
        "maxLength": _cpid.MAX_LENGTH,
        "description": "CPID (docs/protocol.md §1); the check character must also be right",
    },
    _models._check_ns: {
        "pattern": NAMESPACE_PATTERN,
        "maxLength": _cpid.MAX_LENGTH,
        "description": "namespace prefix, e.g. CN.31.CMCC",
    },
    _models._check_pubkey: {
        "pattern": PUBLIC_KEY_PATTERN,
        "description": "Ed25519 public key: base64url of the 32 raw bytes, no padding; the "
        "bytes must also be the canonical encoding of a point of the prime-order subgroup "
        "(small-order and non-canonical points are refused; docs/verification.md)",
    },
    _models._check_node_pubkey: {
        "pattern": PUBLIC_KEY_PATTERN,
        "description": "Ed25519 public key: base64url of the 32 raw bytes, no padding; the "
        "bytes must also be the canonical encoding of a point of the prime-order subgroup "
        "(small-order and non-canonical points are refused; docs/verification.md)",
    },
    _models._check_kind: {"enum": list(_cpid.KINDS)},
    _models._check_labels: {
        "propertyNames": {"pattern": r"^[a-z0-9._/-]{1,63}$"},
        "additionalProperties": {"type": "string", "maxLength": 256},
    },
    _models._check_metrics: {
        "propertyNames": {"pattern": r"^[a-z][a-z0-9_]{0,63}$"},
        "properties": {
            name: {
                "type": "number",
                "minimum": spec.low,
                "maximum": spec.high,
                "description": f"{spec.what} ({spec.unit})",
            }
            for name, spec in sorted(_models.METRICS.items())
        },
        "additionalProperties": {
            "type": "number",
            "minimum": -_models.METRIC_BOUND,
            "maximum": _models.METRIC_BOUND,
        },
    },
    _models._check_region: {
        "pattern": r"^[0-9]{2}([0-9]{2}){0,2}$",
        "description": "GB/T 2260 region code (2, 4 or 6 digits)",
    },
}

_MODELS: Final[dict[str, type[BaseModel]]] = {
    **{t: m for t, m in _models.DOCUMENT_TYPES.items()},
    "anchor.v1": _models.Anchor,
    "endorsement.v1": Endorsement,
    "usage.v1": _usage.Usage,
    "usagesigner.v1": _usage.UsageSigner,
}

SCHEMA_TYPES: Final = tuple(_MODELS)
"""Every type with a schema: the six signed document types, ``anchor.v1``,
``endorsement.v1`` and the usage receipt's two (``usage.v1``, ``usagesigner.v1``)."""

_DESCRIPTIONS: Final = {
    "cert.v1": "Delegation certificate for a namespace, signed by the issuer namespace's "
    "key. Also: not_after > not_before; scopes do not repeat.",
    "register.v1": "Registration request, signed by the node's own key (proof of possession). "
    "Also: the payload is at most 4096 bytes.",
    "record.v1": "Resource record, signed by the registry's certified namespace key. The "
    "cpid's syntax, check character and binding to public_key are checked by chain "
    "verification (rule 5), not by this schema. Also: the payload is at most 4096 bytes.",
    "status.v1": "Live status, signed by the node's own key; observed_at is in milliseconds.",
    "deregister.v1": "Deregistration request, signed by the node's own key.",
    "revocation.v1": "Revocation of a cert serial or a key id, signed by the revoked cert's "
    "issuer or an ancestor. Also: exactly one of serial or kid.",
    "anchor.v1": "Trust anchor file (plain JSON, not signed): a root prefix and its key.",
    "endorsement.v1": "One root's statement that another root's anchor key is public_key, "
    "signed by the issuer root's anchor key. Also: issuer and subject are different roots "
    "(one segment); every permitted namespace is inside subject, none repeats; not_after > "
    "not_before, the window at most 366 days; the payload is at most 2048 bytes.",
    "usage.v1": "Usage receipt: units of cpid held by holder from start to end (Unix "
    "seconds) under claim_id, signed by a usage signing key; a gang's lists its parts. "
    "Also: end >= start; claim_id is <prefix>~<suffix>~<random> naming cpid; the first "
    "part's cpid is cpid, no cpid appears twice and the parts' units add up to units; the "
    "payload is at most 16384 bytes.",
    "usagesigner.v1": "Names a usage signing key and the namespace whose receipts it may "
    "sign, signed by a trust anchor's key. Also: not_after > not_before; the payload is at "
    "most 1024 bytes.",
}


class _Generator(GenerateJsonSchema):
    """Adds the syntax hidden inside the models' after-validators."""

    def function_after_schema(
        self, schema: core_schema.AfterValidatorFunctionSchema
    ) -> JsonSchemaValue:
        out = super().function_after_schema(schema)
        extra = _EXTRA.get(schema["function"]["function"])
        if extra is None:
            return out
        merged = dict(out)
        if "enum" in extra:
            merged.pop("type", None)
        merged.update(extra)
        return merged


def json_schema(doc_type: str) -> dict[str, Any]:
    """The JSON Schema of one type, e.g. ``cert.v1``; ``type`` is always required."""
    try:
        model = _MODELS[doc_type]
    except KeyError:
        raise ValueError(
            f"no schema for {doc_type!r}, expected one of {', '.join(SCHEMA_TYPES)}"
        ) from None
    schema = model.model_json_schema(schema_generator=_Generator, mode="validation")
    required = [f for f in schema.get("required", []) if f != "type"]
    schema["required"] = ["type", *required]
    schema["title"] = doc_type
    schema["description"] = _DESCRIPTIONS[doc_type]
    return {"$schema": DIALECT, **schema}


def json_schemas() -> dict[str, dict[str, Any]]:
    """Every schema, keyed by type."""
    return {t: json_schema(t) for t in SCHEMA_TYPES}


def render(schema: dict[str, Any]) -> str:
    """The file form: sorted keys, two-space indent, ASCII, trailing newline."""
    return json.dumps(schema, indent=2, sort_keys=True, ensure_ascii=True) + "\n"
