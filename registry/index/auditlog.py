"""The audit stream's entries and the compares that append one (docs/protocol.md §6).

One implementation for every writer of ``/cpi/v1/audit/<seq>``: the registries and the
national tools (which import it as :mod:`registry.changes`) and the resolver's claims
service (usage receipts, :mod:`resolver.claims.usage`).  The pure part builds entries,
their put and the head compares; :class:`AuditStream` runs transactions that append
one entry each, group-committing concurrent ones.

Appending entry ``n`` compares, in the change's own transaction, that entry ``n`` is
absent and entry ``n - 1`` exists; the failure branch of such a transaction carries
:func:`head_probe`, and :func:`lost_head` tells from its answers whether the head moved
(another writer appended first) or a compare of the caller's own failed.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Literal

from registry.index.layout import Keys, Prefix
from registry.index.values import Cmp, Op, OpResult, TxnResult
from schemas import _json
from schemas.dsse import Envelope
from schemas.errors import RetrievalError

if TYPE_CHECKING:
    from registry.index.client import Index

__all__ = [
    "AUDIT_OPS",
    "ENTRY_OPS",
    "AuditContentionError",
    "AuditEntry",
    "AuditOp",
    "AuditStream",
    "Entry",
    "EntryOp",
    "digest",
    "entry_ops",
    "find_head",
    "head_compares",
    "head_probe",
    "lost_head",
    "read_entries",
]

_log = logging.getLogger(__name__)

AuditOp = Literal["register", "update", "renew", "deregister", "revoke"]
"""The ops of the registry side (a record or trust change)."""
AUDIT_OPS: Final[tuple[str, ...]] = ("register", "update", "renew", "deregister", "revoke")
EntryOp = Literal["register", "update", "renew", "deregister", "revoke", "usage"]
"""Every op an entry may carry: the registry's and ``usage`` (a usage receipt)."""
ENTRY_OPS: Final[tuple[str, ...]] = (*AUDIT_OPS, "usage")


class AuditContentionError(RetrievalError):
    """The audit head moved under every attempt (very heavy concurrent writing)."""

    code = "audit_contention"


