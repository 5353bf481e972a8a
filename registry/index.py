"""The national index: the one module that talks to etcd and the one that builds keys.

Everything else in the project goes through this module.  It owns

* the key layout of DESIGN.md section 3 (:class:`Prefix`, :class:`Keys`, :func:`parse_key`),
* a typed facade over etcd's KV API with a timeout on every call (:class:`Index`),
* transactions built from small values of our own (:class:`Cmp`, :class:`Op`),
* leases as handles with a keep-alive task that notices loss (:class:`Lease`),
* watches that resume from the last delivered revision and report compaction
  (:class:`Watch`, :class:`WatchEvent`, :class:`Compacted`),
* the mapping of etcd and gRPC errors onto :mod:`schemas.errors` (:meth:`Index._errors`).
* the ``etcd`` section of the service configs and the environment that overrides it
  (:class:`EtcdSettings`).

Prefix listings are plain string prefixes.  ``/cpi/v1/rec/CN.3`` also lists
``CN.31/...``; segment-wise matching is what :meth:`Keys.prefixes_within` is for: it
returns ``rec/CN.3/`` (records of exactly ``CN.3``) and ``rec/CN.3.`` (its sub-namespaces).

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
import time
import weakref
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from types import TracebackType
from typing import Annotated, Any, ClassVar, Final, Literal, NamedTuple, TypeVar
from urllib.parse import urlsplit

import grpc
import grpc.aio
from etcd3aio import (
    EtcdConnectionError,
    EtcdPermissionDeniedError,
    EtcdTransientError,
    EtcdUnauthenticatedError,
    TokenRefresher,
    prefix_range_end,
)
from etcd3aio._protobuf import (
    Compare,
    DeleteRangeRequest,
    LeaseKeepAliveRequest,
    LeaseStub,
    PutRequest,
    RangeRequest,
    RequestOp,
    WatchCreateRequest,
    WatchRequest,
    WatchStub,
)
from etcd3aio.auth import AuthService
from etcd3aio.cluster import ClusterService
from etcd3aio.kv import KVService
from etcd3aio.lease import LeaseService
from etcd3aio.maintenance import MaintenanceService
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from schemas._settings import resolve_path, set_dotted, split_list
from schemas.errors import ConfigError, IndexTimeoutError, IndexUnavailableError, RetrievalError

__all__ = [
    "ENV_ETCD_ENDPOINTS",
    "ENV_ETCD_PASSWORD",
    "KV",
    "ROOT",
    "CasResult",
    "Cmp",
    "Compacted",
    "EtcdSettings",
    "Index",
    "IndexCompactedError",
    "IndexRejectedError",
    "KVPage",
    "Keys",
    "Lease",
    "Member",
    "MemberStatus",
    "Op",
    "OpResult",
    "ParsedKey",
    "Prefix",
    "TxnResult",
    "Watch",
    "WatchEvent",
    "parse_key",
]

_log = logging.getLogger(__name__)
T = TypeVar("T")

# =============================================================================
# Key layout (DESIGN.md section 3)
# =============================================================================

ROOT: Final = "/cpi/v1/"


class Prefix(StrEnum):
    """The collections under :data:`ROOT`; each value is a key prefix ending in ``/``."""

    NS = "/cpi/v1/ns/"
    CERTS = "/cpi/v1/certs/"
    REC = "/cpi/v1/rec/"
    LIVE = "/cpi/v1/live/"
    CLAIM = "/cpi/v1/claim/"
    ALLOC = "/cpi/v1/alloc/"
    REVOKED = "/cpi/v1/revoked/"
    LOG = "/cpi/v1/log/"
    # write-side private collections
    TOKENS = "/cpi/v1/tokens/"
    NONCE = "/cpi/v1/nonce/"
    AUDIT = "/cpi/v1/audit/"
    # claims (resolver/claims.py): API tokens and per-holder totals
    CLAIM_TOKENS = "/cpi/v1/claimtokens/"
    HOLDERS = "/cpi/v1/holders/"


# Collections whose names are CPIDs (``<prefix>/<suffix>``), hence per-namespace ranges.
_CPID_COLLECTIONS: Final = frozenset({Prefix.REC, Prefix.LIVE, Prefix.CLAIM, Prefix.ALLOC})
_BAD_CHARS: Final = re.compile(r"[\x00-\x20\x7f]")
_SHA256_HEX: Final = re.compile(r"[0-9a-f]{64}")
_SEQ_DIGITS: Final = 20  # enough for any unsigned 64-bit number; keeps keys sortable


def _name(value: str, what: str, *, slashes: int = 0) -> str:
    """Check one name used inside a key; it must contain exactly *slashes* ``/``."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what} must be a non-empty string, got {value!r}")
    if _BAD_CHARS.search(value):
        raise ValueError(f"{what} {value!r} contains whitespace or control characters")
    if value.count("/") != slashes:
        raise ValueError(f"{what} {value!r} contains {value.count('/')} '/', expected {slashes}")
    if any(part in ("", ".", "..") for part in value.split("/")):
        raise ValueError(f"{what} {value!r} has an empty, '.' or '..' path segment")
    return value


