"""The regional / industry registry: an aiohttp app (``create_app(config)``).

Routes (docs/protocol.md §8; details and error codes in ``docs/registry.md``):

==========  ====================================  ==========================================
POST        /v1/registrations                     register.v1 + Bearer join token -> 201/200
PUT         /v1/resources/{cpid}/status           status.v1 signed by the node -> 204
                                                  (header X-CPI-Claimed: units claimed)
DELETE      /v1/resources/{cpid}                  deregister.v1 signed by the node -> 204
GET/POST    /v1/admin/self-preservation           operator override (Bearer admin token)
GET         /healthz, /readyz, /metrics
==========  ====================================  ==========================================

Errors are ``{"error": {"code", "message"}}``; one middleware maps the
:mod:`schemas.errors` tree to status codes (each class's ``http_status``), gives each
request its ``X-Request-Id`` and counts and times it by route (:mod:`schemas.observe`).  The index, the
instance lease and the liveness sweeper live in ``cleanup_ctx``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from registry import tokens
from registry.changes import AuditStream
from registry.claimed import CLAIMED_HEADER, ClaimedUnits
from registry.config import RegistryConfig
from registry.errors import (
    AdminAuthError,
    BodyTooLargeError,
    RateLimitedError,
    StartupError,
    TokenError,
)
from registry.index import Index
from registry.liveness import Liveness
from registry.metrics import RegistryMetrics
from registry.openapi import openapi_handler
from registry.ratelimit import BucketTable
from registry.registrar import Registrar
from registry.revocations import Revocations
from registry.signers import Signers, load_signers
from schemas import _json
from schemas.chain import TrustAnchors
from schemas.cpid import parse as parse_cpid
from schemas.dsse import Envelope
from schemas.errors import (
    CPIError,
    EnvelopeError,
    InvalidDataError,
    KeyFileError,
    RequestTimeoutError,
    RetrievalError,
)
from schemas.http import bearer_token, check_utf8_json
from schemas.observe import REQUEST_ID, REQUEST_ID_HEADER, request_id, route_label

__all__ = [
    "CONFIG",
    "METRICS",
    "STATE",
    "RegistryState",
    "create_app",
]

_log = logging.getLogger(__name__)

_TOKEN_PRUNE_S = 3600.0


@dataclass(slots=True)
class RegistryState:
    """Everything the handlers use, built in the app's ``cleanup_ctx``."""

    index: Index
    signers: Signers
    liveness: Liveness
    registrar: Registrar
    audit: AuditStream
    claimed: ClaimedUnits | None = None
    revocations: Revocations | None = None


@dataclass(frozen=True, slots=True)
class Limits:
    """The registration rate limits (docs/registry.md "Limits").

    A request with a valid join token takes one token from its token's bucket and one
    from its client address's bucket; any other request (no token, an unknown, expired
    or used-up one) takes one from its address's small ``unauthenticated`` bucket, so a
    flood of refused requests cannot starve valid tokens.
    """

    per_token: BucketTable
    per_address: BucketTable
    unauthenticated: BucketTable

    @classmethod
    def from_config(cls, config: RegistryConfig) -> Limits:
        keys = config.rate_limit_keys
        return cls(
            per_token=BucketTable(
                rate=config.registrations_per_s, burst=config.registration_burst, max_keys=keys
            ),
            per_address=BucketTable(
                rate=config.address_registrations_per_s or config.registrations_per_s,
                burst=config.address_registration_burst or config.registration_burst,
                max_keys=keys,
                what="per-address registration",
            ),
            unauthenticated=BucketTable(
                rate=config.unauthenticated_per_s,
                burst=config.unauthenticated_burst,
                max_keys=keys,
                what="unauthenticated request",
            ),
        )


CONFIG = web.AppKey("config", RegistryConfig)
METRICS = web.AppKey("metrics", RegistryMetrics)
LIMITS = web.AppKey("limits", Limits)
STATE = web.AppKey("state", RegistryState)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


# -- helpers ----------------------------------------------------------------------------


def _error(status: int, code: str, message: str, **headers: str) -> web.Response:
    return web.json_response(
        {"error": {"code": code, "message": message}}, status=status, headers=headers or None
    )


def _bearer(request: web.Request) -> str | None:
    return bearer_token(request.headers.get("Authorization", ""))


def client_address(request: web.Request) -> str:
    """The peer's IP address (``X-Forwarded-For`` is not trusted)."""
    return request.remote or "unknown"


