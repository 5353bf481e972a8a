"""The resolver's HTTP service (docs/protocol.md §8): lookups, discovery, watches.

Routes (all ``GET``):

* ``/v1/resources/{cpid}`` -> ``{"record", "chain", "status", "live", "revision"}``:
  the signed record, its cert chain and the node-signed status, as envelopes, so a
  client holding only the anchor can verify it.  The body is rendered once per entry
  state and served as prepared bytes.  ``400 invalid_cpid``, ``404 not_found``.
* ``/v1/discover?kind=&within=&accelerator=&min_free=&near=&max_latency_ms=&label=k:v&live=&limit=&sort=&weights=``
  -> ``{"results": [{"cpid", "score", "free", "latency_ms", "record", ..., "rank"}], "revision", "ranking"}``.
* ``/v1/watch?<same filters>`` -> ``text/event-stream``: ``put``/``delete`` events
  (``id:`` = etcd revision), ``relist`` when the requested position is gone; resumable
  with ``Last-Event-ID`` (or ``?since=``).  See ``docs/resolver.md``.
* ``/v1/endorsements``: the ``endorsement.v1`` envelopes a federated resolver serves
  other roots under (empty otherwise).
* ``/healthz`` (the process runs), ``/readyz`` (503 until the first listing is applied,
  and while etcd is unreachable), ``/metrics`` (Prometheus text).

With ``anchor_bundle`` in the config the app serves a :class:`~resolver.federation.Federation`
of roots instead of one :class:`~resolver.core.Resolver`; ``roots=CN,SG`` restricts
discovery and watches on either (docs/resolver.md, "Federation").

With ``dns_port`` set in the config, the DNS front end (:mod:`resolver.dns`, UDP and TCP)
runs in the same process and starts and stops with the app (``docs/dns.md``).

While etcd is unreachable, answers carry ``"stale": true`` and ``X-CPI-Stale: 1``.
Errors are ``{"error": {"code", "message"}}``, mapped from :mod:`schemas.errors` by one
function (:func:`error_answer`).  It is not an aiohttp middleware: any middleware makes
aiohttp wrap *every* request in two more coroutines (the middleware and its own
``current_app`` fixer), a fifth of the cost of a cached lookup.  The lookup handler
calls it itself; every other route is wrapped with :func:`json_errors`; a catch-all
route answers unknown paths (404) and methods (405) the same way.  For the same reason
request ids (``X-Request-Id``) and the per-route counts and timings
(:mod:`schemas.observe`) are not a middleware either: the lookup handler does them
inline, and :func:`create_app` wraps every other route's handler once (:func:`observed`).
The lookup's route is matched by its prefix (:class:`_LookupResource`), not by a regular
expression, and its answer is made with all its headers at once (docs/resolver.md,
"Performance").
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import heapq
import json
import logging
import time
from bisect import bisect_left
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from typing import Any, Final

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from registry.index import Index
from resolver.audit.log import add_log_routes
from resolver.claims.http import BODY_TIMEOUT, add_claim_routes
from resolver.config import ResolverConfig
from resolver.core import DiscoveryResult, Resolver, ResolverSettings
from resolver.discovery import LatencyTable, Query
from resolver.dns.server import DnsServer
from resolver.errors import NotReadyError, QueryError, TooManyWatchesError, WatchCapacityError
from resolver.events import Event, parse_cursor
from resolver.federation import Federation, parse_fed_cursor, parse_roots
from resolver.metrics import ResolverMetrics
from resolver.openapi import openapi_handler
from resolver.ui import add_ui_routes
from schemas.errors import (
    CPIError,
    NotFoundError,
)
from schemas.observe import BUCKETS, REQUEST_ID, REQUEST_ID_HEADER, request_id, route_label

__all__ = [
    "CONFIG",
    "DNS",
    "RESOLVER",
    "create_app",
    "error_answer",
    "json_errors",
    "render_event",
]

_log = logging.getLogger("resolver.http")

CONFIG = web.AppKey("config", ResolverConfig)
AnyResolver = Resolver | Federation
"""One root's resolver, or a federation of roots (``anchor_bundle``, resolver.federation)."""
RESOLVER: web.AppKey[AnyResolver] = web.AppKey("resolver")
DNS = web.AppKey("dns", DnsServer)
"""The DNS front end, present when the config has a ``dns_port`` (its ``port`` once started)."""
_METRICS = web.AppKey("metrics", ResolverMetrics)
_STREAMS: web.AppKey[set[asyncio.Task[Any]]] = web.AppKey("streams")
_WATCHERS: web.AppKey[dict[str, int]] = web.AppKey("watchers_per_address")
_RID = web.RequestKey("request_id", str)

