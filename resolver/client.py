"""A client of the resolver's HTTP API, async (what ``cpi resolve|discover|watch`` use)
and synchronous for scripts (docs/client.md).

::

    async with ResolverClient("https://127.0.0.1:8700", cacert=".cpi/tls/ca.pem") as client:
        found = await client.lookup("CN.31.CMCC/GPU.4K7Q9M2XH3PT-Z")  # -> Resolved
        for hit in await client.find(kind="GPU", near="31"):       # -> Discovery of DiscoveryHit
            ...
        async for message in client.watch(Query(within="CN.31")):
            ...

    with SyncResolverClient("http://127.0.0.1:8700") as client:  # no asyncio in sight
        hits = client.find(kind="GPU", accelerator="H100", min_free=2)

:meth:`ResolverClient.lookup` and :meth:`ResolverClient.find` return typed, frozen
objects (:class:`Resolved`, :class:`Discovery`, :class:`DiscoveryHit`);
:meth:`ResolverClient.resolve` and :meth:`ResolverClient.discover` return the
resolver's JSON as dicts, as before.  Records are decoded for reading, not verified:
:meth:`Resolved.verify` checks the record and its chain against your trust anchors.

Error answers become the project's errors: 400 -> :class:`ResolverAPIError` (an
:class:`~schemas.errors.InvalidDataError`), 404 -> :class:`~schemas.errors.NotFoundError`,
5xx and connection failures -> :class:`~resolver.errors.ResolverUnavailableError`.
:meth:`ResolverClient.watch` resumes after a dropped connection with ``Last-Event-ID``,
as an EventSource does.
"""

from __future__ import annotations

import asyncio
import base64
import os
import ssl
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Coroutine, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final, TypeVar

import aiohttp

from resolver.claims.client import Claim, ClaimsClient, Holdings
from resolver.discovery import Query
from resolver.errors import ResolverUnavailableError
from resolver.tls import tls_context
from schemas import _json, chain, dsse
from schemas.errors import InvalidDataError, NotFoundError

__all__ = [
    "DEFAULT_URL",
    "ENV_CLAIMS_TOKEN",
    "ENV_RESOLVER",
    "Claim",
    "Discovery",
    "DiscoveryHit",
    "Holdings",
    "Query",
    "Resolved",
    "ResolverAPIError",
    "ResolverClient",
    "SyncResolverClient",
    "WatchMessage",
    "decode_payload",
    "default_url",
    "tls_context",
]

T = TypeVar("T")

