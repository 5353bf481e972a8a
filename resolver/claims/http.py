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
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from aiohttp import web

from registry.index import Index
from resolver import ranking
from resolver.claims.gang import GangSpec
from resolver.claims.model import InsufficientCapacityError, parse_claim_id
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
    UnknownClaimsTokenError,
)
from resolver.claims.usage import UsageRecorder, recorder_from_env
from resolver.core import Resolver
from resolver.discovery import Query
from resolver.errors import NotReadyError, QueryError
from resolver.federation import Federation, Member, parse_roots
from schemas._json import loads as strict_loads
from schemas.errors import (
    BodyTooLargeError,
    CPIError,
    RequestTimeoutError,
)
from schemas.http import bearer_token, check_utf8_json

__all__ = [
    "BODY_TIMEOUT",
    "CLAIMS",
    "ClaimRouter",
    "add_claim_routes",
    "parse_gang",
    "parse_query",
]

_log = logging.getLogger("resolver.claims_http")

CLAIMS = web.AppKey("claims", ClaimService)
"""The app's :class:`ClaimService` (set in ``cleanup_ctx``)."""
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
    "roots": (str, list),
}
_SYNC_S: Final = 1.0
"""How often a federated app starts claims services for new index clusters (and stops
those of clusters gone)."""


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


def _bearer(request: web.Request) -> str | None:
    return bearer_token(request.headers.get("Authorization", ""))


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
    obj = {k: v for k, v in obj.items() if k != "roots"}  # routing, see parse_query_roots
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


def parse_query_roots(obj: object) -> frozenset[str] | None:
    """A claim query's ``"roots"``: ``"CN,SG"`` or ``["CN", "SG"]`` (None when absent)."""
    if not isinstance(obj, dict) or "roots" not in obj:
        return None
    raw = obj["roots"]
    if isinstance(raw, list):
        if not all(isinstance(x, str) for x in raw):
            raise QueryError(f"query field 'roots' must list root names, got {raw!r}")
        raw = ",".join(raw)
    if not isinstance(raw, str):
        raise QueryError(f"query field 'roots' must be str or list, got {raw!r}")
    return parse_roots(raw)


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


# -- where a claim goes -------------------------------------------------------------------


@dataclass(slots=True)
class Cell:
    """The claims service of one index cluster, with its token cache."""

    name: str
    """The federation member (index cluster) name; ``""`` on a single-root resolver."""
    root: str
    resolver: Resolver
    service: ClaimService
    tokens: TokenCache