async def _read_body(
    request: web.Request,
    limit: int,
    *,
    error: type[InvalidDataError] = EnvelopeError,
) -> bytes:
    """The body, refusing more than ``limit`` bytes (before reading it when declared),
    a body that does not arrive within ``body_timeout_s`` (408, the connection is
    closed) and bytes that are not UTF-8 JSON text (``error``, 400)."""
    declared = request.content_length
    if declared is not None and declared > limit:
        raise BodyTooLargeError(f"request body is {declared} bytes, at most {limit} allowed")
    content = request.content
    if content.is_eof() and content.exception() is None:
        # the whole body has arrived already (a small body in one packet, the usual
        # case): nothing to wait for, so no timeout to arm
        body = content.read_nowait()
        if len(body) > limit:
            raise BodyTooLargeError(f"request body is over {limit} bytes, at most {limit} allowed")
    else:
        body = await _receive_body(request, limit, declared)
    why = check_utf8_json(body)
    if why is not None:
        raise error(f"body is not valid JSON: {why}")
    return body


async def _receive_body(request: web.Request, limit: int, declared: int | None) -> bytes:
    timeout = request.app[CONFIG].body_timeout_s
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout):
            while True:
                chunk = await request.content.read(65536)
                if not chunk:
                    break
                size += len(chunk)
                if size > limit:
                    raise BodyTooLargeError(
                        f"request body is over {limit} bytes, at most {limit} allowed"
                    )
                chunks.append(chunk)
    except TimeoutError:
        raise RequestTimeoutError(
            f"request body not received within {timeout:g} s "
            f"({size} of {declared if declared is not None else 'unknown'} bytes arrived)"
        ) from None
    return b"".join(chunks)


def _state(request: web.Request) -> RegistryState:
    return request.app[STATE]


