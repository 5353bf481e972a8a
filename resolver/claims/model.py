"""What a claim is, what it may take, and how it can be refused.  No I/O.

The values behind :mod:`resolver.claims.service` (which re-exports them): the error tree of
claims, :class:`Claim` as stored at ``/cpi/v1/claim/<cpid>/<claim-id>``, claim ids,
the totals' value format (``{"units": N}``), the free-units rule
(:func:`available_units`), the service's settings and counters.
"""

from __future__ import annotations

import json
import math
import re
import secrets
from dataclasses import dataclass, field
from typing import Any, Final

from prometheus_client import CollectorRegistry, Counter

from registry.index import layout
from registry.index.layout import Keys, Prefix, parse_key, units_json
from registry.index.values import KV
from schemas import _json
from schemas.cpid import parse as parse_cpid
from schemas.errors import ConflictError, InvalidCPIDError, InvalidDataError, NotFoundError
from schemas.models import Record, Status

__all__ = [
    "CLAIMED_METRIC",
    "ID_SEPARATOR",
    "MAX_UNITS",
    "Claim",
    "ClaimConflictError",
    "ClaimForbiddenError",
    "ClaimNotFoundError",
    "ClaimsMetrics",
    "ClaimsSettings",
    "ContentionError",
    "DrainingError",
    "InsufficientCapacityError",
    "InvalidClaimError",
    "NotLiveError",
    "QuotaExceededError",
    "ReconcileReport",
    "available_units",
    "new_claim_id",
    "parse_claim_id",
    "read_units",
    "reported_claimed",
    "units_json",
]

CLAIMED_METRIC: Final = "claimed_units"
"""Status metric: units the node already subtracted from its reported free capacity."""

MAX_UNITS: Final = 1 << 20
"""Upper bound on ``units`` of one claim (a sanity bound; capacity is the real one)."""

ID_SEPARATOR: Final = "~"
_ID_RANDOM: Final = re.compile(r"[A-Za-z0-9_-]{16,64}")


# =============================================================================
# Errors (one tree: schemas.errors; resolver.claims.http maps them to statuses)
# =============================================================================


class InvalidClaimError(InvalidDataError):
    """A claim request is malformed: units, ttl, body, claim id (HTTP 400)."""

    code = "invalid_claim"


class ClaimConflictError(ConflictError):
    """The resource cannot take the claim now (HTTP 409); ``free`` says what it could take."""

    code = "conflict"

    def __init__(
        self,
        message: str,
        *,
        cpid: str | None,
        requested: int,
        free: int,
        available: tuple[tuple[str, int], ...] | None = None,
    ) -> None:
        self.cpid = cpid
        self.requested = requested
        self.free = free
        self.available = available
        """For a gang: the parts ``(cpid, units)`` of the largest gang that fits now
        (``free`` is their total); None for a claim on one resource."""
        super().__init__(message)


class InsufficientCapacityError(ClaimConflictError):
    """Fewer units are free than requested (HTTP 409)."""

    code = "insufficient_capacity"


class NotLiveError(ClaimConflictError):
    """The node has no live, verified status, or reports state ``down`` (HTTP 409)."""

    code = "not_live"


class DrainingError(ClaimConflictError):
    """The node reports state ``draining``: it takes no new claims (HTTP 409)."""

    code = "draining"


class ContentionError(ClaimConflictError):
    """Every attempt lost its compare to a concurrent writer (HTTP 409; retry later)."""

    code = "contention"


class QuotaExceededError(InvalidDataError):
    """The holder would hold more than its token's ``max_units`` (HTTP 429)."""

    code = "quota_exceeded"
    http_status = 429

    def __init__(
        self, message: str, *, holder: str, max_units: int, held: int, requested: int
    ) -> None:
        self.holder = holder
        self.max_units = max_units
        self.held = held
        self.requested = requested
        super().__init__(message)


class ClaimForbiddenError(InvalidDataError):
    """The claim belongs to another holder (HTTP 403)."""

    code = "forbidden"
    http_status = 403


class ClaimNotFoundError(NotFoundError):
    """No such claim (never made, released, or expired) (HTTP 404)."""

    code = "claim_not_found"


# =============================================================================
# Values
# =============================================================================


