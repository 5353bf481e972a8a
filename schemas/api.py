"""Wire shapes of the HTTP answers and request bodies (docs/protocol.md §8). No I/O.

These pydantic models describe what the services send and accept; the OpenAPI
descriptions (:mod:`schemas.openapi`) take their JSON Schemas from them.  The handlers
build their answers as plain dicts (the resolver renders hot answers once, as bytes), so
these models are the contract those dicts are checked against: ``tests/test_openapi.py``
fuzzes every route and validates each answer against the schemas made from them.
Signed payloads inside envelopes are the document models of :mod:`schemas.models`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import SkipJsonSchema

from schemas.models import Record

__all__ = [
    "CatsScore",
    "ClaimCreated",
    "ClaimList",
    "ClaimPart",
    "ClaimQuery",
    "ClaimRenewal",
    "ClaimRequest",
    "ClaimView",
    "DiscoverAnswer",
    "DiscoverMatch",
    "Envelope",
    "ErrorBody",
    "ErrorDetail",
    "GangRequest",
    "Health",
    "LogConsistency",
    "LogEntries",
    "LogEntry",
    "LogInclusion",
    "PerResource",
    "RankExplanation",
    "RankKey",
    "Ranking",
    "RegistrationAnswer",
    "RegistryReady",
    "ResolverReady",
    "ResourceBundle",
    "SelfPreservation",
    "SelfPreservationSet",
    "Signature",
]

NonNegative = Annotated[int, Field(ge=0)]
B64 = Annotated[str, Field(description="standard base64 (RFC 4648 §4), padded")]


class _Wire(BaseModel):
    """Fields typed ``X | SkipJsonSchema[None]`` are left out when absent, never null."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ClaimPart(_Wire):
    """One part of a gang claim: ``units`` of ``cpid``."""

    cpid: str
    units: int = Field(ge=1)


class ErrorDetail(_Wire):
    code: str = Field(description="machine-readable error code, e.g. invalid_cpid")
    message: str = Field(description="what was found and what was expected")
    free: int | SkipJsonSchema[None] = Field(None, description="claims 409: units free on the node")
    requested: int | SkipJsonSchema[None] = Field(
        None, description="claims 409/429: units requested"
    )
    cpid: str | SkipJsonSchema[None] = Field(
        None, description="claims 409: the node that was short"
    )
    max_units: int | SkipJsonSchema[None] = Field(None, description="claims 429: the token's quota")
    held: int | SkipJsonSchema[None] = Field(
        None, description="claims 429: units the holder already holds"
    )
    available: dict[str, Any] | SkipJsonSchema[None] = Field(
        None,
        description='gang claims 409: the largest gang that fits now, {"total": N, '
        '"parts": [{"cpid", "units"}, ...]}',
    )


class ErrorBody(_Wire):
    """Every error answer: ``{"error": {"code", "message"}}``."""

    error: ErrorDetail


class Signature(_Wire):
    keyid: str = ""
    sig: B64


class Envelope(_Wire):
    """A DSSE envelope (docs/protocol.md §3): a signed payload of one document type."""

    payloadType: str = Field(description="application/vnd.cpi.<type>+json")
    payload: B64
    signatures: list[Signature] = Field(min_length=1)


class EndorsementView(_Wire):
    root: str = Field(description="the endorsed root, e.g. SG")
    endorsed_by: str = Field(description="the root whose anchor signed it, e.g. CN")
    envelope: Envelope = Field(description="the endorsement.v1 envelope as stored")


class EndorsementList(_Wire):
    """``GET /v1/endorsements``: the endorsements a federated resolver serves under now."""

    endorsements: list[EndorsementView]


class Health(_Wire):
    status: Literal["ok"]


# -- registry ---------------------------------------------------------------------------


class RegistrationAnswer(_Wire):
    cpid: str
    record: Envelope = Field(description="the record.v1 envelope signed by the registry")
    chain: list[Envelope] = Field(description="cert.v1 envelopes from the signer up to the anchor")
    heartbeat_s: float = Field(description="send a status.v1 this often")


class SelfPreservation(_Wire):
    enabled: bool
    protecting: list[str] = Field(description="CPIDs kept live by self-preservation")


class SelfPreservationSet(_Wire):
    enabled: bool


class RegistryReady(_Wire):
    ready: Literal[True]
    namespaces: list[str]
    lease: str | None = Field(description="the instance lease id, hex")


