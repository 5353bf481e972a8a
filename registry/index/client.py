"""The etcd client: :class:`Index`, a typed facade over etcd's KV, lease, watch,
cluster and maintenance APIs with a timeout on every call.

It owns the connection (endpoints, TLS, token auth) and the mapping of etcd and gRPC
errors onto :mod:`schemas.errors` (:meth:`Index._translate`, the one place).

Every call is bounded by ``Index.timeout``.  Within it, requests whose repetition is
harmless (reads, put, delete, lease grant/revoke) are retried after ``UNAVAILABLE`` or
a timed-out attempt, which rides over member restarts and leader elections.
Transactions and compaction are retried only when the request provably never left
the client: after an ambiguous failure a retried compare could report "failed" when
the first attempt had in fact succeeded, so the caller gets the error and must read
back before deciding.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import random
import re
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Final, TypeVar
from urllib.parse import urlsplit

import grpc
import grpc.aio
from etcd3aio import (
    AlarmType,
    EtcdConnectionError,
    EtcdPermissionDeniedError,
    EtcdTransientError,
    EtcdUnauthenticatedError,
    PermissionType,
    TokenRefresher,
    prefix_range_end,
)
from etcd3aio.auth import AuthService
from etcd3aio.cluster import ClusterService
from etcd3aio.kv import KVService
from etcd3aio.lease import LeaseService
from etcd3aio.maintenance import MaintenanceService

from registry.index._rpc import (
    LeaseStub,
    WatchStub,
    cmp_to_pb,
    invalid_token,
    is_access_refusal,
    never_sent,
    op_to_pb,
)
from registry.index.layout import ROOT
from registry.index.lease import Lease
from registry.index.values import (
    KV,
    CasResult,
    Cmp,
    IndexAccessDeniedError,
    IndexCompactedError,
    IndexRejectedError,
    KVPage,
    Member,
    MemberStatus,
    Op,
    OpResult,
    TxnResult,
    _kb,
    _vb,
)
from registry.index.watch import Watch
from schemas.errors import IndexTimeoutError, IndexUnavailableError, RetrievalError

__all__ = ["Index", "TLSMaterial"]

_log = logging.getLogger(__name__)
T = TypeVar("T")

# =============================================================================
# Connection set-up
# =============================================================================

_DEFAULT_PORT: Final = 2379
_CHANNEL_OPTIONS: Final[list[tuple[str, str | int | bool]]] = [
    ("grpc.lb_policy_name", "round_robin"),
    # etcd enforces keepalive like grpc-go servers do: pings closer than
    # --grpc-keepalive-min-time (default 5 s) or sent while no call is active count as
    # strikes, and a few strikes get GOAWAY ENHANCE_YOUR_CALM "too_many_pings".  So ping
    # every 10 s, and only while a call (a watch, a lease keep-alive, a request) is open:
    # an idle channel is checked by its next call's deadline instead.
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", False),
    # reconnect to a restarted member quickly (gRPC's default backs off to 120 s).  Not
    # grpc.min_reconnect_backoff_ms: that is also the connect timeout (default 20 s).
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2_000),
    # watch catch-up batches with prev_kv can exceed gRPC's default 4 MiB
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
]
TLSMaterial = bytes | str | os.PathLike[str] | None


@dataclass(frozen=True, slots=True)
class _Endpoint:
    host: str
    port: int
    tls: bool | None  # None: no scheme given

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def _parse_endpoint(text: str) -> _Endpoint:
    raw = text.strip()
    if not raw:
        raise ValueError("empty etcd endpoint")
    tls: bool | None = None
    if "://" not in raw:
        raw = "//" + raw
    parts = urlsplit(raw)
    if parts.scheme:
        if parts.scheme not in ("http", "https"):
            raise ValueError(f"etcd endpoint {text!r}: scheme must be http or https")
        tls = parts.scheme == "https"
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise ValueError(f"etcd endpoint {text!r}: expected [http[s]://]host[:port]")
    try:
        port = parts.port or _DEFAULT_PORT
    except ValueError as exc:
        raise ValueError(f"etcd endpoint {text!r}: bad port") from exc
    host = parts.hostname
    if not host:
        raise ValueError(f"etcd endpoint {text!r}: no host")
    if host == "localhost":
        host = "127.0.0.1"
    return _Endpoint(host, port, tls)


def _ip_version(host: str) -> int | None:
    try:
        return ipaddress.ip_address(host).version
    except ValueError:
        return None


def _load_tls(value: TLSMaterial, what: str) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    try:
        return Path(value).read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read {what} from {os.fspath(value)!r}: {exc}") from exc


@dataclass(slots=True)
class _Conn:
    channel: grpc.aio.Channel
    kv: KVService
    lease: LeaseService
    auth: AuthService
    cluster: ClusterService
    maintenance: MaintenanceService
    watch_stub: Any
    lease_stub: Any


# =============================================================================
# Index
# =============================================================================


_WINDOW_BYTES: Final = 48
"""Bytes after a listing's prefix that place a key on :meth:`Index.iter_prefix`'s
number line (keys that agree on more are one point there: no gain, no harm)."""


def _position(base: bytes, key: bytes) -> int:
    """Where *key* (under the prefix *base*) lies on the listing's number line."""
    return int.from_bytes(
        key[len(base) : len(base) + _WINDOW_BYTES].ljust(_WINDOW_BYTES, b"\0"), "big"
    )


