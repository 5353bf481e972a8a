"""A small async client of the resolver's HTTP API (what ``cpi resolve|discover|watch`` use).

::

    async with ResolverClient("https://127.0.0.1:8700", cacert=".cpi/tls/ca.pem") as client:
        bundle = await client.resolve("CN.31.CMCC/GPU.4K7Q9M2XH3PT-Z")
        found = await client.discover(Query(kind="GPU", near="31"))
        async for message in client.watch(Query(within="CN.31")):
            ...

Error answers become the project's errors: 400 -> :class:`ResolverAPIError` (an
:class:`~schemas.errors.InvalidDataError`), 404 -> :class:`~schemas.errors.NotFoundError`,
5xx and connection failures -> :class:`~resolver.errors.ResolverUnavailableError`.
:meth:`ResolverClient.watch` resumes after a dropped connection with ``Last-Event-ID``,
as an EventSource does.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import ssl
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Final

import aiohttp

from resolver.discovery import Query
from resolver.errors import ResolverUnavailableError
from schemas.errors import InvalidDataError, NotFoundError
from schemas.tls import client_context

__all__ = [
    "DEFAULT_URL",
    "ENV_RESOLVER",
    "ResolverAPIError",
    "ResolverClient",
    "WatchMessage",
    "decode_payload",
    "default_url",
    "tls_context",
]

ENV_RESOLVER: Final = "CPI_RESOLVER"
DEFAULT_URL: Final = "https://127.0.0.1:8700"


def tls_context(cacert: str | os.PathLike[str] | None) -> ssl.SSLContext:
    """A client context trusting the CA file ``cacert`` (PEM), else the system roots."""
    if cacert is None:
        return client_context()
    try:
        pem = Path(cacert).read_bytes()
    except OSError as exc:
        raise InvalidDataError(f"CA certificate {cacert}: {exc.strerror}") from exc
    try:
        return client_context(pem)
    except (ssl.SSLError, ValueError) as exc:
        raise InvalidDataError(f"CA certificate {cacert}: {exc}") from exc


def default_url() -> str:
    """``$CPI_RESOLVER``, else :data:`DEFAULT_URL`."""
    return os.environ.get(ENV_RESOLVER) or DEFAULT_URL


class ResolverAPIError(InvalidDataError):
    """The resolver refused a request (4xx); ``code`` is its ``error.code``."""

    def __init__(self, message: str, *, code: str, status: int) -> None:
        self.code = code
        self.status = status
        super().__init__(message)


def decode_payload(envelope: dict[str, Any]) -> dict[str, Any]:
    """The JSON payload of an envelope dict, decoded but NOT verified (for display)."""
    raw = base64.b64decode(envelope["payload"] + "=" * (-len(envelope["payload"]) % 4))
    obj = json.loads(raw)
    if not isinstance(obj, dict):
        raise InvalidDataError("envelope payload is not a JSON object")
    return obj


@dataclass(frozen=True, slots=True)
class WatchMessage:
    """One server-sent event: ``type`` is ``put``, ``delete``, ``relist`` or ``progress``."""

    type: str
    id: str | None
    data: dict[str, Any] = field(default_factory=dict)


def _params(
    query: Query | Iterable[tuple[str, str]] | None, *, with_limit: bool
) -> list[tuple[str, str]]:
    if query is None:
        return []
    if isinstance(query, Query):
        return query.to_params(with_limit=with_limit)
    return list(query)


class ResolverClient:
    """Client of one resolver.  Use as ``async with``."""

    def __init__(
        self,
        base_url: str | None = None,
        *,
        timeout: float = 10.0,
        ssl_context: ssl.SSLContext | None = None,
        cacert: str | os.PathLike[str] | None = None,
    ) -> None:
        """``ssl_context`` (or a context trusting the CA file ``cacert``) verifies the
        resolver's certificate; default: the system roots."""
        self.base_url = (base_url or default_url()).rstrip("/")
        self.timeout = timeout
        self._ssl = ssl_context or tls_context(cacert)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> ResolverClient:
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=self._ssl))
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("ResolverClient is not open (use 'async with')")
        return self._session

    async def _raise_for(self, resp: aiohttp.ClientResponse) -> None:
        if resp.status < 400:
            return
        text = await resp.text()
        try:
            err = json.loads(text)["error"]
            code, message = str(err["code"]), str(err["message"])
        except (ValueError, KeyError, TypeError):
            code, message = "http_error", f"HTTP {resp.status}: {text[:200]}"
        if resp.status == 404:
            raise NotFoundError(message)
        if resp.status >= 500:
            raise ResolverUnavailableError(
                f"resolver {self.base_url} answered {resp.status}: {message}"
            )
        raise ResolverAPIError(message, code=code, status=resp.status)

    async def _get(self, path: str, params: list[tuple[str, str]] | None = None) -> dict[str, Any]:
        url = self.base_url + path
        try:
            async with self.session.get(
                url, params=params, timeout=aiohttp.ClientTimeout(total=self.timeout)
            ) as resp:
                await self._raise_for(resp)
                body: dict[str, Any] = await resp.json()
                if resp.headers.get("X-CPI-Stale") == "1":
                    body.setdefault("stale", True)
                return body
        except aiohttp.ClientError as exc:
            raise ResolverUnavailableError(f"cannot reach the resolver at {url}: {exc}") from exc
        except TimeoutError as exc:
            raise ResolverUnavailableError(
                f"the resolver at {url} did not answer within {self.timeout:g} s"
            ) from exc

    async def resolve(self, cpid: str) -> dict[str, Any]:
        """``{"record", "chain", "status", "live", "revision"}`` for ``cpid``."""
        return await self._get("/v1/resources/" + cpid)

    async def discover(
        self, query: Query | Iterable[tuple[str, str]] | None = None
    ) -> dict[str, Any]:
        """``{"results": [...], "revision"}``, best first."""
        return await self._get("/v1/discover", _params(query, with_limit=True))

    async def ready(self) -> dict[str, Any]:
        """The ``/readyz`` report (also when the resolver answers 503)."""
        url = self.base_url + "/readyz"
        try:
            async with self.session.get(
                url, timeout=aiohttp.ClientTimeout(total=self.timeout)
            ) as resp:
                body: dict[str, Any] = await resp.json()
                return body
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ResolverUnavailableError(f"cannot reach the resolver at {url}: {exc}") from exc

    async def watch(
        self,
        query: Query | Iterable[tuple[str, str]] | None = None,
        *,
        since: str | None = None,
        reconnect: bool = True,
        retry_s: float = 1.0,
    ) -> AsyncIterator[WatchMessage]:
        """Server-sent events from ``/v1/watch``; on a dropped stream, reconnect with
        ``Last-Event-ID`` (when ``reconnect``), so no event is lost or repeated."""
        params = _params(query, with_limit=False)
        last = since
        while True:
            headers = {"Last-Event-ID": last} if last else {}
            try:
                async with self.session.get(
                    self.base_url + "/v1/watch",
                    params=params,
                    headers=headers,
                    timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.timeout),
                ) as resp:
                    await self._raise_for(resp)
                    async for message in _read_sse(resp):
                        if message.id is not None:
                            last = message.id
                        yield message
            except (aiohttp.ClientError, ResolverUnavailableError) as exc:
                if not reconnect:
                    raise ResolverUnavailableError(
                        f"watch stream from {self.base_url} ended: {exc}"
                    ) from exc
            else:
                if not reconnect:
                    return
            await asyncio.sleep(retry_s)


async def _read_sse(resp: aiohttp.ClientResponse) -> AsyncIterator[WatchMessage]:
    """Parse ``text/event-stream`` (the subset the resolver sends)."""
    event, ident = "", None
    data: list[str] = []
    async for raw in resp.content:
        line = raw.decode("utf-8").rstrip("\r\n")
        if not line:
            if data:
                payload = json.loads("\n".join(data))
                yield WatchMessage(event or "message", ident, payload)
            elif ident is not None:
                yield WatchMessage("progress", ident)
            event, data, ident = "", [], None
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            event = value
        elif name == "data":
            data.append(value)
        elif name == "id":
            ident = value