ENV_RESOLVER: Final = "CPI_RESOLVER"
ENV_CLAIMS_TOKEN: Final = "CPI_CLAIMS_TOKEN"
DEFAULT_URL: Final = "https://127.0.0.1:8700"


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
    try:
        obj = _json.loads(raw)
    except ValueError as exc:
        raise InvalidDataError(f"envelope payload is not valid JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise InvalidDataError("envelope payload is not a JSON object")
    return obj


@dataclass(frozen=True, slots=True)
class WatchMessage:
    """One server-sent event: ``type`` is ``put``, ``delete``, ``relist`` or ``progress``."""

    type: str
    id: str | None
    data: dict[str, Any] = field(default_factory=dict)


def _int(value: Any, default: int = 0) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


@dataclass(frozen=True, slots=True)
class Resolved:
    """A lookup's answer (``GET /v1/resources/{cpid}``), decoded.

    ``record`` and ``status`` are the decoded payloads of the signed record and of the
    node's latest status (``None`` when the node never sent one), for reading: the
    client does not verify them.  ``bundle`` is the answer as served (the envelopes of
    the record, its cert chain and the status); :meth:`verify` checks the record and
    chain offline against trust anchors you hold.
    """

    cpid: str
    kind: str
    issuer: str
    version: int
    record: Mapping[str, Any]
    status: Mapping[str, Any] | None
    live: bool
    revision: int
    stale: bool = False
    live_held: bool = False
    bundle: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_bundle(cls, bundle: Mapping[str, Any]) -> Resolved:
        """From the resolver's JSON; a malformed answer raises :class:`InvalidDataError`."""
        try:
            record = decode_payload(bundle["record"])
            status = decode_payload(bundle["status"]) if bundle.get("status") else None
            return cls(
                cpid=str(record["cpid"]),
                kind=str(record["kind"]),
                issuer=str(record["issuer"]),
                version=_int(record.get("version")),
                record=record,
                status=status,
                live=bundle.get("live") is True,
                revision=_int(bundle.get("revision")),
                stale=bundle.get("stale") is True,
                live_held=bundle.get("live_held") is True,
                bundle=dict(bundle),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidDataError(f"not a resolver lookup answer: {exc!r}") from exc

    @property
    def free(self) -> int | None:
        """Free accelerators in the latest status (``None`` without a status)."""
        if not self.status:
            return None
        value = self.status.get("capacity", {}).get("accelerators_free")
        return value if isinstance(value, int) else None

    @property
    def state(self) -> str | None:
        """``up``, ``draining``, ... from the latest status (``None`` without one)."""
        return str(self.status["state"]) if self.status and "state" in self.status else None

    def verify(self, anchors: chain.TrustAnchors) -> chain.ChainResult:
        """Verify the record and its chain against ``anchors`` (all five chain rules);
        ``result.ok`` is the verdict, ``result.failure`` says what failed.  Load anchors
        with :func:`resolver.config.load_anchor_files`."""
        record = dsse.Envelope.from_dict(dict(self.bundle["record"]))
        certs = [dsse.Envelope.from_dict(c) for c in self.bundle.get("chain", [])]
        return chain.verify_record(record, certs, anchors=anchors)


@dataclass(frozen=True, slots=True)
class DiscoveryHit:
    """One discovery result: the resource, its score and free units, best first."""

    cpid: str
    score: float
    free: int
    latency_ms: float | None
    live: bool
    kid: str
    version: int
    revision: int
    record: Mapping[str, Any] = field(repr=False, compare=False)
    rank: Mapping[str, Any] | None = field(default=None, repr=False, compare=False)
    """Why the hit ranks where it does: ``{"sort", "keys", "score"}`` (docs/resolver.md)."""

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any]) -> DiscoveryHit:
        try:
            latency = obj.get("latency_ms")
            return cls(
                cpid=str(obj["cpid"]),
                score=float(obj["score"]),
                free=_int(obj.get("free")),
                latency_ms=None if latency is None else float(latency),
                live=obj.get("live") is True,
                kid=str(obj.get("kid", "")),
                version=_int(obj.get("version")),
                revision=_int(obj.get("revision")),
                record=dict(obj.get("record") or {}),
                rank=dict(obj["rank"]) if isinstance(obj.get("rank"), dict) else None,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidDataError(f"not a discovery result: {exc!r}") from exc

    @property
    def kind(self) -> str:
        return str(self.record.get("kind", ""))

    @property
    def l2(self) -> float | None:
        """The level 2 score (0-10, ``cpi-cats-v1``) of the hit, when the answer has one."""
        value = ((self.rank or {}).get("score") or {}).get("l2")
        return float(value) if isinstance(value, int | float) else None

    @property
    def accelerators(self) -> tuple[tuple[str, int], ...]:
        """``(model, count)`` of each accelerator group in the record."""
        accs = self.record.get("attributes", {}).get("accelerators", [])
        return tuple((str(a.get("model")), _int(a.get("count"))) for a in accs)


@dataclass(frozen=True, slots=True)
class Discovery:
    """A discovery answer: ``hits`` best first, at etcd ``revision``.  Iterable."""

    hits: tuple[DiscoveryHit, ...]
    revision: int
    stale: bool = False
    ranking: Mapping[str, Any] | None = field(default=None, compare=False)
    """The answer's order: ``{"sort", "function", "weights"}``."""

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any]) -> Discovery:
        results = obj.get("results")
        if not isinstance(results, list):
            raise InvalidDataError("not a discovery answer: no results list")
        return cls(
            hits=tuple(DiscoveryHit.from_dict(r) for r in results),
            revision=_int(obj.get("revision")),
            stale=obj.get("stale") is True,
            ranking=dict(obj["ranking"]) if isinstance(obj.get("ranking"), dict) else None,
        )

    def __iter__(self) -> Iterator[DiscoveryHit]:
        return iter(self.hits)

    def __len__(self) -> int:
        return len(self.hits)

    def __bool__(self) -> bool:
        return bool(self.hits)


def _query(query: Query | None, filters: Mapping[str, Any]) -> Query:
    if query is not None and filters:
        raise InvalidDataError("give a Query or keyword filters, not both")
    if query is not None:
        return query
    labels = filters.get("labels")
    if isinstance(labels, Mapping):
        filters = {**filters, "labels": tuple(labels.items())}
    weights = filters.get("weights")
    if isinstance(weights, Mapping):
        filters = {**filters, "weights": tuple(weights.items())}
    return Query(**filters)


Roots = str | Iterable[str] | None
"""``roots=`` of discovery and watches on a federated resolver: ``"CN,SG"`` or
``["CN", "SG"]`` (None: every root)."""


