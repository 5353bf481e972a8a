"""The values the index hands out and takes: plain frozen dataclasses, no etcd types.

:class:`KV` and :class:`KVPage` (reads), :class:`Cmp` and :class:`Op` (transactions)
with their results :class:`OpResult`, :class:`TxnResult` and :class:`CasResult`,
:class:`WatchEvent` and :class:`Compacted` (watches), :class:`Member` and
:class:`MemberStatus` (cluster), and the errors only the index raises.

Like :mod:`registry.index.layout`, this module imports neither gRPC nor the etcd
client; the conversion to and from etcd's messages lives in :mod:`registry.index._rpc`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final, Literal

from schemas.errors import RetrievalError

__all__ = [
    "KV",
    "CasResult",
    "Cmp",
    "CmpOp",
    "CmpTarget",
    "Compacted",
    "IndexAccessDeniedError",
    "IndexCompactedError",
    "IndexRejectedError",
    "KVPage",
    "Member",
    "MemberStatus",
    "Op",
    "OpResult",
    "TxnResult",
    "WatchEvent",
]


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
    """One page of a prefix listing; every page of one listing has the same ``revision``.

    ``ranged``: how many keys the request's range held, as etcd reported them.  etcd 3.5
    walks every key of a request's range to count them, also when it returns only a
    page, so this is what the page cost etcd (see :meth:`Index.iter_prefix`)."""

    kvs: list[KV]
    revision: int
    ranged: int = 0


CmpOp = Literal["==", "!=", "<", ">"]
CmpTarget = Literal["version", "create_revision", "mod_revision", "value", "lease"]

_CMP_OPS: Final = frozenset({"==", "!=", "<", ">"})
_CMP_TARGETS: Final = frozenset({"version", "create_revision", "mod_revision", "value", "lease"})


@dataclass(frozen=True, slots=True)
class Cmp:
    """One compare of a transaction.  A missing key compares as version, create and mod
    revision 0, so ``Cmp.mod_revision(k, "==", 0)`` also means "absent"."""

    key: str
    target: CmpTarget
    op: CmpOp
    operand: int | bytes

    def __post_init__(self) -> None:
        if self.op not in _CMP_OPS:
            raise ValueError(f"compare operator must be one of ==, !=, <, >; got {self.op!r}")
        if self.target not in _CMP_TARGETS:
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
    db_size_in_use: int = 0
    """Bytes of ``db_size`` holding live data; the rest is free pages that only a
    defragmentation gives back."""


class IndexCompactedError(RetrievalError):
    """A read asked for a revision that etcd has already compacted away."""

    code = "index_compacted"


class IndexRejectedError(RetrievalError):
    """etcd refused a request (bad credentials, permission, size limits, a cancelled watch).

    Never retried by the index: the same request would be refused again, so it is not a
    "retry may help" error: services answer it with 502 (the index behind them refused),
    not 503.
    """

    code = "index_rejected"
    http_status = 502
    retryable = False


class IndexAccessDeniedError(IndexRejectedError):
    """etcd refused the credentials or the permission: no user or password, a wrong one,
    an invalid token, or a role without access to the keys.

    Not a "retry may help" error (unlike :class:`~schemas.errors.IndexUnavailableError`):
    the same request fails until the etcd user, password or roles are fixed.  A subclass
    of :class:`IndexRejectedError`, with its ``code``, so existing handling is unchanged.
    """
