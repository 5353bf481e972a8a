"""A small async client of the claims API (what ``cpi claim`` uses).

::

    async with ClaimsClient("https://127.0.0.1:8700", token=token, cacert=ca) as client:
        claim = await client.acquire(query=Query(kind="GPU", accelerator="H100", near="31"), units=8)
        await client.release(claim.claim_id)
        gang = await client.acquire_gang(
            query=Query(kind="GPU", within="CN.31"), units=64, per_resource=8,
            max_pairwise_latency_ms=5,
        )                                   # gang.parts: ((cpid, 8), ...) x 8
        await client.renew(gang.claim_id, ttl_s=3600)
        await client.release(gang.claim_id)

:meth:`ClaimsClient.acquire` and :meth:`ClaimsClient.holdings` return typed, frozen
objects (:class:`Claim`, :class:`Holdings`); :meth:`ClaimsClient.claim` and
:meth:`ClaimsClient.list` return the resolver's JSON as dicts, as before.

Error answers become the project's errors: 4xx -> :class:`ClaimsAPIError` (an
:class:`~schemas.errors.InvalidDataError` carrying ``status``, ``code`` and the error
object), 404 -> :class:`ClaimsNotFoundError`; 5xx and connection failures ->
:class:`~resolver.errors.ResolverUnavailableError`.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import aiohttp

from resolver import ranking
from resolver.discovery import Query
from resolver.errors import ResolverUnavailableError
from resolver.tls import tls_context
from schemas import _json
from schemas.errors import InvalidDataError, NotFoundError

__all__ = [
    "Claim",
    "ClaimsAPIError",
    "ClaimsClient",
    "ClaimsNotFoundError",
    "Holdings",
    "query_to_json",
]


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected an integer, got {value!r}")
    return value


@dataclass(frozen=True, slots=True)
class Claim:
    """A claim on ``units`` of ``cpid`` until ``expires_at`` (Unix seconds).

    ``holder`` and ``created_at`` are known for claims listed by :meth:`ClaimsClient.holdings`
    (``None`` for the answer of :meth:`ClaimsClient.acquire`).  A gang has ``parts``
    (``(cpid, units)`` each; ``cpid`` is its first part, ``units`` its total).
    """

    claim_id: str
    cpid: str
    units: int
    expires_at: int
    holder: str | None = None
    created_at: int | None = None
    parts: tuple[tuple[str, int], ...] = ()

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any]) -> Claim:
        try:
            return cls(
                claim_id=str(obj["claim_id"]),
                cpid=str(obj["cpid"]),
                units=_int(obj["units"]),
                expires_at=_int(obj["expires_at"]),
                holder=None if obj.get("holder") is None else str(obj["holder"]),
                created_at=None if obj.get("created_at") is None else _int(obj["created_at"]),
                parts=tuple((str(p["cpid"]), _int(p["units"])) for p in obj.get("parts") or ()),
            )
        except (KeyError, TypeError) as exc:
            raise InvalidDataError(f"not a claim: {exc!r}") from exc


@dataclass(frozen=True, slots=True)
class Holdings:
    """What a token's holder holds now: ``units`` in total over ``claims``.  Iterable."""

    holder: str
    units: int
    claims: tuple[Claim, ...]

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any]) -> Holdings:
        try:
            return cls(
                holder=str(obj["holder"]),
                units=_int(obj["units"]),
                claims=tuple(Claim.from_dict(c) for c in obj["claims"]),
            )
        except (KeyError, TypeError) as exc:
            raise InvalidDataError(f"not a claims listing: {exc!r}") from exc

    def __iter__(self) -> Iterator[Claim]:
        return iter(self.claims)

    def __len__(self) -> int:
        return len(self.claims)


class ClaimsAPIError(InvalidDataError):
    """The resolver refused a claims request (4xx); ``code`` is its ``error.code``."""

    def __init__(self, message: str, *, status: int, code: str, error: dict[str, Any]) -> None:
        self.status = status
        self.code = code
        self.error = error
        super().__init__(message)


class ClaimsNotFoundError(ClaimsAPIError, NotFoundError):
    """HTTP 404: no such CPID or claim."""


def query_to_json(query: Query, roots: Iterable[str] | None = None) -> dict[str, Any]:
    """The ``"query"`` object of ``POST /v1/claims`` for ``query`` (``live`` is implied);
    ``roots``: on a federated resolver, the roots whose index clusters may take it."""
    out: dict[str, Any] = {}
    for name in ("kind", "within", "accelerator", "min_free", "near", "max_latency_ms"):
        value = getattr(query, name)
        if value is not None:
            out[name] = value
    if query.labels:
        out["label"] = [f"{k}:{v}" for k, v in query.labels]
    out["limit"] = query.limit
    if query.sort is not None:
        out["sort"] = query.sort
    if query.weights:
        out["weights"] = ranking.weights_text(query.weights)
    if roots is not None:
        out["roots"] = ",".join(roots)
    return out


