"""HTTP routes of claims (docs/protocol.md §8), mountable on any aiohttp app.

:func:`add_claim_routes` registers, next to whatever the app already serves:

* ``POST /v1/claims`` (``Authorization: Bearer <claims token>``), body
  ``{"cpid": ...} | {"query": {...}}`` with ``"units"`` and optional ``"ttl_s"``
  -> ``201 {"claim_id", "cpid", "units", "expires_at"}``;
  ``"gang": {"per_resource", "same_region", "max_pairwise_latency_ms"}`` with a query
  claims ``units`` in total over several resources, all or nothing -> ``201`` with
  ``"parts"``;
* ``DELETE /v1/claims/{claim_id}`` by the claim's holder -> ``204`` (a gang: all of it);
* ``PATCH /v1/claims/{claim_id}`` ``{"ttl_s": N}`` by the claim's holder -> ``200``, the
  claim now expiring ``N`` s from now (single or gang; the units stay held);
* ``GET /v1/claims[?holder=NAME]`` -> ``{"holder", "units", "claims": [...]}``, the
  token holder's active claims (``holder`` may only name the token's own holder).

The routes map their own errors (each class's ``http_status``), so they answer the same whatever
middleware the host app has.  Errors are ``{"error": {"code", "message"}}``; a 409
adds ``"free"`` and ``"requested"`` (and for a gang ``"available": {"total", "parts"}``,
the largest gang that fits now), a 429 ``"max_units"``, ``"held"`` and
``"requested"``.  The claims service (and its reconciler) start in the app's
``cleanup_ctx``, after the resolver's.  See ``docs/claims.md``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, Final

from aiohttp import web

from registry.index import Index
from resolver import ranking
from resolver.claims.gang import GangSpec
from resolver.claims.service import (
    Claim,
    ClaimConflictError,
    ClaimForbiddenError,
    ClaimService,
    ClaimsMetrics,
    ClaimsSettings,
    InvalidClaimError,
    QuotaExceededError,
)
from resolver.claims.tokens import (
    ClaimsTokenInfo,
    TokenCache,
)
from resolver.claims.usage import recorder_from_env
from resolver.core import Resolver
from resolver.discovery import Query
from resolver.errors import QueryError
from schemas._json import loads as strict_loads
from schemas.errors import (
    BodyTooLargeError,
    CPIError,
    RequestTimeoutError,
)
from schemas.http import bearer_token, check_utf8_json

__all__ = ["BODY_TIMEOUT", "CLAIMS", "add_claim_routes", "parse_gang", "parse_query"]

_log = logging.getLogger("resolver.claims_http")

CLAIMS = web.AppKey("claims", ClaimService)
"""The app's :class:`ClaimService` (set in ``cleanup_ctx``)."""
_TOKENS = web.AppKey("claims_tokens", TokenCache)
_SETTINGS = web.AppKey("claims_settings", ClaimsSettings)
BODY_TIMEOUT = web.AppKey("claims_body_timeout", float)
"""Seconds a request body may take to arrive (else 408); 10 s when the app has none."""

_JSON: Final = "application/json"
_BODY_FIELDS: Final = frozenset({"cpid", "query", "units", "ttl_s", "gang"})
_GANG_FIELDS: Final = frozenset({"per_resource", "same_region", "max_pairwise_latency_ms"})
_RENEW_FIELDS: Final = frozenset({"ttl_s"})
_QUERY_FIELDS: Final[dict[str, tuple[type, ...]]] = {
    "kind": (str,),
    "within": (str,),
    "accelerator": (str,),
    "min_free": (int,),
    "near": (str,),
    "max_latency_ms": (int, float),
    "label": (str, list),
    "limit": (int,),
    "sort": (str,),
    "weights": (str,),
}


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _error_response(exc: CPIError) -> web.Response:
    status = exc.http_status
    err: dict[str, Any] = {"code": exc.code, "message": str(exc)}
    if isinstance(exc, ClaimConflictError):
        err.update(free=exc.free, requested=exc.requested)
        if exc.cpid is not None:
            err["cpid"] = exc.cpid
        if exc.available is not None:
            err["available"] = {
                "total": sum(u for _, u in exc.available),
                "parts": [{"cpid": c, "units": u} for c, u in exc.available],
            }
    elif isinstance(exc, QuotaExceededError):
        err.update(max_units=exc.max_units, held=exc.held, requested=exc.requested)
    headers = {"WWW-Authenticate": 'Bearer realm="cpi-claims"'} if status == 401 else None
    resp = web.json_response({"error": err}, status=status, headers=headers)
    if isinstance(exc, RequestTimeoutError):
        resp.force_close()  # the rest of the body is not read: close the connection
    return resp