class ClaimRouter:
    """Which index cluster a claim request goes to (docs/claims.md, "Federation").

    On a single-root resolver there is one cell and every request goes there.  On a
    :class:`~resolver.federation.Federation` each trusted index cluster has its own
    :class:`ClaimService` on its own etcd (its ``/alloc/``, ``/holders/`` and
    ``/claimtokens/`` keys): a claim by CPID (and a release or renewal, whose claim id
    starts with the CPID) goes to the cluster serving the CPID; a claim by query to the
    clusters the query concerns.  A claims token is valid only at the cluster whose
    etcd stores it.  Services start when a cluster is first ready and stop when it
    leaves the federation (a withdrawn endorsement), checked every second and on use.
    """

    def __init__(
        self,
        resolver: Resolver | Federation,
        *,
        index: Index | None,
        settings: ClaimsSettings,
        metrics: ClaimsMetrics,
        reconcile: bool,
    ) -> None:
        self.resolver = resolver
        self._index = index
        self.settings = settings
        self.metrics = metrics
        self._reconcile = reconcile
        self.cells: dict[str, Cell] = {}
        self._closing: set[asyncio.Task[None]] = set()

    @property
    def federated(self) -> bool:
        return isinstance(self.resolver, Federation)

    def _new_cell(
        self,
        name: str,
        root: str,
        resolver: Resolver,
        index: Index,
        usage: UsageRecorder | None = None,
    ) -> Cell:
        service = ClaimService(
            index=index,
            resolver=resolver,
            settings=self.settings,
            metrics=self.metrics,
            usage=usage,
        )
        tokens = TokenCache(index, ttl_s=self.settings.token_cache_s)
        return Cell(name, root, resolver, service, tokens)

    async def start(self) -> Cell:
        """Start the first cell (the single resolver's, or the federation's home
        cluster's) and return it."""
        r = self.resolver
        # usage receipts ($CPI_RESOLVER_USAGE_KEY) are signed for the home cluster only:
        # the key's usagesigner.v1 statement is by the home root, so another root's
        # auditors could not verify them (docs/claims.md, "Federation")
        if isinstance(r, Federation):
            m = r.home_member
            index = self._index or r.home.index
            cell = self._new_cell(m.name, m.root, r.home, index, recorder_from_env(index))
        else:
            index = self._index or r.index
            cell = self._new_cell("", "", r, index, recorder_from_env(index))
        self.cells[cell.name] = cell
        await cell.service.start(reconcile=self._reconcile)
        return cell

    async def close(self) -> None:
        cells, self.cells = list(self.cells.values()), {}
        for c in cells:
            await c.service.close()
        if self._closing:
            await asyncio.wait(self._closing)

    def _retire(self, cell: Cell) -> None:
        task = asyncio.create_task(cell.service.close(), name=f"claims-close-{cell.name}")
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def cell_of(self, m: Member) -> Cell:
        """The cell of member ``m``, started if need be (503 while its replica lists)."""
        r = m.resolver
        if r is None:
            raise NotReadyError(f"index cluster {m.name} of root {m.root} is not served now")
        cell = self.cells.get(m.name)
        if cell is not None and cell.resolver is r:
            return cell
        if not r.ready:
            raise NotReadyError(
                f"index cluster {m.name} of root {m.root} has not finished listing its index"
            )
        if cell is not None:  # the member was rebuilt (a new endorsed key): a new service
            self._retire(cell)
        cell = self._new_cell(m.name, m.root, r, r.index)
        self.cells[m.name] = cell
        await cell.service.start(reconcile=self._reconcile)
        return cell

    async def sync(self) -> None:
        """Start cells for ready members, stop those of members gone or rebuilt."""
        fed = self.resolver
        if not isinstance(fed, Federation):
            return
        members = {m.name: m for m in fed.members}
        for name, cell in list(self.cells.items()):
            m = members.get(name)
            if m is None or m.resolver is not cell.resolver:
                del self.cells[name]
                self._retire(cell)
        for m in fed.members:
            if m.resolver is not None and m.resolver.ready and m.name not in self.cells:
                with contextlib.suppress(NotReadyError):
                    await self.cell_of(m)

    async def for_cpid(self, cpid: str) -> Cell:
        """The cell of the cluster serving ``cpid`` (404 for a root not trusted here)."""
        fed = self.resolver
        if not isinstance(fed, Federation):
            return self.cells[""]
        return await self.cell_of(fed.member_for(cpid))

    async def for_query(self, query: Query, roots: frozenset[str] | None) -> list[Cell]:
        """The cells of the clusters ``query`` concerns (``within``, ``roots``)."""
        fed = self.resolver
        if not isinstance(fed, Federation):
            return [self.cells[""]]
        out = []
        for m in fed.members_for(query, roots):
            with contextlib.suppress(NotReadyError):
                out.append(await self.cell_of(m))
        if not out and fed.members_for(query, roots):
            raise NotReadyError("no index cluster of this query has finished listing yet")
        return out

    async def all(self) -> list[Cell]:
        await self.sync()
        return list(self.cells.values())

    def rank(self, cells: list[Cell], query: Query, roots: frozenset[str] | None) -> list[Cell]:
        """``cells`` in the order of each one's best-ranked candidate for ``query`` (the
        federation's merged discovery); cells with no candidate keep their order, last."""
        fed = self.resolver
        if len(cells) < 2 or not isinstance(fed, Federation):
            return cells
        by_name = {c.name: c for c in cells}
        order: list[Cell] = []
        for match in fed.discover(query, roots).results:
            try:
                name = fed.member_for(match.cpid).name
            except CPIError:
                continue
            c = by_name.pop(name, None)
            if c is not None:
                order.append(c)
            if not by_name:
                break
        return order + [c for c in cells if c.name in by_name]


ROUTER = web.AppKey("claims_router", ClaimRouter)
"""The app's :class:`ClaimRouter` (set in ``cleanup_ctx``)."""


async def _token_at(cell: Cell, bearer: str | None) -> ClaimsTokenInfo:
    return await cell.tokens.lookup(bearer)


async def _accepting(cells: list[Cell], bearer: str | None) -> list[tuple[Cell, ClaimsTokenInfo]]:
    """The cells whose cluster knows this token (and it is valid there); the first
    cluster's refusal when none does."""
    out: list[tuple[Cell, ClaimsTokenInfo]] = []
    first: CPIError | None = None
    for cell in cells:
        try:
            out.append((cell, await _token_at(cell, bearer)))
        except UnknownClaimsTokenError as exc:
            first = first or exc
        except CPIError as exc:  # expired, unreadable: a clearer refusal than "unknown"
            first = exc if first is None or isinstance(first, UnknownClaimsTokenError) else first
    if not out:
        raise first or UnknownClaimsTokenError(
            "no index cluster of this request knows the claims token"
        )
    return out


