"""Payload models for every signed document (docs/protocol.md §2–5).

All models are frozen, strict and reject unknown fields.  Each payload carries a
``type`` equal to the ``<type>`` of its payloadType ``application/vnd.cpi.<type>+json``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Final, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from schemas import _json
from schemas import cpid as _cpid
from schemas import keys as _keys
from schemas.errors import InvalidCPIDError, KeyFileError, PayloadError

__all__ = [
    "DOCUMENT_TYPES",
    "MAX_ACCELERATORS",
    "MAX_ENDPOINTS",
    "MAX_INT",
    "MAX_LABELS",
    "MAX_METRICS",
    "MAX_RECORD_BYTES",
    "MAX_STRING",
    "METRICS",
    "METRIC_BOUND",
    "Accelerator",
    "Anchor",
    "Attributes",
    "Capacity",
    "Cert",
    "CpuInfo",
    "Deregister",
    "Document",
    "Endpoint",
    "Location",
    "MetricSpec",
    "Record",
    "Register",
    "Revocation",
    "Status",
    "media_type",
    "parse_payload",
    "type_of_media",
]

MAX_INT: Final = 2**53 - 1
"""Largest integer in any payload (docs/verification.md): exact in every JSON parser,
including those that read numbers as IEEE doubles."""
MAX_RECORD_BYTES: Final = 4096
"""A ``record.v1`` payload (and the ``register.v1`` it is made from) is at most 4 KiB."""
MAX_ENDPOINTS: Final = 16
MAX_ACCELERATORS: Final = 16
MAX_LABELS: Final = 32
MAX_METRICS: Final = 32
MAX_STRING: Final = 256
"""Longest free-text string (characters); fields with a syntax of their own are shorter."""

METRIC_BOUND: Final = MAX_INT
"""Bound on the magnitude of any metric value, named or not (2**53 - 1)."""


@dataclass(frozen=True, slots=True)
class MetricSpec:
    """A named L0 metric of ``status.v1`` (docs/protocol.md §4): unit and bounds."""

    unit: str
    low: float
    high: float
    what: str


METRICS: Final[Mapping[str, MetricSpec]] = {
    "gpu_util": MetricSpec("percent", 0, 100, "mean utilisation of the node's accelerators"),
    "gpu_mem_used_mib": MetricSpec(
        "MiB", 0, 2**40, "accelerator memory in use, summed over the node's accelerators"
    ),
    "gpu_mem_total_mib": MetricSpec(
        "MiB", 0, 2**40, "accelerator memory installed, summed over the node's accelerators"
    ),
    "power_w": MetricSpec("W", 0, 10_000_000, "power drawn by the node's accelerators, summed"),
    "power_limit_w": MetricSpec(
        "W", 0, 10_000_000, "power limit of the node's accelerators, summed"
    ),
}
"""The L0 metrics this protocol names (docs/protocol.md §4, "Metrics"): a status may
carry others (names matching the metric syntax, magnitude at most
:data:`METRIC_BOUND`), but a named one must lie within its bounds."""

_MEDIA_PREFIX = "application/vnd.cpi."
_MEDIA_SUFFIX = "+json"
_LABEL_KEY = re.compile(r"^[a-z0-9._/-]{1,63}$")
_METRIC_KEY = re.compile(r"^[a-z][a-z0-9_]{0,63}$")


def media_type(doc_type: str) -> str:
    """``cert.v1`` -> ``application/vnd.cpi.cert.v1+json``."""
    return f"{_MEDIA_PREFIX}{doc_type}{_MEDIA_SUFFIX}"


def type_of_media(payload_type: str) -> str:
    if not (payload_type.startswith(_MEDIA_PREFIX) and payload_type.endswith(_MEDIA_SUFFIX)):
        raise PayloadError(f"payloadType {payload_type!r} is not application/vnd.cpi.<type>+json")
    return payload_type[len(_MEDIA_PREFIX) : -len(_MEDIA_SUFFIX)]


# -- field validators ------------------------------------------------------------


def _check_cpid(value: str) -> str:
    return _cpid.parse(value).to_text()


def _check_ns(value: str) -> str:
    return _cpid.parse_namespace(value)


def _check_pubkey(value: str) -> str:
    try:
        raw = _keys.b64url_decode(value)
    except KeyFileError as exc:
        raise ValueError(str(exc)) from exc
    if len(raw) != 32:
        raise ValueError(f"an Ed25519 public key is 32 bytes, got {len(raw)}")
    canonical = _keys.b64url_encode(raw)
    if value != canonical:
        # one key, one spelling: padding, the standard alphabet or stray low bits in the
        # last character would give the same key several texts
        raise ValueError(
            f"public key {value!r} is not canonical base64url (no padding); expected {canonical!r}"
        )
    try:
        # small-order points, non-canonical point encodings and points outside the
        # prime-order subgroup are refused wherever a key is parsed (docs/verification.md)
        _keys.check_public_raw(raw)
    except KeyFileError as exc:
        raise ValueError(str(exc)) from exc
    return value


def _check_node_pubkey(value: str) -> str:
    """A ``record.v1``'s node key: the text rules of :func:`_check_pubkey`, then only the
    byte-level check (canonical ``y``, not a small-order point in any encoding).  The
    key passed the full key rule where it was registered (``register.v1``); a record
    carries it on, and parsing a million records should not pay ~40 µs of point
    arithmetic each (docs/verification.md §2)."""
    try:
        raw = _keys.b64url_decode(value)
    except KeyFileError as exc:
        raise ValueError(str(exc)) from exc
    if len(raw) != 32:
        raise ValueError(f"an Ed25519 public key is 32 bytes, got {len(raw)}")
    canonical = _keys.b64url_encode(raw)
    if value != canonical:
        raise ValueError(
            f"public key {value!r} is not canonical base64url (no padding); expected {canonical!r}"
        )
    try:
        _keys.check_public_raw_fast(raw)
    except KeyFileError as exc:
        raise ValueError(str(exc)) from exc
    return value


def _check_kind(value: str) -> str:
    if value not in _cpid.KINDS:
        raise ValueError(f"unknown kind {value!r}, expected one of {', '.join(_cpid.KINDS)}")
    return value


def _check_labels(value: dict[str, str]) -> dict[str, str]:
    for k, v in value.items():
        if not _LABEL_KEY.match(k):
            raise ValueError(f"label key {k!r} must match [a-z0-9._/-]{{1,63}}")
        if len(v) > MAX_STRING:
            raise ValueError(
                f"label {k!r} value is {len(v)} characters, at most {MAX_STRING} allowed"
            )
    return value


def _check_metrics(value: dict[str, float]) -> dict[str, float]:
    for k, v in value.items():
        if not _METRIC_KEY.match(k):
            raise ValueError(f"metric name {k!r} must match [a-z][a-z0-9_]{{0,63}}")
        if not math.isfinite(v) or abs(v) > METRIC_BOUND:
            raise ValueError(f"metric {k!r} is {v:g}: must be finite, magnitude at most 2**53 - 1")
        spec = METRICS.get(k)
        if spec is not None and not spec.low <= v <= spec.high:
            raise ValueError(
                f"metric {k!r} is {v:g} {spec.unit}: must be between {spec.low:g} and {spec.high:g}"
            )
    return value


_REGION: Final = re.compile(r"[0-9]{2}([0-9]{2}){0,2}")


def _check_region(value: str) -> str:
    if not _REGION.fullmatch(value):
        raise ValueError(f"region {value!r} must be a GB/T 2260 code (2, 4 or 6 digits)")
    return value


CPIDStr = Annotated[str, AfterValidator(_check_cpid)]
Namespace = Annotated[str, AfterValidator(_check_ns)]
PublicKey = Annotated[str, AfterValidator(_check_pubkey)]
NodePublicKey = Annotated[str, AfterValidator(_check_node_pubkey)]
"""A record's node key (byte-level check only: see :func:`_check_node_pubkey`)."""
Kind = Annotated[str, AfterValidator(_check_kind)]
Labels = Annotated[dict[str, str], AfterValidator(_check_labels)]
Metrics = Annotated[dict[str, float], AfterValidator(_check_metrics)]
Count = Annotated[int, Field(ge=0, le=MAX_INT)]
"""A non-negative integer: seq, counts, free units."""
Timestamp = Annotated[int, Field(ge=0, le=MAX_INT)]
Text = Annotated[str, Field(max_length=MAX_STRING)]
Serial = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[0-9A-Za-z_-]+$")]
Kid = Annotated[str, Field(pattern=r"^[0-9A-HJKMNP-TV-Z]{16}$")]
"""A key id: 16 Crockford base32 characters (docs/protocol.md §1)."""
Nonce = Annotated[str, Field(min_length=16, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, allow_inf_nan=False)


class Endpoint(_Model):
    proto: Literal["http", "https", "grpc", "ssh", "tcp", "udp"]
    host: Annotated[str, Field(min_length=1, max_length=253)]
    port: Annotated[int, Field(ge=1, le=65535)]
    purpose: Annotated[str, Field(max_length=64)] = ""


class Location(_Model):
    region: Annotated[str, AfterValidator(_check_region)]
    site: Text | None = None
    lat: Annotated[float, Field(ge=-90, le=90)] | None = None
    lon: Annotated[float, Field(ge=-180, le=180)] | None = None
    pue: Annotated[float, Field(ge=1, le=5)] | None = None
    """The site's power usage effectiveness (total facility energy / IT energy)."""
    grid_gco2_per_kwh: Annotated[float, Field(ge=0, le=2000)] | None = None
    """Carbon intensity of the electricity the site draws, as its operator states it,
    in grams of CO2 (equivalent) per kWh."""


class CpuInfo(_Model):
    model: Text
    cores: Annotated[int, Field(ge=1, le=MAX_INT)]


class Accelerator(_Model):
    vendor: Text
    model: Text
    memory_gib: Annotated[float, Field(ge=0)]
    count: Annotated[int, Field(ge=1, le=MAX_INT)]


class Attributes(_Model):
    cpu: CpuInfo | None = None
    memory_gib: Annotated[float, Field(ge=0)] | None = None
    accelerators: list[Accelerator] = Field(default_factory=list, max_length=MAX_ACCELERATORS)
    storage_tib: Annotated[float, Field(ge=0)] | None = None
    network_gbps: Annotated[float, Field(ge=0)] | None = None
    price_cny_per_unit_hour: Annotated[float, Field(ge=0, le=1_000_000)] | None = None
    """The operator's list price in yuan (CNY) for one unit for one hour: an
    accelerator-hour, or a CPU core-hour on a record without accelerators."""

    @property
    def accelerator_units(self) -> int:
        return sum(a.count for a in self.accelerators)


class Capacity(_Model):
    accelerators_free: Count
    cpu_free: Count | None = None
    memory_free_gib: Annotated[float, Field(ge=0)] | None = None


class Document(_Model):
    """Base of signed payloads; ``TYPE`` is the ``<type>`` of the payloadType."""

    TYPE: ClassVar[str] = ""
    MAX_BYTES: ClassVar[int | None] = None
    """Largest payload of this type, in bytes (None: only the envelope bound applies)."""

    @classmethod
    def media_type(cls) -> str:
        return media_type(cls.TYPE)

    def to_json(self) -> bytes:
        """The payload bytes; PayloadError when they exceed :attr:`MAX_BYTES`."""
        data = self.model_dump_json(exclude_none=True).encode("utf-8")
        _check_size(type(self), data)
        return data


class Cert(Document):
    TYPE: ClassVar[str] = "cert.v1"
    type: Literal["cert.v1"] = "cert.v1"
    subject: Namespace
    issuer: Namespace
    public_key: PublicKey
    scopes: list[Literal["delegate", "issue"]] = Field(min_length=1, max_length=2)
    serial: Serial
    not_before: Timestamp
    not_after: Timestamp

    @model_validator(mode="after")
    def _window(self) -> Cert:
        if len(set(self.scopes)) != len(self.scopes):
            raise ValueError(f"scopes {self.scopes} repeat a scope")
        if self.not_after <= self.not_before:
            raise ValueError(
                f"not_after {self.not_after} is not after not_before {self.not_before}"
            )
        return self


class Register(Document):
    TYPE: ClassVar[str] = "register.v1"
    MAX_BYTES: ClassVar[int | None] = MAX_RECORD_BYTES
    type: Literal["register.v1"] = "register.v1"
    namespace: Namespace
    kind: Kind
    public_key: PublicKey
    nonce: Nonce
    timestamp: Timestamp
    endpoints: list[Endpoint] = Field(default_factory=list, max_length=MAX_ENDPOINTS)
    location: Location
    attributes: Attributes = Field(default_factory=Attributes)
    labels: Labels = Field(default_factory=dict, max_length=MAX_LABELS)


class Record(Document):
    """A registry-signed record.

    ``cpid`` is only length-checked here: its syntax, check character and binding to
    ``public_key`` are rule 5 of chain verification (:mod:`schemas.chain`), so a bad
    record is reported by that rule rather than as a parse error.
    """

    TYPE: ClassVar[str] = "record.v1"
    MAX_BYTES: ClassVar[int | None] = MAX_RECORD_BYTES
    type: Literal["record.v1"] = "record.v1"
    cpid: Annotated[str, Field(min_length=1, max_length=_cpid.MAX_LENGTH)]
    kind: Kind
    public_key: NodePublicKey
    issuer: Namespace
    version: Annotated[int, Field(ge=1, le=MAX_INT)]
    issued_at: Timestamp
    expires_at: Timestamp
    endpoints: list[Endpoint] = Field(default_factory=list, max_length=MAX_ENDPOINTS)
    location: Location
    attributes: Attributes = Field(default_factory=Attributes)
    labels: Labels = Field(default_factory=dict, max_length=MAX_LABELS)


class Status(Document):
    TYPE: ClassVar[str] = "status.v1"
    type: Literal["status.v1"] = "status.v1"
    cpid: CPIDStr
    seq: Count
    observed_at: Annotated[int, Field(ge=0, le=MAX_INT, description="Unix time in milliseconds")]
    state: Literal["up", "draining", "down"]
    capacity: Capacity
    metrics: Metrics = Field(default_factory=dict, max_length=MAX_METRICS)


class Deregister(Document):
    TYPE: ClassVar[str] = "deregister.v1"
    type: Literal["deregister.v1"] = "deregister.v1"
    cpid: CPIDStr
    nonce: Nonce
    timestamp: Timestamp


class Revocation(Document):
    TYPE: ClassVar[str] = "revocation.v1"
    type: Literal["revocation.v1"] = "revocation.v1"
    subject: Namespace
    serial: Serial | None = None
    kid: Kid | None = None
    reason: Text
    revoked_at: Timestamp

    @model_validator(mode="after")
    def _one_target(self) -> Revocation:
        if (self.serial is None) == (self.kid is None):
            raise ValueError("exactly one of 'serial' or 'kid' must be given")
        return self

    @property
    def target(self) -> str:
        return self.serial if self.serial is not None else str(self.kid)


class Anchor(_Model):
    """A trust anchor: a root prefix and its public key (plain JSON, not signed)."""

    type: Literal["anchor.v1"] = "anchor.v1"
    subject: Namespace
    public_key: PublicKey

    @property
    def kid(self) -> str:
        return _keys.kid(_keys.b64url_decode(self.public_key))

    def to_json(self) -> bytes:
        return self.model_dump_json().encode("utf-8")


DOCUMENT_TYPES: dict[str, type[Document]] = {
    m.TYPE: m for m in (Cert, Register, Record, Status, Deregister, Revocation)
}

D = TypeVar("D", bound=Document)


def _describe(exc: ValidationError) -> str:
    parts = []
    errors = sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")
    for err in errors[:5]:
        where = ".".join(str(p) for p in err["loc"]) or "payload"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        parts.append(f"{where}: {msg}")
    return "; ".join(parts)


_UNPARSED: Final[Any] = object()


def _check_size(model: type[Document], payload: bytes) -> None:
    if model.MAX_BYTES is not None and len(payload) > model.MAX_BYTES:
        raise PayloadError(
            f"{model.TYPE} payload is {len(payload)} bytes, at most {model.MAX_BYTES} allowed"
        )


def parse_payload(
    payload_type: str, payload: bytes, expected: type[D], *, parsed: Any = _UNPARSED
) -> D:
    """Parse verified payload bytes into ``expected``, checking the type field.

    The payloadType must be ``application/vnd.cpi.<expected.TYPE>+json`` and the
    JSON's ``type`` must equal ``<expected.TYPE>``.  ``parsed``: what
    ``schemas._json.loads(payload)`` already returned for exactly these bytes (a caller
    that had to read them before the signature check), so they are not read twice.
    """
    doc_type = type_of_media(payload_type)
    if doc_type != expected.TYPE:
        raise PayloadError(f"payloadType is for {doc_type!r}, expected {expected.TYPE!r}")
    _check_size(expected, payload)
    if parsed is not _UNPARSED:
        obj = parsed
    else:
        try:
            obj = _json.loads(payload)  # refuses duplicate names and NaN/Infinity
        except ValueError as exc:  # includes UnicodeDecodeError
            raise PayloadError(f"{expected.TYPE} payload is not valid JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise PayloadError(
            f"{expected.TYPE} payload must be a JSON object, got {type(obj).__name__}"
        )
    try:
        doc = expected.model_validate(obj)
    except InvalidCPIDError as exc:
        raise PayloadError(f"{expected.TYPE}: {exc}") from exc
    except ValidationError as exc:
        raise PayloadError(f"invalid {expected.TYPE}: {_describe(exc)}") from exc
    if "type" not in doc.model_fields_set:
        raise PayloadError(f"payload has no 'type' field, expected {expected.TYPE!r}")
    return doc