def _int(value: object, name: str) -> int:
    """An integer field of a stored claim (ValueError for anything else)."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"claim {name} {value!r:.40} is not an integer")
    return value


def reported_claimed(status: Status, record: Record | None = None) -> int:
    """Units the node says it already withheld for claims (metric ``claimed_units``).

    Bounded by the record's hardware (accelerators, else CPU cores) when given, so a
    status cannot make more units free than the record describes.
    """
    value = status.metrics.get(CLAIMED_METRIC, 0)
    if not math.isfinite(value) or value <= 0:
        return 0
    units = int(value)
    if record is not None:
        units = min(units, _hardware_units(record))
    return units


def _hardware_units(record: Record) -> int:
    attrs = record.attributes
    if attrs.accelerators:
        return attrs.accelerator_units
    return attrs.cpu.cores if attrs.cpu is not None else 0


def available_units(record: Record, status: Status | None, allocated: int) -> int:
    """Units a new claim may take: ``reported free + claimed_units - allocated``.

    Units are accelerators for records that list any, CPU cores otherwise (as in
    discovery).  No status, or a state other than ``up``, gives 0; the result is never
    below 0 nor above the record's hardware.
    """
    if status is None or status.state != "up":
        return 0
    cap = status.capacity
    free = cap.accelerators_free if record.attributes.accelerators else (cap.cpu_free or 0)
    free += reported_claimed(status, record) - allocated
    hardware = _hardware_units(record)
    return max(0, min(free, hardware) if hardware else free)


def read_units(kv: KV | None) -> int | None:
    """Units in an ``/alloc/`` or ``/holders/`` key (:func:`registry.index.layout.read_units`):
    0 when absent, ``None`` when unreadable (the claims service then refuses to count on it)."""
    try:
        return layout.read_units(None if kv is None else kv.value)
    except InvalidDataError:
        return None


def new_claim_id(cpid: str) -> str:
    """``<prefix>~<suffix>~<16 random URL-safe characters>`` for a canonical ``cpid``."""
    prefix, suffix = cpid.split("/")
    return ID_SEPARATOR.join((prefix, suffix, secrets.token_urlsafe(12)))


def parse_claim_id(claim_id: str) -> str:
    """The canonical CPID a claim id names; :class:`InvalidClaimError` when malformed."""
    parts = claim_id.split(ID_SEPARATOR) if isinstance(claim_id, str) else []
    if len(parts) != 3 or not _ID_RANDOM.fullmatch(parts[2]):
        raise InvalidClaimError(
            f"claim id {claim_id!r} is malformed: expected <prefix>~<suffix>~<random>, "
            "as returned by POST /v1/claims"
        )
    text = f"{parts[0]}/{parts[1]}"
    try:
        cpid = parse_cpid(text).to_text()
    except InvalidCPIDError as exc:
        raise InvalidClaimError(f"claim id {claim_id!r} names no valid CPID: {exc}") from None
    if cpid != text:
        raise InvalidClaimError(
            f"claim id {claim_id!r} names {text}, expected the canonical form {cpid}"
        )
    return cpid


@dataclass(frozen=True, slots=True)
class Claim:
    """One claim as stored at ``/cpi/v1/claim/<cpid>/<claim-id>``."""

    claim_id: str
    cpid: str
    holder: str
    units: int
    created_at: int
    expires_at: int
    lease: int = 0
    revision: int = 0
    gang_units: int = 0
    """For a part of a gang: the gang's units in total (0: not a gang)."""
    gang_parts: int = 0
    """For a part of a gang: how many parts the gang has (0: not a gang)."""
    parts: tuple[tuple[str, int], ...] = ()
    """Every part ``(cpid, units)`` of the gang, best ranked first: on the gang as a whole
    and on its *anchor* part (the one whose CPID the claim id names); else ``()``."""

    @property
    def is_gang(self) -> bool:
        return self.gang_parts > 0

    @property
    def anchor(self) -> str:
        """The CPID the claim id names (the first part of a gang)."""
        return parse_claim_id(self.claim_id)

    def to_dict(self) -> dict[str, Any]:
        """The API form: for a gang as a whole, ``units`` is the total and ``parts``
        lists ``{"cpid", "units"}`` of every part."""
        out: dict[str, Any] = {
            "claim_id": self.claim_id,
            "cpid": self.cpid,
            "holder": self.holder,
            "units": self.units,
            "created_at": self.created_at,
            "expires_at": self.expires_at,
        }
        if self.parts:
            out["parts"] = [{"cpid": c, "units": u} for c, u in self.parts]
        return out

    def to_json(self) -> bytes:
        """The value stored at :attr:`key` (one part, for a gang)."""
        out: dict[str, Any] = {
            "claim_id": self.claim_id,
            "cpid": self.cpid,
            "holder": self.holder,
            "units": self.units,
            "created_at": self.created_at,
            "expires_at": self.expires_at,
        }
        if self.is_gang:
            out["gang"] = {"units": self.gang_units, "parts": self.gang_parts}
            if self.parts:
                out["parts"] = [{"cpid": c, "units": u} for c, u in self.parts]
        return json.dumps(out, separators=(",", ":")).encode()

    @property
    def key(self) -> str:
        return Keys.claim(self.cpid, self.claim_id)

    def expired(self, now: float) -> bool:
        """Whether ``expires_at`` has passed: such a claim counts as gone even while its
        key still exists (a lease re-armed by an etcd restart outlives the claim)."""
        return 0 < self.expires_at <= now

    @classmethod
    def from_kv(cls, kv: KV) -> Claim:
        """Parse a claim key; ``ValueError`` when the key or value is not a claim."""
        parsed = parse_key(kv.key)
        if parsed.collection is not Prefix.CLAIM:
            raise ValueError(f"{kv.key} is not a claim key")
        cpid, claim_id = parsed.parts
        obj = _json.loads(kv.value)  # ValueError on any unreadable value, however deep
        if not isinstance(obj, dict):
            raise ValueError("claim value is not a JSON object")
        units = obj.get("units")
        if not isinstance(units, int) or isinstance(units, bool) or units < 1:
            raise ValueError(f"claim units {units!r} is not a positive integer")
        holder = obj.get("holder")
        if not isinstance(holder, str):
            raise ValueError(f"claim holder {holder!r} is not a string")
        gang_units, gang_parts, parts = _gang_fields(obj)
        if gang_parts:
            try:
                parse_claim_id(claim_id)  # a gang is found through the CPID its id names
            except InvalidClaimError as exc:
                raise ValueError(str(exc)) from None
        return cls(
            claim_id=claim_id,
            cpid=cpid,
            holder=holder,
            units=units,
            created_at=_int(obj.get("created_at", 0), "created_at"),
            expires_at=_int(obj.get("expires_at", 0), "expires_at"),
            lease=kv.lease,
            revision=kv.mod_revision,
            gang_units=gang_units,
            gang_parts=gang_parts,
            parts=parts,
        )