# -- handlers ---------------------------------------------------------------------------


def _who(token: ClaimsTokenInfo, **extra: Any) -> dict[str, Any]:
    return {
        "holder": token.holder,
        "max_units": token.max_units,
        "within": token.within,
        **extra,
    }


async def post_claim(request: web.Request) -> web.Response:
    settings = request.app[_SETTINGS]
    router = request.app[ROUTER]
    bearer = _bearer(request)
    if not router.federated:  # the token is checked before the body is read
        await _token_at(router.cells[""], bearer)
    body = await _body(request, settings.max_body_bytes)
    first = next(iter(router.cells.values()))
    units, ttl = first.service.check_request(units=body["units"], ttl_s=body.get("ttl_s"))
    if "cpid" in body:
        cpid = body["cpid"]
        if not isinstance(cpid, str):
            raise InvalidClaimError(f'"cpid" must be a string, got {cpid!r}')
        cell = await router.for_cpid(cpid)
        token = await _token_at(cell, bearer)
        claim = await cell.service.claim(cpid, **_who(token, units=units, ttl_s=ttl))
    else:
        gang = "gang" in body
        spec = parse_gang(body["gang"], units=units) if gang else None
        limit = settings.gang_candidates if gang else settings.default_candidates
        query = parse_query(body["query"], default_limit=limit)
        roots = parse_query_roots(body["query"])
        claim = await _claim_by_query(router, bearer, query, roots, units, ttl, spec)
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


async def _claim_by_query(
    router: ClaimRouter,
    bearer: str | None,
    query: Query,
    roots: frozenset[str] | None,
    units: int,
    ttl: int,
    spec: GangSpec | None,
) -> Claim:
    """A claim (or gang) by query: tried cluster by cluster, in the order of each
    cluster's best-ranked candidate, until one takes it whole; a gang never spans
    clusters (it is one etcd transaction).  The refusal is the one with most free."""
    if not router.federated and roots is not None:
        if query.within is not None and query.within.partition(".")[0] not in roots:
            raise InsufficientCapacityError(
                f"the query's within={query.within} is outside roots={','.join(sorted(roots))}",
                cpid=None,
                requested=units,
                free=0,
            )
        if query.within is None and len(roots) == 1:
            query = dataclasses.replace(query, within=next(iter(roots)))
    accepted = await _accepting(await router.for_query(query, roots), bearer)
    if len(accepted) > 1:
        s = router.settings
        probe = dataclasses.replace(
            query,
            min_free=max(query.min_free or 0, spec.per_min if spec else units),
            live=True,
            limit=min(query.limit, s.max_gang_candidates if spec else s.max_candidates),
        )
        infos = {c.name: t for c, t in accepted}
        order = router.rank([c for c, _ in accepted], probe, roots)
        accepted = [(c, infos[c.name]) for c in order]
    refusals: list[ClaimConflictError] = []
    for cell, token in accepted:
        q = query
        if router.federated and q.within is None and token.within is None:
            prefixes = _prefixes(router, cell)
            if len(prefixes) == 1:
                q = dataclasses.replace(q, within=prefixes[0])
        try:
            if spec is not None:
                return await cell.service.claim_gang(q, spec=spec, **_who(token, ttl_s=ttl))
            return await cell.service.claim_query(q, **_who(token, units=units, ttl_s=ttl))
        except ClaimConflictError as exc:
            if len(accepted) == 1:
                raise
            refusals.append(exc)
    best = max(refusals, key=lambda e: e.free)
    raise type(best)(
        f"no index cluster could take the claim ({len(refusals)} tried); the best: {best}",
        cpid=best.cpid,
        requested=best.requested,
        free=best.free,
        available=best.available,
    )


def _prefixes(router: ClaimRouter, cell: Cell) -> list[str]:
    fed = router.resolver
    if not isinstance(fed, Federation):
        return []
    m = next((m for m in fed.members if m.name == cell.name), None)
    return [] if m is None else list(m.spec.prefixes)


async def _cell_of_claim(request: web.Request) -> tuple[Cell, ClaimsTokenInfo]:
    """The cell of a claim id (the CPID it starts with names the cluster) and the token."""
    router = request.app[ROUTER]
    bearer = _bearer(request)
    if not router.federated:
        cell = router.cells[""]
        return cell, await _token_at(cell, bearer)
    cell = await router.for_cpid(parse_claim_id(request.match_info["claim_id"]))
    return cell, await _token_at(cell, bearer)


