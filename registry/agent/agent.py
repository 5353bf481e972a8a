"""The node agent: register a compute node with its registry and keep it live.

An :class:`Agent` holds the node's key, probes its hardware (:mod:`registry.agent.probe`)
and speaks the registry's HTTP interface (docs/protocol.md §8):

* :meth:`Agent.register` sends a ``register.v1`` signed by the node's key (proof of
  possession) with a join token; it retries with exponential back-off and full jitter
  on network errors, 5xx and 429 (never sooner than ``Retry-After``), and gives up at
  once on other 4xx answers: 401/403 (:class:`RefusedError`: the token or namespace
  was refused) and the rest (:class:`RegistryRejectedError`).
* :meth:`Agent.heartbeat` sends one ``status.v1`` (``seq`` increasing, state
  :attr:`Agent.state`, free capacity from the probe minus :attr:`Agent.claimed_units`,
  which the registry's ``X-CPI-Claimed`` answer header keeps current, reported as the
  metric ``claimed_units``); :class:`RecordGoneError` means the registry no longer
  holds the record.  :meth:`Agent.set_state` (e.g. ``draining``: no new claims) takes
  effect with a status sent at once by :meth:`Agent.run`.
* :meth:`Agent.deregister` sends a ``deregister.v1``.
* :meth:`Agent.run` does all of it: register, a status every ``heartbeat_s`` seconds,
  re-register when the record is gone or the hardware changed, deregister when
  ``stop`` is set.

The CPID is derived locally from the node key (the serial is self-certifying), so
the agent checks that the registry answered with the CPID it expected, and, given
trust anchors, verifies the returned record and chain like any auditor.

Tokens and keys are never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import logging
import random
import re
import secrets
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeVar

import aiohttp
from pydantic import ValidationError
from yarl import URL

from registry.agent import probe as _probe
from schemas import chain, cpid, dsse, keys
from schemas.errors import (
    EnvelopeError,
    InvalidDataError,
    NotFoundError,
    PayloadError,
    RetrievalError,
)
from schemas.keys import Ed25519PrivateKey
from schemas.models import (
    Attributes,
    Deregister,
    Document,
    Endpoint,
    Location,
    Record,
    Register,
    Status,
    parse_payload,
)

__all__ = [
    "Agent",
    "Backoff",
    "Prober",
    "RecordGoneError",
    "RefusedError",
    "Registration",
    "RegistryRejectedError",
    "RegistryUnavailableError",
    "host_prober",
    "parse_endpoint",
    "parse_label",
    "region_of",
    "registry_urls",
]

_log = logging.getLogger(__name__)

USER_AGENT: Final = "cpi-agent/0.1"
_JSON: Final = "application/json"
CLAIMED_HEADER: Final = "X-CPI-Claimed"
"""Header of the registry's status answer: units claimed on the node (the same name as
``registry.claimed.CLAIMED_HEADER``, not imported: that module needs the etcd client)."""
CLAIMED_METRIC: Final = "claimed_units"
"""Status metric: the claimed units subtracted from the reported free capacity."""
STATES: Final = ("up", "draining", "down")

Prober = Callable[[], Awaitable[_probe.Probe]]
"""An async callable returning the node's current hardware readings."""


# =============================================================================
# Errors
# =============================================================================


class RegistryRejectedError(InvalidDataError):
    """The registry answered 4xx: sending the same request again cannot succeed."""

    code = "rejected"

    def __init__(self, message: str, *, status: int, error_code: str) -> None:
        self.status = status
        self.error_code = error_code
        super().__init__(message)


class RefusedError(RegistryRejectedError):
    """HTTP 401/403 on registration: the join token or the namespace was refused."""

    code = "refused"


class RecordGoneError(RegistryRejectedError, NotFoundError):
    """HTTP 404 on a status or deregistration: the registry no longer holds the record."""

    code = "not_found"


class RegistryUnavailableError(RetrievalError):
    """The registry could not be reached, answered 5xx, or asked to slow down (429)."""

    code = "registry_unavailable"

    def __init__(
        self, message: str, *, retry_after: float | None = None, status: int | None = None
    ) -> None:
        self.retry_after = retry_after
        self.status = status
        """The HTTP status, when the registry answered (``None``: no answer)."""
        super().__init__(message)


# =============================================================================
# Small parsers (CLI flags)
# =============================================================================

