"""The registry's OpenAPI 3.1 description: one entry per route (docs/protocol.md §8).

:data:`OPERATIONS` describes each route of :func:`registry.service.create_app`
(parameters, body, answers); :func:`description` joins it with the routes the app
really has (:func:`schemas.openapi.build` refuses a route without an entry and an entry
without a route).  The app serves the result at ``GET /openapi.json``;
``tools/gen_openapi.py`` writes it to ``docs/openapi/registry.json``.
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

TITLE: Final = "CPI registry"
VERSION: Final = "1"
_ABOUT: Final = (
    "Regional / industry registry: registers nodes (register.v1 envelopes + join token), "
    "accepts their signed status and deregistration. Errors are "
    '{"error": {"code", "message"}} (docs/registry.md lists every code).'
)

_CPID = Param(
    "cpid",
    "path",
    {"type": "string", "pattern": CPID_PATTERN},
    "the node's CPID, e.g. CN.31.CMCC/GPU.0123456789AB-C",
)
_TEXT: Final = {"type": "string"}
_CLAIMED = {
    "X-CPI-Claimed": {"type": "string", "pattern": "^[0-9]+$"},
}

OPERATIONS: Final[dict[tuple[str, str], Operation]] = {
    ("POST", "/v1/registrations"): Operation(
        summary="Register a node (or re-register the same key)",
        body=Body(api.Envelope, "a register.v1 envelope signed by the node's own key"),
        security="bearerAuth",
        replies={
            200: Reply("the same key registered again", api.RegistrationAnswer),
            201: Reply("a new CPID", api.RegistrationAnswer),
        },
        errors=(400, 401, 403, 408, 409, 413, 429, 503),
        error_headers={
            401: {"WWW-Authenticate": _TEXT},
            429: {"Retry-After": {"type": "string", "pattern": "^[0-9]+$"}},
        },
        tags=("nodes",),
    ),
    ("PUT", "/v1/resources/{cpid}/status"): Operation(
        summary="Report a node's status",
        params=(_CPID,),
        body=Body(api.Envelope, "a status.v1 envelope signed by the node's own key"),
        replies={
            204: Reply("accepted; X-CPI-Claimed says how many units are claimed", headers=_CLAIMED)
        },
        errors=(400, 403, 404, 408, 409, 413, 503),
        tags=("nodes",),
    ),
    ("DELETE", "/v1/resources/{cpid}"): Operation(
        summary="Deregister a node",
        params=(_CPID,),
        body=Body(api.Envelope, "a deregister.v1 envelope signed by the node's own key"),
        replies={204: Reply("the record and live key are deleted")},
        errors=(400, 403, 404, 408, 409, 413, 503),
        tags=("nodes",),
    ),
    ("GET", "/v1/admin/self-preservation"): Operation(
        summary="Self-preservation state",
        security="bearerAuth",
        replies={200: Reply("the state", api.SelfPreservation)},
        errors=(401, 503),
        error_headers={401: {"WWW-Authenticate": _TEXT}},
        tags=("admin",),
    ),
    ("POST", "/v1/admin/self-preservation"): Operation(
        summary="Turn self-preservation on or off (operator override)",
        security="bearerAuth",
        body=Body(api.SelfPreservationSet, '{"enabled": true|false}'),
        replies={200: Reply("the new state", api.SelfPreservation)},
        errors=(400, 401, 408, 413, 503),
        error_headers={401: {"WWW-Authenticate": _TEXT}},
        tags=("admin",),
    ),
    ("GET", "/healthz"): Operation(
        summary="The process runs",
        replies={200: Reply("ok", api.Health)},
        tags=("operations",),
    ),
    ("GET", "/readyz"): Operation(
        summary="Ready to serve (etcd reachable, lease held, signing keys not revoked)",
        replies={200: Reply("ready", api.RegistryReady)},
        errors=(503,),
        tags=("operations",),
    ),
    ("GET", "/metrics"): METRICS,
    ("GET", "/openapi.json"): SELF_DESCRIPTION,
}


def description(router: web.UrlDispatcher) -> dict[str, Any]:
    """The OpenAPI document of the routes of ``router`` (a registry app's)."""
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