class ClaimsClient:
    """Claims over HTTP; ``async with`` closes the session it opened."""

    def __init__(
        self,
        base_url: str,
        *,
        token: str,
        timeout: float = 15.0,
        session: aiohttp.ClientSession | None = None,
        ssl_context: ssl.SSLContext | None = None,
        cacert: str | os.PathLike[str] | None = None,
    ) -> None:
        """``ssl_context`` (or a context trusting the CA file ``cacert``) verifies the
        resolver's certificate when this client opens its own session."""
        self.base_url = base_url.rstrip("/")
        self._token = token
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session = session
        self._own = session is None
        self._ssl = ssl_context or (tls_context(cacert) if session is None else None)

    async def __aenter__(self) -> ClaimsClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._own and self._session is not None:
            await self._session.close()
            self._session = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=self._timeout, connector=aiohttp.TCPConnector(ssl=self._ssl or True)
            )
        return self._session

    async def _call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        url = self.base_url + path
        headers = {"Authorization": f"Bearer {self._token}"}
        try:
            async with self._http().request(method, url, json=body, headers=headers) as resp:
                raw = await resp.read()
                status = resp.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ResolverUnavailableError(
                f"{method} {url}: resolver unreachable ({exc or type(exc).__name__})"
            ) from exc
        try:
            obj = _json.loads(raw) if raw else None
        except ValueError:
            obj = None
        if status >= 500:
            detail = _message(obj) or raw[:200].decode("utf-8", "replace")
            raise ResolverUnavailableError(f"{method} {url}: HTTP {status}: {detail}")
        if status >= 400:
            err = obj.get("error") if isinstance(obj, dict) else None
            err = err if isinstance(err, dict) else {}
            code = str(err.get("code", f"http_{status}"))
            message = str(err.get("message", raw[:200].decode("utf-8", "replace")))
            cls = ClaimsNotFoundError if status == 404 else ClaimsAPIError
            raise cls(f"HTTP {status} {code}: {message}", status=status, code=code, error=err)
        return status, obj

    async def claim(
        self,
        *,
        cpid: str | None = None,
        query: Query | None = None,
        units: int,
        ttl_s: int | None = None,
        roots: Iterable[str] | None = None,
    ) -> dict[str, Any]:
        """``POST /v1/claims``: ``{"claim_id", "cpid", "units", "expires_at"}``.  ``roots``
        (with a query, on a federated resolver): the roots that may take the claim."""
        if (cpid is None) == (query is None):
            raise InvalidDataError("give a CPID or a query, not both")
        body: dict[str, Any] = {"units": units}
        if cpid is not None:
            body["cpid"] = cpid
        else:
            assert query is not None
            body["query"] = query_to_json(query, roots)
        if ttl_s is not None:
            body["ttl_s"] = ttl_s
        _, obj = await self._call("POST", "/v1/claims", body)
        return dict(obj)

    async def acquire(
        self,
        *,
        cpid: str | None = None,
        query: Query | None = None,
        units: int,
        ttl_s: int | None = None,
        roots: Iterable[str] | None = None,
    ) -> Claim:
        """:meth:`claim`, answered as a :class:`Claim`."""
        return Claim.from_dict(
            await self.claim(cpid=cpid, query=query, units=units, ttl_s=ttl_s, roots=roots)
        )

    async def claim_gang(
        self,
        *,
        query: Query,
        units: int,
        per_resource: int | None = None,
        per_resource_min: int | None = None,
        per_resource_max: int | None = None,
        same_region: bool = False,
        max_pairwise_latency_ms: float | None = None,
        ttl_s: int | None = None,
        roots: Iterable[str] | None = None,
    ) -> dict[str, Any]:
        """``POST /v1/claims`` with a ``"gang"``: ``units`` in total over resources matching
        ``query``, all or nothing.  ``per_resource`` exactly, or ``per_resource_min`` /
        ``per_resource_max``.  A refusal (409) carries ``error["available"]``, the largest
        gang that fits now."""
        gang: dict[str, Any] = {}
        if per_resource is not None:
            if per_resource_min is not None or per_resource_max is not None:
                raise InvalidDataError("give per_resource or per_resource_min/max, not both")
            gang["per_resource"] = per_resource
        elif per_resource_min is not None or per_resource_max is not None:
            bounds = {"min": per_resource_min, "max": per_resource_max}
            gang["per_resource"] = {k: v for k, v in bounds.items() if v is not None}
        if same_region:
            gang["same_region"] = True
        if max_pairwise_latency_ms is not None:
            gang["max_pairwise_latency_ms"] = max_pairwise_latency_ms
        body: dict[str, Any] = {
            "query": query_to_json(query, roots),
            "units": units,
            "gang": gang,
        }
        if ttl_s is not None:
            body["ttl_s"] = ttl_s
        _, obj = await self._call("POST", "/v1/claims", body)
        return dict(obj)

    async def acquire_gang(self, *, query: Query, units: int, **gang: Any) -> Claim:
        """:meth:`claim_gang`, answered as a :class:`Claim` (with ``parts``)."""
        return Claim.from_dict(await self.claim_gang(query=query, units=units, **gang))

    async def renew(self, claim_id: str, *, ttl_s: int) -> Claim:
        """``PATCH /v1/claims/{claim_id}``: the claim (single or gang) now expires ``ttl_s``
        seconds from now; its units stay held throughout."""
        _, obj = await self._call("PATCH", f"/v1/claims/{claim_id}", {"ttl_s": ttl_s})
        return Claim.from_dict(obj)

    async def holdings(self) -> Holdings:
        """:meth:`list`, answered as :class:`Holdings`."""
        return Holdings.from_dict(await self.list())

    async def release(self, claim_id: str) -> None:
        """``DELETE /v1/claims/{claim_id}``."""
        await self._call("DELETE", f"/v1/claims/{claim_id}")

    async def list(self) -> dict[str, Any]:
        """``GET /v1/claims``: ``{"holder", "units", "claims": [...]}``."""
        _, obj = await self._call("GET", "/v1/claims")
        return dict(obj)


def _message(obj: Any) -> str:
    if isinstance(obj, dict) and isinstance(obj.get("error"), dict):
        return str(obj["error"].get("message", ""))
    return ""
