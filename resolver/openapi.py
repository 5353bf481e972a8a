"""The resolver's OpenAPI 3.1 description: one entry per route (docs/protocol.md §8).

:data:`OPERATIONS` describes each route of :func:`resolver.http.create_app`, including
the claims routes (:mod:`resolver.claims.http`) and the log routes
(:mod:`resolver.audit.log`); :func:`description` joins it with the routes the app really
has (:func:`schemas.openapi.build` refuses a route without an entry and an entry without
a route).  The catch-all route that answers unknown paths (404) and methods (405) is not
an operation and is left out.  ``GET /v1/watch`` is documented as ``text/event-stream``
with a schema of one event's fields (``event``, ``id``, ``data``); the JSON inside
``data`` is specified in docs/resolver.md, not by a schema.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any, Final

from aiohttp import web

from schemas import api
from schemas.jsonschema import CPID_PATTERN
from schemas.openapi import (
    METRICS,
    SELF_DESCRIPTION,
    Body,
    Operation,
    Param,
    Reply,
    build,
    routes_of,
)

__all__ = ["OPERATIONS", "description", "openapi_handler"]

TITLE: Final = "CPI resolver"
VERSION: Final = "1"
_ABOUT: Final = (
    "Read side: lookups, discovery, watches (SSE), claims and the transparency log. "
    'Errors are {"error": {"code", "message"}}; answers carry "stale": true and '
    "X-CPI-Stale: 1 while etcd is unreachable (docs/resolver.md)."
)

_STALE: Final = {"X-CPI-Stale": {"type": "string", "enum": ["1"]}}
_INT: Final = {"type": "string", "pattern": "^[0-9]+$"}


def _q(name: str, description: str, schema: dict[str, Any] | None = None) -> Param:
    return Param(name, "query", schema or {"type": "string"}, description)


_ROOT: Final = _q(
    "root",
    "a federated resolver: this root's log, from its own index (default: the home root's)",
    {"type": "string", "pattern": "^[A-Za-z0-9]{1,32}$"},
)


_FILTERS: Final = (
    _q("kind", "resource kind, e.g. GPU (any case)"),
    _q("within", "namespace prefix the CPID must lie under, e.g. CN.31"),
    _q("accelerator", "accelerator model, e.g. H100"),
    _q("min_free", "at least this many free accelerator units", {"type": "integer"}),
    _q("near", "region code to rank by latency from, e.g. 31"),
    _q("max_latency_ms", "drop results estimated slower than this", {"type": "number"}),
    Param(
        "label",
        "query",
        {"type": "array", "items": {"type": "string", "pattern": "^[^:]*:.*$"}},
        "key:value (repeatable)",
    ),
    _q("live", "only live (true) or not-live (false) nodes", {"type": "boolean"}),
    _q("limit", "at most this many results", {"type": "integer", "minimum": 1}),
    _q(
        "roots",
        "only these roots, comma-separated, e.g. CN,SG (a federated resolver; docs/resolver.md)",
        {"type": "string", "pattern": "^[A-Za-z]{2}(,[A-Za-z]{2})*$"},
    ),
)
_ORDER: Final = (
    _q(
        "sort",
        "order of the results (docs/resolver.md, Ranking): default (0.6 latency + 0.4 free), "
        "latency (needs near), free, score (CATS level 2, cpi-cats-v1), price, carbon",
        {"type": "string", "enum": ["default", "latency", "free", "score", "price", "carbon"]},
    ),
    _q(
        "weights",
        "level 2 weights for sort=score (implied), e.g. latency:2,price:1; names: compute "
        "(free), communication (latency, network), cost (price), energy (carbon); each 0 or 0.001-100",
        {"type": "string", "pattern": "^[a-z]+:[0-9.eE+-]+(,[a-z]+:[0-9.eE+-]+)*$"},
    ),
)
_POS: Final = "[0-9]+(\\.[0-9]+)?"
_FED: Final = (
    f"[A-Za-z0-9][A-Za-z0-9_.-]{{0,31}}:{_POS}(,[A-Za-z0-9][A-Za-z0-9_.-]{{0,31}}:{_POS})*"
)
_CURSOR: Final = {"type": "string", "pattern": f"^({_POS}|{_FED})$"}
_RESUME: Final = {"type": "string", "pattern": f"^({_POS}|{_FED})?$"}
_EVENT: Final = {
    "description": "one server-sent event; data is the event as JSON text (docs/resolver.md)",
    "type": "object",
    "required": ["event", "data"],
    "properties": {
        "event": {"enum": ["put", "delete", "relist"]},
        "id": _CURSOR,
        "data": {"type": "string", "contentMediaType": "application/json"},
    },
}
_CLAIMS_AUTH: Final = {401: {"WWW-Authenticate": {"type": "string"}}}

OPERATIONS: Final[dict[tuple[str, str], Operation]] = {
    ("GET", "/v1/resources/{cpid}"): Operation(
        summary="Look up a resource: its signed record, chain and status",
        params=(
            Param(
                "cpid",
                "path",
                {"type": "string", "pattern": CPID_PATTERN},
                "e.g. CN.31.CMCC/GPU.0123456789AB-C",
            ),
        ),
        replies={200: Reply("the bundle", api.ResourceBundle, headers=_STALE)},
        errors=(400, 404, 503),
        tags=("lookup",),
    ),
    ("GET", "/v1/discover"): Operation(
        summary="Discover resources matching filters, best first",
        params=(*_FILTERS, *_ORDER),
        replies={200: Reply("the matches", api.DiscoverAnswer, headers=_STALE)},
        errors=(400, 503),
        tags=("lookup",),
    ),
    ("GET", "/v1/watch"): Operation(
        summary="Watch changes matching filters (server-sent events)",
        description="put/delete events with etcd revisions as ids, relist when the "
        "position is gone; resume with Last-Event-ID or since= (docs/resolver.md)",
        params=(
            *_FILTERS,
            _q("since", "resume after this event id (empty: from now)", _RESUME),
            Param(
                "Last-Event-ID",
                "header",
                _RESUME,
                "resume after this event id; empty (an SSE client's reset id): from now",
            ),
        ),
        replies={
            200: Reply(
                "an endless event stream",
                media="text/event-stream",
                schema=_EVENT,
                headers=_STALE,
            )
        },
        errors=(400, 429, 503),
        tags=("lookup",),
    ),
    ("POST", "/v1/claims"): Operation(
        summary="Claim units of a resource (by CPID or by query), or a gang over several",
        security="bearerAuth",
        body=Body(
            api.ClaimRequest,
            'exactly one of "cpid" and "query", with "units"; "gang" (with "query") claims '
            '"units" in total over several resources, all or nothing',
        ),
        replies={201: Reply("the claim", api.ClaimCreated)},
        errors=(400, 401, 403, 404, 408, 409, 413, 429, 503),
        error_headers=_CLAIMS_AUTH,
        tags=("claims",),
    ),
    ("GET", "/v1/claims"): Operation(
        summary="The token holder's active claims",
        security="bearerAuth",
        params=(
            _q("holder", "must be the token's own holder"),
            _q(
                "roots",
                "a federated resolver: only the claims in these roots' clusters (CN,SG)",
                {"type": "string", "pattern": "^[A-Za-z]{2}(,[A-Za-z]{2})*$"},
            ),
        ),
        replies={200: Reply("the claims", api.ClaimList)},
        errors=(400, 401, 403, 503),
        error_headers=_CLAIMS_AUTH,
        tags=("claims",),
    ),
    ("DELETE", "/v1/claims/{claim_id}"): Operation(
        summary="Release a claim (by its holder)",
        security="bearerAuth",
        params=(Param("claim_id", "path", {"type": "string"}),),
        replies={204: Reply("released")},
        errors=(400, 401, 403, 404, 503),
        error_headers=_CLAIMS_AUTH,
        tags=("claims",),
    ),
    ("PATCH", "/v1/claims/{claim_id}"): Operation(
        summary="Renew a claim or a whole gang (by its holder): it expires ttl_s from now",
        security="bearerAuth",
        params=(Param("claim_id", "path", {"type": "string"}),),
        body=Body(api.ClaimRenewal, '"ttl_s": seconds from now'),
        replies={200: Reply("the renewed claim", api.ClaimCreated)},
        errors=(400, 401, 403, 404, 408, 409, 413, 503),
        error_headers=_CLAIMS_AUTH,
        tags=("claims",),
    ),
    ("GET", "/v1/log/checkpoint"): Operation(
        summary="The latest signed checkpoint of the transparency log",
        params=(_ROOT,),
        replies={200: Reply("a signed note", media="text/plain")},
        errors=(400, 404, 503),
        tags=("log",),
    ),
    ("GET", "/v1/log/proof/inclusion"): Operation(
        summary="Inclusion proof of a log entry (by index, or by cpid with digest or version)",
        params=(
            _q("index", "leaf index", _INT),
            _q("cpid", "with digest= or version="),
            _q("digest", "sha256 hex of the record envelope"),
            _q("version", "the record version", _INT),
            _q("tree_size", "prove against this tree size (default: the checkpoint's)", _INT),
            _ROOT,
        ),
        replies={200: Reply("the proof", api.LogInclusion)},
        errors=(400, 404, 503),
        tags=("log",),
    ),
    ("GET", "/v1/log/proof/consistency"): Operation(
        summary="Consistency proof between two tree sizes",
        params=(
            Param("first", "query", _INT, "the smaller tree size", required=True),
            _q("second", "the larger tree size (default: the checkpoint's)", _INT),
            _ROOT,
        ),
        replies={200: Reply("the proof", api.LogConsistency)},
        errors=(400, 404, 503),
        tags=("log",),
    ),
    ("GET", "/v1/log/entries"): Operation(
        summary="Log entries [start, end), at most 256",
        params=(
            Param("start", "query", _INT, "first index", required=True),
            _q("end", "one past the last index", _INT),
            _ROOT,
        ),
        replies={200: Reply("the entries", api.LogEntries)},
        errors=(400, 404, 503),
        tags=("log",),
    ),
    ("GET", "/healthz"): Operation(
        summary="The process runs",
        replies={200: Reply("ok", api.Health)},
        tags=("operations",),
    ),
    ("GET", "/readyz"): Operation(
        summary="Ready: first listing applied and etcd reachable",
        replies={
            200: Reply("ready", api.ResolverReady, headers=_STALE),
            503: Reply("not ready; error says why", api.ResolverReady, headers=_STALE),
        },
        tags=("operations",),
    ),
    ("GET", "/metrics"): METRICS,
    ("GET", "/ui"): Operation(
        summary="The web console (redirects to /ui/)",
        replies={302: Reply("to /ui/", headers={"Location": {"type": "string", "const": "/ui/"}})},
        tags=("console",),
    ),
    ("GET", "/ui/"): Operation(
        summary="The web console: verifies what it shows in the browser (docs/console.md)",
        replies={200: Reply("the console page", media="text/html")},
        tags=("console",),
    ),
    ("GET", "/ui/{name}"): Operation(
        summary="A static file of the console",
        params=(
            Param(
                "name",
                "path",
                {"type": "string", "pattern": "^[A-Za-z0-9_.-]+$"},
                required=True,
            ),
        ),
        replies={
            200: Reply(
                "the file",
                media=("text/html", "text/javascript", "text/css", "image/svg+xml"),
            )
        },
        errors=(404,),
        tags=("console",),
    ),
    ("GET", "/v1/endorsements"): Operation(
        summary="The endorsements of other roots this resolver serves under now",
        description="a federated resolver (docs/protocol.md §10): each endorsed root, its "
        "endorser and the endorsement.v1 envelope, so a client holding only the endorser's "
        "anchor can verify that root's records (cpi verify --endorsement); empty otherwise",
        replies={200: Reply("the endorsements", api.EndorsementList)},
        tags=("lookup",),
    ),
    ("GET", "/v1/anchor"): Operation(
        summary="The trust anchors this resolver verifies against, and the log's verifier keys",
        replies={
            200: Reply(
                "anchors and log verifier keys",
                media="application/json",
                schema={
                    "type": "object",
                    "required": ["anchors", "log_vkeys"],
                    "properties": {
                        "anchors": {"type": "array"},
                        "log_vkeys": {"type": "array", "items": {"type": "string"}},
                    },
                },
            )
        },
        tags=("console",),
    ),
    ("GET", "/v1/ui/namespaces"): Operation(
        summary="The seeded 1+M+N namespace tree the console draws",
        replies={
            200: Reply("seeds/namespaces.json", media="application/json", schema={"type": "object"})
        },
        tags=("console",),
    ),
    ("GET", "/openapi.json"): SELF_DESCRIPTION,
}


def description(router: web.UrlDispatcher) -> dict[str, Any]:
    """The OpenAPI document of the routes of ``router`` (a resolver app's)."""
    return build(
        title=TITLE,
        version=VERSION,
        description=_ABOUT,
        routes=routes_of(router),
        table=OPERATIONS,
    )


def openapi_handler() -> Callable[[web.Request], Awaitable[web.Response]]:
    """``GET /openapi.json``: the description of the app's routes, built on first use."""
    cache: list[bytes] = []

    async def get_openapi(request: web.Request) -> web.Response:
        if not cache:
            cache.append(json.dumps(description(request.app.router)).encode())
        return web.Response(body=cache[0], content_type="application/json")

    return get_openapi