def _gang_fields(obj: dict[str, Any]) -> tuple[int, int, tuple[tuple[str, int], ...]]:
    """``(gang units, gang parts, parts)`` of a stored claim value (zeros when no gang)."""
    gang = obj.get("gang")
    if gang is None:
        return 0, 0, ()
    if not isinstance(gang, dict):
        raise ValueError("claim gang is not an object")
    units, count = _int(gang.get("units"), "gang units"), _int(gang.get("parts"), "gang parts")
    if units < 1 or count < 1:
        raise ValueError("claim gang units and parts must be positive")
    raw = obj.get("parts", [])
    if not isinstance(raw, list) or len(raw) > count:
        raise ValueError("claim parts is not a list of at most the gang's parts")
    parts: list[tuple[str, int]] = []
    for p in raw:
        if not isinstance(p, dict) or not isinstance(p.get("cpid"), str):
            raise ValueError('claim part is not {"cpid", "units"}')
        u = _int(p.get("units"), "part units")
        if u < 1:
            raise ValueError("claim part units must be positive")
        parts.append((p["cpid"], u))
    if parts and (len(parts) != count or sum(u for _, u in parts) != units):
        raise ValueError("claim parts do not add up to the gang")
    return units, count, tuple(parts)


@dataclass(frozen=True, slots=True)
class ClaimsSettings:
    """Bounds and timings of the claims service (``docs/claims.md``)."""

    default_ttl_s: int = 600
    max_ttl_s: int = 86_400
    max_attempts: int = 8
    """Transactions tried per claim (or release) before answering ``contention``."""
    retry_backoff_s: float = 0.005
    retry_backoff_max_s: float = 0.1
    default_candidates: int = 20
    """Resources a query claim tries, best ranked first (the query's ``limit``)."""
    max_candidates: int = 100
    gang_candidates: int = 200
    """Resources a gang considers when its query gives no ``limit``."""
    max_gang_candidates: int = 500
    reconcile_interval_s: float = 30.0
    reconcile_delay_s: float = 0.2
    """A pass runs this long after a claim key is deleted (gathers a burst of expiries)."""
    token_cache_s: float = 5.0
    token_prune_interval_s: float = 3600.0
    max_body_bytes: int = 16_384

    def __post_init__(self) -> None:
        if not 1 <= self.default_ttl_s <= self.max_ttl_s:
            raise ValueError(
                f"default_ttl_s {self.default_ttl_s} must be between 1 and max_ttl_s {self.max_ttl_s}"
            )
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {self.max_attempts}")


class ClaimsMetrics:
    """Prometheus counters of the claims service (on the resolver's registry when given)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.registry = r
        self.claims = Counter(
            "cpi_resolver_claims",
            "Claim requests by outcome (created, or the error code)",
            ["outcome"],
            registry=r,
        )
        self.releases = Counter(
            "cpi_resolver_claim_releases", "Release requests by outcome", ["outcome"], registry=r
        )
        self.renewals = Counter(
            "cpi_resolver_claim_renewals", "Renewal requests by outcome", ["outcome"], registry=r
        )
        self.retries = Counter(
            "cpi_resolver_claim_retries",
            "Claim and release transactions whose compare failed (retried)",
            registry=r,
        )
        self.reconciled = Counter(
            "cpi_resolver_claims_reconciled",
            "Totals corrected by the reconciler, by collection (alloc, holders)",
            ["collection"],
            registry=r,
        )


@dataclass(frozen=True, slots=True)
class ReconcileReport:
    """What one reconciliation pass saw and did."""

    revision: int
    claims: int
    fixed: list[str] = field(default_factory=list)
    """One line per corrected total: ``"<key>: <was> -> <now>"``."""
    lost: int = 0
    """Corrections not made because the key changed meanwhile (the next pass retries)."""