async def patch_claim(request: web.Request) -> web.Response:
    """Renew: ``{"ttl_s": N}`` -> the claim (single or gang) expires N s from now."""
    settings = request.app[_SETTINGS]
    cell, token = await _cell_of_claim(request)
    body = await _json_object(request, settings.max_body_bytes)
    unknown = sorted(set(body) - _RENEW_FIELDS)
    if unknown:
        raise InvalidClaimError(f"unknown field(s) {', '.join(map(repr, unknown))}; expected ttl_s")
    if "ttl_s" not in body:
        raise InvalidClaimError('"ttl_s" is required (seconds from now)')
    claim = await cell.service.renew(
        request.match_info["claim_id"], holder=token.holder, ttl_s=body["ttl_s"]
    )
    _log.info("claim %s renewed by %s until %d", claim.claim_id, claim.holder, claim.expires_at)
    return web.json_response(_created(claim))


async def delete_claim(request: web.Request) -> web.Response:
    cell, token = await _cell_of_claim(request)
    claim = await cell.service.release(request.match_info["claim_id"], holder=token.holder)
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
    """The token holder's claims; on a federation, at every cluster that knows the token
    (each claim then names its ``root``), ``?roots=`` restricting them."""
    router = request.app[ROUTER]
    bearer = _bearer(request)
    _only(request.query, {"holder", "roots"} if router.federated else {"holder"})
    if not router.federated:
        cells = [(router.cells[""], await _token_at(router.cells[""], bearer))]
    else:
        roots = parse_roots(request.query["roots"]) if "roots" in request.query else None
        wanted = [c for c in await router.all() if roots is None or c.root in roots]
        cells = await _accepting(wanted, bearer)
    holder = request.query.get("holder", cells[0][1].holder)
    listed: list[dict[str, Any]] = []
    units = 0
    for cell, token in cells:
        if holder != token.holder:
            raise ClaimForbiddenError(
                f"this token lists the claims of holder {token.holder}, not of {holder}"
            )
        for c in await cell.service.list_claims(holder):
            units += c.units
            d = c.to_dict()
            if router.federated:
                d["root"] = cell.root
            listed.append(d)
    if len(cells) > 1:
        listed.sort(key=lambda d: (d["created_at"], d["claim_id"]))
    return web.json_response({"holder": holder, "units": units, "claims": listed})


# -- mounting ---------------------------------------------------------------------------


def add_claim_routes(
    app: web.Application,
    *,
    resolver: Resolver | Federation,
    index: Index | None = None,
    settings: ClaimsSettings | None = None,
    reconcile: bool = True,
) -> None:
    """Register the claims routes on ``app`` and start the service in its ``cleanup_ctx``.

    Call it after the resolver's own ``cleanup_ctx`` entry was appended (e.g. right
    after :func:`resolver.http.create_app`): the service uses ``resolver.index`` (or
    ``index``), connected by then.  With a :class:`~resolver.federation.Federation`
    each index cluster gets its own service (:class:`ClaimRouter`); :data:`CLAIMS` is
    the home cluster's.  ``reconcile=False`` runs no reconciler in this app (another
    instance must run one).  Counters go to the resolver's metrics registry.
    """
    s = settings or ClaimsSettings()
    app[_SETTINGS] = s
    try:
        metrics = ClaimsMetrics(resolver.metrics.registry)
    except ValueError:  # the registry already has them (a second app on this resolver)
        metrics = ClaimsMetrics()

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        router = ClaimRouter(
            resolver, index=index, settings=s, metrics=metrics, reconcile=reconcile
        )
        app[ROUTER] = router
        app[CLAIMS] = (await router.start()).service
        syncer = asyncio.create_task(_sync_loop(router)) if router.federated else None
        try:
            yield
        finally:
            if syncer is not None:
                syncer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await syncer
            await router.close()

    app.cleanup_ctx.append(lifecycle)
    app.router.add_post("/v1/claims", _guarded(post_claim), name="claims-create")
    app.router.add_get("/v1/claims", _guarded(get_claims), name="claims-list")
    app.router.add_delete("/v1/claims/{claim_id}", _guarded(delete_claim), name="claims-release")
    app.router.add_patch("/v1/claims/{claim_id}", _guarded(patch_claim), name="claims-renew")


async def _sync_loop(router: ClaimRouter) -> None:
    while True:
        try:
            await router.sync()
        except Exception:
            _log.exception("claims: starting the services of new index clusters failed")
        await asyncio.sleep(_SYNC_S)