def _page_width(base: bytes, kvs: Sequence[Any], page_size: int, width: int) -> int:
    """Positions a page's worth of keys spans, judged by the second half of a full page
    (its first half may have begun before a gap); *width* (the estimate so far) when one
    key is all there is to judge by."""
    n = len(kvs)
    if n < 2:
        return width
    first = n // 2 if n >= 4 else 0
    span = _position(base, bytes(kvs[-1].key)) - _position(base, bytes(kvs[first].key))
    return max(1, span * page_size // (n - 1 - first))


def _window_end(base: bytes, start: bytes, width: int) -> bytes | None:
    """The key *width* positions after *start*, or ``None`` (no estimate yet, or past the
    prefix: the window runs to the prefix's end).  Always after *start* when not None."""
    if width <= 0:
        return None
    at = _position(base, start) + width
    if at >= 1 << (8 * _WINDOW_BYTES):
        return None
    key = base + at.to_bytes(_WINDOW_BYTES, "big").rstrip(b"\0")
    return key if key > start else None


class Index:
    """Async client of the national index (one etcd cluster).

    Use as ``async with Index(endpoints=[...]) as index:``.  Every call is bounded by
    *timeout* seconds and fails with :class:`~schemas.errors.IndexUnavailableError` or
    :class:`~schemas.errors.IndexTimeoutError` (never hangs).

    Args:
        endpoints: ``host:port`` or ``http(s)://host:port`` of one or more members.
            IP literals and a single host name are used as given; several host names
            are resolved once at :meth:`connect`.  Calls round-robin over members.
        timeout: Bound on every call, in seconds.
        ca_cert, cert_key, cert_chain: PEM bytes or file paths; ``ca_cert`` (or an
            ``https://`` endpoint, then with the system roots) enables TLS, the other
            two add a client certificate.
        tls_server_name: Name to verify in the server certificate (needed when several
            endpoints are given as different IP addresses; members on one address, ports
            apart, are verified against that address).
        user, password: etcd token auth; the token is refreshed every
            *token_refresh_interval* seconds.
        watch_backoff, watch_backoff_max: First and largest delay (s) between watch
            reconnects (exponential, with jitter).
    """

    def __init__(
        self,
        *,
        endpoints: Sequence[str],
        timeout: float = 5.0,
        ca_cert: TLSMaterial = None,
        cert_key: TLSMaterial = None,
        cert_chain: TLSMaterial = None,
        tls_server_name: str | None = None,
        user: str | None = None,
        password: str | None = None,
        token_refresh_interval: float = 240.0,
        watch_backoff: float = 0.1,
        watch_backoff_max: float = 2.0,
    ) -> None:
        if isinstance(endpoints, str):
            raise TypeError("endpoints must be a sequence of strings; see Index.from_url_list")
        parsed = [_parse_endpoint(e) for e in endpoints]
        if not parsed:
            raise ValueError("at least one etcd endpoint is required")
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        if (user is None) != (password is None):
            raise ValueError("user and password must be given together")
        schemes = {e.tls for e in parsed if e.tls is not None}
        if len(schemes) > 1:
            raise ValueError("etcd endpoints mix http:// and https://")
        if ca_cert is not None and schemes == {False}:
            raise ValueError("ca_cert given but the endpoints are http://")
        if ca_cert is None and (cert_key is not None or cert_chain is not None):
            raise ValueError("cert_key/cert_chain need ca_cert (or https:// endpoints)")
        self._endpoints = parsed
        self.timeout = float(timeout)
        self._tls = ca_cert is not None or schemes == {True}
        self._ca_cert = _load_tls(ca_cert, "ca_cert")
        self._cert_key = _load_tls(cert_key, "cert_key")
        self._cert_chain = _load_tls(cert_chain, "cert_chain")
        self._tls_server_name = tls_server_name
        self._user = user
        self._password = password
        self._token_refresh_interval = token_refresh_interval
        self.watch_backoff = watch_backoff
        self.watch_backoff_max = watch_backoff_max
        self._conn: _Conn | None = None
        self._token: str | None = None
        self._refresher: TokenRefresher | None = None
        self._auth_lock = asyncio.Lock()
        self.reauthentications = 0
        """Times a token etcd no longer knew was replaced (see :meth:`reauthenticate`)."""
        self._leases: weakref.WeakSet[Lease] = weakref.WeakSet()
        self.watch_reconnects = 0
        """Total watch reconnects made by watches of this index (for metrics)."""

    @classmethod
    def from_url_list(cls, urls: str, **options: Any) -> Index:
        """Build from a comma- or space-separated URL list, e.g. ``"http://a:2379,http://b:2379"``.

        *options* are the keyword arguments of the constructor.
        """
        return cls(endpoints=[u for u in re.split(r"[,\s]+", urls) if u], **options)

    @property
    def endpoints(self) -> tuple[str, ...]:
        """The normalised ``host:port`` endpoints."""
        return tuple(str(e) for e in self._endpoints)

    def __repr__(self) -> str:
        return f"Index(endpoints={list(self.endpoints)!r}, timeout={self.timeout:g})"

    # -- life cycle ------------------------------------------------------------

    async def _target(self) -> tuple[str, str | None]:
        """The gRPC target for the endpoints and a TLS name to verify (if not the target's)."""
        versions = {_ip_version(e.host) for e in self._endpoints}
        # several members on one address (ports apart, e.g. a loopback cluster): the
        # target's default authority is not a name, so verify that address
        hosts = {e.host for e in self._endpoints}
        same = next(iter(hosts)) if len(hosts) == 1 and len(self._endpoints) > 1 else None
        if versions == {4}:
            return "ipv4:" + ",".join(self.endpoints), same
        if versions == {6}:
            return "ipv6:" + ",".join(self.endpoints), same
        if len(self._endpoints) == 1:
            return f"dns:///{self.endpoints[0]}", None
        loop = asyncio.get_running_loop()
        addrs: list[str] = []
        for e in self._endpoints:
            if _ip_version(e.host) == 6:
                raise ValueError("cannot mix IPv6 literals with host names in one endpoint list")
            infos = await loop.getaddrinfo(e.host, e.port, family=2)  # AF_INET
            addrs.extend(f"{info[4][0]}:{e.port}" for info in infos[:1])
        first_name = next(e.host for e in self._endpoints if _ip_version(e.host) is None)
        return "ipv4:" + ",".join(addrs), first_name

    async def connect(self) -> None:
        """Open the channel (and authenticate, if a user was given).  Idempotent."""
        if self._conn is not None:
            return
        try:
            target, name = await self._target()
        except OSError as exc:
            raise IndexUnavailableError(
                f"cannot resolve etcd endpoints {', '.join(self.endpoints)}: {exc}"
            ) from exc
        options = list(_CHANNEL_OPTIONS)
        if self._tls:
            server_name = self._tls_server_name or name
            if server_name is not None:
                options.append(("grpc.ssl_target_name_override", server_name))
            creds = grpc.ssl_channel_credentials(
                root_certificates=self._ca_cert,
                private_key=self._cert_key,
                certificate_chain=self._cert_chain,
            )
            channel = grpc.aio.secure_channel(target, creds, options=options)
        else:
            channel = grpc.aio.insecure_channel(target, options=options)
        self._conn = _Conn(
            channel=channel,
            kv=KVService(channel),
            lease=LeaseService(channel),
            auth=AuthService(channel),
            cluster=ClusterService(channel),
            maintenance=MaintenanceService(channel),
            watch_stub=WatchStub(channel),
            lease_stub=LeaseStub(channel),
        )
        if self._user is not None and self._password is not None:
            refresher = TokenRefresher(
                self._conn.auth,
                self._set_token,
                self._user,
                self._password,
                interval=self._token_refresh_interval,
            )
            try:
                with self._errors(f"authenticate as {self._user!r}"):
                    async with asyncio.timeout(self.timeout):
                        await refresher.__aenter__()
            except BaseException:
                await self.close()
                raise
            self._refresher = refresher

    async def close(self) -> None:
        """Stop lease keep-alives (without revoking), token refresh, and close the channel."""
        for lease in list(self._leases):
            await lease.stop_keepalive()
        if self._refresher is not None:
            refresher, self._refresher = self._refresher, None
            await refresher.__aexit__(None, None, None)
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await conn.channel.close()

    async def __aenter__(self) -> Index:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def _c(self) -> _Conn:
        if self._conn is None:
            raise RuntimeError(f"{self!r} is not connected (use 'async with' or connect())")
        return self._conn

    def _set_token(self, token: str | None) -> None:
        self._token = token
        if self._conn is not None:
            c = self._conn
            for svc in (c.kv, c.lease, c.auth, c.cluster, c.maintenance):
                svc.set_token(token)

    async def reauthenticate(self, stale: str | None) -> bool:
        """Get a new token when etcd refused *stale* as invalid; ``False`` without a user.

        etcd keeps simple tokens in each member's memory: a member that restarted, or a
        member that had not applied the token yet, answers "invalid auth token" for a
        token the others accept.  The refused request was not executed, so the caller
        may send it again (writes included).  Concurrent callers holding the same stale
        token share one authentication.
        """
        if self._user is None or self._password is None or self._conn is None:
            return False
        async with self._auth_lock:
            if self._token != stale:
                return True  # another caller already replaced it
            with self._errors(f"authenticate as {self._user!r}"):
                async with asyncio.timeout(self.timeout):
                    resp = await self._c.auth.authenticate(self._user, self._password)
            self._set_token(resp.token)
            self.reauthentications += 1
            _log.info("etcd refused our auth token as invalid (a member restarted?); new token")
            return True

    def _metadata(self, *extra: tuple[str, str]) -> tuple[tuple[str, str], ...] | None:
        md = ((("token", self._token),) if self._token else ()) + extra
        return md or None

    # -- error mapping (the one place) -------------------------------------------

    def _translate(self, exc: BaseException, operation: str) -> RetrievalError | None:
        """Map an etcd3aio / gRPC / asyncio error to the project's error tree."""
        where = f"{operation} on etcd {','.join(self.endpoints)}"
        if isinstance(exc, TimeoutError | EtcdTransientError):
            return IndexTimeoutError(f"{where} did not finish within {self.timeout:g} s")
        if isinstance(exc, EtcdConnectionError):
            return IndexUnavailableError(f"{where} failed: etcd unreachable ({exc})")
        if isinstance(exc, EtcdUnauthenticatedError | EtcdPermissionDeniedError):
            return IndexAccessDeniedError(f"{where} refused: {exc}")
        if isinstance(exc, grpc.aio.AioRpcError):
            code, detail = exc.code(), exc.details() or ""
            if code is grpc.StatusCode.UNAVAILABLE:
                return IndexUnavailableError(f"{where} failed: etcd unreachable ({detail})")
            if code is grpc.StatusCode.DEADLINE_EXCEEDED:
                return IndexTimeoutError(f"{where} did not finish within {self.timeout:g} s")
            if code is grpc.StatusCode.OUT_OF_RANGE and "compacted" in detail:
                return IndexCompactedError(f"{where} failed: {detail}")
            if is_access_refusal(code, detail):
                return IndexAccessDeniedError(f"{where} refused: {code.name}: {detail}")
            return IndexRejectedError(f"{where} refused: {code.name}: {detail}")
        if isinstance(exc, grpc.aio.UsageError):
            return IndexUnavailableError(f"{where} failed: the channel is closed ({exc})")
        return None

    @contextlib.contextmanager
    def _errors(self, operation: str) -> Iterator[None]:
        """Translate errors raised inside the block (see :meth:`_translate`)."""
        try:
            yield
        except Exception as exc:
            mapped = self._translate(exc, operation)
            if mapped is None:
                raise
            raise mapped from exc

    async def _call(
        self,
        operation: str,
        rpc: Callable[[float], Awaitable[T]],
        *,
        idempotent: bool = True,
    ) -> T:
        """Run one etcd3aio call, bounded by :attr:`timeout` overall, with errors mapped.

        ``rpc(seconds)`` makes a single attempt with that deadline.  *idempotent*
        requests are retried with back-off while time remains, after ``UNAVAILABLE``
        and after an attempt that timed out; each attempt then gets at most half the
        timeout (at least 1 s), because a write forwarded to a leader that has just
        died is silently lost and only etcd's own request timeout would end it.
        Other requests are retried only when they provably never reached etcd.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        per_attempt = max(1.0, self.timeout / 2) if idempotent else self.timeout
        delay = 0.05
        reauth_left = 3
        while True:
            remaining = deadline - loop.time()
            token = self._token
            try:
                with self._errors(operation):
                    return await rpc(max(min(remaining, per_attempt), 0.001))
            except IndexAccessDeniedError as exc:
                # a refused token: the request was not executed; a new token, then again
                if not (invalid_token(exc) and reauth_left > 0 and deadline > loop.time()):
                    raise
                reauth_left -= 1
                if not await self.reauthenticate(token):
                    raise
                continue
            except (IndexUnavailableError, IndexTimeoutError) as exc:
                retry = idempotent or (isinstance(exc, IndexUnavailableError) and never_sent(exc))
                if not retry or deadline - loop.time() <= 2 * delay or self._conn is None:
                    raise
                _log.debug("%s: %s; retrying in %.2f s", operation, exc, delay)
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, 0.5)

    # -- reads ---------------------------------------------------------------------

    async def get(self, key: str) -> KV | None:
        """The KV at *key*, or ``None``."""
        resp = await self._call(
            f"get {key!r}", lambda t: self._c.kv.get(_kb(key), timeout=t, max_attempts=1)
        )
        return KV._from_pb(resp.kvs[0]) if resp.kvs else None

    async def iter_prefix(
        self, prefix: str, *, page_size: int = 500, revision: int = 0, after: str | None = None
    ) -> AsyncIterator[KVPage]:
        """Yield every KV under *prefix* in key order, a page of at most *page_size* at a time.

        All pages are read at one revision: *revision*, or the revision of the first
        page when 0.  If that revision is compacted mid-way,
        :class:`IndexCompactedError` is raised (start again).  *after*: start with the
        first key after this one (to resume a listing that failed after a page).

        Each request asks for a window of the prefix, not for the rest of it: etcd (3.5)
        counts every key from a request's start to its range end to report the total,
        even when it returns a page, so paging through the whole rest of a prefix costs
        etcd O(keys^2 / page_size) (a million keys, pages of 2,000: ~5e8 keys walked,
        minutes of a core).  The windows' ends are estimated from the key density of
        the pages read so far (:func:`_window_end`) and aim at a page's worth of keys;
        whatever the estimate, the windows are contiguous and the last one ends at the
        prefix's end, so the listing is complete.  The first page (one empty page for
        an empty prefix) is always yielded; later empty windows are not.
        """
        if not prefix:
            raise ValueError("prefix must not be empty")
        if page_size < 1:
            raise ValueError(f"page_size must be at least 1, got {page_size}")
        base = _kb(prefix)
        end = prefix_range_end(base)

        def page(start: bytes, stop: bytes, rev: int) -> Callable[[float], Awaitable[Any]]:
            return lambda t: self._c.kv.get(
                start, stop, revision=rev, limit=page_size, timeout=t, max_attempts=1
            )

        start, rev = base, revision
        if after is not None:
            start = max(start, _kb(after) + b"\x00")
        width = 0  # positions a page's worth of keys spans; 0: not known yet
        first = True
        while True:
            stop = _window_end(base, start, width) or end
            resp = await self._call(
                f"list {prefix!r} at revision {rev or 'latest'}", page(start, stop, rev)
            )
            if rev == 0:
                rev = int(resp.header.revision)
            if first or resp.kvs:
                yield KVPage([KV._from_pb(kv) for kv in resp.kvs], rev, int(resp.count))
            first = False
            if resp.more and resp.kvs:  # more in this window: go on inside it
                width = _page_width(base, resp.kvs, page_size, width)
                after_last = bytes(resp.kvs[-1].key) + b"\x00"
                if after_last <= start:  # a member that answers so would page forever
                    raise RetrievalError(
                        f"listing {prefix!r}: etcd answered a page ending at "
                        f"{after_last[:-1][:200]!r}, not after {start[:200]!r}"
                    )
                start = after_last
            elif stop == end:
                return
            else:  # the window held less than a page: widen (x4 at most: gaps between
                # namespaces are vast next to a namespace's span; a wide jump over one
                # would take in whole namespaces beyond it)
                held = len(resp.kvs)
                width = width * 4 if held * 4 <= page_size else width * page_size // held
                start = stop

    async def get_prefix(
        self, prefix: str, *, page_size: int = 500, revision: int = 0
    ) -> tuple[list[KV], int]:
        """Every KV under *prefix* (key order) and the revision of that consistent snapshot.

        Pages of *page_size* keys are all read at the same revision.  When no *revision*
        is given and the snapshot revision is compacted mid-listing, the listing starts
        again (up to three times).
        """
        attempts = 1 if revision else 3
        for attempt in range(1, attempts + 1):
            kvs: list[KV] = []
            rev = revision
            try:
                async for page in self.iter_prefix(prefix, page_size=page_size, revision=revision):
                    kvs.extend(page.kvs)
                    rev = page.revision
            except IndexCompactedError:
                if attempt == attempts:
                    raise
                _log.info("listing %r: snapshot revision compacted; listing again", prefix)
                continue
            return kvs, rev
        raise AssertionError("unreachable")

    async def count_prefix(self, prefix: str) -> int:
        """Number of keys under *prefix*."""
        if not prefix:
            raise ValueError("prefix must not be empty")
        key = _kb(prefix)
        resp = await self._call(
            f"count {prefix!r}",
            lambda t: self._c.kv.get(
                key, prefix_range_end(key), count_only=True, timeout=t, max_attempts=1
            ),
        )
        return int(resp.count)

    async def revision(self) -> int:
        """The current store revision."""
        resp = await self._call(
            "read revision",
            lambda t: self._c.kv.get(_kb(ROOT), count_only=True, timeout=t, max_attempts=1),
        )
        return int(resp.header.revision)

    # -- writes --------------------------------------------------------------------

    async def put(self, key: str, value: bytes | str, *, lease: int = 0) -> int:
        """Write *value* at *key*; return the new store revision."""
        resp = await self._call(
            f"put {key!r}",
            lambda t: self._c.kv.put(_kb(key), _vb(value), lease=lease, timeout=t, max_attempts=1),
        )
        return int(resp.header.revision)

    async def delete(self, key: str) -> bool:
        """Delete *key*; ``True`` if it existed."""
        resp = await self._call(
            f"delete {key!r}",
            lambda t: self._c.kv.delete(_kb(key), timeout=t, max_attempts=1),
        )
        return int(resp.deleted) > 0

    async def delete_prefix(self, prefix: str) -> int:
        """Delete every key under *prefix*; return how many were deleted."""
        if not prefix:
            raise ValueError("prefix must not be empty (see delete_everything)")
        key = _kb(prefix)
        resp = await self._call(
            f"delete prefix {prefix!r}",
            lambda t: self._c.kv.delete(key, prefix_range_end(key), timeout=t, max_attempts=1),
        )
        return int(resp.deleted)

    async def delete_everything(self) -> int:
        """Delete every key in the cluster, ours or not (tests, ``cpi reset``)."""
        resp = await self._call(
            "delete every key",
            lambda t: self._c.kv.delete(b"\x00", b"\x00", timeout=t, max_attempts=1),
        )
        return int(resp.deleted)

    # -- transactions --------------------------------------------------------------------

    async def txn(
        self,
        *,
        compare: Sequence[Cmp] = (),
        success: Sequence[Op] = (),
        failure: Sequence[Op] = (),
    ) -> TxnResult:
        """Run an etcd transaction: if every *compare* holds run *success*, else *failure*.

        Retried only when the request provably never reached etcd: after any other
        unavailable/timeout error the outcome is unknown, and the caller must read back
        before deciding.
        """
        cmps = [cmp_to_pb(c) for c in compare]
        ok = [op_to_pb(o) for o in success]
        nok = [op_to_pb(o) for o in failure]
        keys = sorted({c.key for c in compare} | {o.key for o in (*success, *failure)})
        resp = await self._call(
            f"txn on {keys!r}",
            lambda t: self._c.kv.txn(cmps, ok, nok, timeout=t, max_attempts=1),
            idempotent=False,
        )
        ops = success if resp.succeeded else failure
        results: list[OpResult] = []
        for op, r in zip(ops, resp.responses, strict=True):
            if op.kind == "get":
                results.append(OpResult("get", [KV._from_pb(kv) for kv in r.response_range.kvs]))
            elif op.kind == "delete":
                results.append(OpResult("delete", [], int(r.response_delete_range.deleted)))
            else:
                results.append(OpResult("put", []))
        return TxnResult(bool(resp.succeeded), int(resp.header.revision), results)

    async def _cas(self, compare: Cmp, success: Op) -> CasResult:
        result = await self.txn(compare=[compare], success=[success], failure=[Op.get(compare.key)])
        if result.succeeded:
            return CasResult(True, result.revision, None)
        kvs = result.responses[0].kvs
        return CasResult(False, result.revision, kvs[0] if kvs else None)

    async def put_if_absent(self, key: str, value: bytes | str, *, lease: int = 0) -> CasResult:
        """Create *key* only if it does not exist."""
        return await self._cas(Cmp.absent(key), Op.put(key, value, lease=lease))

    async def compare_and_put(
        self, key: str, value: bytes | str, *, mod_revision: int, lease: int = 0
    ) -> CasResult:
        """Write *key* only if its ``mod_revision`` is still *mod_revision* (0 = absent)."""
        return await self._cas(
            Cmp.mod_revision(key, "==", mod_revision), Op.put(key, value, lease=lease)
        )

    async def compare_and_delete(self, key: str, *, mod_revision: int) -> CasResult:
        """Delete *key* only if its ``mod_revision`` is still *mod_revision*."""
        return await self._cas(Cmp.mod_revision(key, "==", mod_revision), Op.delete(key))

    # -- leases --------------------------------------------------------------------------

    async def grant_lease(self, ttl: int, *, revoke_on_exit: bool = True) -> Lease:
        """Grant a lease of *ttl* seconds (etcd may round it up) and return its handle.

        The lease is not kept alive until the handle is entered (``async with lease:``)
        or :meth:`Lease.start_keepalive` is called.
        """
        if ttl < 1:
            raise ValueError(f"lease TTL must be at least 1 s, got {ttl}")
        resp = await self._call(
            f"grant lease (TTL {ttl} s)",
            lambda t: self._c.lease.grant(ttl, timeout=t, max_attempts=1),
        )
        if resp.error:
            raise IndexRejectedError(f"etcd refused to grant a lease: {resp.error}")
        lease = Lease(self, int(resp.ID), int(resp.TTL), revoke_on_exit=revoke_on_exit)
        self._leases.add(lease)
        return lease

    async def revoke_lease(self, lease_id: int) -> bool:
        """Revoke a lease by id, deleting its keys; ``False`` if it did not exist."""
        try:
            await self._call(
                f"revoke lease {lease_id:x}",
                lambda t: self._c.lease.revoke(lease_id, timeout=t, max_attempts=1),
            )
        except IndexRejectedError as exc:
            if isinstance(exc.__cause__, grpc.aio.AioRpcError) and (
                exc.__cause__.code() is grpc.StatusCode.NOT_FOUND
            ):
                return False
            raise
        return True

    async def lease_time_to_live(self, lease_id: int) -> int:
        """Remaining seconds of a lease; ``-1`` if it expired or never existed."""
        resp = await self._call(
            f"lease {lease_id:x} time-to-live",
            lambda t: self._c.lease.time_to_live(lease_id, timeout=t, max_attempts=1),
        )
        return int(resp.TTL)

    # -- watches -------------------------------------------------------------------------

    def watch_prefix(self, prefix: str, *, start_revision: int, prev_kv: bool = True) -> Watch:
        """Watch every key under *prefix* from *start_revision* (inclusive, >= 1).

        Typically ``start_revision = list_revision + 1`` after :meth:`get_prefix`; use
        ``await index.revision() + 1`` for "from now".  See :class:`Watch`.
        """
        if not prefix:
            raise ValueError("prefix must not be empty")
        return Watch(
            self,
            _kb(prefix),
            prefix_range_end(_kb(prefix)),
            start_revision=start_revision,
            prev_kv=prev_kv,
            what=f"prefix {prefix!r}",
        )

    def watch_key(self, key: str, *, start_revision: int, prev_kv: bool = True) -> Watch:
        """Watch one key from *start_revision* (inclusive, >= 1).  See :class:`Watch`."""
        return Watch(
            self, _kb(key), b"", start_revision=start_revision, prev_kv=prev_kv, what=f"key {key!r}"
        )

    # -- cluster and maintenance -----------------------------------------------------------

    async def ping(self) -> None:
        """Check that etcd answers a (linearizable, read-only) request within the timeout."""
        await self.revision()

    async def compact(self, revision: int, *, physical: bool = True) -> None:
        """Discard history before *revision* (watches from older revisions get :class:`Compacted`)."""
        await self._call(
            f"compact at revision {revision}",
            lambda t: self._c.kv.compact(revision, physical=physical, timeout=t, max_attempts=1),
        )

    async def status(self) -> MemberStatus:
        """Status of whichever member answers (round-robin)."""
        resp = await self._call(
            "member status", lambda t: self._c.maintenance.status(timeout=t, max_attempts=1)
        )
        return MemberStatus(
            member_id=int(resp.header.member_id),
            leader_id=int(resp.leader),
            raft_term=int(resp.raftTerm),
            revision=int(resp.header.revision),
            version=str(resp.version),
            db_size=int(resp.dbSize),
            errors=tuple(resp.errors),
            db_size_in_use=int(resp.dbSizeInUse),
        )

    async def defragment(self, *, timeout: float = 120.0) -> None:  # noqa: ASYNC109
        """Defragment the member that answers (give its free pages back to the disk).

        The member blocks reads and writes while it rewrites its database, so use an
        :class:`Index` of **one** member and do one member at a time
        (:mod:`registry.index.maintenance`).  *timeout* replaces :attr:`timeout`
        (defragmenting gigabytes takes seconds to minutes).
        """
        await self._call(
            "defragment",
            lambda t: self._c.maintenance.defragment(timeout=timeout, max_attempts=1),
        )

    async def alarms(self) -> list[tuple[int, str]]:
        """Active alarms as ``(member id, "NOSPACE" | "CORRUPT")``."""
        resp = await self._call(
            "list alarms", lambda t: self._c.maintenance.alarms(timeout=t, max_attempts=1)
        )
        names = {1: "NOSPACE", 2: "CORRUPT"}
        return [(int(a.memberID), names.get(int(a.alarm), str(a.alarm))) for a in resp.alarms]

    async def disarm_nospace(self) -> None:
        """Clear the NOSPACE alarm on every member (after compaction and defragmentation
        brought the database under its quota; etcd raises it again if not)."""

        def disarm(member_id: int) -> Callable[[float], Awaitable[Any]]:
            return lambda t: self._c.maintenance.alarm_deactivate(
                AlarmType.NOSPACE, member_id=member_id, timeout=t, max_attempts=1
            )

        for member_id, kind in await self.alarms():  # etcd clears one member's at a time
            if kind == "NOSPACE":
                await self._call(f"disarm NOSPACE of member {member_id:x}", disarm(member_id))

    async def member_list(self) -> list[Member]:
        """The cluster's members."""
        resp = await self._call(
            "member list", lambda t: self._c.cluster.member_list(timeout=t, max_attempts=1)
        )
        return [
            Member(
                id=int(m.ID),
                name=str(m.name),
                client_urls=tuple(m.clientURLs),
                peer_urls=tuple(m.peerURLs),
                is_learner=bool(m.isLearner),
            )
            for m in resp.members
        ]

    # -- auth administration (cpi up; needs root once auth is on) ---------------------------

    async def auth_enabled(self) -> bool:
        """Whether etcd's authentication is on (asked with or without credentials).

        etcd refuses the question to a client without a token once auth is on; that
        refusal is the answer "on".
        """
        try:
            resp = await self._call(
                "auth status", lambda t: self._c.auth.auth_status(timeout=t, max_attempts=1)
            )
        except IndexAccessDeniedError:
            if self._user is None:
                return True
            raise
        return bool(resp.enabled)

    async def enable_auth(self) -> None:
        """Turn authentication on; a no-op when it is already on.

        etcd refuses it unless a user ``root`` with the role ``root`` exists.
        """
        if await self.auth_enabled():
            return
        await self._call(
            "enable auth",
            lambda t: self._c.auth.auth_enable(timeout=t, max_attempts=1),
            idempotent=False,
        )

    async def ensure_user(self, name: str, password: str) -> bool:
        """Make user *name* exist with *password*; ``True`` if it was created.

        An existing user whose password is not *password* gets it set (so a lost
        password file can be replaced by re-running the set-up); one whose password
        already is *password* is left alone (a change would invalidate its tokens).
        The password is never logged.
        """
        if not name or not password:
            raise ValueError("a user needs a name and a non-empty password")
        resp = await self._call(
            "list users", lambda t: self._c.auth.user_list(timeout=t, max_attempts=1)
        )
        if name in set(resp.users):
            if await self._password_works(name, password):
                return False  # changing it anyway would invalidate the user's tokens
            await self._call(
                f"set the password of user {name!r}",
                lambda t: self._c.auth.user_change_password(
                    name, password, timeout=t, max_attempts=1
                ),
            )
            return False
        await self._call(
            f"add user {name!r}",
            lambda t: self._c.auth.user_add(name, password, timeout=t, max_attempts=1),
            idempotent=False,
        )
        return True

    async def _password_works(self, name: str, password: str) -> bool:
        try:
            await self._call(
                f"check the password of user {name!r}",
                lambda t: self._c.auth.authenticate(name, password, timeout=t, max_attempts=1),
            )
        except IndexAccessDeniedError:
            return False
        return True

    async def grant_role(self, user: str, role: str) -> None:
        """Give *role* to *user* (a no-op if the user has it already)."""
        resp = await self._call(
            f"get user {user!r}", lambda t: self._c.auth.user_get(user, timeout=t, max_attempts=1)
        )
        if role in set(resp.roles):
            return
        await self._call(
            f"grant role {role!r} to user {user!r}",
            lambda t: self._c.auth.user_grant_role(user, role, timeout=t, max_attempts=1),
        )

    async def ensure_role(
        self,
        name: str,
        *,
        read: Sequence[str] = (),
        write: Sequence[str] = (),
        readwrite: Sequence[str] = (),
        read_keys: Sequence[str] = (),
    ) -> None:
        """Make role *name* exist with exactly these key permissions.

        *read*, *write* and *readwrite* are key prefixes (a prefix in both *read* and
        *write* is read-write); *read_keys* are single keys that may be read.  Any other
        permission the role had is revoked, so running this again with a new table
        leaves the role as the table says.  Not for etcd's built-in ``root`` role.
        """
        if name == "root":
            raise ValueError("the root role is etcd's own; grant it, do not define it")
        wanted: dict[tuple[bytes, bytes], PermissionType] = {}

        def want(key: bytes, end: bytes, perm: PermissionType) -> None:
            if not key:
                raise ValueError("a permission needs a non-empty key or prefix")
            old = wanted.get((key, end))
            wanted[(key, end)] = perm if old in (None, perm) else PermissionType.READWRITE

        for prefixes, perm in (
            (read, PermissionType.READ),
            (write, PermissionType.WRITE),
            (readwrite, PermissionType.READWRITE),
        ):
            for p in prefixes:
                want(_kb(p), prefix_range_end(_kb(p)), perm)
        for k in read_keys:
            want(_kb(k), b"", PermissionType.READ)

        roles = await self._call(
            "list roles", lambda t: self._c.auth.role_list(timeout=t, max_attempts=1)
        )
        have: dict[tuple[bytes, bytes], int] = {}
        if name in set(roles.roles):
            resp = await self._call(
                f"get role {name!r}",
                lambda t: self._c.auth.role_get(name, timeout=t, max_attempts=1),
            )
            have = {(bytes(p.key), bytes(p.range_end)): int(p.permType) for p in resp.perm}
        else:
            await self._call(
                f"add role {name!r}",
                lambda t: self._c.auth.role_add(name, timeout=t, max_attempts=1),
                idempotent=False,
            )
        auth = self._c.auth

        def grant(
            key: bytes, end: bytes, perm: PermissionType
        ) -> Callable[[float], Awaitable[Any]]:
            return lambda t: auth.role_grant_permission(
                name, key, end or None, perm_type=perm, timeout=t, max_attempts=1
            )

        def revoke(key: bytes, end: bytes) -> Callable[[float], Awaitable[Any]]:
            return lambda t: auth.role_revoke_permission(
                name, key, end or None, timeout=t, max_attempts=1
            )

        for (key, end), perm in wanted.items():
            if have.get((key, end)) != int(perm):
                await self._call(
                    f"grant {perm.name} on {key!r} to role {name!r}", grant(key, end, perm)
                )
        for key, end in sorted(have.keys() - wanted.keys()):
            await self._call(f"revoke {key!r} from role {name!r}", revoke(key, end))
