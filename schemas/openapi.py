"""OpenAPI 3.1 descriptions built from a service's routes and the pydantic models. No I/O.

A service keeps one table, ``(METHOD, path template) -> Operation``, next to its routes
(:mod:`registry.openapi`, :mod:`resolver.openapi`); :func:`build` walks the routes the
app really has (``(method, path)`` pairs from its aiohttp router) and describes each
one from the table.  A route without an entry, or an entry without a route, is an
error, so the description cannot drift from the app.  Bodies are described by the
JSON Schemas of :mod:`schemas.api` and :mod:`schemas.models` (``model_json_schema``,
with the syntax the models check in Python added by :mod:`schemas.jsonschema`), placed
under ``components/schemas``.

``tools/gen_openapi.py`` writes the results to ``docs/openapi/``; each service serves
its own at ``GET /openapi.json``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from schemas.api import ErrorBody
from schemas.jsonschema import _Generator

__all__ = [
    "ERROR_CODES",
    "METRICS",
    "SELF_DESCRIPTION",
    "Body",
    "Operation",
    "Param",
    "Reply",
    "build",
    "render",
    "routes_of",
]

OPENAPI_VERSION: Final = "3.1.0"
_REF: Final = "#/components/schemas/{model}"

ERROR_CODES: Final = {
    400: "Bad Request: the input is malformed or invalid (see error.code)",
    401: "Unauthorized: no or unknown bearer token",
    403: "Forbidden: the token or signer may not do this",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout: the body did not arrive within the server's body timeout",
    409: "Conflict with the stored state",
    413: "Request body too large",
    429: "Too Many Requests: rate limit or quota",
    502: "Bad Gateway: etcd refused the service's own credentials (not retryable)",
    503: "Service Unavailable: not ready, or etcd unreachable; retry later",
}


@dataclass(frozen=True, slots=True)
class Param:
    """A path, query or header parameter."""

    name: str
    location: str  # "path" | "query" | "header"
    schema: Mapping[str, Any]
    description: str = ""
    required: bool = False


@dataclass(frozen=True, slots=True)
class Body:
    """A request body: a model (JSON) or a raw schema with its media type."""

    model: type[BaseModel]
    description: str = ""
    required: bool = True


@dataclass(frozen=True, slots=True)
class Reply:
    """One documented answer.  ``model`` for JSON bodies; ``media`` + ``schema`` for others;
    neither for an empty body."""

    description: str
    model: type[BaseModel] | None = None
    media: str | tuple[str, ...] | None = None
    """One media type, or several that share ``schema`` (e.g. the console's static files)."""
    schema: Mapping[str, Any] | None = None
    headers: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Operation:
    """What one route does: its parameters, body, answers and security."""

    summary: str
    replies: Mapping[int, Reply]
    errors: tuple[int, ...] = ()
    """Statuses answered with the error body (descriptions from :data:`ERROR_CODES`)."""
    params: tuple[Param, ...] = ()
    body: Body | None = None
    security: str | None = None
    """Name of a security scheme (``bearerAuth``) when the route takes a bearer token."""
    tags: tuple[str, ...] = ()
    description: str = ""
    error_headers: Mapping[int, Mapping[str, Mapping[str, Any]]] = field(default_factory=dict)


METRICS: Final = Operation(
    summary="Prometheus metrics",
    replies={200: Reply("Prometheus text exposition", media="text/plain")},
    tags=("operations",),
)
"""``GET /metrics`` of every service."""

SELF_DESCRIPTION: Final = Operation(
    summary="This description",
    replies={200: Reply("OpenAPI 3.1", media="application/json", schema={"type": "object"})},
    tags=("operations",),
)
"""``GET /openapi.json`` of every service."""


def _collect_models(ops: Iterable[Operation]) -> list[type[BaseModel]]:
    seen: dict[str, type[BaseModel]] = {}
    for op in ops:
        models: list[type[BaseModel] | None] = [r.model for r in op.replies.values()]
        if op.body is not None:
            models.append(op.body.model)
        if op.errors:
            models.append(ErrorBody)
        for m in models:
            if m is not None:
                seen.setdefault(m.__name__, m)
    return [seen[k] for k in sorted(seen)]


def _ref(model: type[BaseModel]) -> dict[str, Any]:
    return {"$ref": _REF.format(model=model.__name__)}


def _headers(headers: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    return {name: {"schema": dict(schema)} for name, schema in sorted(headers.items())}


def _reply(reply: Reply) -> dict[str, Any]:
    out: dict[str, Any] = {"description": reply.description}
    if reply.model is not None:
        out["content"] = {"application/json": {"schema": _ref(reply.model)}}
    elif reply.media is not None:
        media = (reply.media,) if isinstance(reply.media, str) else reply.media
        out["content"] = {m: {"schema": dict(reply.schema or {"type": "string"})} for m in media}
    if reply.headers:
        out["headers"] = _headers(reply.headers)
    return out


def _operation(op: Operation, op_id: str) -> dict[str, Any]:
    out: dict[str, Any] = {"operationId": op_id, "summary": op.summary}
    if op.description:
        out["description"] = op.description
    if op.tags:
        out["tags"] = list(op.tags)
    if op.params:
        out["parameters"] = [
            {
                "name": p.name,
                "in": p.location,
                "required": p.required or p.location == "path",
                "schema": dict(p.schema),
                **({"description": p.description} if p.description else {}),
            }
            for p in op.params
        ]
    if op.body is not None:
        out["requestBody"] = {
            "required": op.body.required,
            "description": op.body.description,
            "content": {"application/json": {"schema": _ref(op.body.model)}},
        }
    responses: dict[str, Any] = {str(s): _reply(r) for s, r in sorted(op.replies.items())}
    for status in op.errors:
        if str(status) in responses:
            raise ValueError(f"{op_id}: status {status} is both a reply and an error")
        err: dict[str, Any] = {
            "description": ERROR_CODES[status],
            "content": {"application/json": {"schema": _ref(ErrorBody)}},
        }
        if status in op.error_headers:
            err["headers"] = _headers(op.error_headers[status])
        responses[str(status)] = err
    out["responses"] = dict(sorted(responses.items()))
    if op.security is not None:
        out["security"] = [{op.security: []}]
    return out


def _op_id(method: str, path: str) -> str:
    words = [w.strip("{}").replace("-", "_").replace(".", "_") for w in path.split("/") if w]
    return "_".join([method.lower(), *words]) if words else method.lower()


def build(
    *,
    title: str,
    version: str,
    description: str,
    routes: Iterable[tuple[str, str]],
    table: Mapping[tuple[str, str], Operation],
) -> dict[str, Any]:
    """The OpenAPI 3.1 document of ``routes`` (``(METHOD, path template)`` pairs).

    Raises ValueError when a route has no entry in ``table`` or an entry names no route.
    """
    wanted = set(routes)
    missing = sorted(wanted - set(table))
    if missing:
        raise ValueError(f"routes without an OpenAPI description: {missing}")
    unused = sorted(set(table) - wanted)
    if unused:
        raise ValueError(f"OpenAPI descriptions of routes the app does not have: {unused}")
    paths: dict[str, dict[str, Any]] = {}
    for method, path in sorted(wanted, key=lambda mp: (mp[1], mp[0])):
        paths.setdefault(path, {})[method.lower()] = _operation(
            table[method, path], _op_id(method, path)
        )
    models = _collect_models(table[r] for r in wanted)
    _, defs = models_json_schema(
        [(m, "validation") for m in models], ref_template=_REF, schema_generator=_Generator
    )
    for schema in defs.get("$defs", {}).values():
        _drop_null_defaults(schema)
    doc: dict[str, Any] = {
        "openapi": OPENAPI_VERSION,
        "info": {"title": title, "version": version, "description": description},
        "paths": paths,
        "components": {"schemas": defs.get("$defs", {})},
    }
    if any(op.security for op in table.values()):
        doc["components"]["securitySchemes"] = {
            "bearerAuth": {"type": "http", "scheme": "bearer"},
        }
    return doc


def _allows_null(schema: Mapping[str, Any]) -> bool:
    if schema.get("type") == "null":
        return True
    return any(_allows_null(s) for s in schema.get("anyOf", ()))


def _drop_null_defaults(schema: dict[str, Any]) -> None:
    """``"default": null`` on a property that cannot be null (``SkipJsonSchema[None]``
    fields of :mod:`schemas.api`): the field is simply optional, so say nothing."""
    for prop in schema.get("properties", {}).values():
        if "default" in prop and prop["default"] is None and not _allows_null(prop):
            del prop["default"]


def render(doc: Mapping[str, Any]) -> str:
    """The file form: sorted keys, two-space indent, ASCII, trailing newline."""
    return json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=True) + "\n"


def routes_of(router: Any, *, skip: Iterable[str] = ()) -> list[tuple[str, str]]:
    """``(METHOD, path template)`` of every route of an aiohttp router (duck-typed).

    ``HEAD`` (added by aiohttp next to each ``GET``) and catch-all ``*`` routes are left
    out, as are the paths in ``skip``.
    """
    out: set[tuple[str, str]] = set()
    skipped = set(skip)
    for route in router.routes():
        if route.method in ("HEAD", "*"):
            continue
        resource = route.resource
        if resource is None or resource.canonical in skipped:
            continue
        out.add((route.method, resource.canonical))
    return sorted(out)