def _seq(n: int, what: str) -> str:
    if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n < 10**_SEQ_DIGITS:
        raise ValueError(f"{what} must be an integer in [0, 10**{_SEQ_DIGITS}), got {n!r}")
    return f"{n:0{_SEQ_DIGITS}d}"


class Keys:
    """Builders for every key the project stores.  Nothing else may build key strings.

    Names are checked (non-empty, no whitespace, the right number of ``/``) but not
    normalised: CPIDs and prefixes must already be canonical (see :mod:`schemas`).
    """

    @staticmethod
    def ns(prefix: str) -> str:
        """``/cpi/v1/ns/<prefix>``: a namespace's current key id and endpoints."""
        return Prefix.NS + _name(prefix, "namespace prefix")

    @staticmethod
    def cert(kid: str) -> str:
        """``/cpi/v1/certs/<kid>``: the ``cert.v1`` envelope certifying key *kid*."""
        return Prefix.CERTS + _name(kid, "kid")

    @staticmethod
    def rec(cpid: str) -> str:
        """``/cpi/v1/rec/<cpid>``: the signed record."""
        return Prefix.REC + _name(cpid, "CPID", slashes=1)

    @staticmethod
    def live(cpid: str) -> str:
        """``/cpi/v1/live/<cpid>``: the latest status envelope (on the registry's lease)."""
        return Prefix.LIVE + _name(cpid, "CPID", slashes=1)

    @staticmethod
    def claim(cpid: str, claim_id: str) -> str:
        """``/cpi/v1/claim/<cpid>/<claim-id>``: one claim (on its own lease)."""
        return Keys.claims(cpid) + _name(claim_id, "claim id")

    @staticmethod
    def claims(cpid: str) -> str:
        """``/cpi/v1/claim/<cpid>/``: prefix of every claim on *cpid*."""
        return Prefix.CLAIM + _name(cpid, "CPID", slashes=1) + "/"

    @staticmethod
    def alloc(cpid: str) -> str:
        """``/cpi/v1/alloc/<cpid>``: units currently claimed (the CAS point for claims)."""
        return Prefix.ALLOC + _name(cpid, "CPID", slashes=1)

    @staticmethod
    def revoked(kid_or_serial: str) -> str:
        """``/cpi/v1/revoked/<kid-or-serial>``: a revocation envelope."""
        return Prefix.REVOKED + _name(kid_or_serial, "kid or serial")

    @staticmethod
    def log(*parts: str) -> str:
        """``/cpi/v1/log/<part>/<part>...``: transparency-log keys (layout owned by the log)."""
        if not parts:
            raise ValueError("a log key needs at least one part")
        return Prefix.LOG + "/".join(_name(p, "log key part") for p in parts)

    @staticmethod
    def log_entry(index: int) -> str:
        """``/cpi/v1/log/entry/<zero-padded index>``: one log leaf; keys sort by index."""
        return Keys.log("entry", _seq(index, "log index"))

    @staticmethod
    def log_head(tree_size: int) -> str:
        """``/cpi/v1/log/head/<zero-padded size>``: the signed tree head at *tree_size*."""
        return Keys.log("head", _seq(tree_size, "tree size"))

    @staticmethod
    def token(sha256_hex: str) -> str:
        """``/cpi/v1/tokens/<sha256-hex>``: a join token, stored by hash only."""
        if not isinstance(sha256_hex, str) or not _SHA256_HEX.fullmatch(sha256_hex):
            raise ValueError(
                f"token key must be 64 lower-case hex digits (a SHA-256), got {sha256_hex!r}"
            )
        return Prefix.TOKENS + sha256_hex

    @staticmethod
    def claim_token(sha256_hex: str) -> str:
        """``/cpi/v1/claimtokens/<sha256-hex>``: a claims API token, stored by hash only."""
        if not isinstance(sha256_hex, str) or not _SHA256_HEX.fullmatch(sha256_hex):
            raise ValueError(
                f"claims token key must be 64 lower-case hex digits (a SHA-256), got {sha256_hex!r}"
            )
        return Prefix.CLAIM_TOKENS + sha256_hex

    @staticmethod
    def holder(name: str) -> str:
        """``/cpi/v1/holders/<name>``: units a claims holder holds (the CAS point for quotas)."""
        return Prefix.HOLDERS + _name(name, "holder name")

    @staticmethod
    def nonce(kid: str, nonce: str) -> str:
        """``/cpi/v1/nonce/<kid>/<nonce>``: a used nonce (replay protection)."""
        return Keys.nonces(kid) + _name(nonce, "nonce")

    @staticmethod
    def nonces(kid: str) -> str:
        """``/cpi/v1/nonce/<kid>/``: prefix of every nonce used by *kid*."""
        return Prefix.NONCE + _name(kid, "kid") + "/"

    @staticmethod
    def audit(seq: int) -> str:
        """``/cpi/v1/audit/<zero-padded seq>``: one entry of the append-only audit stream."""
        return Prefix.AUDIT + _seq(seq, "audit sequence number")

    @staticmethod
    def prefixes_within(collection: Prefix, namespace: str) -> tuple[str, str]:
        """The two prefixes covering *namespace* and its sub-namespaces in *collection*.

        ``(f"{collection}{ns}/", f"{collection}{ns}.")``: the first holds names of exactly
        *namespace* (``CN.3/...``), the second every sub-namespace (``CN.3.X/...``), and
        neither matches a sibling such as ``CN.31``.  *collection* must be one whose names
        are CPIDs (REC, LIVE, CLAIM, ALLOC).
        """
        if collection not in _CPID_COLLECTIONS:
            raise ValueError(f"collection {collection.name} is not keyed by CPID")
        ns = _name(namespace, "namespace prefix")
        return collection + ns + "/", collection + ns + "."

    @staticmethod
    def rec_prefix_for_namespace(namespace: str) -> str:
        """``/cpi/v1/rec/<ns>/``: records of exactly *namespace* (not ``<ns>1``, not ``<ns>.X``)."""
        return Keys.prefixes_within(Prefix.REC, namespace)[0]

    @staticmethod
    def rec_prefixes_within(namespace: str) -> tuple[str, str]:
        """Record prefixes of *namespace* itself and of all its sub-namespaces."""
        return Keys.prefixes_within(Prefix.REC, namespace)