# -- resolver ---------------------------------------------------------------------------


class ResourceBundle(_Wire):
    """``GET /v1/resources/{cpid}``: the envelopes as stored, verifiable from the anchor."""

    record: Envelope
    chain: list[Envelope]
    status: Envelope | None
    live: bool
    revision: NonNegative
    live_held: bool | SkipJsonSchema[None] = Field(
        None, description="present (true) while held by mass expiry"
    )
    stale: bool | SkipJsonSchema[None] = Field(
        None, description="present (true) while etcd is unreachable"
    )


SortName = Literal["default", "latency", "free", "score", "price", "carbon"]


class RankKey(_Wire):
    name: str = Field(description="what was compared, e.g. price_cny_per_unit_hour, l2, cpid")
    value: float | str | None = Field(description="its value for this result (null: missing)")
    order: Literal["asc", "desc"]


class CatsScore(_Wire):
    """The CATS-style scores of one result (docs/resolver.md, "Ranking")."""

    function: str = Field(description="name and version of the scoring functions: cpi-cats-v1")
    l1: dict[str, float | None] = Field(
        description="level 1 score (0-10) per category: compute, communication, cost, energy; "
        "null when the category's inputs are missing"
    )
    l2: float | None = Field(description="level 2 score (0-10): weighted mean of the l1 present")
    weights: dict[str, float] = Field(description="the level 2 weights by category")


class RankExplanation(_Wire):
    """Why a result ranks where it does: the keys compared, in order, and its scores."""

    sort: SortName
    keys: list[RankKey]
    score: CatsScore


class Ranking(_Wire):
    """The order of a discovery answer."""

    sort: SortName
    function: str = Field(description="name and version of the scoring functions: cpi-cats-v1")
    weights: dict[str, float]


class DiscoverMatch(_Wire):
    cpid: str
    score: float
    free: NonNegative
    claimed: NonNegative = Field(description="units claimed now (/alloc/), as watch events say")
    latency_ms: float | None
    record: Record = Field(description="the decoded record.v1 payload")
    live: bool
    kid: str
    version: int
    revision: NonNegative
    rank: RankExplanation | SkipJsonSchema[None] = None


class DiscoverAnswer(_Wire):
    results: list[DiscoverMatch] = Field(description="best first")
    revision: NonNegative
    ranking: Ranking | SkipJsonSchema[None] = None
    stale: bool | SkipJsonSchema[None] = Field(
        None, description="present (true) while etcd is unreachable"
    )


class BadValues(_Wire):
    count: NonNegative
    by_prefix: dict[str, int]
    keys: list[str]


class ResolverSnapshot(_Wire):
    """The warm-restart snapshot of a resolver with a ``snapshot_dir``."""

    status: str = Field(description="loaded, absent, or not used: <why> (on start)")
    loaded_revision: NonNegative
    written_revision: NonNegative = Field(description="0: none written by this process yet")
    fallbacks: NonNegative = Field(description="starts that could not use it")
    write_failures: NonNegative = Field(
        description="writes that failed since start: the next restart is cold if it stays so"
    )
    last_write_error: str | SkipJsonSchema[None] = Field(
        None, description="why the last failed write failed"
    )


class ResolverReady(_Wire):
    """``GET /readyz`` of the resolver (200 when ``ready``, else 503 with ``error``)."""

    ready: bool
    listed: bool
    stale: bool
    revision: NonNegative
    store_revision: NonNegative
    served: NonNegative
    records: NonNegative
    rejected: dict[str, int]
    bad_values: BadValues
    mass_expiry: list[dict[str, Any]]
    held: NonNegative
    last_contact_s: float | None
    ready_after_s: float | None
    statuses_pending: NonNegative | SkipJsonSchema[None] = Field(
        None,
        description="statuses a large first listing left to read and verify after ready "
        "(served without a status until then)",
    )
    statuses_after_ready_s: float | SkipJsonSchema[None] = Field(
        None, description="seconds from start until the last of those was verified"
    )
    etcd_error: str | SkipJsonSchema[None] = None
    snapshot: ResolverSnapshot | SkipJsonSchema[None] = Field(
        None, description="with a snapshot_dir: the warm-restart snapshot"
    )
    error: ErrorDetail | SkipJsonSchema[None] = None
    roots: dict[str, dict[str, Any]] | SkipJsonSchema[None] = Field(
        None, description="a federated resolver: each index cluster (member) by name"
    )
    not_ready: list[str] | SkipJsonSchema[None] = Field(
        None, description="a federated resolver: the members that are not ready"
    )
    bundle_error: str | SkipJsonSchema[None] = Field(
        None, description="a federated resolver: why the last bundle file change was refused"
    )