def _guarded(handler: Handler) -> Handler:
    """Answer the project's errors as JSON with their ``http_status`` (independent of the app)."""

    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except CPIError as exc:
            if exc.http_status >= 500:
                _log.warning("%s %s: %s", request.method, request.path, exc)
            else:
                _log.debug("%s %s refused (%s): %s", request.method, request.path, exc.code, exc)
            return _error_response(exc)

    return wrapped


# -- request parsing ----------------------------------------------------------------------


async def _token(request: web.Request) -> ClaimsTokenInfo:
    return await request.app[_TOKENS].lookup(bearer_token(request.headers.get("Authorization", "")))


async def _json_object(request: web.Request, limit: int) -> dict[str, Any]:
    """The request body: one JSON object (strict: duplicate names refused), bounded."""
    declared = request.content_length
    if declared is not None and declared > limit:
        raise BodyTooLargeError(f"request body is {declared} bytes, at most {limit} allowed")
    timeout = request.app.get(BODY_TIMEOUT, 10.0)
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout):
            while chunk := await request.content.read(65536):
                size += len(chunk)
                if size > limit:
                    raise BodyTooLargeError(
                        f"request body is over {limit} bytes, at most {limit} allowed"
                    )
                chunks.append(chunk)
    except TimeoutError:
        raise RequestTimeoutError(
            f"request body not received within {timeout:g} s ({size} of "
            f"{declared if declared is not None else 'unknown'} bytes arrived)"
        ) from None
    raw = b"".join(chunks)
    why = check_utf8_json(raw)
    if why is not None:
        raise InvalidClaimError(f"body is not valid JSON: {why}")
    try:
        obj = strict_loads(raw)
    except ValueError as exc:
        raise InvalidClaimError(f"body is not valid JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise InvalidClaimError(f"body must be a JSON object, got {type(obj).__name__}")
    return obj


async def _body(request: web.Request, limit: int) -> dict[str, Any]:
    obj = await _json_object(request, limit)
    unknown = sorted(set(obj) - _BODY_FIELDS)
    if unknown:
        raise InvalidClaimError(
            f"unknown field(s) {', '.join(map(repr, unknown))}; expected cpid or query, "
            "units, ttl_s, gang"
        )
    if ("cpid" in obj) == ("query" in obj):
        raise InvalidClaimError('give exactly one of "cpid" and "query"')
    if "gang" in obj and "query" not in obj:
        raise InvalidClaimError('a "gang" needs a "query" (the resources it may use), not a "cpid"')
    if "units" not in obj:
        raise InvalidClaimError('"units" is required (an integer, at least 1)')
    return obj


def parse_gang(obj: object, *, units: object) -> GangSpec:
    """A claim's ``"gang"`` object (with the body's ``units``, the total) -> :class:`GangSpec`.

    ``per_resource``: an integer (exactly that many per resource) or ``{"min", "max"}``
    (either may be left out); ``same_region``: true or false; ``max_pairwise_latency_ms``:
    a positive number.  Unknown fields are refused (InvalidClaimError).
    """
    if not isinstance(obj, dict):
        raise InvalidClaimError(f'"gang" must be a JSON object, got {type(obj).__name__}')
    unknown = sorted(set(obj) - _GANG_FIELDS)
    if unknown:
        raise InvalidClaimError(
            f"unknown gang field(s) {', '.join(map(repr, unknown))}; known: "
            f"{', '.join(sorted(_GANG_FIELDS))}"
        )
    if not isinstance(units, int) or isinstance(units, bool):
        raise InvalidClaimError(f"units must be an integer, got {units!r}")
    per = obj.get("per_resource", {})
    if isinstance(per, dict):
        extra = sorted(set(per) - {"min", "max"})
        if extra:
            raise InvalidClaimError(
                f"unknown per_resource field(s) {', '.join(map(repr, extra))}; known: min, max"
            )
        per_min, per_max = per.get("min", 1), per.get("max", units)
    else:
        per_min = per_max = per
    spec: dict[str, Any] = {"units": units, "per_min": per_min, "per_max": per_max}
    if "same_region" in obj:
        spec["same_region"] = obj["same_region"]
    if "max_pairwise_latency_ms" in obj:
        spec["max_pairwise_latency_ms"] = obj["max_pairwise_latency_ms"]
    return GangSpec(**spec)


def parse_query(obj: object, *, default_limit: int) -> Query:
    """A claim's ``"query"`` object -> :class:`Query` (strictly typed, unknown fields refused).

    Fields as for ``GET /v1/discover``: ``kind``, ``within``, ``accelerator``,
    ``min_free``, ``near``, ``max_latency_ms``, ``label`` (``"k:v"`` or a list of them),
    ``limit`` (the number of candidates tried), ``sort`` and ``weights`` (the order in
    which candidates are tried: a gang takes its parts best first, e.g. cheapest first
    with ``"sort": "price"``).
    """
    if not isinstance(obj, dict):
        raise QueryError(f"query must be a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - set(_QUERY_FIELDS))
    if unknown:
        raise QueryError(
            f"unknown query field(s) {', '.join(map(repr, unknown))}; known: "
            f"{', '.join(_QUERY_FIELDS)}"
        )
    for name, value in obj.items():
        types = _QUERY_FIELDS[name]
        if isinstance(value, bool) or not isinstance(value, types):
            expected = " or ".join("list" if t is list else t.__name__ for t in types)
            raise QueryError(f"query field {name!r} must be {expected}, got {value!r}")
    labels_raw = obj.get("label", [])
    items = [labels_raw] if isinstance(labels_raw, str) else labels_raw
    labels: list[tuple[str, str]] = []
    for item in items:
        if not isinstance(item, str) or ":" not in item:
            raise QueryError(f"query label {item!r}: expected 'key:value'")
        k, _, v = item.partition(":")
        labels.append((k, v))
    max_latency = obj.get("max_latency_ms")
    kind = obj.get("kind")
    weights = obj.get("weights")
    return Query(
        kind=kind.upper() if kind is not None else None,
        within=obj.get("within"),
        accelerator=obj.get("accelerator"),
        min_free=obj.get("min_free"),
        near=obj.get("near"),
        max_latency_ms=float(max_latency) if max_latency is not None else None,
        labels=tuple(labels),
        limit=obj.get("limit", default_limit),
        sort=obj.get("sort"),
        weights=ranking.parse_weights(weights) if weights is not None else (),
    )


def _created(claim: Claim) -> dict[str, Any]:
    out: dict[str, Any] = {
        "claim_id": claim.claim_id,
        "cpid": claim.cpid,
        "units": claim.units,
        "expires_at": claim.expires_at,
    }
    if claim.parts:
        out["parts"] = [{"cpid": c, "units": u} for c, u in claim.parts]
    return out


# -- handlers ---------------------------------------------------------------------------


async def post_claim(request: web.Request) -> web.Response:
    settings = request.app[_SETTINGS]
    token = await _token(request)
    body = await _body(request, settings.max_body_bytes)
    service = request.app[CLAIMS]
    units, ttl = service.check_request(units=body["units"], ttl_s=body.get("ttl_s"))
    who: dict[str, Any] = {
        "units": units,
        "ttl_s": ttl,
        "holder": token.holder,
        "max_units": token.max_units,
        "within": token.within,
    }
    if "cpid" in body:
        cpid = body["cpid"]
        if not isinstance(cpid, str):
            raise InvalidClaimError(f'"cpid" must be a string, got {cpid!r}')
        claim = await service.claim(cpid, **who)
    elif "gang" in body:
        spec = parse_gang(body["gang"], units=units)
        query = parse_query(body["query"], default_limit=settings.gang_candidates)
        del who["units"]
        claim = await service.claim_gang(query, spec=spec, **who)
    else:
        query = parse_query(body["query"], default_limit=settings.default_candidates)
        claim = await service.claim_query(query, **who)
    _log.info(
        "claim %s: %d units of %s%s for %s until %d",
        claim.claim_id,
        claim.units,
        claim.cpid,
        f" and {len(claim.parts) - 1} more resources" if len(claim.parts) > 1 else "",
        claim.holder,
        claim.expires_at,
    )
    return web.json_response(_created(claim), status=201)


async def patch_claim(request: web.Request) -> web.Response:
    """Renew: ``{"ttl_s": N}`` -> the claim (single or gang) expires N s from now."""
    settings = request.app[_SETTINGS]
    token = await _token(request)
    body = await _json_object(request, settings.max_body_bytes)
    unknown = sorted(set(body) - _RENEW_FIELDS)
    if unknown:
        raise InvalidClaimError(f"unknown field(s) {', '.join(map(repr, unknown))}; expected ttl_s")
    if "ttl_s" not in body:
        raise InvalidClaimError('"ttl_s" is required (seconds from now)')
    claim = await request.app[CLAIMS].renew(
        request.match_info["claim_id"], holder=token.holder, ttl_s=body["ttl_s"]
    )
    _log.info("claim %s renewed by %s until %d", claim.claim_id, claim.holder, claim.expires_at)
    return web.json_response(_created(claim))


async def delete_claim(request: web.Request) -> web.Response:
    token = await _token(request)
    claim = await request.app[CLAIMS].release(request.match_info["claim_id"], holder=token.holder)
    _log.info("claim %s released by %s (%d units)", claim.claim_id, claim.holder, claim.units)
    return web.Response(status=204)


def _only(params: Mapping[str, str], allowed: set[str]) -> None:
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise InvalidClaimError(
            f"unknown query parameter(s) {', '.join(map(repr, unknown))}; "
            f"known: {', '.join(sorted(allowed))}"
        )


async def get_claims(request: web.Request) -> web.Response:
    token = await _token(request)
    _only(request.query, {"holder"})
    holder = request.query.get("holder", token.holder)
    if holder != token.holder:
        raise ClaimForbiddenError(
            f"this token lists the claims of holder {token.holder}, not of {holder}"
        )
    claims = await request.app[CLAIMS].list_claims(holder)
    return web.json_response(
        {
            "holder": holder,
            "units": sum(c.units for c in claims),
            "claims": [c.to_dict() for c in claims],
        }
    )


# -- mounting ---------------------------------------------------------------------------


def add_claim_routes(
    app: web.Application,
    *,
    resolver: Resolver,
    index: Index | None = None,
    settings: ClaimsSettings | None = None,
    reconcile: bool = True,
) -> None:
    """Register the claims routes on ``app`` and start the service in its ``cleanup_ctx``.

    Call it after the resolver's own ``cleanup_ctx`` entry was appended (e.g. right
    after :func:`resolver.http.create_app`): the service uses ``resolver.index`` (or
    ``index``), connected by then.  ``reconcile=False`` runs no reconciler in this app
    (another instance must run one).  Counters go to the resolver's metrics registry.
    """
    s = settings or ClaimsSettings()
    app[_SETTINGS] = s
    try:
        metrics = ClaimsMetrics(resolver.metrics.registry)
    except ValueError:  # the registry already has them (a second app on this resolver)
        metrics = ClaimsMetrics()

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        idx = index if index is not None else resolver.index
        service = ClaimService(
            index=idx,
            resolver=resolver,
            settings=s,
            metrics=metrics,
            usage=recorder_from_env(idx),  # usage receipts: $CPI_RESOLVER_USAGE_KEY
        )
        app[CLAIMS] = service
        app[_TOKENS] = TokenCache(idx, ttl_s=s.token_cache_s)
        await service.start(reconcile=reconcile)
        try:
            yield
        finally:
            await service.close()

    app.cleanup_ctx.append(lifecycle)
    app.router.add_post("/v1/claims", _guarded(post_claim), name="claims-create")
    app.router.add_get("/v1/claims", _guarded(get_claims), name="claims-list")
    app.router.add_delete("/v1/claims/{claim_id}", _guarded(delete_claim), name="claims-release")
    app.router.add_patch("/v1/claims/{claim_id}", _guarded(patch_claim), name="claims-renew")