class ParsedKey(NamedTuple):
    """A key split into its collection and the name after the collection prefix."""

    collection: Prefix
    name: str

    @property
    def parts(self) -> tuple[str, ...]:
        """The builder arguments: ``(cpid, claim_id)`` for claims, ``(kid, nonce)`` for
        nonces, the path segments for log keys, ``(name,)`` otherwise."""
        if self.collection is Prefix.CLAIM:
            cpid, claim_id = self.name.rsplit("/", 1)
            return cpid, claim_id
        if self.collection is Prefix.NONCE:
            kid, nonce = self.name.split("/", 1)
            return kid, nonce
        if self.collection is Prefix.LOG:
            return tuple(self.name.split("/"))
        return (self.name,)


_SHAPES: Final[dict[Prefix, int]] = {  # number of "/" in a well-formed name
    Prefix.NS: 0,
    Prefix.CERTS: 0,
    Prefix.REC: 1,
    Prefix.LIVE: 1,
    Prefix.CLAIM: 2,
    Prefix.ALLOC: 1,
    Prefix.REVOKED: 0,
    Prefix.TOKENS: 0,
    Prefix.NONCE: 1,
    Prefix.AUDIT: 0,
    Prefix.CLAIM_TOKENS: 0,
    Prefix.HOLDERS: 0,
}


def parse_key(key: str) -> ParsedKey:
    """Split a key built by :class:`Keys` back into ``(collection, name)``.

    Raises:
        ValueError: the key is outside the layout or its name has the wrong shape.
    """
    for collection in Prefix:
        if key.startswith(collection):
            name = key[len(collection) :]
            if collection is Prefix.LOG:
                _name(name, "log key", slashes=name.count("/"))
            else:
                _name(name, f"{collection.name.lower()} name", slashes=_SHAPES[collection])
            return ParsedKey(collection, name)
    raise ValueError(f"key {key!r} is not in the CPI key layout (expected it under {ROOT}...)")


# =============================================================================
# Values
# =============================================================================


def _kb(key: str) -> bytes:
    return key.encode("utf-8", "surrogateescape")