STALE_HEADER: Final = "X-CPI-Stale"
_JSON: Final = "application/json"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _error(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    return web.Response(body=body, status=status, content_type=_JSON, headers=headers)


def _json(obj: Any, *, status: int = 200, stale: bool = False) -> web.Response:
    resp = web.Response(
        body=json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode(),
        status=status,
        content_type=_JSON,
    )
    if stale:
        resp.headers[STALE_HEADER] = "1"
    return resp


def error_answer(request: web.Request, exc: CPIError | web.HTTPException) -> web.Response:
    """The JSON answer for an error of the tree (counted per route and code, logged when
    it is ours, 5xx) or for one of aiohttp's HTTP errors."""
    if isinstance(exc, web.HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status, "http_error")
        allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None  # 405
        return _error(exc.status, code, f"{request.method} {request.path}: {exc.reason}", allow)
    status = exc.http_status
    route = request.match_info.route.name or "other"
    request.app[_METRICS].errors.labels(route, exc.code).inc()
    if isinstance(exc, NotFoundError):
        request.app[_METRICS].not_found.inc()
    if status >= 500:
        extra = {"route": route, "status": status, "outcome": exc.code}
        _log.warning("%s %s: %s", request.method, request.path, exc, extra=extra)
    return _error(status, exc.code, str(exc))


def json_errors(handler: Handler) -> Handler:
    """``handler`` answering the error tree and aiohttp's HTTP errors (>= 400) as JSON."""

    @functools.wraps(handler)
    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except CPIError as exc:
            return error_answer(request, exc)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return error_answer(request, exc)

    return wrapped


def observed(handler: Handler, template: str) -> Handler:
    """``handler`` with a request id (``X-Request-Id``, echoed, in :data:`REQUEST_ID` for
    the log lines) and counted and timed under ``template`` (:mod:`schemas.observe`).
    Not a middleware (see the module doc): :func:`create_app` wraps each route's handler
    but the lookup's, which does the same itself."""
    if getattr(handler, "_observed", False):
        return handler

    async def wrapped(request: web.Request) -> web.StreamResponse:
        t0 = time.perf_counter()
        rid = request_id(request.headers)
        REQUEST_ID.set(rid)
        request[_RID] = rid  # for the handlers that prepare their own stream (watch)
        observe = request.app[_METRICS].requests.observe
        try:
            resp = await handler(request)
        except web.HTTPException as exc:  # redirects, and errors of handlers not wrapped
            exc.headers[REQUEST_ID_HEADER] = rid
            observe(template, request.method, exc.status, time.perf_counter() - t0)
            raise
        except Exception:
            observe(template, request.method, 500, time.perf_counter() - t0)
            raise
        except asyncio.CancelledError:  # the client went away (a watch, mostly)
            observe(template, request.method, 499, time.perf_counter() - t0)
            raise
        if not resp.prepared:
            resp.headers[REQUEST_ID_HEADER] = rid
        observe(template, request.method, resp.status, time.perf_counter() - t0)
        return resp

    wrapped._observed = True  # type: ignore[attr-defined]
    return wrapped


def _observe_routes(app: web.Application) -> None:
    """Wrap every route's handler but the lookup's with :func:`observed`."""
    for route in app.router.routes():
        if not isinstance(route, web.ResourceRoute) or route.resource is None:
            continue
        if route.resource.name == "resource":  # GET and HEAD: the handler does it
            continue
        template = "other" if route.name == "other" else route_label(route.resource)
        route._handler = observed(route.handler, template)  # type: ignore[assignment]


async def _no_route(request: web.Request) -> web.Response:
    """The catch-all route: 405 when another route has the path, else 404 (as JSON)."""
    allowed: set[str] = set()
    for resource in request.app.router.resources():
        if resource is not request.match_info.route.resource:
            allowed |= (await resource.resolve(request))[1]
    if allowed:
        return error_answer(request, web.HTTPMethodNotAllowed(request.method, allowed))
    return error_answer(request, web.HTTPNotFound())


# -- handlers ---------------------------------------------------------------------------


_RESOURCES: Final = "/v1/resources/"
"""The lookup route's path up to the CPID (the CPID is the rest of the path, any text)."""


class _LookupResource(web.DynamicResource):
    """``/v1/resources/{cpid}``, matched by its prefix.

    The same match as the :class:`~aiohttp.web.DynamicResource` of that template with
    ``cpid`` = ``(?s:.+)`` (``tests/resolver/test_http_fast.py`` holds them side by
    side), without its regular expression and per-part unquoting: ``cpid`` is the rest
    of the decoded path, which is what the pattern's one group decodes to.
    """

    def __init__(self, *, name: str) -> None:
        super().__init__(_RESOURCES + "{cpid:(?s:.+)}", name=name)
        self._by_method: dict[str, web.ResourceRoute] = {}
        self._methods: set[str] = set()

    def register_route(self, route: web.ResourceRoute) -> None:
        super().register_route(route)
        self._by_method[route.method] = route
        self._methods.add(route.method)

    async def resolve(
        self, request: web.Request
    ) -> tuple[web.UrlMappingMatchInfo | None, set[str]]:
        url = request.rel_url
        # the undecoded "/" and "%" of a path stay escaped in path_safe: a path
        # whose "/v1/resources/" is spelt with "%2F" is not this route's, as with the pattern
        path = url.path_safe
        if len(path) <= len(_RESOURCES) or not path.startswith(_RESOURCES):
            return None, set()
        route = self._by_method.get(request.method)
        if route is None:
            return None, self._methods
        cpid = path[len(_RESOURCES) :]
        if "%" in cpid:  # an escaped "/" or "%" is left in path_safe: decode it
            cpid = url.path[len(_RESOURCES) :]
        return web.UrlMappingMatchInfo({"cpid": cpid}, route), self._methods


def _resource_handler(resolver: AnyResolver) -> Handler:
    """``GET /v1/resources/{cpid}``, the hot path: a dictionary lookup and bytes rendered
    once per entry.  The resolver is bound here rather than looked up per request, and
    the error tree is answered here (no wrapper).  The answer's headers are given to
    the response whole (no header set after it is made); the GET counters are updated
    inline (a slot bound here), HEAD's through :meth:`~schemas.observe.RequestStats.observe`.
    """
    metrics = resolver.metrics
    observe = metrics.requests.observe
    clock = time.perf_counter
    template = "/v1/resources/{cpid}"
    counts, hist = metrics.requests.slot(template, "GET")  # GET's counters, updated inline
    buckets = BUCKETS
    resolve = resolver.resolve
    response = web.Response
    content_type = "Content-Type"

    async def get_resource(request: web.Request) -> web.Response:
        t0 = clock()
        rid = request_id(request.headers)
        try:
            entry = resolve(request.match_info["cpid"])
        except CPIError as exc:
            REQUEST_ID.set(rid)
            resp = error_answer(request, exc)
            resp.headers[REQUEST_ID_HEADER] = rid
            status = resp.status
        else:
            metrics.records_served += 1
            if resolver.stale:
                resp = response(
                    body=entry.body(stale=True),
                    headers=(
                        (content_type, _JSON),
                        (STALE_HEADER, "1"),
                        (REQUEST_ID_HEADER, rid),
                    ),
                )
            else:
                resp = response(
                    body=entry.body(), headers=((content_type, _JSON), (REQUEST_ID_HEADER, rid))
                )
            status = 200
        if request.method == "GET":
            counts[status] = counts.get(status, 0) + 1
            dt = clock() - t0
            hist[bisect_left(buckets, dt)] += 1
            hist[-1] += dt
        else:  # HEAD
            observe(template, request.method, status, clock() - t0)
        return resp

    return get_resource


def _query(request: web.Request, *, ignore: tuple[str, ...] = ()) -> Query:
    config = request.app[CONFIG]
    return Query.from_params(
        [(k, v) for k, v in request.query.items() if k not in (*ignore, "roots")],
        default_limit=config.discover_default_limit,
        max_limit=config.discover_max_limit,
    )


def _roots(request: web.Request) -> frozenset[str] | None:
    """``roots=CN,SG`` (given at most once), or None."""
    given = request.query.getall("roots", [])
    if len(given) > 1:
        raise QueryError("query parameter 'roots' is given more than once")
    return parse_roots(given[0]) if given else None


def discover_in_roots(
    resolver: AnyResolver, query: Query, roots: frozenset[str] | None
) -> DiscoveryResult:
    """Discovery restricted to ``roots``; a single-root resolver runs one query per root
    (``within=<root>``) and merges them by the ranking, as a federation does."""
    if isinstance(resolver, Federation):
        return resolver.discover(query, roots)
    if roots is None:
        return resolver.discover(query)
    if query.within is not None:
        if query.within.partition(".")[0] not in roots:
            return DiscoveryResult([], resolver.revision, resolver.stale)
        return resolver.discover(query)
    parts = [resolver.discover(replace(query, within=r)) for r in sorted(roots)]
    merged = heapq.merge(*(p.results for p in parts), key=lambda m: (-m.score, m.cpid))
    return DiscoveryResult(list(merged)[: query.limit], resolver.revision, resolver.stale)


async def get_discover(request: web.Request) -> web.Response:
    query = _query(request)
    result = discover_in_roots(request.app[RESOLVER], query, _roots(request))
    resp = web.Response(body=result.to_json(), content_type=_JSON)
    if result.stale:
        resp.headers[STALE_HEADER] = "1"
    return resp


def render_event(event: Event) -> bytes:
    """One SSE message.  ``id:`` is sent on the last event of each revision group only,
    so a client's ``Last-Event-ID`` always names a fully delivered revision."""
    if event.type == "progress":
        return f": progress\nid: {event.id}\n\n".encode()
    lines = [f"event: {event.type}"]
    if event.final or event.type == "relist":
        lines.append(f"id: {event.id}")
    data = json.dumps(event.to_dict(), separators=(",", ":"), ensure_ascii=False)
    lines.append(f"data: {data}")
    return ("\n".join(lines) + "\n\n").encode()


def _closed(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


async def get_watch(request: web.Request) -> web.StreamResponse:
    """``GET /v1/watch``: a server-sent event stream (see the module doc).

    Each watch takes one of ``max_watchers`` slots and one of its client address's
    ``max_watchers_per_address``; the slot is freed as soon as the client goes away.
    The handler wakes at least once a second to check the connection, and sends a
    ``: ping`` comment after ``watch_ping_s`` without a write, so a dead peer fails a
    write; a write that cannot be sent within ``watch_write_timeout_s`` (a client that
    does not read) closes the connection.
    """
    resolver = request.app[RESOLVER]
    config = request.app[CONFIG]
    query = _query(request, ignore=("since",))
    if query.sort is not None or query.weights:
        raise QueryError("sort and weights order a discovery answer; a watch has no order")
    roots = _roots(request)
    since_text = request.headers.get("Last-Event-ID") or request.query.get("since")
    if isinstance(resolver, Federation):
        fed_since = parse_fed_cursor(since_text) if since_text else None
    else:
        since = parse_cursor(since_text) if since_text else None
    if not resolver.ready:
        raise NotReadyError("the resolver has not finished listing the index yet")
    streams = request.app[_STREAMS]
    per_address = request.app[_WATCHERS]
    address = request.remote or "unknown"
    if per_address.get(address, 0) >= config.max_watchers_per_address:
        raise TooManyWatchesError(
            f"client address {address} has {per_address[address]} open watches, at most "
            f"{config.max_watchers_per_address} allowed; close one first"
        )
    if len(streams) >= config.max_watchers:
        raise WatchCapacityError(
            f"too many open watches ({len(streams)}, at most {config.max_watchers}); "
            "try again later"
        )
    resp = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
        }
    )
    if resolver.stale:
        resp.headers[STALE_HEADER] = "1"
    if _RID in request:
        resp.headers[REQUEST_ID_HEADER] = request[_RID]
    task = asyncio.current_task()
    assert task is not None
    streams.add(task)
    per_address[address] = per_address.get(address, 0) + 1
    metrics = request.app[_METRICS]
    metrics.watchers.inc()
    loop = asyncio.get_running_loop()
    heartbeat = config.watch_heartbeat_s
    if isinstance(resolver, Federation):
        events = aiter(resolver.watch(query, since=fed_since, heartbeat=heartbeat, roots=roots))
    else:
        events = aiter(_in_roots(resolver.watch(query, since=since, heartbeat=heartbeat), roots))
    pending: asyncio.Future[Event] | None = None
    check_s = min(1.0, config.watch_ping_s)

    async def write(data: bytes) -> None:
        async with asyncio.timeout(config.watch_write_timeout_s):
            await resp.write(data)

    try:
        await resp.prepare(request)
        await write(b"retry: 1000\n\n")
        last_write = loop.time()
        buffer: list[bytes] = []
        while True:
            if pending is None:
                pending = asyncio.ensure_future(anext(events))
            done, _ = await asyncio.wait((pending,), timeout=check_s)
            if _closed(request):
                break
            if not done:
                if loop.time() - last_write >= config.watch_ping_s:
                    await write(b": ping\n\n")
                    last_write = loop.time()
                continue
            try:
                event = pending.result()
            except StopAsyncIteration:
                break
            finally:
                pending = None
            buffer.append(render_event(event))
            if event.final or event.type in ("relist", "progress"):
                await write(b"".join(buffer))
                buffer.clear()
                last_write = loop.time()
    except ConnectionResetError:
        pass  # the client went away
    except TimeoutError:  # the client does not read: drop the connection (and its buffer)
        transport = request.transport
        if transport is not None:
            transport.abort()
    finally:
        if pending is not None:
            pending.cancel()
            with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration, Exception):
                await pending
        with contextlib.suppress(Exception):
            await events.aclose()  # type: ignore[attr-defined]
        streams.discard(task)
        n = per_address.get(address, 0) - 1
        if n > 0:
            per_address[address] = n
        else:
            per_address.pop(address, None)
        metrics.watchers.dec()
    return resp


