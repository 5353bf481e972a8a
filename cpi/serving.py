"""Serve an aiohttp app with connection limits and timeouts (both services use this).

aiohttp bounds none of these by itself.  :class:`Serving` runs the app with
``web.AppRunner`` (its public ``server``, a protocol factory, answers the HTTP) on a
listening socket of its own, wrapping every connection in a small guard that:

* refuses a connection when its client address already has
  ``max_connections_per_address`` open, or the server ``max_connections`` (answered
  ``429`` / ``503`` with ``{"error": {"code": "too_many_connections"}}``, then closed);
* closes a connection that has not sent a complete request head (the blank line after
  the headers) within ``header_timeout_s`` of opening (answered ``408`` with code
  ``request_timeout``): half a header is not a way to hold a connection;
* after that, aiohttp's ``keepalive_timeout`` (``keepalive_timeout_s``) closes a
  connection idle between requests, or one whose next request head does not complete
  in that time.

Body reads are bounded by the apps themselves (``body_timeout_s``: ``408``); after an
answer that left part of a body unread, aiohttp drains the rest for at most 1 s
(``lingering_time``), then closes the connection.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from dataclasses import dataclass
from typing import Any

from aiohttp import web

__all__ = ["ServerLimits", "Serving"]

_REFUSAL_WAIT_S = 2.0  # how long a refused connection may take to send its head
_LINGERING_S = 1.0  # after an answer, the unread rest of a body is drained this long, then closed


@dataclass(frozen=True, slots=True)
class ServerLimits:
    """Connection limits and timeouts (the fields of the same names in both configs)."""

    header_timeout_s: float = 10.0
    keepalive_timeout_s: float = 30.0
    max_connections: int = 10_000
    max_connections_per_address: int = 256

    @classmethod
    def of(cls, config: Any) -> ServerLimits:
        """The limits of a registry or resolver config."""
        return cls(
            header_timeout_s=config.header_timeout_s,
            keepalive_timeout_s=config.keepalive_timeout_s,
            max_connections=config.max_connections,
            max_connections_per_address=config.max_connections_per_address,
        )


def _answer(status: int, reason: str, code: str, message: str, **headers: str) -> bytes:
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    head = [f"HTTP/1.1 {status} {reason}", "Content-Type: application/json"]
    head += [f"{k}: {v}" for k, v in headers.items()]
    head += [f"Content-Length: {len(body)}", "Connection: close", "", ""]
    return "\r\n".join(head).encode() + body


def _head_done(tail: bytes, data: bytes) -> bool:
    joined = tail + data
    return b"\r\n\r\n" in joined or b"\n\n" in joined


class _Guard(asyncio.Protocol):
    """One connection: counts it per address, watches its first request head, and hands
    every event to aiohttp's request handler (``inner``)."""

    def __init__(self, serving: Serving, inner: asyncio.Protocol) -> None:
        self._serving = serving
        self._inner = inner
        self._transport: asyncio.Transport | None = None
        self._address = ""
        self._counted = False
        self._refusal: bytes | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._tail = b""

    # -- asyncio.Protocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        peer = transport.get_extra_info("peername")
        self._address = str(peer[0]) if peer else "unknown"
        loop = asyncio.get_running_loop()
        self._refusal = self._serving._admit(self._address)
        if self._refusal is not None:  # answered once its head is in (or soon anyway)
            self._timer = loop.call_later(_REFUSAL_WAIT_S, self._refuse)
            return
        self._counted = True
        self._timer = loop.call_later(self._serving.limits.header_timeout_s, self._head_timeout)
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._timer is not None:
            if _head_done(self._tail, data):
                if self._refusal is not None:
                    self._refuse()
                    return
                self._timer.cancel()
                self._timer = None
            else:
                self._tail = (self._tail + data)[-3:]
        if self._refusal is None:
            self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        if self._refusal is not None:
            return None
        return self._inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._counted:
            self._counted = False
            self._serving._release(self._address)
            self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._refusal is None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._refusal is None:
            self._inner.resume_writing()

    # -- limits ----------------------------------------------------------------------

    def _refuse(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        transport = self._transport
        if transport is not None and not transport.is_closing() and self._refusal is not None:
            transport.write(self._refusal)
            transport.close()

    def _head_timeout(self) -> None:
        self._timer = None
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        limit = self._serving.limits.header_timeout_s
        self._serving.head_timeouts += 1
        transport.write(
            _answer(
                408,
                "Request Timeout",
                "request_timeout",
                f"no complete request head within {limit:g} s; closing the connection",
            )
        )
        transport.close()


class Serving:
    """An app served on ``host:port`` with :class:`ServerLimits` (see the module doc)."""

    def __init__(
        self,
        app: web.Application,
        host: str,
        port: int,
        limits: ServerLimits | None = None,
        *,
        reuse_port: bool | None = None,
        ssl_context: ssl.SSLContext | None = None,
        shutdown_timeout: float = 60.0,
    ) -> None:
        self.app = app
        self.ssl_context = ssl_context
        self.host = host
        self.port = port
        self.limits = limits or ServerLimits()
        self.reuse_port = reuse_port
        self.runner = web.AppRunner(
            app,
            handle_signals=False,
            access_log=None,
            keepalive_timeout=self.limits.keepalive_timeout_s,
            lingering_time=_LINGERING_S,
            shutdown_timeout=shutdown_timeout,
        )
        self._server: asyncio.Server | None = None
        self._open: dict[str, int] = {}
        self.connections = 0
        self.refused = 0
        self.head_timeouts = 0

    async def setup(self) -> None:
        """The app's start-up (``cleanup_ctx``), as ``runner.setup()``."""
        await self.runner.setup()

    async def start(self) -> None:
        """Listen (after :meth:`setup`)."""
        handler = self.runner.server
        assert handler is not None, "call setup() first"
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Guard(self, handler()),
            self.host,
            self.port,
            reuse_address=True,
            reuse_port=self.reuse_port,
            ssl=self.ssl_context,
            # a TLS handshake is part of sending the request head: same bound
            ssl_handshake_timeout=self.limits.header_timeout_s if self.ssl_context else None,
        )

    @property
    def addresses(self) -> list[Any]:
        """The bound socket addresses (``(host, port, ...)``)."""
        if self._server is None:
            return []
        return [s.getsockname() for s in self._server.sockets]

    @property
    def url(self) -> str:
        host, port = self.addresses[0][:2]
        scheme = "https" if self.ssl_context is not None else "http"
        return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"

    async def close(self) -> None:
        """Stop listening, then shut the app down (open connections are closed)."""
        if self._server is not None:
            self._server.close()
        await self.runner.cleanup()
        self._server = None

    async def __aenter__(self) -> Serving:
        await self.setup()
        try:
            await self.start()
        except BaseException:
            await self.runner.cleanup()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- connection counting (called by the guards) -----------------------------------

    def _admit(self, address: str) -> bytes | None:
        """None when a new connection from ``address`` may be served, else its answer."""
        limits = self.limits
        n = self._open.get(address, 0)
        if n >= limits.max_connections_per_address:
            self.refused += 1
            return _answer(
                429,
                "Too Many Requests",
                "too_many_connections",
                f"client address {address} has {n} open connections, at most "
                f"{limits.max_connections_per_address} allowed",
                **{"Retry-After": "1"},
            )
        if self.connections >= limits.max_connections:
            self.refused += 1
            return _answer(
                503,
                "Service Unavailable",
                "too_many_connections",
                f"the server has {self.connections} open connections, at most "
                f"{limits.max_connections} allowed",
                **{"Retry-After": "1"},
            )
        self._open[address] = n + 1
        self.connections += 1
        return None

    def _release(self, address: str) -> None:
        self.connections -= 1
        n = self._open.get(address, 0) - 1
        if n > 0:
            self._open[address] = n
        else:
            self._open.pop(address, None)