def _roots_text(roots: Roots) -> str | None:
    if roots is None:
        return None
    text = roots if isinstance(roots, str) else ",".join(roots)
    if not text:
        raise InvalidDataError("roots= names no root; give e.g. roots=['CN', 'SG'] or None")
    return text


def _params(
    query: Query | Iterable[tuple[str, str]] | None, *, with_limit: bool, roots: Roots = None
) -> list[tuple[str, str]]:
    if query is None:
        out: list[tuple[str, str]] = []
    elif isinstance(query, Query):
        out = query.to_params(with_limit=with_limit)
    else:
        out = list(query)
    text = _roots_text(roots)
    if text is not None:
        out.append(("roots", text))
    return out


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
            err = _json.loads(text)["error"]
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
                body = await _json_body(resp, url)
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
        self, query: Query | Iterable[tuple[str, str]] | None = None, *, roots: Roots = None
    ) -> dict[str, Any]:
        """``{"results": [...], "revision"}``, best first; ``roots`` restricts a
        federated resolver's answer to those roots (e.g. ``["CN", "SG"]``)."""
        return await self._get("/v1/discover", _params(query, with_limit=True, roots=roots))

    async def lookup(self, cpid: str) -> Resolved:
        """The record of ``cpid`` as a :class:`Resolved` (404 -> :class:`NotFoundError`)."""
        return Resolved.from_bundle(await self.resolve(cpid))

    async def find(
        self, query: Query | None = None, *, roots: Roots = None, **filters: Any
    ) -> Discovery:
        """Discovery, best first: a :class:`Query` or its fields as keywords
        (``kind``, ``within``, ``accelerator``, ``min_free``, ``near``, ``max_latency_ms``,
        ``labels`` as a dict or pairs, ``live``, ``limit``, ``sort``, ``weights`` as a
        dict or pairs, e.g. ``{"latency": 2, "price": 1}``); ``roots`` as for
        :meth:`discover`."""
        return Discovery.from_dict(await self.discover(_query(query, filters), roots=roots))

    async def ready(self) -> dict[str, Any]:
        """The ``/readyz`` report (also when the resolver answers 503)."""
        url = self.base_url + "/readyz"
        try:
            async with self.session.get(
                url, timeout=aiohttp.ClientTimeout(total=self.timeout)
            ) as resp:
                return await _json_body(resp, url)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ResolverUnavailableError(f"cannot reach the resolver at {url}: {exc}") from exc

    async def watch(
        self,
        query: Query | Iterable[tuple[str, str]] | None = None,
        *,
        since: str | None = None,
        reconnect: bool = True,
        retry_s: float = 1.0,
        roots: Roots = None,
    ) -> AsyncGenerator[WatchMessage, None]:
        """Server-sent events from ``/v1/watch``; on a dropped stream, reconnect with
        ``Last-Event-ID`` (when ``reconnect``), so no event is lost or repeated.
        ``roots`` restricts a federated resolver's events to those roots."""
        params = _params(query, with_limit=False, roots=roots)
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