class ClaimQuery(_Wire):
    """A discovery query inside a claim (fields as for ``GET /v1/discover``)."""

    kind: str | SkipJsonSchema[None] = None
    within: str | SkipJsonSchema[None] = None
    accelerator: str | SkipJsonSchema[None] = None
    min_free: int | SkipJsonSchema[None] = None
    near: str | SkipJsonSchema[None] = None
    max_latency_ms: float | SkipJsonSchema[None] = None
    label: str | list[str] | SkipJsonSchema[None] = Field(
        None, description="'key:value' or a list of them"
    )
    limit: int | SkipJsonSchema[None] = Field(None, description="the number of candidates tried")
    sort: str | SkipJsonSchema[None] = Field(
        None,
        description="the order candidates are tried in, as for discovery: default, latency, "
        "free, score, price, carbon (a gang takes its parts best first)",
    )
    weights: str | SkipJsonSchema[None] = Field(
        None, description="level 2 weights for sort=score, as for discovery (latency:2,price:1)"
    )
    roots: str | list[str] | SkipJsonSchema[None] = Field(
        None,
        description="a federated resolver: only the index clusters of these roots ('CN,SG' "
        "or a list); a claim or gang is made in one cluster (docs/claims.md)",
    )


class PerResource(_Wire):
    """Units per resource of a gang: at least ``min``, at most ``max``."""

    min: int | SkipJsonSchema[None] = Field(None, ge=1)
    max: int | SkipJsonSchema[None] = Field(None, ge=1)


class GangRequest(_Wire):
    """``"gang"`` of ``POST /v1/claims``: the body's ``units`` in total over several
    resources matching its ``query``, all or nothing (docs/claims.md)."""

    per_resource: int | PerResource | SkipJsonSchema[None] = Field(
        None, description="exactly this many units per resource, or {min, max}"
    )
    same_region: bool | SkipJsonSchema[None] = Field(None, description="all parts in one region")
    max_pairwise_latency_ms: float | SkipJsonSchema[None] = Field(
        None, gt=0, description="every two parts' regions at most this far apart"
    )


class ClaimRequest(_Wire):
    """``POST /v1/claims``: exactly one of ``cpid`` and ``query``; ``gang`` needs ``query``."""

    model_config = ConfigDict(
        json_schema_extra={"oneOf": [{"required": ["cpid"]}, {"required": ["query"]}]}
    )

    cpid: str | SkipJsonSchema[None] = None
    query: ClaimQuery | SkipJsonSchema[None] = None
    units: int = Field(ge=1)
    ttl_s: int | SkipJsonSchema[None] = None
    gang: GangRequest | SkipJsonSchema[None] = None


class ClaimRenewal(_Wire):
    """``PATCH /v1/claims/{claim_id}``: the claim then expires ``ttl_s`` from now."""

    ttl_s: int = Field(ge=1)


class ClaimCreated(_Wire):
    """A claim (or renewed claim); a gang adds ``parts`` (``cpid`` is its first part,
    ``units`` its total)."""

    claim_id: str
    cpid: str
    units: int
    expires_at: int
    parts: list[ClaimPart] | SkipJsonSchema[None] = None


class ClaimView(_Wire):
    claim_id: str
    cpid: str
    holder: str
    units: int
    created_at: int
    expires_at: int
    parts: list[ClaimPart] | SkipJsonSchema[None] = None
    root: str | SkipJsonSchema[None] = Field(
        None, description="a federated resolver: the root whose index cluster holds the claim"
    )


class ClaimList(_Wire):
    holder: str
    units: NonNegative
    claims: list[ClaimView]


class LogInclusion(_Wire):
    leaf_index: NonNegative
    tree_size: NonNegative
    leaf: B64
    leaf_hash: B64
    proof: list[B64]


class LogConsistency(_Wire):
    first: NonNegative
    second: NonNegative
    proof: list[B64]


class LogEntry(_Wire):
    index: NonNegative
    leaf: B64


class LogEntries(_Wire):
    tree_size: NonNegative
    entries: list[LogEntry] = Field(max_length=256)