# -- middleware -------------------------------------------------------------------------


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Map the error tree (and aiohttp's own HTTP errors) to JSON error answers; give
    each request its id (``X-Request-Id``, echoed on every answer) and count and time it
    by route template (:mod:`schemas.observe`)."""
    t0 = time.perf_counter()
    rid = request_id(request.headers)
    REQUEST_ID.set(rid)  # each request runs in its own task: its own context
    route = request.match_info.route.name or "other"
    template = route_label(request.match_info.route.resource)
    metrics = request.app[METRICS]
    resp: web.StreamResponse
    try:
        resp = await handler(request)
    except CPIError as exc:
        resp = _error_answer(request, exc, route, metrics)
    except web.HTTPException as exc:
        if exc.status < 400:
            exc.headers[REQUEST_ID_HEADER] = rid
            metrics.requests.observe(template, request.method, exc.status, time.perf_counter() - t0)
            raise
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status, "http_error")
        allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else {}  # 405
        resp = _error(exc.status, code, f"{request.method} {request.path}: {exc.reason}", **allow)
    except Exception:
        _log.exception("%s %s: unexpected error", request.method, template)
        resp = _error(500, "internal", "internal error; the registry's log has the details")
    if not resp.prepared:
        resp.headers[REQUEST_ID_HEADER] = rid
    elapsed = time.perf_counter() - t0
    metrics.requests.observe(template, request.method, resp.status, elapsed)
    _log.log(
        logging.INFO if route in _LOGGED_ROUTES else logging.DEBUG,
        "%s %s -> %d in %.1f ms",
        request.method,
        template,
        resp.status,
        elapsed * 1000,
        extra={
            "route": template,
            "status": resp.status,
            "outcome": request.get(_OUTCOME),
            "cpid": request.get(_CPID) or request.match_info.get("cpid"),
        },
    )
    return resp


_LOGGED_ROUTES = frozenset({"register", "deregister", "admin-set"})
"""Routes whose every answer is logged at INFO (the others at DEBUG): writes that are
rare per node; heartbeats and reads would flood the log."""
_OUTCOME = web.RequestKey("outcome", str)
_CPID = web.RequestKey("cpid", str)


def _error_answer(
    request: web.Request, exc: CPIError, route: str, metrics: RegistryMetrics
) -> web.Response:
    status = exc.http_status
    headers: dict[str, str] = {}
    if isinstance(exc, RateLimitedError):
        headers["Retry-After"] = str(exc.retry_after)
    if status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="cpi-registry"'
    metrics.rejections.labels(route, exc.code).inc()
    request[_OUTCOME] = exc.code
    if status >= 500:
        _log.warning("%s %s: %s", request.method, request.path, exc)
    else:
        _log.debug("%s %s refused (%s): %s", request.method, request.path, exc.code, exc)
    resp = _error(status, exc.code, str(exc), **headers)
    if isinstance(exc, RequestTimeoutError):
        resp.force_close()  # the rest of the body is not read: close the connection
    return resp


# -- handlers ---------------------------------------------------------------------------


async def _admit_registration(request: web.Request, token: str | None) -> None:
    """Take a token from the buckets this request counts against (docs/registry.md)."""
    limits = request.app[LIMITS]
    address = client_address(request)
    known = None
    if token is not None:
        with contextlib.suppress(TokenError):  # refused by register() below, as usual
            known = await _state(request).registrar.authenticate(token)
    if known is None:
        limits.unauthenticated.take(address)
        return
    limits.per_token.take(known.sha256)  # the token's SHA-256 hex, as hash_token() gives
    limits.per_address.take(address)


async def post_registration(request: web.Request) -> web.Response:
    token = _bearer(request)
    await _admit_registration(request, token)
    config = request.app[CONFIG]
    body = await _read_body(request, config.max_body_bytes)
    result = await _state(request).registrar.register(body, token)
    request[_CPID] = result.cpid
    request[_OUTCOME] = result.outcome
    # {"cpid", "record", "chain", "heartbeat_s"} as JSON, put together from parts made
    # before: the record's compact JSON is the value written to etcd, the chain's (the
    # same few chains on every answer) is made once per chain
    body = b"".join(
        (
            b'{"cpid": ',
            json.dumps(result.cpid).encode(),
            b', "record": ',
            result.record_json or result.record.to_json(),
            b', "chain": ',
            _chain_json(result.chain),
            b', "heartbeat_s": ',
            _number_json(config.heartbeat_s),
            b"}",
        )
    )
    return web.Response(
        body=body,
        status=201 if result.created else 200,
        content_type="application/json",
        charset="utf-8",
    )


_CHAIN_JSON: dict[tuple[Envelope, ...], bytes] = {}


def _chain_json(chain: tuple[Envelope, ...]) -> bytes:
    """``json.dumps`` of the chain's envelopes as dicts, cached per chain (a registry has
    one per namespace key; a chain replaced by a new cert gets its own entry)."""
    text = _CHAIN_JSON.get(chain)
    if text is None:
        if len(_CHAIN_JSON) >= 64:
            _CHAIN_JSON.clear()
        text = _CHAIN_JSON[chain] = json.dumps([c.to_dict() for c in chain]).encode()
    return text


@functools.lru_cache(maxsize=8)
def _number_json(value: float) -> bytes:
    return json.dumps(value).encode()


async def put_status(request: web.Request) -> web.Response:
    body = await _read_body(request, request.app[CONFIG].max_body_bytes)
    state = _state(request)
    await state.registrar.status(request.match_info["cpid"], body)
    resp = web.Response(status=204)
    if state.claimed is not None:  # the CPID parsed in status(): tell the agent its claims
        units = state.claimed.units(parse_cpid(request.match_info["cpid"]).to_text())
        resp.headers[CLAIMED_HEADER] = str(units)
    return resp


async def delete_resource(request: web.Request) -> web.Response:
    body = await _read_body(request, request.app[CONFIG].max_body_bytes)
    await _state(request).registrar.deregister(request.match_info["cpid"], body)
    return web.Response(status=204)


def _check_admin(request: web.Request) -> None:
    expected = request.app[CONFIG].admin_token_hash
    if expected is None:
        raise AdminAuthError(
            "admin endpoints are disabled: set admin_token_hash (SHA-256 hex of a token) "
            "in the registry config"
        )
    token = _bearer(request)
    if token is None:
        raise AdminAuthError("send 'Authorization: Bearer <admin token>'")
    got = hashlib.sha256(token.encode("utf-8")).hexdigest()
    if not hmac.compare_digest(got, expected):
        raise AdminAuthError("wrong admin token")


def _self_preservation_view(liveness: Liveness) -> dict[str, Any]:
    return {
        "enabled": liveness.self_preservation_enabled,
        "protecting": sorted(liveness.protecting),
    }


async def get_self_preservation(request: web.Request) -> web.Response:
    _check_admin(request)
    return web.json_response(_self_preservation_view(_state(request).liveness))


async def post_self_preservation(request: web.Request) -> web.Response:
    _check_admin(request)
    body = await _read_body(request, request.app[CONFIG].max_body_bytes, error=InvalidDataError)
    try:
        obj = _json.loads(body)
    except ValueError as exc:
        raise InvalidDataError(f"body is not valid JSON: {exc}") from exc
    if not isinstance(obj, dict) or set(obj) != {"enabled"} or not isinstance(obj["enabled"], bool):
        raise InvalidDataError('expected exactly {"enabled": true|false}')
    liveness = _state(request).liveness
    liveness.set_self_preservation(obj["enabled"])
    return web.json_response(_self_preservation_view(liveness))


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    state = request.app.get(STATE)
    if state is None:
        return _error(503, "not_ready", "the registry is starting")
    try:
        async with request.app[METRICS].etcd("ping"):
            await state.index.ping()
    except RetrievalError as exc:
        return _error(503, "not_ready", f"etcd unreachable: {exc}")
    if not state.liveness.lease_alive:
        return _error(503, "not_ready", "the instance lease is lost; re-granting")
    if state.revocations is not None:
        revoked = state.revocations.revoked_signers()
        if revoked:
            detail = "; ".join(
                f"namespace {s.namespace}: signing key {s.kid} revoked ({reason})"
                for s, reason in revoked
            )
            return _error(503, "not_ready", f"cannot sign any more: {detail}")
    lease = state.liveness.lease
    return web.json_response(
        {
            "ready": True,
            "namespaces": state.signers.namespaces,
            "lease": f"{lease.id:x}" if lease is not None else None,
        }
    )


async def get_metrics(request: web.Request) -> web.Response:
    return web.Response(
        body=request.app[METRICS].render(), headers={"Content-Type": CONTENT_TYPE_LATEST}
    )


# -- life cycle -------------------------------------------------------------------------


def _load_anchors(path: Path) -> TrustAnchors:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise StartupError(f"anchor file {path}: {exc.strerror}") from exc
    try:
        return TrustAnchors.from_json(data)
    except KeyFileError as exc:
        raise StartupError(f"anchor file {path}: {exc}") from exc


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    anchors = _load_anchors(config.anchor_file)
    index = config.etcd.open_index()
    await index.connect()
    liveness: Liveness | None = None
    claimed: ClaimedUnits | None = None
    revocations: Revocations | None = None
    try:
        signers = await load_signers(index, config.namespaces, anchors)
        revocations = Revocations(index, signers, anchors)
        await revocations.start()
        claimed = ClaimedUnits(index, signers.namespaces)
        await claimed.start()
        liveness = Liveness(
            index,
            heartbeat_s=config.heartbeat_s,
            expire_after_heartbeats=config.expire_after_heartbeats,
            live_refresh_s=config.live_refresh_s,
            lease_ttl_s=config.effective_lease_ttl_s,
            threshold=config.self_preservation_threshold,
            min_nodes=config.self_preservation_min_nodes,
            metrics=app[METRICS],
        )
        await liveness.start()
        audit = AuditStream(index)
        registrar = Registrar(
            index=index,
            signers=signers,
            liveness=liveness,
            audit=audit,
            metrics=app[METRICS],
            record_ttl_s=int(config.record_ttl_days * 86_400),
            max_body_bytes=config.max_body_bytes,
            revocations=revocations,
        )
        app[STATE] = RegistryState(index, signers, liveness, registrar, audit, claimed, revocations)
        pruner = asyncio.create_task(_prune_tokens(index), name="token-pruner")
        try:
            yield
        finally:
            pruner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pruner
    finally:
        if revocations is not None:
            await revocations.stop()
        if claimed is not None:
            await claimed.stop()
        if liveness is not None:
            await liveness.stop()
        await index.close()


async def _prune_tokens(index: Index) -> None:
    while True:
        await asyncio.sleep(_TOKEN_PRUNE_S)
        try:
            removed = await tokens.prune(index)
            if removed:
                _log.info("pruned %d join tokens expired for over a day", removed)
        except RetrievalError as exc:
            _log.warning("token pruning failed: %s", exc)


def create_app(
    config: RegistryConfig, *, metrics: RegistryMetrics | None = None
) -> web.Application:
    """The registry app for ``config``.  Start-up (in ``cleanup_ctx``) connects to etcd,
    checks every namespace's certificate and grants the instance lease; it raises
    :class:`~registry.errors.StartupError` when a key, cert or anchor does not fit."""
    app = web.Application(middlewares=[error_middleware], client_max_size=config.max_body_bytes + 1)
    app[CONFIG] = config
    app[METRICS] = metrics or RegistryMetrics()
    app[LIMITS] = Limits.from_config(config)
    app.cleanup_ctx.append(_lifecycle)
    app.router.add_post("/v1/registrations", post_registration, name="register")
    app.router.add_put("/v1/resources/{cpid:.+}/status", put_status, name="status")
    # a CPID never ends in /status: DELETE .../status is a 405 of the status route
    app.router.add_delete("/v1/resources/{cpid:.+(?<!/status)}", delete_resource, name="deregister")
    app.router.add_get("/v1/admin/self-preservation", get_self_preservation, name="admin")
    app.router.add_post("/v1/admin/self-preservation", post_self_preservation, name="admin-set")
    app.router.add_get("/healthz", healthz, name="healthz")
    app.router.add_get("/readyz", readyz, name="readyz")
    app.router.add_get("/metrics", get_metrics, name="metrics")
    app.router.add_get("/openapi.json", openapi_handler(), name="openapi")
    return app