class SyncResolverClient:
    """The resolver client for scripts: blocking calls, typed results.

    It runs its own event loop in a background thread, so it also works where an event
    loop is already running (a notebook).  ``claims_token`` (or ``$CPI_CLAIMS_TOKEN``)
    enables :meth:`claim`, :meth:`release` and :meth:`holdings`.  Use it as ``with``,
    or call :meth:`close`.  Errors are those of :class:`ResolverClient`.
    """

    def __init__(
        self,
        base_url: str | None = None,
        *,
        timeout: float = 10.0,
        claims_token: str | None = None,
    ) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="cpi-resolver-client", daemon=True
        )
        self._thread.start()
        self._client = ResolverClient(base_url, timeout=timeout)
        self.base_url = self._client.base_url
        token = claims_token or os.environ.get(ENV_CLAIMS_TOKEN) or None
        self._claims = (
            ClaimsClient(self.base_url, token=token, timeout=max(timeout, 15.0)) if token else None
        )
        try:
            self._run(self._client.__aenter__())
        except BaseException:
            self._stop_loop()
            raise

    def __enter__(self) -> SyncResolverClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        self.close()

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._loop.is_closed():
            coro.close()
            raise RuntimeError("SyncResolverClient is closed")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def close(self) -> None:
        """Close the HTTP sessions and stop the loop thread (idempotent)."""
        if self._loop.is_closed():
            return
        try:
            self._run(self._client.close())
            if self._claims is not None:
                self._run(self._claims.close())
        finally:
            self._stop_loop()

    def lookup(self, cpid: str) -> Resolved:
        """See :meth:`ResolverClient.lookup`."""
        return self._run(self._client.lookup(cpid))

    def find(self, query: Query | None = None, *, roots: Roots = None, **filters: Any) -> Discovery:
        """See :meth:`ResolverClient.find`."""
        return self._run(self._client.find(query, roots=roots, **filters))

    def ready(self) -> dict[str, Any]:
        """The ``/readyz`` report (``report["ready"]`` is the verdict)."""
        return self._run(self._client.ready())

    def watch(
        self,
        query: Query | None = None,
        *,
        since: str | None = None,
        roots: Roots = None,
        **filters: Any,
    ) -> Iterator[WatchMessage]:
        """Watch events as a blocking iterator (reconnecting as :meth:`ResolverClient.watch`
        does); stop with ``break``."""
        stream = self._client.watch(_query(query, filters), since=since, roots=roots)

        async def step() -> WatchMessage:
            return await stream.__anext__()

        try:
            while True:
                try:
                    message = self._run(step())
                except StopAsyncIteration:
                    return
                yield message
        finally:
            if not self._loop.is_closed():
                self._run(stream.aclose())

    def _claims_client(self) -> ClaimsClient:
        if self._claims is None:
            raise InvalidDataError(
                f"no claims token: pass claims_token= or set ${ENV_CLAIMS_TOKEN}"
            )
        return self._claims

    def claim(
        self,
        *,
        cpid: str | None = None,
        query: Query | None = None,
        units: int,
        ttl_s: int | None = None,
        **filters: Any,
    ) -> Claim:
        """Claim ``units`` on ``cpid`` or on the best match of a query (a :class:`Query`
        or keyword filters); see :meth:`resolver.claims.client.ClaimsClient.acquire`."""
        if cpid is None:
            query = _query(query, filters)
        elif filters:
            raise InvalidDataError("give a CPID or query filters, not both")
        return self._run(
            self._claims_client().acquire(cpid=cpid, query=query, units=units, ttl_s=ttl_s)
        )

    def claim_gang(
        self, *, query: Query | None = None, units: int, ttl_s: int | None = None, **kw: Any
    ) -> Claim:
        """Claim ``units`` in total over several resources, all or nothing (a gang); ``kw``:
        ``per_resource`` (or ``per_resource_min``/``_max``), ``same_region``,
        ``max_pairwise_latency_ms``, and query filters.  See
        :meth:`resolver.claims.client.ClaimsClient.claim_gang`."""
        gang_keys = {
            "per_resource",
            "per_resource_min",
            "per_resource_max",
            "same_region",
            "max_pairwise_latency_ms",
        }
        gang = {k: kw.pop(k) for k in list(kw) if k in gang_keys}
        q = _query(query, kw)
        return self._run(
            self._claims_client().acquire_gang(query=q, units=units, ttl_s=ttl_s, **gang)
        )

    def renew(self, claim: Claim | str, *, ttl_s: int) -> Claim:
        """Renew a claim (single or gang): it then expires ``ttl_s`` seconds from now."""
        claim_id = claim.claim_id if isinstance(claim, Claim) else claim
        return self._run(self._claims_client().renew(claim_id, ttl_s=ttl_s))

    def release(self, claim: Claim | str) -> None:
        """Release a claim (a :class:`Claim` or its id)."""
        claim_id = claim.claim_id if isinstance(claim, Claim) else claim
        self._run(self._claims_client().release(claim_id))

    def holdings(self) -> Holdings:
        """The claims the token's holder holds now."""
        return self._run(self._claims_client().holdings())


async def _json_body(resp: aiohttp.ClientResponse, url: str) -> dict[str, Any]:
    """The JSON object a response carries (strict, bounded nesting)."""
    raw = await resp.read()
    try:
        body = _json.loads(raw)
    except ValueError as exc:
        raise ResolverUnavailableError(
            f"the resolver at {url} answered invalid JSON: {exc}"
        ) from exc
    if not isinstance(body, dict):
        raise ResolverUnavailableError(f"the resolver at {url} answered {type(body).__name__}")
    return body


async def _read_sse(resp: aiohttp.ClientResponse) -> AsyncIterator[WatchMessage]:
    """Parse ``text/event-stream`` (the subset the resolver sends)."""
    event, ident = "", None
    data: list[str] = []
    async for raw in resp.content:
        line = raw.decode("utf-8").rstrip("\r\n")
        if not line:
            if data:
                payload = _json.loads("\n".join(data))
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