def digest(envelope: Envelope, envelope_json: bytes | None = None) -> str:
    """Revision-independent SHA-256 (hex) of an envelope's compact JSON (``envelope_json``:
    that JSON when the caller has it already, else ``envelope.to_json()``)."""
    return hashlib.sha256(
        envelope.to_json() if envelope_json is None else envelope_json
    ).hexdigest()


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One entry of the stream.  ``receipt`` (op ``usage`` only) names the receipt's key
    below ``/cpi/v1/usage/``: ``<claim-id>/<20-digit n>``."""

    seq: int
    op: str
    digest: str
    time: int
    cpid: str | None = None
    subject: str | None = None
    version: int | None = None
    receipt: str | None = None

    def to_json(self) -> bytes:
        obj: dict[str, Any] = {"seq": self.seq, "op": self.op}
        if self.cpid is not None:
            obj["cpid"] = self.cpid
        if self.version is not None:
            obj["version"] = self.version
        if self.subject is not None:
            obj["subject"] = self.subject
        if self.receipt is not None:
            obj["receipt"] = self.receipt
        obj["digest"] = self.digest
        obj["time"] = self.time
        return json.dumps(obj, separators=(",", ":")).encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes) -> AuditEntry:
        obj = _json.loads(data)
        return cls(
            seq=int(obj["seq"]),
            op=str(obj["op"]),
            digest=str(obj["digest"]),
            time=int(obj["time"]),
            cpid=obj.get("cpid"),
            subject=obj.get("subject"),
            version=obj.get("version"),
            receipt=obj.get("receipt"),
        )


def head_compares(head: int) -> list[Cmp]:
    """Compares that make a transaction append right after entry ``head``: entry
    ``head + 1`` absent and (``head > 0``) entry ``head`` present."""
    cmps = [Cmp.absent(Keys.audit(head + 1))]
    if head > 0:
        cmps.append(Cmp.exists(Keys.audit(head)))
    return cmps


def head_probe(head: int) -> list[Op]:
    """Reads for a transaction's failure branch: with :func:`lost_head` they tell whether
    the head compares of :func:`head_compares` failed."""
    return [Op.get(Keys.audit(head + 1))] + ([Op.get(Keys.audit(head))] if head > 0 else [])


def lost_head(head: int, probe: Sequence[OpResult]) -> tuple[bool, bool]:
    """From the answers to :func:`head_probe`: ``(taken, missing)``: entry ``head + 1``
    was written by someone else, or entry ``head`` is gone (another etcd, or a deletion)."""
    taken = bool(probe[0].kvs)
    missing = head > 0 and not probe[1].kvs
    return taken, missing


def entry_ops(
    seq: int,
    *,
    op: EntryOp,
    envelope: Envelope,
    cpid: str | None = None,
    subject: str | None = None,
    version: int | None = None,
    receipt: str | None = None,
    now: int | None = None,
    digest_hex: str | None = None,
) -> tuple[list[Cmp], list[Op]]:
    """The compares and the put that append entry ``seq`` inside a caller's transaction.

    Exactly one of ``cpid`` (register, update, renew, deregister, usage) or ``subject``
    (revoke) names what changed; ``receipt`` is given with op ``usage`` and only then.
    ``digest_hex``: :func:`digest` of ``envelope`` when the caller has computed it.
    """
    if op not in ENTRY_OPS:
        raise ValueError(f"unknown audit op {op!r}, expected one of {', '.join(ENTRY_OPS)}")
    if (cpid is None) == (subject is None):
        raise ValueError("give exactly one of cpid or subject")
    if (op == "usage") != (receipt is not None):
        raise ValueError("a usage entry names its receipt, and only a usage entry does")
    if seq < 1:
        raise ValueError(f"audit sequence numbers start at 1, got {seq}")
    entry = AuditEntry(
        seq=seq,
        op=op,
        digest=digest(envelope) if digest_hex is None else digest_hex,
        time=int(time.time()) if now is None else now,
        cpid=cpid,
        subject=subject,
        version=version,
        receipt=receipt,
    )
    return head_compares(seq - 1), [Op.put(Keys.audit(seq), entry.to_json())]


async def find_head(index: Index, *, hint: int = 0) -> int:
    """The highest sequence number in the stream (0 when empty).

    Starts from ``hint`` (a head seen before) and probes forwards, galloping, then
    bisects: O(log n) reads, and one or two when the hint is recent.
    """
    lo = max(0, hint)
    if lo > 0 and await index.get(Keys.audit(lo)) is None:
        lo = 0  # the hint is ahead of the stream (another etcd?): search from scratch
    step = 1
    hi = lo + step
    while await index.get(Keys.audit(hi)) is not None:
        lo = hi
        step *= 2
        hi = lo + step
    # entry lo exists (or lo == 0), entry hi does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if await index.get(Keys.audit(mid)) is not None:
            lo = mid
        else:
            hi = mid
    return lo


async def read_entries(index: Index) -> list[AuditEntry]:
    """Every entry, in sequence order."""
    kvs, _ = await index.get_prefix(Prefix.AUDIT)
    return [AuditEntry.from_json(kv.value) for kv in kvs]


_MAX_BATCH_OPS = 100  # etcd's default --max-txn-ops is 128 (per branch and for compares)
_MAX_BATCH_BYTES = 1024 * 1024  # etcd refuses requests over 1.5 MiB


@dataclass(frozen=True, slots=True)
class Entry:
    """One entry to append (its ``seq`` and ``time`` are given at commit)."""

    op: EntryOp
    envelope: Envelope
    cpid: str | None = None
    subject: str | None = None
    version: int | None = None
    receipt: str | None = None
    digest_hex: str | None = None
    """:func:`digest` of ``envelope``, when known (computed once, not on every attempt)."""

    def check(self) -> None:
        """ValueError when the members do not fit the op (as :func:`entry_ops` checks)."""
        if (self.cpid is None) == (self.subject is None):
            raise ValueError("give exactly one of cpid or subject")
        if self.op not in ENTRY_OPS:
            raise ValueError(
                f"unknown audit op {self.op!r}, expected one of {', '.join(ENTRY_OPS)}"
            )
        if (self.op == "usage") != (self.receipt is not None):
            raise ValueError("a usage entry names its receipt, and only a usage entry does")


@dataclass(slots=True)
class _Pending:
    compare: Sequence[Cmp]
    success: Sequence[Op]
    failure: Sequence[Op]
    entries: tuple[Entry, ...]
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
    Up to ``pipeline`` batches are in flight at once, each numbered right after the one
    before (see :meth:`_lead`); compares shared by several changes are sent once.
    """

    def __init__(self, index: Index, *, attempts: int = 16, pipeline: int = 2) -> None:
        self._index = index
        self._head: int | None = None
        self.attempts = attempts
        self.pipeline = max(1, pipeline)
        """Batches in flight at once (see :meth:`_lead`)."""
        self._queue: list[_Pending] = []
        self._leading = False
        self._inflight: list[tuple[int, asyncio.Task[None], frozenset[str]]] = []
        self._next: int | None = None  # where the next speculative batch starts (head + 1)
        self._resync = False
        self._fallback = asyncio.Lock()
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
        op: EntryOp,
        envelope: Envelope,
        cpid: str | None = None,
        subject: str | None = None,
        version: int | None = None,
        receipt: str | None = None,
        envelope_json: bytes | None = None,
    ) -> TxnResult:
        """Run a transaction that also appends one audit entry.

        ``compare``/``success``/``failure`` are the caller's; the audit compares and the
        entry's put are added.  The result's ``responses`` are those of the caller's
        ops only (``failure`` ops when a compare of the caller's failed).
        ``envelope_json``: ``envelope.to_json()`` when the caller has it (the entry's
        digest is then computed once, here, not on every attempt).  Raises
        :class:`~schemas.errors.RetrievalError` like :meth:`Index.txn`.
        """
        entry = Entry(
            op, envelope, cpid, subject, version, receipt, digest(envelope, envelope_json)
        )
        return await self.commit_entries(
            compare=compare, success=success, failure=failure, entries=[entry]
        )

    async def commit_entries(
        self,
        *,
        compare: Sequence[Cmp] = (),
        success: Sequence[Op] = (),
        failure: Sequence[Op] = (),
        entries: Sequence[Entry],
    ) -> TxnResult:
        """As :meth:`commit`, appending several entries (consecutive sequence numbers) in
        the caller's one transaction: e.g. the usage receipts of every part of a claim
        released at once."""
        if not entries:
            raise ValueError("commit_entries needs at least one entry")
        for e in entries:
            e.check()
        p = _Pending.make(
            compare=tuple(compare),
            success=tuple(success),
            failure=tuple(failure),
            entries=tuple(entries),
        )
        self._queue.append(p)
        while not p.result.done():
            if not self._leading:
                self._leading = True
                try:
                    while not p.result.done():
                        await self._lead(p)
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

    async def _lead(self, own: _Pending) -> None:
        """Keep up to :attr:`pipeline` batches in flight; return when one finishes or
        *own*'s result is in.

        Batch *k+1* is sent while batch *k* is in flight, with sequence numbers right
        after *k*'s: its compares (entry ``start`` absent, entry ``start - 1`` present)
        hold only once *k* is applied, so no fork or gap is possible whatever etcd
        does.  If it arrives first, or *k* fails, it fails as a whole and is retried
        after the batches before it are done (:meth:`_speculate`).
        """
        while len(self._inflight) < self.pipeline and self._queue:
            if self._resync and self._inflight:
                break  # a batch failed: let the ones in flight finish, then re-read
            if not self._inflight or self._next is None:
                self._resync = False
                self._next = await self.head() + 1
            batch = self._take_batch()
            if not batch:
                break
            busy = frozenset().union(*(w for _, _, w in self._inflight))
            if any(p.touches & busy for p in batch):
                self._queue[:0] = batch  # would compare what a batch in flight writes
                break
            start = self._next
            self._next += sum(len(p.entries) for p in batch)
            task = asyncio.create_task(self._speculate(batch, start))
            writes = frozenset().union(*(p.writes for p in batch))
            self._inflight.append((start, task, writes))
            task.add_done_callback(self._landed)
        waiters: set[asyncio.Future[Any]] = {own.result, *(t for _, t, _ in self._inflight)}
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)

    def _landed(self, task: asyncio.Task[None]) -> None:
        self._inflight = [entry for entry in self._inflight if entry[1] is not task]
        if not task.cancelled() and task.exception() is not None:
            _log.warning("audit commit failed: %s", task.exception())

    async def _speculate(self, batch: list[_Pending], start: int) -> None:
        """One attempt of *batch* at *start*; on failure, wait for the batches sent
        before it, then commit it the careful way (:meth:`_run`)."""
        try:
            if await self._attempt_many(batch, start - 1):
                return
        except Exception as exc:
            self._resync = True
            self._head = None  # the outcome is unknown: read the head again
            for p in batch:
                if not p.result.done():
                    p.result.set_exception(exc)
            return
        self._resync = True
        earlier = [t for s, t, _ in self._inflight if s < start]
        if earlier:
            await asyncio.wait(earlier)
        async with self._fallback:
            try:
                self._head = await find_head(self._index, hint=start - 1)
            except Exception as exc:
                self._head = None
                for p in batch:
                    if not p.result.done():
                        p.result.set_exception(exc)
                return
            try:
                await self._run(batch)
            except Exception:
                return  # _run set every result

    async def _attempt_many(self, batch: list[_Pending], head: int) -> bool:
        """Send *batch* as one transaction after entry *head*; True when it landed."""
        a_cmps, a_puts = self._audit_parts(head, batch)
        compare = list(dict.fromkeys(c for p in batch for c in p.compare))
        success: list[Op] = []
        for p, puts in zip(batch, a_puts, strict=True):
            success.extend(p.success)
            success.extend(puts)
        self.batches += 1
        result = await self._index.txn(compare=[*compare, *a_cmps], success=success)
        if not result.succeeded:
            return False
        if self._head is not None:
            self._head = max(self._head, head + sum(len(p.entries) for p in batch))
        at = 0
        for p in batch:
            n = len(p.success)
            p.result.set_result(TxnResult(True, result.revision, result.responses[at : at + n]))
            at += n + len(p.entries)
        return True

    def _take_batch(self) -> list[_Pending]:
        batch: list[_Pending] = []
        writes: set[str] = set()
        touches: set[str] = set()
        cmps: set[Cmp] = set()  # identical compares (a shared token, namespace) are sent once
        n_ops = size = 0
        for p in list(self._queue):
            ops = len(p.success) + len(p.entries)
            n_cmps = len(cmps.union(p.compare))
            if batch and (
                n_ops + ops > _MAX_BATCH_OPS
                or n_cmps + 2 > _MAX_BATCH_OPS
                or size + p.size > _MAX_BATCH_BYTES
            ):
                break
            if p.writes & touches or p.touches & writes:
                continue  # overlaps a change already in this batch: next batch
            batch.append(p)
            self._queue.remove(p)
            writes |= p.writes
            touches |= p.touches
            cmps.update(p.compare)
            n_ops, size = n_ops + ops, size + p.size
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

    def _audit_parts(
        self, head: int, batch: Sequence[_Pending]
    ) -> tuple[list[Cmp], list[list[Op]]]:
        """The head compares, and per change the puts of its entries (consecutive seqs)."""
        now = int(time.time())
        cmps = head_compares(head)
        puts: list[list[Op]] = []
        seq = head
        for p in batch:
            mine: list[Op] = []
            for e in p.entries:
                seq += 1
                _, (put,) = entry_ops(
                    seq,
                    op=e.op,
                    envelope=e.envelope,
                    cpid=e.cpid,
                    subject=e.subject,
                    version=e.version,
                    receipt=e.receipt,
                    now=now,
                    digest_hex=e.digest_hex,
                )
                mine.append(put)
            puts.append(mine)
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
            a_cmps, (a_puts,) = self._audit_parts(head, [p])
            self.batches += 1
            result = await self._index.txn(
                compare=[*p.compare, *a_cmps],
                success=[*p.success, *a_puts],
                failure=[*p.failure, *self._head_probe(head)],
            )
            if result.succeeded:
                self._head = head + len(p.entries)
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
            compare = list(dict.fromkeys(c for p in batch for c in p.compare))
            success: list[Op] = []
            for p, puts in zip(batch, a_puts, strict=True):
                success.extend(p.success)
                success.extend(puts)
            self.batches += 1
            result = await self._index.txn(
                compare=[*compare, *a_cmps], success=success, failure=self._head_probe(head)
            )
            if result.succeeded:
                self._head = head + sum(len(p.entries) for p in batch)
                at = 0
                for p in batch:
                    n = len(p.success)
                    p.result.set_result(
                        TxnResult(True, result.revision, result.responses[at : at + n])
                    )
                    at += n + len(p.entries)
                return True
            if not await self._lost_head(head, result.responses):
                return False
        raise AuditContentionError(
            f"could not append to the audit stream after {self.attempts} attempts "
            "(other writers keep taking the head)"
        )