_ENDPOINT = re.compile(
    r"^(?P<proto>[a-z]+)://(?:\[(?P<v6>[0-9a-fA-F:.]+)\]|(?P<host>[^:/\s\[\]]+)):(?P<port>\d{1,5})"
    r"(?:/(?P<purpose>[^/\s]*))?$"
)


def parse_endpoint(text: str) -> Endpoint:
    """``proto://host:port/purpose`` (e.g. ``http://10.0.0.5:8000/inference``) -> Endpoint."""
    m = _ENDPOINT.match(text.strip())
    if m is None:
        raise InvalidDataError(
            f"endpoint {text!r} is not proto://host:port[/purpose] "
            "(e.g. http://10.0.0.5:8000/inference, ssh://[2001:db8::1]:22/ssh)"
        )
    try:
        return Endpoint(
            proto=m["proto"],  # type: ignore[arg-type]  # validated by the model
            host=m["v6"] or m["host"],
            port=int(m["port"]),
            purpose=m["purpose"] or "",
        )
    except ValueError as exc:
        raise InvalidDataError(f"endpoint {text!r}: {exc}") from exc


def registry_urls(registry: str | Sequence[str]) -> list[str]:
    """The registry base URLs of an agent: one, several in a sequence, or several in
    one string separated by commas (or spaces); each ``http(s)://host[:port]``."""
    texts = re.split(r"[,\s]+", registry) if isinstance(registry, str) else list(registry)
    urls: list[str] = []
    for text in (t for t in texts if t):
        base = URL(text)
        if base.scheme not in ("http", "https") or not base.host:
            raise InvalidDataError(f"registry URL {text!r} is not http(s)://host[:port]")
        url = str(base).rstrip("/")
        if url not in urls:
            urls.append(url)
    if not urls:
        raise InvalidDataError("no registry URL given")
    return urls


def parse_label(text: str) -> tuple[str, str]:
    """``k=v`` -> ``(k, v)``; keys follow the protocol's ``[a-z0-9._/-]{1,63}``."""
    k, sep, v = text.partition("=")
    if not sep or not re.fullmatch(r"[a-z0-9._/-]{1,63}", k) or len(v) > 256:
        raise InvalidDataError(
            f"label {text!r} is not k=v with k matching [a-z0-9._/-]{{1,63}} and v of at most "
            "256 characters"
        )
    return k, v


def region_of(namespace: str) -> str | None:
    """The most specific GB/T 2260 code in a namespace: ``CN.13.1307.ALIYUN`` -> ``1307``."""
    segs = cpid.parse_namespace(namespace).split(".")[1:]
    codes = [s for s in segs if re.fullmatch(r"\d{2}(?:\d{2}){0,2}", s)]
    return codes[-1] if codes else None