def _ks(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def _vb(value: bytes | str) -> bytes:
    return value.encode("utf-8") if isinstance(value, str) else bytes(value)


@dataclass(frozen=True, slots=True)
class KV:
    """One key-value pair as stored, with etcd's revision bookkeeping."""

    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int

    @classmethod
    def _from_pb(cls, kv: Any) -> KV:
        return cls(
            key=_ks(kv.key),
            value=bytes(kv.value),
            create_revision=int(kv.create_revision),
            mod_revision=int(kv.mod_revision),
            version=int(kv.version),
            lease=int(kv.lease),
        )


@dataclass(frozen=True, slots=True)
class KVPage:
    """One page of a prefix listing; every page of one listing has the same ``revision``."""

    kvs: list[KV]
    revision: int


CmpOp = Literal["==", "!=", "<", ">"]
CmpTarget = Literal["version", "create_revision", "mod_revision", "value", "lease"]

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


@dataclass(frozen=True, slots=True)
class Cmp:
    """One compare of a transaction.  A missing key compares as version, create and mod
    revision 0, so ``Cmp.mod_revision(k, "==", 0)`` also means "absent"."""

    key: str
    target: CmpTarget
    op: CmpOp
    operand: int | bytes

    def __post_init__(self) -> None:
        if self.op not in _CMP_RESULT:
            raise ValueError(f"compare operator must be one of ==, !=, <, >; got {self.op!r}")
        if self.target not in _CMP_TARGET:
            raise ValueError(f"unknown compare target {self.target!r}")
        if (self.target == "value") != isinstance(self.operand, bytes):
            raise ValueError(
                f"compare on {self.target} needs a {'bytes' if self.target == 'value' else 'int'} operand"
            )

    @classmethod
    def version(cls, key: str, op: CmpOp, n: int) -> Cmp:
        """Compare the key's version (0 = absent, 1 after creation, +1 per write)."""
        return cls(key, "version", op, n)

    @classmethod
    def create_revision(cls, key: str, op: CmpOp, n: int) -> Cmp:
        """Compare the revision at which the key was created (0 = absent)."""
        return cls(key, "create_revision", op, n)

    @classmethod
    def mod_revision(cls, key: str, op: CmpOp, n: int) -> Cmp:
        """Compare the revision of the key's last write (0 = absent)."""
        return cls(key, "mod_revision", op, n)

    @classmethod
    def value(cls, key: str, op: CmpOp, value: bytes | str) -> Cmp:
        """Compare the key's value byte-wise."""
        return cls(key, "value", op, _vb(value))

    @classmethod
    def lease(cls, key: str, op: CmpOp, lease_id: int) -> Cmp:
        """Compare the lease the key is attached to (0 = none)."""
        return cls(key, "lease", op, lease_id)

    @classmethod
    def absent(cls, key: str) -> Cmp:
        """The key does not exist."""
        return cls(key, "create_revision", "==", 0)

    @classmethod
    def exists(cls, key: str) -> Cmp:
        """The key exists."""
        return cls(key, "create_revision", ">", 0)

    def _to_pb(self) -> Any:
        cmp = Compare(
            result=_CMP_RESULT[self.op], target=_CMP_TARGET[self.target], key=_kb(self.key)
        )
        if self.target == "value":
            cmp.value = self.operand
        elif self.target == "version":
            cmp.version = self.operand
        elif self.target == "create_revision":
            cmp.create_revision = self.operand
        elif self.target == "mod_revision":
            cmp.mod_revision = self.operand
        else:
            cmp.lease = self.operand
        return cmp


@dataclass(frozen=True, slots=True)
class Op:
    """One operation of a transaction branch."""

    kind: Literal["put", "delete", "get"]
    key: str
    value: bytes = b""
    lease: int = 0
    prefix: bool = False

    @classmethod
    def put(cls, key: str, value: bytes | str, *, lease: int = 0) -> Op:
        """Write *value* at *key* (attached to *lease* unless 0)."""
        return cls("put", key, _vb(value), lease)

    @classmethod
    def delete(cls, key: str, *, prefix: bool = False) -> Op:
        """Delete *key* (or every key starting with it when *prefix*)."""
        return cls("delete", key, prefix=prefix)

    @classmethod
    def get(cls, key: str, *, prefix: bool = False) -> Op:
        """Read *key* (or every key starting with it when *prefix*)."""
        return cls("get", key, prefix=prefix)

    def _to_pb(self) -> Any:
        key = _kb(self.key)
        end = prefix_range_end(key) if self.prefix else b""
        if self.prefix and not key:
            raise ValueError("a prefix operation needs a non-empty prefix")
        if self.kind == "put":
            return RequestOp(request_put=PutRequest(key=key, value=self.value, lease=self.lease))
        if self.kind == "delete":
            return RequestOp(request_delete_range=DeleteRangeRequest(key=key, range_end=end))
        return RequestOp(request_range=RangeRequest(key=key, range_end=end))


@dataclass(frozen=True, slots=True)
class OpResult:
    """Result of one :class:`Op`: ``kvs`` for a get, ``deleted`` for a delete."""

    kind: Literal["put", "delete", "get"]
    kvs: list[KV]
    deleted: int = 0


@dataclass(frozen=True, slots=True)
class TxnResult:
    """Outcome of :meth:`Index.txn`; ``responses`` follow the branch that ran."""

    succeeded: bool
    revision: int
    responses: list[OpResult]


@dataclass(frozen=True, slots=True)
class CasResult:
    """Outcome of a compare-and-swap helper.

    ``revision`` is the store revision after the transaction (the new ``mod_revision`` of
    the key on success).  On failure ``current`` is the key as it was when the compare
    failed (``None`` if absent), read in the same transaction.
    """

    succeeded: bool
    revision: int
    current: KV | None


@dataclass(frozen=True, slots=True)
class WatchEvent:
    """A put or delete seen by a watch.

    For a delete, ``kv`` carries the key, ``mod_revision`` (the delete's revision) and an
    empty value; ``prev`` is the value before the event (when etcd still had it).
    """

    type: Literal["put", "delete"]
    kv: KV
    revision: int
    prev: KV | None = None


@dataclass(frozen=True, slots=True)
class Compacted:
    """The watch cannot continue: history before ``compact_revision`` is gone.

    The watch ends after yielding this.  Re-list with :meth:`Index.get_prefix` and watch
    again from the listing's revision + 1.
    """

    compact_revision: int


@dataclass(frozen=True, slots=True)
class Member:
    """One etcd cluster member."""

    id: int
    name: str
    client_urls: tuple[str, ...]
    peer_urls: tuple[str, ...]
    is_learner: bool


@dataclass(frozen=True, slots=True)
class MemberStatus:
    """Status of the member that answered :meth:`Index.status`."""

    member_id: int
    leader_id: int
    raft_term: int
    revision: int
    version: str
    db_size: int
    errors: tuple[str, ...]


class IndexCompactedError(RetrievalError):
    """A read asked for a revision that etcd has already compacted away."""

    code = "index_compacted"


class IndexRejectedError(RetrievalError):
    """etcd refused a request (bad credentials, permission, size limits, a cancelled watch)."""

    code = "index_rejected"


# =============================================================================
# Connection set-up
# =============================================================================

_DEFAULT_PORT: Final = 2379
_CHANNEL_OPTIONS: Final[list[tuple[str, str | int | bool]]] = [
    ("grpc.lb_policy_name", "round_robin"),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", True),
    # reconnect to a restarted member quickly (gRPC's default backs off to 120 s).  Not
    # grpc.min_reconnect_backoff_ms: that is also the connect timeout (default 20 s).
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2_000),
    # watch catch-up batches with prev_kv can exceed gRPC's default 4 MiB
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
]
_WATCH_RETRY_CODES: Final = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.ABORTED,
    }
)
_REQUIRE_LEADER: Final = ("hasleader", "true")

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
            endpoints are given as IP addresses).
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
        if versions == {4}:
            return "ipv4:" + ",".join(self.endpoints), None
        if versions == {6}:
            return "ipv6:" + ",".join(self.endpoints), None
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
            return IndexRejectedError(f"{where} refused: {exc}")
        if isinstance(exc, grpc.aio.AioRpcError):
            code, detail = exc.code(), exc.details() or ""
            if code is grpc.StatusCode.UNAVAILABLE:
                return IndexUnavailableError(f"{where} failed: etcd unreachable ({detail})")
            if code is grpc.StatusCode.DEADLINE_EXCEEDED:
                return IndexTimeoutError(f"{where} did not finish within {self.timeout:g} s")
            if code is grpc.StatusCode.OUT_OF_RANGE and "compacted" in detail:
                return IndexCompactedError(f"{where} failed: {detail}")
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
        while True:
            remaining = deadline - loop.time()
            try:
                with self._errors(operation):
                    return await rpc(max(min(remaining, per_attempt), 0.001))
            except (IndexUnavailableError, IndexTimeoutError) as exc:
                retry = idempotent or (isinstance(exc, IndexUnavailableError) and _never_sent(exc))
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
        self, prefix: str, *, page_size: int = 500, revision: int = 0
    ) -> AsyncIterator[KVPage]:
        """Yield every KV under *prefix* in key order, one page at a time.

        All pages are read at one revision: *revision*, or the revision of the first
        page when 0.  If that revision is compacted mid-way,
        :class:`IndexCompactedError` is raised (start again).
        """
        if not prefix:
            raise ValueError("prefix must not be empty")
        if page_size < 1:
            raise ValueError(f"page_size must be at least 1, got {page_size}")
        end = prefix_range_end(_kb(prefix))

        def page(start: bytes, rev: int) -> Callable[[float], Awaitable[Any]]:
            return lambda t: self._c.kv.get(
                start, end, revision=rev, limit=page_size, timeout=t, max_attempts=1
            )

        start, rev = _kb(prefix), revision
        while True:
            resp = await self._call(
                f"list {prefix!r} at revision {rev or 'latest'}", page(start, rev)
            )
            if rev == 0:
                rev = int(resp.header.revision)
            yield KVPage([KV._from_pb(kv) for kv in resp.kvs], rev)
            if not resp.more or not resp.kvs:
                return
            start = bytes(resp.kvs[-1].key) + b"\x00"

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
        cmps = [c._to_pb() for c in compare]
        ok = [o._to_pb() for o in success]
        nok = [o._to_pb() for o in failure]
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
        )

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