async def _in_roots(
    events: AsyncIterator[Event], roots: frozenset[str] | None
) -> AsyncIterator[Event]:
    """The events of ``events`` whose CPID is under one of ``roots`` (control events too)."""
    async for ev in events:
        if roots is None or not ev.cpid or ev.cpid[:2] in roots:
            yield ev


async def get_endorsements(request: web.Request) -> web.Response:
    """``GET /v1/endorsements`` (docs/protocol.md §10): empty on a single-root resolver."""
    r = request.app[RESOLVER]
    return _json({"endorsements": r.endorsements() if isinstance(r, Federation) else []})


async def healthz(request: web.Request) -> web.Response:
    return _json({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    resolver = request.app[RESOLVER]
    health = resolver.health()
    if health["ready"]:
        return _json(health, stale=False)
    why = (
        "etcd is unreachable; answers are stale"
        if health["listed"]
        else "first listing of the index not done yet"
    )
    if health.get("not_ready"):
        why = f"not ready: {', '.join(health['not_ready'])} ({why} for those; the others serve)"
    health["error"] = {"code": "not_ready", "message": why}
    return _json(health, status=503, stale=health["stale"])


async def get_metrics(request: web.Request) -> web.Response:
    return web.Response(
        body=request.app[_METRICS].render(), headers={"Content-Type": CONTENT_TYPE_LATEST}
    )


# -- life cycle -------------------------------------------------------------------------


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    resolver = app[RESOLVER]
    await resolver.start()
    try:
        yield
    finally:
        await resolver.close()


async def _dns_lifecycle(app: web.Application) -> AsyncIterator[None]:
    """The DNS front end runs while the app does (after the resolver starts, closed before it)."""
    server = app[DNS]
    await server.start()
    try:
        yield
    finally:
        await server.close()


async def _end_streams(app: web.Application) -> None:
    """At shutdown: end every watch stream, so the server does not wait on them."""
    app[RESOLVER].end_watches()
    streams = app[_STREAMS]
    tasks = [*streams]
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task


def federation_from_config(
    config: ResolverConfig, *, metrics: ResolverMetrics | None = None
) -> Federation:
    """The federation of ``config.anchor_bundle``'s roots (the bundle checked first)."""
    assert config.anchor_bundle is not None
    latency = LatencyTable.from_file(config.latency_table_path())
    return Federation.from_bundle(
        config.anchor_bundle,
        latency=latency,
        settings=ResolverSettings.from_config(config),
        metrics=metrics,
    )


def _root_log_index(app: web.Application, root: str) -> Index | None:
    """The index holding ``root``'s transparency log (``/v1/log/...?root=``)."""
    fed = app[RESOLVER]
    assert isinstance(fed, Federation)
    m = fed.root_member(root)
    if m is None or m.resolver is None or not m.active(time.time()):
        return None
    return m.resolver.index


def create_app(
    config: ResolverConfig, *, resolver: AnyResolver | None = None, primary: bool = True
) -> web.Application:
    """The resolver app for ``config``.

    The resolver (built from ``config`` unless given) starts in ``cleanup_ctx``: the app
    serves at once, answering 503 until the first listing of the index is applied.
    The transparency-log routes (``/v1/log/...``, :mod:`resolver.audit.log`) and the
    claims routes (``/v1/claims``, :mod:`resolver.claims.http`) are mounted too.
    ``primary=False`` (the other processes of ``cpi resolver serve --workers N``) runs
    neither the DNS front end nor the claims reconciler: one process of the group does.
    """
    app = web.Application()
    r: AnyResolver
    if resolver is not None:
        r = resolver
    elif config.anchor_bundle is not None:
        r = federation_from_config(config)
    else:
        r = Resolver.from_config(config)
    app[CONFIG] = config
    app[RESOLVER] = r
    app[_METRICS] = r.metrics
    streams: set[asyncio.Task[Any]] = set()
    app[_STREAMS] = streams
    app[_WATCHERS] = {}
    app.cleanup_ctx.append(_lifecycle)
    if config.dns_port is not None and primary:
        app[DNS] = DnsServer(
            r,
            host=config.dns_host,
            port=config.dns_port,
            zone=config.zone,
            rrl_responses_per_s=config.dns_rrl_responses_per_s,
            rrl_slip=config.dns_rrl_slip,
            max_udp_ratio=config.dns_max_udp_ratio,
            tcp_idle_s=config.dns_tcp_idle_s,
            max_tcp_per_client=config.dns_tcp_max_per_client,
            max_tcp_clients=config.dns_tcp_max_clients,
        )
        app.cleanup_ctx.append(_dns_lifecycle)
    app.on_shutdown.append(_end_streams)
    # (?s): a CPID with a newline in it is an invalid CPID too, not a path of no route
    lookup = _LookupResource(name="resource")
    app.router.register_resource(lookup)
    get_resource = _resource_handler(r)
    lookup.add_route("HEAD", get_resource)  # as add_get does: HEAD, then GET
    lookup.add_route("GET", get_resource)
    app.router.add_get("/v1/discover", json_errors(get_discover), name="discover")
    app.router.add_get("/v1/watch", json_errors(get_watch), name="watch")
    app.router.add_get("/v1/endorsements", json_errors(get_endorsements), name="endorsements")
    app.router.add_get("/healthz", json_errors(healthz), name="healthz")
    app.router.add_get("/readyz", json_errors(readyz), name="readyz")
    app.router.add_get("/metrics", json_errors(get_metrics), name="metrics")
    app.router.add_get("/openapi.json", openapi_handler(), name="openapi")
    # after the resolver's cleanup_ctx entry: both use its index once it is connected;
    # their handlers answer the error tree themselves
    add_log_routes(
        app,
        index=lambda a: a[RESOLVER].index,
        root_index=_root_log_index if isinstance(r, Federation) else None,
    )
    app[BODY_TIMEOUT] = config.body_timeout_s
    # claims live in the index cluster of the resource claimed (one service per cluster)
    add_claim_routes(app, resolver=r, reconcile=primary)
    add_ui_routes(app, config)  # the web console at /ui/, /v1/anchor (docs/console.md)
    # last: unknown routes, newlines in the path included
    app.router.add_route("*", "/{path:(?s:.*)}", _no_route, name="other")
    _observe_routes(app)
    return app
