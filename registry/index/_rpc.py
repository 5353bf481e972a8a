"""etcd's wire messages: the one module that touches etcd's generated protobuf code.

The request and stub classes come from etcd's own generated modules
(``etcd.api.etcdserverpb.rpc_pb2`` and ``rpc_pb2_grpc``, the ``etcdserverpb`` package
of etcd's API), which :mod:`etcd3aio` ships and makes importable when it is imported;
nothing here reaches into etcd3aio's private modules.  ``pyproject.toml`` pins the
etcd3aio versions this was tested with.

Also here: the conversion of :class:`~registry.index.values.Cmp` and
:class:`~registry.index.values.Op` into etcd messages, and the stream helpers shared
by leases and watches.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, Final

import etcd3aio  # noqa: F401  (makes etcd's generated ``etcd.api`` modules importable)
import grpc
import grpc.aio
from etcd.api.etcdserverpb import rpc_pb2, rpc_pb2_grpc
from etcd3aio import prefix_range_end

from registry.index.values import Cmp, Op, _kb

Compare: Final[Any] = rpc_pb2.Compare
DeleteRangeRequest: Final[Any] = rpc_pb2.DeleteRangeRequest
LeaseKeepAliveRequest: Final[Any] = rpc_pb2.LeaseKeepAliveRequest
PutRequest: Final[Any] = rpc_pb2.PutRequest
RangeRequest: Final[Any] = rpc_pb2.RangeRequest
RequestOp: Final[Any] = rpc_pb2.RequestOp
WatchCreateRequest: Final[Any] = rpc_pb2.WatchCreateRequest
WatchRequest: Final[Any] = rpc_pb2.WatchRequest
LeaseStub: Final[Any] = rpc_pb2_grpc.LeaseStub
WatchStub: Final[Any] = rpc_pb2_grpc.WatchStub

_CMP_RESULT: Final[dict[str, int]] = {
    "==": Compare.EQUAL,
    "!=": Compare.NOT_EQUAL,
    "<": Compare.LESS,
    ">": Compare.GREATER,
}
_CMP_TARGET: Final[dict[str, int]] = {
    "version": Compare.VERSION,
    "create_revision": Compare.CREATE,
    "mod_revision": Compare.MOD,
    "value": Compare.VALUE,
    "lease": Compare.LEASE,
}


# etcd's own texts (rpctypes) for refused credentials or permissions; some of them come
# with INVALID_ARGUMENT or FAILED_PRECONDITION, not PERMISSION_DENIED or UNAUTHENTICATED
ACCESS_CODES: Final = frozenset(
    {grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED}
)
_ACCESS_DETAILS: Final = (
    "etcdserver: permission denied",
    "etcdserver: user name is empty",
    "etcdserver: user name not found",
    "etcdserver: authentication failed",
    "etcdserver: invalid auth token",
    "etcdserver: authentication is not enabled",
    "code = permissiondenied",
    "code = unauthenticated",
)


def is_access_refusal(code: grpc.StatusCode | None, detail: str) -> bool:
    """True if etcd refused the credentials or a permission (*detail* is etcd's text)."""
    if code in ACCESS_CODES:
        return True
    text = detail.lower()
    return any(marker in text for marker in _ACCESS_DETAILS)


def invalid_token(exc: BaseException) -> bool:
    """True if etcd refused the request's auth token as unknown ("invalid auth token"):
    the request was not executed, and a new token fixes it."""
    seen: BaseException | None = exc
    for _ in range(5):  # the error and its causes
        if seen is None:
            return False
        if "invalid auth token" in str(seen).lower():
            return True
        if isinstance(seen, grpc.aio.AioRpcError) and "invalid auth token" in (
            seen.details() or ""
        ):
            return True
        seen = seen.__cause__
    return False


def cmp_to_pb(c: Cmp) -> Any:
    """The etcd ``Compare`` message for *c*."""
    cmp = Compare(result=_CMP_RESULT[c.op], target=_CMP_TARGET[c.target], key=_kb(c.key))
    if c.target == "value":
        cmp.value = c.operand
    elif c.target == "version":
        cmp.version = c.operand
    elif c.target == "create_revision":
        cmp.create_revision = c.operand
    elif c.target == "mod_revision":
        cmp.mod_revision = c.operand
    else:
        cmp.lease = c.operand
    return cmp


def op_to_pb(op: Op) -> Any:
    """The etcd ``RequestOp`` message for *op*."""
    key = _kb(op.key)
    end = prefix_range_end(key) if op.prefix else b""
    if op.prefix and not key:
        raise ValueError("a prefix operation needs a non-empty prefix")
    if op.kind == "put":
        return RequestOp(request_put=PutRequest(key=key, value=op.value, lease=op.lease))
    if op.kind == "delete":
        return RequestOp(request_delete_range=DeleteRangeRequest(key=key, range_end=end))
    return RequestOp(request_range=RangeRequest(key=key, range_end=end))


def never_sent(exc: BaseException) -> bool:
    """True if an UNAVAILABLE error shows the request never left the client.

    gRPC reports that when no connection to any member could be made; errors that
    etcd itself sends (``etcdserver: ...``) or a connection lost mid-request do not
    count: the request may have been applied.
    """
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, grpc.aio.AioRpcError):
        cause = cause.__cause__
    if cause is None or cause.code() is not grpc.StatusCode.UNAVAILABLE:
        return False
    detail = (cause.details() or "").lower()
    return (
        any(
            marker in detail
            for marker in ("failed to connect", "connections to all backends failing", "no address")
        )
        and "etcdserver" not in detail
    )


class StreamEnded(Exception):
    """etcd closed a stream without an error status."""


async def exchange(call: Any, request: Any, what: str) -> Any:
    """Write *request* on a bidi stream and read one answer.

    A stream that has already finished raises its real status (``AioRpcError``) or
    :class:`StreamEnded`, never grpc's ``InvalidStateError``.
    """
    with contextlib.suppress(asyncio.InvalidStateError):  # finished: read() says why
        await call.write(request)
    resp = await call.read()
    if resp is grpc.aio.EOF:
        raise StreamEnded(f"{what} stream closed by etcd")
    return resp