# =============================================================================
# Settings (the ``etcd`` section of a service config)
# =============================================================================

ENV_ETCD_ENDPOINTS: Final = "CPI_ETCD_ENDPOINTS"
"""Comma-separated etcd endpoints; replaces ``etcd.endpoints`` of a service config."""
ENV_ETCD_PASSWORD: Final = "CPI_ETCD_PASSWORD"
"""The etcd password, so that it need not sit in a config file."""


class EtcdSettings(BaseModel):
    """How a service reaches the national index: the ``etcd`` section of its config.

    The password is a :class:`pydantic.SecretStr`: it prints as ``**********`` and is
    never logged.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    PATH_FIELDS: ClassVar[tuple[str, ...]] = ("ca_cert", "cert_key", "cert_chain")
    """Fields holding file paths, resolved against the directory of the config file."""

    endpoints: list[str] = Field(default_factory=lambda: ["127.0.0.1:2379"], min_length=1)
    timeout_s: Annotated[float, Field(gt=0)] = 5.0
    ca_cert: Path | None = None
    cert_key: Path | None = None
    cert_chain: Path | None = None
    tls_server_name: str | None = None
    user: str | None = None
    password: SecretStr | None = None

    def open_index(self, **options: Any) -> Index:
        """An unconnected :class:`Index` for these settings (use as ``async with``).

        *options* are further keyword arguments of the :class:`Index` constructor.
        Settings that do not fit together raise :class:`~schemas.errors.ConfigError`.
        """
        try:
            return Index(
                endpoints=self.endpoints,
                timeout=self.timeout_s,
                ca_cert=self.ca_cert,
                cert_key=self.cert_key,
                cert_chain=self.cert_chain,
                tls_server_name=self.tls_server_name,
                user=self.user,
                password=self.password.get_secret_value() if self.password else None,
                **options,
            )
        except ValueError as exc:
            raise ConfigError(f"etcd settings: {exc}") from exc

    @classmethod
    def layer(cls, raw: dict[str, Any], *, base: Path, env: Mapping[str, str]) -> None:
        """Prepare the ``etcd`` section of a config's raw data, in place.

        Relative paths in it are resolved against *base* (the config file's directory);
        then :data:`ENV_ETCD_ENDPOINTS` and :data:`ENV_ETCD_PASSWORD` from *env* replace
        what the file says.
        """
        if isinstance(raw.get("etcd"), dict):
            raw["etcd"] = dict(raw["etcd"])
            for name in cls.PATH_FIELDS:
                if name in raw["etcd"]:
                    raw["etcd"][name] = resolve_path(base, raw["etcd"][name])
        if env.get(ENV_ETCD_ENDPOINTS):
            set_dotted(raw, "etcd.endpoints", split_list(env[ENV_ETCD_ENDPOINTS]))
        if env.get(ENV_ETCD_PASSWORD):
            set_dotted(raw, "etcd.password", env[ENV_ETCD_PASSWORD])


# =============================================================================
# Leases
# =============================================================================


def _never_sent(exc: BaseException) -> bool:
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


class _StreamEnded(Exception):
    """etcd closed a stream without an error status."""


async def _exchange(call: Any, request: Any, what: str) -> Any:
    """Write *request* on a bidi stream and read one answer.

    A stream that has already finished raises its real status (``AioRpcError``) or
    :class:`_StreamEnded`, never grpc's ``InvalidStateError``.
    """
    with contextlib.suppress(asyncio.InvalidStateError):  # finished: read() says why
        await call.write(request)
    resp = await call.read()
    if resp is grpc.aio.EOF:
        raise _StreamEnded(f"{what} stream closed by etcd")
    return resp


class Lease:
    """Handle of one etcd lease.  Obtain it from :meth:`Index.grant_lease`.

    ``async with lease:`` keeps the lease alive in a background task (a keep-alive every
    ``ttl / 3`` seconds over one stream, re-opened on errors).  On exit the keep-alive
    stops and, unless ``revoke_on_exit=False``, the lease is revoked (its keys vanish).

    :attr:`lost` is set, and an error logged, when etcd answers that the lease is gone
    (expired or revoked elsewhere) or when no keep-alive got an answer for a whole TTL.
    A lost lease stays lost: grant a new one and rewrite the keys.
    """

    def __init__(self, index: Index, lease_id: int, ttl: int, *, revoke_on_exit: bool) -> None:
        self._index = index
        self.id = lease_id
        self.ttl = ttl
        self.revoke_on_exit = revoke_on_exit
        self.lost = asyncio.Event()
        self.lost_reason: str | None = None
        self._revoked = False
        self._granted_at = time.monotonic()
        self._task: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"Lease(id={self.id:x}, ttl={self.ttl}, alive={self.alive})"

    @property
    def alive(self) -> bool:
        """``False`` once the lease is lost or revoked through this handle."""
        return not self.lost.is_set() and not self._revoked

    def start_keepalive(self) -> None:
        """Start the background keep-alive (no-op if running)."""
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._keepalive(), name=f"lease-keepalive-{self.id:x}")

    async def stop_keepalive(self) -> None:
        """Stop the background keep-alive (the lease then expires after its TTL)."""
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def revoke(self) -> None:
        """Stop the keep-alive and revoke the lease (a no-op if etcd no longer has it)."""
        await self.stop_keepalive()
        await self._index.revoke_lease(self.id)
        self._revoked = True

    async def time_to_live(self) -> int:
        """Remaining seconds as etcd sees them; ``-1`` if the lease is gone."""
        return await self._index.lease_time_to_live(self.id)

    async def __aenter__(self) -> Lease:
        self.start_keepalive()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        await self.stop_keepalive()
        if self.revoke_on_exit and self.alive:
            try:
                await self.revoke()
            except RetrievalError as exc:
                _log.warning(
                    "lease %x: revoke on exit failed (%s); it expires in %d s",
                    self.id,
                    exc,
                    self.ttl,
                )

    def _mark_lost(self, reason: str) -> None:
        self.lost_reason = reason
        self.lost.set()
        _log.error("lease %x (TTL %d s) lost: %s", self.id, self.ttl, reason)

    async def _keepalive(self) -> None:
        interval = max(self.ttl / 3, 0.2)
        last_ok = self._granted_at
        call: Any = None
        failing = False
        try:
            while True:
                if self._index._conn is None:
                    return  # the index was closed
                conn = self._index._conn
                try:
                    if call is None:
                        call = conn.lease_stub.LeaseKeepAlive(metadata=self._index._metadata())
                    async with asyncio.timeout(min(self._index.timeout, max(interval, 0.5))):
                        resp = await _exchange(
                            call, LeaseKeepAliveRequest(ID=self.id), "keep-alive"
                        )
                except (
                    grpc.aio.AioRpcError,
                    grpc.aio.UsageError,
                    TimeoutError,
                    _StreamEnded,
                ) as exc:
                    if call is not None:
                        call.cancel()
                        call = None
                    silent = time.monotonic() - last_ok
                    detail = self._index._translate(exc, f"keep-alive of lease {self.id:x}") or exc
                    if silent >= self.ttl:
                        self._mark_lost(
                            f"no keep-alive answer for {silent:.1f} s (last error: {detail})"
                        )
                        return
                    if not failing:
                        _log.warning("lease %x: keep-alive failed, retrying: %s", self.id, detail)
                        failing = True
                    await asyncio.sleep(min(interval, 0.5) * random.uniform(0.5, 1.0))
                    continue
                if resp.TTL <= 0:
                    self._mark_lost("etcd says the lease no longer exists (expired or revoked)")
                    return
                if failing:
                    _log.warning("lease %x: keep-alive recovered (TTL %d s)", self.id, resp.TTL)
                    failing = False
                last_ok = time.monotonic()
                await asyncio.sleep(interval)
        except Exception as exc:  # a bug or an unexpected answer: never die silently
            _log.exception("lease %x: keep-alive task failed", self.id)
            self._mark_lost(f"keep-alive task failed: {exc!r}")
        finally:
            if call is not None:
                call.cancel()


# =============================================================================
# Watches
# =============================================================================


class Watch:
    """An async iterator of :class:`WatchEvent` (one per key change) and, last,
    :class:`Compacted`.

    Events of one etcd response are yielded one by one, in revision order; all events
    of one revision (one transaction) arrive together.  The watch survives etcd
    restarts and leader changes: on a transient gRPC error it reconnects with capped,
    jittered exponential back-off and resumes from :attr:`next_revision`, computed
    from delivered events only, so nothing is skipped or repeated.  It never ends on
    its own except after yielding :class:`Compacted`; errors that a reconnect cannot
    fix (auth, a watch cancelled by etcd for another reason) are raised.  Closing the
    :class:`Index` ends the iteration.

    ``next_revision``: every event with a smaller revision has been yielded;
    ``reconnects``: how many times the stream was re-established.
    """

    def __init__(
        self,
        index: Index,
        key: bytes,
        range_end: bytes,
        *,
        start_revision: int,
        prev_kv: bool,
        what: str,
    ) -> None:
        if start_revision < 1:
            raise ValueError(
                f"start_revision must be >= 1, got {start_revision} "
                "(use await index.revision() + 1 to watch from now)"
            )
        self._index = index
        self._key = key
        self._range_end = range_end
        self._prev_kv = prev_kv
        self._what = what
        self.next_revision = start_revision
        self.reconnects = 0
        self._gen: AsyncGenerator[WatchEvent | Compacted, None] | None = None

    def __repr__(self) -> str:
        return (
            f"Watch({self._what}, next_revision={self.next_revision}, reconnects={self.reconnects})"
        )

    def __aiter__(self) -> Watch:
        return self

    async def __anext__(self) -> WatchEvent | Compacted:
        if self._gen is None:
            self._gen = self._run()
        return await self._gen.__anext__()

    async def aclose(self) -> None:
        """Stop watching (closes the stream)."""
        gen, self._gen = self._gen, None
        if gen is not None:
            await gen.aclose()

    async def __aenter__(self) -> Watch:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def _convert(self, resp: Any) -> list[WatchEvent]:
        events: list[WatchEvent] = []
        for ev in resp.events:
            kv = KV._from_pb(ev.kv)
            if kv.mod_revision < self.next_revision:  # already delivered; defensive
                continue
            prev = KV._from_pb(ev.prev_kv) if ev.HasField("prev_kv") else None
            events.append(
                WatchEvent("delete" if ev.type == 1 else "put", kv, kv.mod_revision, prev)
            )
        return events

    async def _run(self) -> AsyncGenerator[WatchEvent | Compacted, None]:
        index = self._index
        backoff = index.watch_backoff
        while True:
            if index._conn is None:
                return  # the Index was closed
            call = index._conn.watch_stub.Watch(metadata=index._metadata(_REQUIRE_LEADER))
            problem: str
            try:
                create = WatchCreateRequest(
                    key=self._key,
                    range_end=self._range_end,
                    start_revision=self.next_revision,
                    prev_kv=self._prev_kv,
                )
                async with asyncio.timeout(index.timeout):
                    resp = await _exchange(call, WatchRequest(create_request=create), "watch")
                while True:
                    if resp is grpc.aio.EOF:
                        raise _StreamEnded("watch stream closed by etcd")
                    if resp.compact_revision > 0:
                        yield Compacted(int(resp.compact_revision))
                        return
                    if resp.canceled:
                        raise IndexRejectedError(
                            f"etcd cancelled the watch on {self._what}: "
                            f"{resp.cancel_reason or 'no reason given'}"
                        )
                    events = self._convert(resp)
                    if events:
                        backoff = index.watch_backoff
                    for i, event in enumerate(events):
                        more_of_same = (
                            i + 1 < len(events) and events[i + 1].revision == event.revision
                        )
                        self.next_revision = event.revision + (0 if more_of_same else 1)
                        yield event
                    resp = await call.read()
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in _WATCH_RETRY_CODES:
                    mapped = index._translate(exc, f"watch {self._what}")
                    raise (mapped or exc) from exc
                problem = f"{exc.code().name}: {exc.details()}"
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if index._conn is None and task is not None and not task.cancelling():
                    return  # Index.close() cancelled the stream: end quietly
                raise
            except TimeoutError:
                problem = f"no answer to the watch request within {index.timeout:g} s"
            except _StreamEnded as exc:
                problem = str(exc)
            finally:
                call.cancel()
            self.reconnects += 1
            index.watch_reconnects += 1
            delay = min(backoff, index.watch_backoff_max) * random.uniform(0.5, 1.0)
            backoff = min(backoff * 2, index.watch_backoff_max)
            _log.warning(
                "watch %s on etcd %s interrupted (%s); reconnect #%d from revision %d in %.2f s",
                self._what,
                ",".join(index.endpoints),
                problem,
                self.reconnects,
                self.next_revision,
                delay,
            )
            await asyncio.sleep(delay)
