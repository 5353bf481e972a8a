"""The change stream: one append-only audit entry per state change, under ``/cpi/v1/audit/<seq>``.

Every register, update, renew, deregister and revoke appends one entry **in the same
etcd transaction as the change itself**, so the stream and the index never disagree.
Entries are JSON::

    {"seq": 7, "op": "register", "cpid": "CN.31.CMCC/GPU.4K7Q9M2XH3PT-Z", "version": 1,
     "digest": "<sha256 hex of the envelope>", "time": 1700000000}

(``"subject"`` instead of ``"cpid"`` for a revocation; ``"version"``, the record
version the change produced, on register, update and renew).  ``digest`` is the SHA-256 of
the envelope's compact JSON (:meth:`schemas.dsse.Envelope.to_json`), so it does not
depend on etcd revisions and a later transparency log can recompute it.

Sequence numbers start at 1 and have no gaps.  The head is the highest entry:
appending entry ``n`` compares, in the change's own transaction, that entry ``n`` is
absent and entry ``n - 1`` exists.  Two registries racing for ``n`` cannot both win
(no fork), nobody can overwrite an entry, and nobody can skip a number.  The loser's
transaction fails as a whole; :meth:`AuditStream.commit` re-reads the head and tries
again, so callers only see the failures of their own compares.

Other modules (the national tools' ``revoke``) use :meth:`AuditStream.commit` with
their own compares and operations, or :func:`entry_ops` to build the audit part of a
transaction they run themselves.

The entries, their put and the head compares are built by :mod:`registry.index.auditlog`
(shared with the resolver, which appends usage receipts); this module adds the
group commit.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from registry.index import Cmp, Index, Op, OpResult, TxnResult
from registry.index.auditlog import (
    AUDIT_OPS,
    AuditEntry,
    AuditOp,
    digest,
    entry_ops,
    find_head,
    head_compares,
    head_probe,
    lost_head,
    read_entries,
)
from schemas.dsse import Envelope
from schemas.errors import RetrievalError

__all__ = [
    "AUDIT_OPS",
    "AuditContentionError",
    "AuditEntry",
    "AuditOp",
    "AuditStream",
    "digest",
    "entry_ops",
    "find_head",
    "read_entries",
]

_log = logging.getLogger(__name__)


class AuditContentionError(RetrievalError):
    """The audit head moved under every attempt (very heavy concurrent writing)."""

    code = "audit_contention"


_MAX_BATCH_OPS = 100  # etcd's default --max-txn-ops is 128 (per branch and for compares)
_MAX_BATCH_BYTES = 1024 * 1024  # etcd refuses requests over 1.5 MiB


@dataclass(slots=True)
class _Pending:
    compare: Sequence[Cmp]
    success: Sequence[Op]
    failure: Sequence[Op]
    op: AuditOp
    envelope: Envelope
    cpid: str | None
    subject: str | None
    version: int | None
    result: asyncio.Future[TxnResult]
    lead: asyncio.Future[None]
    writes: frozenset[str]
    touches: frozenset[str]
    size: int

    @classmethod
    def make(cls, **kw: Any) -> _Pending:
        loop = asyncio.get_running_loop()
        success: Sequence[Op] = kw["success"]
        compare: Sequence[Cmp] = kw["compare"]
        writes = frozenset(o.key for o in success if o.kind != "get")
        touches = writes | {c.key for c in compare} | {o.key for o in success}
        size = sum(len(o.key) + len(o.value) for o in success) + 512
        return cls(
            result=loop.create_future(),
            lead=loop.create_future(),
            writes=writes,
            touches=frozenset(touches),
            size=size,
            **kw,
        )


class AuditStream:
    """Appends audit entries inside other transactions, committing concurrent ones together.

    Concurrent :meth:`commit` calls on one stream are **group-committed**: whichever
    caller finds no transaction in flight leads, and sends the waiting changes whose
    keys do not overlap as one etcd transaction, with consecutive sequence numbers
    and one pair of head compares.  If a batch fails on a caller's own compare, its
    changes are retried one by one, so each caller gets the outcome of its own
    compares.  Leadership passes to the next waiter once the leader's change is done.
    """

    def __init__(self, index: Index, *, attempts: int = 16) -> None:
        self._index = index
        self._head: int | None = None
        self.attempts = attempts
        self._queue: list[_Pending] = []
        self._leading = False
        self.races = 0
        """Batches that lost the head to another writer (another registry) and were retried."""
        self.batches = 0
        """Transactions sent (for the bench: changes per transaction)."""

    async def head(self) -> int:
        """The highest sequence number (read from etcd once, then tracked)."""
        if self._head is None:
            self._head = await find_head(self._index)
        return self._head

    async def commit(
        self,
        *,
        compare: Sequence[Cmp] = (),
        success: Sequence[Op] = (),
        failure: Sequence[Op] = (),
        op: AuditOp,
        envelope: Envelope,
        cpid: str | None = None,
        subject: str | None = None,
        version: int | None = None,
    ) -> TxnResult:
        """Run a transaction that also appends one audit entry.

        ``compare``/``success``/``failure`` are the caller's; the audit compares and the
        entry's put are added.  The result's ``responses`` are those of the caller's
        ops only (``failure`` ops when a compare of the caller's failed).  Raises
        :class:`~schemas.errors.RetrievalError` like :meth:`Index.txn`.
        """
        if (cpid is None) == (subject is None):
            raise ValueError("give exactly one of cpid or subject")
        if op not in AUDIT_OPS:
            raise ValueError(f"unknown audit op {op!r}, expected one of {', '.join(AUDIT_OPS)}")
        p = _Pending.make(
            compare=tuple(compare),
            success=tuple(success),
            failure=tuple(failure),
            op=op,
            envelope=envelope,
            cpid=cpid,
            subject=subject,
            version=version,
        )
        self._queue.append(p)
        while not p.result.done():
            if not self._leading:
                self._leading = True
                try:
                    while not p.result.done():
                        await self._run(self._take_batch())
                finally:
                    self._leading = False
                    if self._queue and not self._queue[0].lead.done():
                        self._queue[0].lead.set_result(None)
                break
            waiters: set[asyncio.Future[Any]] = {p.result, p.lead}
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            if p.lead.done():
                p.lead = asyncio.get_running_loop().create_future()
        return p.result.result()

    def _take_batch(self) -> list[_Pending]:
        batch: list[_Pending] = []
        writes: set[str] = set()
        touches: set[str] = set()
        n_ops = n_cmps = size = 0
        for p in list(self._queue):
            ops = len(p.success) + 1
            cmps = len(p.compare)
            if batch and (
                n_ops + ops > _MAX_BATCH_OPS
                or n_cmps + cmps + 2 > _MAX_BATCH_OPS
                or size + p.size > _MAX_BATCH_BYTES
            ):
                break
            if p.writes & touches or p.touches & writes:
                continue  # overlaps a change already in this batch: next batch
            batch.append(p)
            self._queue.remove(p)
            writes |= p.writes
            touches |= p.touches
            n_ops, n_cmps, size = n_ops + ops, n_cmps + cmps, size + p.size
        return batch

    async def _run(self, batch: list[_Pending]) -> None:
        try:
            if len(batch) == 1:
                batch[0].result.set_result(await self._commit_one(batch[0]))
                return
            if await self._commit_many(batch):
                return
            for p in batch:  # a caller's compare failed: find whose, one by one
                p.result.set_result(await self._commit_one(p))
        except BaseException as exc:
            error = exc if isinstance(exc, Exception) else RetrievalError("audit commit cancelled")
            for p in batch:
                if not p.result.done():
                    p.result.set_exception(error)
            raise

    def _audit_parts(self, head: int, batch: Sequence[_Pending]) -> tuple[list[Cmp], list[Op]]:
        now = int(time.time())
        cmps = head_compares(head)
        puts = []
        for i, p in enumerate(batch):
            _, (put,) = entry_ops(
                head + 1 + i,
                op=p.op,
                envelope=p.envelope,
                cpid=p.cpid,
                subject=p.subject,
                version=p.version,
                now=now,
            )
            puts.append(put)
        return cmps, puts

    def _head_probe(self, head: int) -> list[Op]:
        return head_probe(head)

    async def _lost_head(self, head: int, probe: Sequence[OpResult]) -> bool:
        """After a failed transaction: True (and the head re-read) if the head had moved."""
        taken, missing = lost_head(head, probe)
        if not taken and not missing:
            return False
        self.races += 1
        self._head = await find_head(self._index, hint=head + 1 if taken else 0)
        return True

    async def _commit_one(self, p: _Pending) -> TxnResult:
        for _ in range(self.attempts):
            head = await self.head()
            a_cmps, (a_put,) = self._audit_parts(head, [p])
            self.batches += 1
            result = await self._index.txn(
                compare=[*p.compare, *a_cmps],
                success=[*p.success, a_put],
                failure=[*p.failure, *self._head_probe(head)],
            )
            if result.succeeded:
                self._head = head + 1
                return TxnResult(True, result.revision, result.responses[: len(p.success)])
            if not await self._lost_head(head, result.responses[len(p.failure) :]):
                return TxnResult(False, result.revision, result.responses[: len(p.failure)])
        raise AuditContentionError(
            f"could not append to the audit stream after {self.attempts} attempts "
            "(other writers keep taking the head)"
        )

    async def _commit_many(self, batch: list[_Pending]) -> bool:
        """Commit the batch as one transaction; False when a caller's compare failed."""
        for _ in range(self.attempts):
            head = await self.head()
            a_cmps, a_puts = self._audit_parts(head, batch)
            compare = [c for p in batch for c in p.compare]
            success: list[Op] = []
            for p, put in zip(batch, a_puts, strict=True):
                success.extend(p.success)
                success.append(put)
            self.batches += 1
            result = await self._index.txn(
                compare=[*compare, *a_cmps], success=success, failure=self._head_probe(head)
            )
            if result.succeeded:
                self._head = head + len(batch)
                at = 0
                for p in batch:
                    n = len(p.success)
                    p.result.set_result(
                        TxnResult(True, result.revision, result.responses[at : at + n])
                    )
                    at += n + 1
                return True
            if not await self._lost_head(head, result.responses):
                return False
        raise AuditContentionError(
            f"could not append to the audit stream after {self.attempts} attempts "
            "(other writers keep taking the head)"
        )