# =============================================================================
# Back-off
# =============================================================================


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential back-off with full jitter: attempt ``n`` waits ``U(0, min(cap, base*2**n))``.

    With a ``Retry-After`` the wait is that long plus a jitter of up to the same
    bound, so a burst of refused agents does not come back in one wave.
    """

    base: float = 0.5
    cap: float = 60.0

    def delay(self, attempt: int, rng: random.Random, retry_after: float | None = None) -> float:
        bound = min(self.cap, self.base * 2 ** min(attempt, 30))
        jitter = rng.uniform(0, bound)
        return jitter if retry_after is None else retry_after + jitter


def _retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


# =============================================================================
# Results
# =============================================================================


@dataclass(frozen=True, slots=True)
class Registration:
    """A successful registration: what the registry answered."""

    cpid: str
    record: Record
    envelope: dsse.Envelope
    chain: tuple[dsse.Envelope, ...]
    heartbeat_s: float
    created: bool
    """``True`` for 201 (a new record), ``False`` for 200 (this key was known)."""


async def host_prober() -> _probe.Probe:
    """Probe this machine (``nvidia-smi`` and /proc reads run in a worker thread)."""
    return await asyncio.to_thread(_probe.probe)


# =============================================================================
# Agent
# =============================================================================


_T = TypeVar("_T")


def _checked(what: str, build: Callable[[], _T]) -> _T:
    """``build()``, a model's validation error turned into :class:`InvalidDataError`
    naming the field (``location.pue: ...``)."""
    try:
        return build()
    except ValidationError as exc:
        where = "; ".join(
            f"{what}.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        raise InvalidDataError(f"the node's {where}") from None


class Agent:
    """One node's agent.  Keyword-only; see the module docstring for the protocol.

    Args:
        registry: Base URL of the registry (``https://host:port``), or several (a
            sequence, or one string separated by commas): instances of the same
            registry, tried in order.  The agent stays with the one that answers; when
            it is unreachable or answers 5xx the agent moves to the next (a status is
            sent again at once, a registration at its next attempt), and after
            ``failback_s`` on another one it tries the first again.
        token: Join token (sent as ``Authorization: Bearer``; never logged).
        namespace: Namespace to register in, e.g. ``CN.31.CMCC``.
        kind: CPID kind (GPU, NPU, CPU, ...).
        key: The node's Ed25519 key; its public key determines the CPID.
        region: GB/T 2260 code for ``location.region``; default: from the namespace.
        site, endpoints, labels: What the record should carry.
        pue, grid_gco2_per_kwh: The site's energy figures for ``location`` (as its
            operator states them; docs/protocol.md §4).
        price_cny_per_unit_hour: The operator's list price for ``attributes``.
        session: An aiohttp session to share (several agents, one pool); else one is
            opened per agent and closed by :meth:`close`.
        ssl_context: For the session the agent opens itself: how to verify the
            registry's certificate (a private CA) and the client certificate it presents
            (mutual TLS); default: the system roots.
        prober: Async hardware probe; :func:`host_prober` by default.
        anchors: When given, the returned record and chain are verified against them.
        backoff: Registration back-off.
        register_attempts: Give up registering after this many tries (``None``: never).
        request_timeout: Bound on each HTTP request, in seconds.
        name: How the agent appears in logs (default: its CPID).
        rng: Random source for jitter (tests pass a seeded one).
        failback_s: Seconds on a later registry URL before the first is tried again.
    """

    def __init__(
        self,
        *,
        registry: str | Sequence[str],
        token: str,
        namespace: str,
        kind: str,
        key: Ed25519PrivateKey,
        region: str | None = None,
        site: str | None = None,
        endpoints: Sequence[Endpoint] = (),
        labels: Mapping[str, str] | None = None,
        pue: float | None = None,
        grid_gco2_per_kwh: float | None = None,
        price_cny_per_unit_hour: float | None = None,
        session: aiohttp.ClientSession | None = None,
        ssl_context: ssl.SSLContext | None = None,
        prober: Prober = host_prober,
        anchors: chain.TrustAnchors | None = None,
        backoff: Backoff | None = None,
        register_attempts: int | None = None,
        request_timeout: float = 10.0,
        name: str | None = None,
        rng: random.Random | None = None,
        failback_s: float = 300.0,
    ) -> None:
        self.registries = registry_urls(registry)
        self.registry = self.registries[0]
        """The registry URL in use (one of :attr:`registries`)."""
        self.failback_s = failback_s
        self._moved_at: float | None = None
        self._token = token
        self.namespace = cpid.parse_namespace(namespace)
        self.kind = kind.upper()
        self._key = key
        self.public_key = keys.public_to_b64url(key)
        self.cpid = cpid.derive(self.namespace, self.kind, keys.public_raw(key)).to_text()
        resolved_region = region or region_of(self.namespace)
        if resolved_region is None:
            raise InvalidDataError(
                f"namespace {self.namespace} has no region code; give the region (GB/T 2260)"
            )
        self.location = _checked(
            "location",
            lambda: Location(
                region=resolved_region, site=site, pue=pue, grid_gco2_per_kwh=grid_gco2_per_kwh
            ),
        )
        if price_cny_per_unit_hour is not None:  # checked against the model's bounds now
            _checked(
                "attributes", lambda: Attributes(price_cny_per_unit_hour=price_cny_per_unit_hour)
            )
        self.price_cny_per_unit_hour = price_cny_per_unit_hour
        self.endpoints = list(endpoints)
        self.labels = dict(labels or {})
        self._session = session
        self._own_session = session is None
        self._ssl = ssl_context
        self._prober = prober
        self.anchors = anchors
        self.backoff = backoff or Backoff()
        self.register_attempts = register_attempts
        self.timeout = aiohttp.ClientTimeout(total=request_timeout)
        self.name = name or self.cpid
        self._rng = rng or random.Random()
        self.claimed_units = 0
        """Units known to be claimed (accelerators, CPU cores on nodes without any);
        subtracted from the free capacity.  Set from the registry's ``X-CPI-Claimed``."""
        self.state: str = "up"
        self._wake = asyncio.Event()
        self.registration: Registration | None = None
        self._registered_attributes: Attributes | None = None
        self.last_probe: _probe.Probe | None = None
        self.seq = time.time_ns() // 1_000_000
        """Status sequence number: starts at the start time in ms, +1 per status, so it
        keeps increasing across restarts of the agent."""
        self.heartbeats_sent = 0
        self._warned_no_accelerator = False
        self.registrations = 0

    def __repr__(self) -> str:
        return f"Agent({self.cpid}, registry={self.registry})"

    # -- session ---------------------------------------------------------------------

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                headers={"User-Agent": USER_AGENT},
                connector=aiohttp.TCPConnector(ssl=self._ssl or True),
            )
            self._own_session = True
        return self._session

    async def close(self) -> None:
        """Close the HTTP session if this agent opened it."""
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> Agent:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- documents -------------------------------------------------------------------

    @property
    def heartbeat_s(self) -> float | None:
        return None if self.registration is None else self.registration.heartbeat_s

    async def probe(self) -> _probe.Probe:
        """Probe the hardware now (and remember the reading)."""
        self.last_probe = await self._prober()
        return self.last_probe

    def attributes(self) -> Attributes:
        attrs = (self.last_probe or _probe.Probe(None, None, None)).attributes()
        if self.price_cny_per_unit_hour is None:
            return attrs
        return attrs.model_copy(update={"price_cny_per_unit_hour": self.price_cny_per_unit_hour})

    def register_payload(self) -> Register:
        """A fresh ``register.v1`` (new nonce, current time) from the last probe."""
        return Register(
            namespace=self.namespace,
            kind=self.kind,
            public_key=self.public_key,
            nonce=secrets.token_urlsafe(18),
            timestamp=int(time.time()),
            endpoints=self.endpoints,
            location=self.location,
            attributes=self.attributes(),
            labels=self.labels,
        )

    def status_payload(self) -> Status:
        """The next ``status.v1`` (``seq`` advanced) from the last probe."""
        reading = self.last_probe or _probe.Probe(None, None, None)
        self.seq += 1
        claimed = self.claimed_units
        capacity = reading.capacity(claimed=claimed)
        if not reading.gpus and capacity.cpu_free is not None:  # claims are in CPU cores
            capacity = capacity.model_copy(update={"cpu_free": max(0, capacity.cpu_free - claimed)})
        return Status(
            cpid=self.cpid,
            seq=self.seq,
            observed_at=time.time_ns() // 1_000_000,
            state=self.state,  # type: ignore[arg-type]  # validated by the model
            capacity=capacity,
            metrics={**reading.metrics(), CLAIMED_METRIC: claimed},
        )

    def set_state(self, state: str) -> None:
        """Report ``state`` (``up``, ``draining``: take no new claims, ``down``) from the
        next status on; :meth:`run` sends that status at once."""
        if state not in STATES:
            raise InvalidDataError(f"state {state!r}: expected one of {', '.join(STATES)}")
        if state != self.state:
            _log.info("%s: state %s -> %s", self.name, self.state, state)
        self.state = state
        self._wake.set()

    def sign(self, doc: Document) -> dsse.Envelope:
        return dsse.sign(doc.media_type(), doc.to_json(), self._key)

    # -- HTTP ------------------------------------------------------------------------

    def _fail_over(self, exc: RegistryUnavailableError) -> bool:
        """Move to the next registry URL after *exc*; ``False`` when there is none or
        the registry only asked to slow down (429)."""
        if len(self.registries) < 2 or exc.status == 429:
            return False
        at = self.registries.index(self.registry) if self.registry in self.registries else -1
        nxt = self.registries[(at + 1) % len(self.registries)]
        _log.warning("%s: %s; moving to registry %s", self.name, exc, nxt)
        self.registry = nxt
        self._moved_at = time.monotonic() if nxt != self.registries[0] else None
        return True

    def _fail_back(self) -> None:
        """Back to the first registry URL after ``failback_s`` on another one."""
        if (
            self._moved_at is not None
            and time.monotonic() - self._moved_at >= self.failback_s
            and self.registry != self.registries[0]
        ):
            _log.info("%s: trying the first registry %s again", self.name, self.registries[0])
            self.registry = self.registries[0]
            self._moved_at = None

    async def _send(
        self, method: str, path: str, body: bytes, *, auth: bool = False
    ) -> tuple[int, bytes, Mapping[str, str]]:
        """One request; network errors and timeouts become RegistryUnavailableError."""
        headers = {"Content-Type": _JSON, "User-Agent": USER_AGENT}
        if auth:
            headers["Authorization"] = f"Bearer {self._token}"
        url = URL(self.registry + path, encoded=True)
        try:
            async with self._http().request(
                method, url, data=body, headers=headers, timeout=self.timeout
            ) as resp:
                return resp.status, await resp.read(), resp.headers
        except (aiohttp.ClientError, TimeoutError) as exc:
            detail = str(exc) or type(exc).__name__
            raise RegistryUnavailableError(
                f"{method} {self.registry}{path}: registry unreachable ({detail})"
            ) from exc

    @staticmethod
    def _error(status: int, body: bytes) -> tuple[str, str]:
        """``(code, message)`` of an error answer, however it is shaped."""
        try:
            err = json.loads(body)["error"]
            return str(err.get("code", "")), str(err.get("message", ""))
        except (ValueError, KeyError, TypeError, AttributeError):
            text = body[:200].decode("utf-8", "replace").strip()
            return f"http_{status}", text or f"HTTP {status}"

    def _raise_for(self, what: str, status: int, body: bytes, headers: Mapping[str, str]) -> None:
        code, message = self._error(status, body)
        detail = f"{what}: HTTP {status} {code}: {message}"
        if status == 429 or status >= 500:
            raise RegistryUnavailableError(
                detail, retry_after=_retry_after(headers.get("Retry-After"))
            )
        if status == 404:
            raise RecordGoneError(detail, status=status, error_code=code)
        if status in (401, 403):
            raise RefusedError(detail, status=status, error_code=code)
        raise RegistryRejectedError(detail, status=status, error_code=code)

    # -- register --------------------------------------------------------------------

    def _accept(self, status: int, body: bytes) -> Registration:
        """Check a 200/201 answer: the CPID we derived, our key, and (with anchors) the chain."""
        try:
            obj = json.loads(body)
            env = dsse.Envelope.from_dict(obj["record"])
            certs = tuple(dsse.Envelope.from_dict(c) for c in obj.get("chain", []))
            heartbeat_s = float(obj["heartbeat_s"])
            answered = str(obj["cpid"])
        except (ValueError, KeyError, TypeError, EnvelopeError) as exc:
            raise PayloadError(
                f"registry answered {status} with an unusable body (expected cpid, record, chain, "
                f"heartbeat_s): {exc!r}"
            ) from exc
        if answered != self.cpid:
            raise PayloadError(
                f"registry answered CPID {answered}, expected {self.cpid} (derived from our key)"
            )
        if self.anchors is not None:
            rec = chain.require_record(env, certs, anchors=self.anchors)
        else:
            rec = parse_payload(env.payload_type, env.payload, Record)
        if rec.cpid != self.cpid or rec.public_key != self.public_key:
            raise PayloadError(
                f"registry's record is for {rec.cpid} with key {rec.public_key}, expected "
                f"{self.cpid} with our key {self.public_key}"
            )
        if not heartbeat_s > 0:
            raise PayloadError(f"registry answered heartbeat_s {heartbeat_s}, expected > 0")
        return Registration(answered, rec, env, certs, heartbeat_s, status == 201)

    async def register_once(self) -> Registration:
        """One registration attempt (probes first); raises on any failure."""
        reading = await self.probe()
        if self.kind in ("GPU", "NPU") and not reading.gpus and not self._warned_no_accelerator:
            self._warned_no_accelerator = True
            _log.warning(
                "%s: kind %s but the probe found no accelerator (nvidia-smi not on PATH?); "
                "registering without accelerators",
                self.name,
                self.kind,
            )
        payload = self.register_payload()
        env = self.sign(payload)
        status, body, headers = await self._send(
            "POST", "/v1/registrations", env.to_json(), auth=True
        )
        if status not in (200, 201):
            self._raise_for(f"registration of {self.cpid}", status, body, headers)
        reg = self._accept(status, body)
        self.registration = reg
        self._registered_attributes = payload.attributes
        self.registrations += 1
        _log.info(
            "%s: registered %s (%s, record version %d); status every %g s",
            self.name,
            reg.cpid,
            "new" if reg.created else "known key",
            reg.record.version,
            reg.heartbeat_s,
        )
        return reg

    async def register(self) -> Registration:
        """Register, retrying transient failures with back-off (see :class:`Backoff`).

        Raises:
            RefusedError: the token or namespace was refused (401/403); not retried.
            RegistryRejectedError: any other 4xx; not retried.
            RegistryUnavailableError: still failing after ``register_attempts`` tries.
        """
        attempt = 0
        while True:
            try:
                return await self.register_once()
            except RefusedError as exc:
                _log.error(
                    "%s: the registry refused the join token or namespace %s (%s); not "
                    "retrying: check the token and that it is for this namespace and kind",
                    self.name,
                    self.namespace,
                    exc,
                )
                raise
            except RegistryUnavailableError as exc:
                attempt += 1
                if self.register_attempts is not None and attempt >= self.register_attempts:
                    _log.error("%s: giving up after %d attempts: %s", self.name, attempt, exc)
                    raise
                self._fail_over(exc)  # the next attempt (a fresh nonce) goes to the next URL
                delay = self.backoff.delay(attempt, self._rng, exc.retry_after)
                level = logging.DEBUG
                if attempt in (1, 5) or attempt % 20 == 0:
                    # a 429 is the registry pacing a burst, not a fault
                    level = logging.INFO if exc.status == 429 else logging.WARNING
                _log.log(
                    level,
                    "%s: registration attempt %d failed (%s); retrying in %.2f s",
                    self.name,
                    attempt,
                    exc,
                    delay,
                )
                await asyncio.sleep(delay)

    # -- heartbeat -------------------------------------------------------------------

    async def heartbeat(self, *, probe: bool = True) -> Status:
        """Send one signed status; returns what was sent.

        Raises:
            RecordGoneError: the registry answered 404 (register again).
            RegistryRejectedError: another 4xx (e.g. a refused sequence number).
            RegistryUnavailableError: network error, 5xx or 429.
        """
        if probe or self.last_probe is None:
            await self.probe()
        doc = self.status_payload()
        env = self.sign(doc).to_json()
        self._fail_back()
        for tries_left in range(len(self.registries) - 1, -1, -1):
            try:
                status, body, headers = await self._send(
                    "PUT", f"/v1/resources/{self.cpid}/status", env
                )
                if status >= 500:
                    self._raise_for(f"status of {self.cpid}", status, body, headers)
                break
            except RegistryUnavailableError as exc:
                # the same status again on the next instance: its seq is not above one
                # the first accepted only if that one wrote it (then 409, not a loss)
                if not tries_left or not self._fail_over(exc):
                    raise
        if status not in (200, 204):
            self._raise_for(f"status of {self.cpid}", status, body, headers)
        self._take_claimed(headers.get(CLAIMED_HEADER))
        self.heartbeats_sent += 1
        _log.debug(
            "%s: status seq %d sent (%d accelerators free)",
            self.name,
            doc.seq,
            doc.capacity.accelerators_free,
        )
        return doc

    def _take_claimed(self, header: str | None) -> None:
        """Remember the registry's count of claimed units (reported from the next status)."""
        if header is None:
            return  # a registry without claims support: keep what a library user set
        try:
            units = int(header)
        except ValueError:
            units = -1
        if units < 0:
            _log.warning("%s: ignoring %s: %r (not a count)", self.name, CLAIMED_HEADER, header)
            return
        if units != self.claimed_units:
            _log.info("%s: %d units claimed (was %d)", self.name, units, self.claimed_units)
            self.claimed_units = units

    # -- deregister ------------------------------------------------------------------

    async def deregister(self, *, deadline_s: float = 10.0) -> bool:
        """Remove the record; ``False`` when the registry did not hold it.

        Transient failures are retried (short back-off) until ``deadline_s``.
        """
        loop = asyncio.get_running_loop()
        end = loop.time() + deadline_s
        attempt = 0
        while True:
            doc = Deregister(
                cpid=self.cpid, nonce=secrets.token_urlsafe(18), timestamp=int(time.time())
            )
            try:
                status, body, headers = await self._send(
                    "DELETE", f"/v1/resources/{self.cpid}", self.sign(doc).to_json()
                )
                if status in (200, 204):
                    _log.info("%s: deregistered %s", self.name, self.cpid)
                    self.registration = None
                    return True
                self._raise_for(f"deregistration of {self.cpid}", status, body, headers)
            except RecordGoneError:
                _log.info("%s: %s was not registered; nothing to remove", self.name, self.cpid)
                self.registration = None
                return False
            except RegistryUnavailableError as exc:
                attempt += 1
                self._fail_over(exc)
                delay = min(
                    Backoff(base=0.2, cap=2.0).delay(attempt, self._rng, exc.retry_after), 5.0
                )
                if loop.time() + delay >= end:
                    _log.error("%s: could not deregister %s: %s", self.name, self.cpid, exc)
                    raise
                _log.warning("%s: deregistration failed (%s); retrying", self.name, exc)
                await asyncio.sleep(delay)

    # -- the loop --------------------------------------------------------------------

    async def run(self, stop: asyncio.Event | None = None, *, once: bool = False) -> None:
        """Register, then send status every ``heartbeat_s`` until ``stop`` is set; deregister.

        With ``once``: register, send one status, return (the record stays).  When
        ``stop`` is set before the registration completed, return without one.
        Registration errors (:class:`RefusedError`, ...) propagate.
        """
        stop = stop if stop is not None else asyncio.Event()
        if not await self._register_until(stop):
            _log.info("%s: stopped before registration completed", self.name)
            return
        if once:
            await self.heartbeat(probe=False)
            return
        failing = False
        delay = 0.0  # the first status right after registering
        while not await self._pause(stop, delay):
            assert self.registration is not None
            period = self.registration.heartbeat_s
            delay = period * self._rng.uniform(0.85, 1.0)
            try:
                await self.probe()
                if self._hardware_changed():
                    _log.info(
                        "%s: hardware changed; registering again to update the record", self.name
                    )
                    if not await self._register_until(stop):
                        break
                await self.heartbeat(probe=False)
                if failing:
                    _log.info("%s: status accepted again", self.name)
                failing = False
            except RecordGoneError:
                _log.warning(
                    "%s: the registry no longer holds %s; registering again", self.name, self.cpid
                )
                if not await self._register_until(stop):
                    break
                delay = 0.0
            except RegistryUnavailableError as exc:
                if not failing:
                    _log.warning("%s: status not delivered (%s); will keep trying", self.name, exc)
                failing = True
                if exc.retry_after is not None:
                    delay = max(delay, exc.retry_after)
            except RefusedError:
                raise
            except RegistryRejectedError as exc:
                _log.error("%s: status refused: %s", self.name, exc)
        await self.deregister()

    async def _pause(self, stop: asyncio.Event, seconds: float) -> bool:
        """Sleep up to ``seconds``, less when :meth:`set_state` is called (a status is
        due at once); ``True`` when ``stop`` was set."""
        if not self._wake.is_set() and not stop.is_set():
            waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self._wake.wait())]
            try:
                await asyncio.wait(
                    waits, timeout=max(0.0, seconds), return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                for w in waits:
                    w.cancel()
        self._wake.clear()
        return stop.is_set()

    def _hardware_changed(self) -> bool:
        """The probe now reports other hardware than the last registration sent."""
        sent = self._registered_attributes
        return sent is not None and self.last_probe is not None and (self.attributes() != sent)

    async def _register_until(self, stop: asyncio.Event) -> bool:
        """Register unless ``stop`` is set first; ``True`` when registered."""
        task = asyncio.ensure_future(self.register())
        stopper = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
        if task.done():
            task.result()  # raises what register() raised
            return True
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return False

    # -- dry run ---------------------------------------------------------------------

    async def dry_run(self) -> dict[str, Any]:
        """What :meth:`register` would send, without any network: CPID, payload, envelope."""
        reading = await self.probe()
        if self.kind in ("GPU", "NPU") and not reading.gpus and not self._warned_no_accelerator:
            self._warned_no_accelerator = True
            _log.warning(
                "%s: kind %s but the probe found no accelerator (nvidia-smi not on PATH?); "
                "registering without accelerators",
                self.name,
                self.kind,
            )
        payload = self.register_payload()
        env = self.sign(payload)
        return {
            "cpid": self.cpid,
            "registry": self.registry,
            "payload": json.loads(payload.to_json()),
            "envelope": env.to_dict(),
        }
