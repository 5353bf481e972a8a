"""Liveness: heartbeats reach the registry; etcd sees only changes.

One etcd lease per registry instance carries every ``/cpi/v1/live/<cpid>`` key the
instance writes.  A node's live key (its latest node-signed ``status.v1`` envelope) is
written only when

* the node has no live key of ours yet (first heartbeat, return after expiry, or
  first heartbeat seen by this instance after a restart),
* its ``state`` changed, or its free capacity changed (``accelerators_free`` or
  ``cpu_free`` differ, or ``memory_free_gib`` moved by more than
  :data:`MEMORY_TOLERANCE` of the last written value), or
* the last write is older than ``live_refresh_s``.

Other heartbeats only update memory, so etcd load grows with changes, not nodes.

**Freshness is in the index** (docs/protocol.md §3): ``/cpi/v1/seq/<cpid>`` holds the
``seq`` (and ``observed_at``) of the last status written for the CPID.  It is put in
the same transaction as every live write, which compares its ``mod_revision`` with
the one this instance last saw (a compare-and-swap; a failed one reads it again and
decides again).  The first status of a node this instance has not seen since it
started (or since the node expired) is checked against the stored value; later ones
against the highest ``seq`` accepted in memory, which re-registration does not reset.
So no instance, restarted or not, accepts a ``seq`` at or below one written to the
index; heartbeats that change nothing still cost no etcd write.

**Group commit.**  Live writes that are due at the same moment share one transaction:
whichever heartbeat finds no write in flight leads and sends the waiting writes (up to
:data:`_GROUP` nodes, one per CPID) together, each node with its own two compares
(record exists, ``/seq/`` ``mod_revision`` as last seen) and its two puts.  All compares
must hold for anything to be written; when one fails, the nodes of that transaction are
written one by one as before, so each heartbeat gets the outcome of its own compares and
the seq CAS holds per CPID.  The first-contact reads of ``/seq/`` are grouped the same
way (one read-only transaction of gets).  So etcd sees a handful of transactions per
second however many nodes change at once.

A node silent for ``expire_after_heartbeats * heartbeat_s`` is made not-live: its
live key is deleted (only if it is still on this instance's lease, so an instance
never deletes what another instance wrote since).

**Self-preservation** (as in Eureka): nodes are grouped by the registry namespace
that issued their record.  When a sweep finds nodes due to expire and more than
``threshold`` of the group's live nodes (and at least ``min_nodes``) are silent
(missed more than 1.5 heartbeat intervals), the registry is more likely cut off from
them than they are all dead, so nothing in that group expires: a WARNING is logged
once, the ``cpi_registry_self_preservation{namespace}`` gauge is 1, and expiry
resumes when enough heartbeats return (the truly dead then expire) or when an
operator switches self-preservation off (:meth:`Liveness.set_self_preservation`).

If the lease is lost (etcd says it expired, or keep-alives went unanswered for a
TTL), a new one is granted and every live key is rewritten on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from registry.errors import StaleSequenceError
from registry.index import KV, Cmp, Index, IndexRejectedError, Keys, Lease, Op
from registry.metrics import RegistryMetrics
from schemas import _json, keys
from schemas.dsse import Envelope
from schemas.errors import NotFoundError, RetrievalError
from schemas.keys import Ed25519PublicKey
from schemas.models import Capacity, Status

__all__ = ["MEMORY_TOLERANCE", "Liveness", "NodeState", "capacity_changed"]

_log = logging.getLogger(__name__)

MEMORY_TOLERANCE = 0.10
"""Relative change of ``memory_free_gib`` that counts as a capacity change."""

OVERDUE_INTERVALS = 1.5
"""A node is *silent* (for self-preservation) after this many heartbeat intervals."""

_BATCH = 64
_PARALLEL = 32
_GROUP = 60
"""Most nodes per grouped transaction: 2 compares and 2 puts each, within etcd's
default ``--max-txn-ops`` of 128."""
_GROUP_BYTES = 1 << 20  # etcd refuses requests over 1.5 MiB


def capacity_changed(old: Capacity | None, new: Capacity) -> bool:
    """True when free capacity changed enough to be worth an etcd write."""
    if old is None:
        return True
    if old.accelerators_free != new.accelerators_free or old.cpu_free != new.cpu_free:
        return True
    a, b = old.memory_free_gib, new.memory_free_gib
    if (a is None) != (b is None):
        return True
    if a is not None and b is not None:
        return abs(a - b) > MEMORY_TOLERANCE * max(abs(a), 1.0)
    return False


@dataclass(slots=True)
class NodeState:
    """What the registry remembers about one node."""

    cpid: str
    group: str
    public_key: str
    last_seen: float
    seq: int | None = None
    """The highest ``seq`` accepted for the node (memory or index); never lowered."""
    seq_rev: int | None = None
    """``mod_revision`` of ``/cpi/v1/seq/<cpid>`` as last seen (0: absent); ``None``: not read yet."""
    signer_kid: str = ""
    """Key id of the registry key that signed the node's record."""
    envelope: bytes | None = None
    written_at: float | None = None
    """Clock time of the last live write on the current lease; ``None``: no live key of ours."""
    written_state: str | None = None
    written_capacity: Capacity | None = None
    _key: tuple[str, Ed25519PublicKey] | None = None

    @property
    def live(self) -> bool:
        return self.written_at is not None

    def verify_key(self) -> tuple[str, Ed25519PublicKey]:
        """The node key's kid and public key object (decoded once; the key comes from a
        record, so it passed the full key rule when it was registered)."""
        if self._key is None:
            raw = keys.check_public_raw_fast(keys.b64url_decode(self.public_key))
            self._key = (keys.kid(raw), Ed25519PublicKey.from_public_bytes(raw))
        return self._key


@dataclass(slots=True)
class _Counters:
    heartbeats: int = 0
    writes: int = 0
    """Live keys written."""
    txns: int = 0
    """etcd transactions that wrote live keys (a group commit writes several)."""
    deletes: int = 0
    by_reason: dict[str, int] = field(default_factory=lambda: defaultdict(int))


ItemT = TypeVar("ItemT")
ResultT = TypeVar("ResultT")


@dataclass(slots=True)
class _Job(Generic[ItemT, ResultT]):
    item: ItemT
    key: str
    size: int
    done: asyncio.Future[ResultT]
    lead: asyncio.Future[None]
    """Set when this job's caller is to take the lead."""


class _Group(Generic[ItemT, ResultT]):
    """Group commit: concurrent :meth:`submit` calls are handed to *run* in batches.

    Whichever caller finds no batch in flight leads: it runs batches (FIFO, at most
    *limit* jobs and *max_bytes*, one job per key) until its own job is done, then
    hands the lead to the oldest waiting job.  *run* must resolve the ``done`` future
    of every job it is given (a result or an exception).
    """

    def __init__(
        self,
        run: Callable[[list[_Job[ItemT, ResultT]]], Awaitable[None]],
        *,
        limit: int,
        max_bytes: int = _GROUP_BYTES,
    ) -> None:
        self._run = run
        self.limit = limit
        self.max_bytes = max_bytes
        self._queue: list[_Job[ItemT, ResultT]] = []
        self._leading = False
        self.batches = 0

    async def submit(self, item: ItemT, *, key: str, size: int = 0) -> ResultT:
        loop = asyncio.get_running_loop()
        job: _Job[ItemT, ResultT] = _Job(
            item, key, size, loop.create_future(), loop.create_future()
        )
        self._queue.append(job)
        while not job.done.done():
            if not self._leading:
                self._leading = True
                try:
                    while not job.done.done():
                        await self._run_batch(self._take())
                finally:
                    self._leading = False
                    if self._queue and not self._queue[0].lead.done():
                        self._queue[0].lead.set_result(None)
                break
            waiters: set[asyncio.Future[Any]] = {job.done, job.lead}
            try:
                await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            except asyncio.CancelledError:
                if job in self._queue:  # not sent: forget it, and pass on a lead it got
                    self._queue.remove(job)
                if not self._leading and self._queue and not self._queue[0].lead.done():
                    self._queue[0].lead.set_result(None)
                raise
            if job.lead.done() and not job.done.done():
                job.lead = loop.create_future()
        return job.done.result()

    def _take(self) -> list[_Job[ItemT, ResultT]]:
        batch: list[_Job[ItemT, ResultT]] = []
        keys: set[str] = set()
        size = 0
        rest: list[_Job[ItemT, ResultT]] = []
        for job in self._queue:
            if (
                len(batch) >= self.limit
                or job.key in keys
                or (batch and size + job.size > self.max_bytes)
            ):
                rest.append(job)
                continue
            batch.append(job)
            keys.add(job.key)
            size += job.size
        self._queue = rest
        return batch

    async def _run_batch(self, batch: list[_Job[ItemT, ResultT]]) -> None:
        if not batch:
            return
        self.batches += 1
        try:
            await self._run(batch)
        except Exception as exc:  # every job of the batch gets it; the leader goes on
            for job in batch:
                if not job.done.done():
                    job.done.set_exception(exc)
        except BaseException:  # the leader was cancelled: its batch is not written
            for job in batch:
                if not job.done.done():
                    job.done.set_exception(RetrievalError("the grouped write was cancelled"))
            raise
        for job in batch:
            if not job.done.done():  # a bug in run: never leave a caller waiting
                job.done.set_exception(RuntimeError("group commit left a job unresolved"))


@dataclass(slots=True)
class _LiveWrite:
    node: NodeState
    seq: int
    observed_at: int
    envelope: bytes
    reason: str


class Liveness:
    """Tracks heartbeats of the nodes this instance registered or heard from."""

    def __init__(
        self,
        index: Index,
        *,
        heartbeat_s: float,
        expire_after_heartbeats: int = 3,
        live_refresh_s: float = 240.0,
        lease_ttl_s: int = 30,
        threshold: float = 0.5,
        min_nodes: int = 3,
        metrics: RegistryMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._index = index
        self.heartbeat_s = heartbeat_s
        self.expire_after_s = heartbeat_s * expire_after_heartbeats
        self.live_refresh_s = live_refresh_s
        self.lease_ttl_s = lease_ttl_s
        self.threshold = threshold
        self.min_nodes = min_nodes
        self.metrics = metrics or RegistryMetrics()
        self._clock = clock
        self._nodes: dict[str, NodeState] = {}
        self._to_delete: dict[str, NodeState] = {}  # expired, delete failed: retried
        self.lease: Lease | None = None
        self._lease_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        self.self_preservation_enabled = True
        self.protecting: set[str] = set()
        self.counters = _Counters()
        self._writes: _Group[_LiveWrite, bool] = _Group(self._write_group, limit=_GROUP)
        self._reads: _Group[NodeState, KV | None] = _Group(self._read_group, limit=_GROUP * 2)

    # -- life cycle -------------------------------------------------------------------

    async def start(self, *, sweep: bool = True) -> None:
        """Grant the instance lease, keep it alive, and start the sweeper (unless ``sweep=False``)."""
        await self._ensure_lease()
        self._tasks.append(asyncio.create_task(self._watch_lease(), name="liveness-lease"))
        if sweep:
            self._tasks.append(asyncio.create_task(self._sweeper(), name="liveness-sweeper"))

    async def stop(self) -> None:
        """Stop the tasks and the keep-alive.  The lease is not revoked: live keys
        outlive a clean restart by at most the lease TTL instead of flapping."""
        tasks, self._tasks = self._tasks, []
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        if self.lease is not None:
            await self.lease.stop_keepalive()

    @property
    def lease_alive(self) -> bool:
        return self.lease is not None and self.lease.alive

    # -- node table -------------------------------------------------------------------

    def get(self, cpid: str) -> NodeState | None:
        return self._nodes.get(cpid)

    def __len__(self) -> int:
        return len(self._nodes)

    def live_count(self, group: str | None = None) -> int:
        return sum(1 for n in self._nodes.values() if n.live and group in (None, n.group))

    def track(self, cpid: str, *, group: str, public_key: str, signer_kid: str = "") -> NodeState:
        """Remember a node (after it registered).  Its next status must carry a ``seq``
        above the highest one accepted so far: re-registration does not reset it."""
        self._to_delete.pop(cpid, None)
        node = self._nodes.get(cpid)
        if node is None or node.public_key != public_key:
            node = NodeState(cpid, group, public_key, self._clock(), signer_kid=signer_kid)
            self._nodes[cpid] = node
        else:
            node.group = group
            node.signer_kid = signer_kid or node.signer_kid
            node.last_seen = self._clock()
        return node

    def forget(self, cpid: str) -> None:
        """Drop a node (deregistered, or its record is gone)."""
        self._nodes.pop(cpid, None)
        self._to_delete.pop(cpid, None)

    # -- heartbeats -------------------------------------------------------------------

    async def heartbeat(self, node: NodeState, status: Status, envelope: Envelope) -> bool:
        """Take a verified status; write the live key if needed.  Returns whether it wrote.

        The caller has checked the signature, the CPID and ``seq`` (see
        :meth:`check_seq`).  Raises :class:`NotFoundError` when the record is gone
        (the agent should register again).
        """
        now = self._clock()
        if node.seq_rev is None:
            await self.load_seq(node)
        self._require_newer(node, status.seq)
        self.counters.heartbeats += 1
        self.metrics.heartbeats.inc()
        node.last_seen = now
        if node.written_at is None:
            reason = "first"
        elif status.state != node.written_state or capacity_changed(
            node.written_capacity, status.capacity
        ):
            reason = "changed"
        elif now - node.written_at >= self.live_refresh_s:
            reason = "refresh"
        else:
            node.seq = status.seq
            node.envelope = envelope.to_json()
            return False
        data = envelope.to_json()
        previous = (node.written_at, node.written_state, node.written_capacity)
        node.written_at, node.written_state = now, status.state
        node.written_capacity = status.capacity
        previous_seq, node.seq = node.seq, status.seq  # a concurrent status must be above it
        try:
            ok = await self._write(node, status, data, reason=reason)
        except StaleSequenceError:
            node.written_at, node.written_state, node.written_capacity = previous
            raise
        except BaseException:
            node.written_at, node.written_state, node.written_capacity = previous
            if node.seq == status.seq:
                node.seq = previous_seq
            raise
        if not ok:
            self.forget(node.cpid)
            raise NotFoundError(f"no record for {node.cpid}: register again")
        node.envelope = data
        return True

    def check_seq(self, node: NodeState, seq: int) -> bool:
        """True when ``seq`` is newer than the last status accepted for the node (in
        memory; :meth:`heartbeat` also checks the index on first contact)."""
        return node.seq is None or seq > node.seq

    def _require_newer(self, node: NodeState, seq: int) -> None:
        if not self.check_seq(node, seq):
            raise StaleSequenceError(
                f"status seq {seq} is not above the last accepted seq {node.seq}"
            )

    def _saw_seq(self, node: NodeState, kv: KV | None) -> None:
        """Take the stored ``/seq/`` value into memory (the highest seq wins)."""
        node.seq_rev = 0 if kv is None else kv.mod_revision
        if kv is None:
            return
        stored = _stored_seq(kv)
        if stored is not None and (node.seq is None or stored > node.seq):
            node.seq = stored

    async def load_seq(self, node: NodeState) -> None:
        """Read the node's last accepted ``seq`` from the index (first contact; the
        reads of nodes arriving together share one transaction)."""
        kv = await self._reads.submit(node, key=node.cpid)
        if node.seq_rev is None:
            self._saw_seq(node, kv)

    async def _read_group(self, jobs: list[_Job[NodeState, KV | None]]) -> None:
        async with self.metrics.etcd("get-seq"):
            if len(jobs) == 1:
                kvs = [await self._index.get(Keys.seq(jobs[0].key))]
            else:
                result = await self._index.txn(success=[Op.get(Keys.seq(j.key)) for j in jobs])
                kvs = [r.kvs[0] if r.kvs else None for r in result.responses]
        for job, kv in zip(jobs, kvs, strict=True):
            job.done.set_result(kv)

    async def _write(
        self, node: NodeState, status: Status, envelope: bytes, *, reason: str
    ) -> bool:
        """Put the live key on our lease and the seq key beside it, if the record still
        exists and nobody wrote the seq key since we last saw it; False: no record.
        Writes due together are group-committed (see the module docstring)."""
        w = _LiveWrite(node, status.seq, status.observed_at, envelope, reason)
        return await self._writes.submit(w, key=node.cpid, size=len(envelope) + 256)

    async def _write_group(self, jobs: list[_Job[_LiveWrite, bool]]) -> None:
        if len(jobs) > 1 and await self._write_together([j.item for j in jobs]):
            for job in jobs:
                job.done.set_result(True)
            return
        for job in jobs:  # alone, or a compare of the group failed: one by one
            try:
                job.done.set_result(await self._write_one(job.item))
            except Exception as exc:
                job.done.set_exception(exc)

    async def _write_together(self, writes: list[_LiveWrite]) -> bool:
        """One transaction for several nodes; False when any node's compare failed
        (then nothing was written)."""
        compare: list[Cmp] = []
        success: list[Op] = []
        for attempt in (1, 2):
            lease = await self._ensure_lease()
            compare, success = [], []
            for w in writes:
                seq_key = Keys.seq(w.node.cpid)
                compare += [
                    Cmp.exists(Keys.rec(w.node.cpid)),
                    Cmp.mod_revision(seq_key, "==", w.node.seq_rev or 0),
                ]
                success += [
                    Op.put(Keys.live(w.node.cpid), w.envelope, lease=lease.id),
                    Op.put(seq_key, _seq_value(w)),
                ]
            try:
                async with self.metrics.etcd("txn-live"):
                    result = await self._index.txn(compare=compare, success=success)
            except IndexRejectedError as exc:
                if "lease not found" not in str(exc) or attempt >= 2:
                    raise
                self._lease_gone(lease, "etcd says the lease is not found")
                continue
            if not result.succeeded:
                return False
            self.counters.txns += 1
            for w in writes:
                w.node.seq_rev = result.revision
                self._count_write(w.reason)
            return True
        raise AssertionError("unreachable")

    def _count_write(self, reason: str) -> None:
        self.counters.writes += 1
        self.counters.by_reason[reason] += 1
        self.metrics.live_writes.labels(reason).inc()

    async def _write_one(self, w: _LiveWrite) -> bool:
        node = w.node
        cpid = node.cpid
        seq_key = Keys.seq(cpid)
        seq_value = _seq_value(w)
        envelope = w.envelope
        attempt = 0
        while True:
            attempt += 1
            lease = await self._ensure_lease()
            try:
                async with self.metrics.etcd("txn-live"):
                    result = await self._index.txn(
                        compare=[
                            Cmp.exists(Keys.rec(cpid)),
                            Cmp.mod_revision(seq_key, "==", node.seq_rev or 0),
                        ],
                        success=[
                            Op.put(Keys.live(cpid), envelope, lease=lease.id),
                            Op.put(seq_key, seq_value),
                        ],
                        failure=[Op.get(Keys.rec(cpid)), Op.get(seq_key)],
                    )
            except IndexRejectedError as exc:
                if "lease not found" not in str(exc) or attempt >= 2:
                    raise
                self._lease_gone(lease, "etcd says the lease is not found")
                continue
            if result.succeeded:
                node.seq_rev = result.revision
                self.counters.txns += 1
                self._count_write(w.reason)
                return True
            if not result.responses[0].kvs:
                return False
            # another writer (instance) stored a seq since: decide again against it
            seq_kv = result.responses[1].kvs[0] if result.responses[1].kvs else None
            stored = None if seq_kv is None else _stored_seq(seq_kv)
            self._saw_seq(node, seq_kv)
            if stored is not None and w.seq <= stored:
                raise StaleSequenceError(
                    f"status seq {w.seq} is not above the last accepted seq {stored}"
                )
            if attempt >= 8:
                raise StaleSequenceError(
                    f"status seq {w.seq} of {cpid} kept racing with other writers; retry"
                )

    # -- the lease --------------------------------------------------------------------

    def _lease_gone(self, lease: Lease, reason: str) -> None:
        if lease.alive:
            lease.lost_reason = reason
            lease.lost.set()

    async def _ensure_lease(self) -> Lease:
        """The current lease; grant a new one (and rewrite every live key) if it is lost."""
        if self.lease is not None and self.lease.alive:
            return self.lease
        async with self._lease_lock:
            if self.lease is not None and self.lease.alive:
                return self.lease
            old = self.lease
            if old is not None:
                await old.stop_keepalive()
            async with self.metrics.etcd("lease-grant"):
                lease = await self._index.grant_lease(self.lease_ttl_s, revoke_on_exit=False)
            lease.start_keepalive()
            self.lease = lease
            if old is not None:
                self.metrics.lease_regrants.inc()
                _log.warning(
                    "instance lease %x lost (%s); granted %x, rewriting %d live keys",
                    old.id,
                    old.lost_reason or "unknown",
                    lease.id,
                    self.live_count(),
                )
                await self._rewrite_all(lease)
            return lease

    async def _rewrite_all(self, lease: Lease) -> None:
        now = self._clock()
        nodes = [n for n in self._nodes.values() if n.live and n.envelope is not None]
        for i in range(0, len(nodes), _BATCH):
            batch = nodes[i : i + _BATCH]
            async with self.metrics.etcd("txn-live-rewrite"):
                await self._index.txn(
                    success=[
                        Op.put(Keys.live(n.cpid), n.envelope or b"", lease=lease.id) for n in batch
                    ]
                )
            for n in batch:
                n.written_at = now
            self.counters.txns += 1
            self.counters.writes += len(batch)
            self.counters.by_reason["lease_regrant"] += len(batch)
            self.metrics.live_writes.labels("lease_regrant").inc(len(batch))

    async def _watch_lease(self) -> None:
        delay = 0.2
        while True:
            lease = self.lease
            if lease is not None and lease.alive:
                await lease.lost.wait()
            try:
                await self._ensure_lease()
                delay = 0.2
            except RetrievalError as exc:
                _log.warning("cannot re-grant the instance lease: %s; retrying", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    # -- expiry -----------------------------------------------------------------------

    def set_self_preservation(self, enabled: bool) -> None:
        """Operator override: ``False`` lets the next sweep expire silent nodes."""
        if enabled == self.self_preservation_enabled:
            return
        self.self_preservation_enabled = enabled
        self.metrics.self_preservation_enabled.set(1 if enabled else 0)
        if enabled:
            _log.warning("self-preservation switched back on by the operator")
        else:
            _log.warning(
                "self-preservation switched off by the operator; protected namespaces %s "
                "will expire their silent nodes",
                ", ".join(sorted(self.protecting)) or "(none)",
            )
            for group in self.protecting:
                self.metrics.self_preservation.labels(group).set(0)
            self.protecting.clear()

    async def sweep(self) -> list[str]:
        """Expire silent nodes (unless self-preservation holds); return the expired CPIDs."""
        now = self._clock()
        groups: dict[str, list[NodeState]] = defaultdict(list)
        for n in list(self._nodes.values()):
            if n.live:
                groups[n.group].append(n)
            elif now - n.last_seen > self.expire_after_s:
                self._nodes.pop(n.cpid, None)  # registered but never heard from
        for group in set(self.protecting) - set(groups):
            self._end_protection(group, "no live nodes left")
        expired: list[NodeState] = []
        for group, nodes in groups.items():
            due = [n for n in nodes if now - n.last_seen > self.expire_after_s]
            silent = sum(
                1 for n in nodes if now - n.last_seen > OVERDUE_INTERVALS * self.heartbeat_s
            )
            protect = (
                self.self_preservation_enabled
                and silent >= self.min_nodes
                and silent > self.threshold * len(nodes)
            )
            if protect and due:
                if group not in self.protecting:
                    self.protecting.add(group)
                    self.metrics.self_preservation.labels(group).set(1)
                    _log.warning(
                        "self-preservation: %d of %d live nodes of %s went silent at once; "
                        "not expiring any of them until heartbeats return or an operator "
                        "switches self-preservation off",
                        silent,
                        len(nodes),
                        group,
                    )
                self.metrics.live_nodes.labels(group).set(len(nodes))
                continue
            if group in self.protecting and not protect:
                self._end_protection(group, f"{silent} of {len(nodes)} nodes silent now")
            expired.extend(due)
            self.metrics.live_nodes.labels(group).set(len(nodes) - len(due))
        for n in expired:
            self._nodes.pop(n.cpid, None)
            self._to_delete[n.cpid] = n
            self.metrics.expirations.inc()
            _log.info("%s silent for %.1f s: not live", n.cpid, now - n.last_seen)
        if self._to_delete:
            await self._delete_live(list(self._to_delete.values()))
        return [n.cpid for n in expired]

    def _end_protection(self, group: str, why: str) -> None:
        self.protecting.discard(group)
        self.metrics.self_preservation.labels(group).set(0)
        self.metrics.live_nodes.labels(group).set(self.live_count(group))
        _log.warning("self-preservation for %s ended (%s); expiry resumes", group, why)

    async def _delete_live(self, nodes: Iterable[NodeState]) -> None:
        lease = self.lease
        if lease is None:
            return
        sem = asyncio.Semaphore(_PARALLEL)

        async def one(n: NodeState) -> None:
            async with sem, self.metrics.etcd("txn-expire"):
                result = await self._index.txn(
                    compare=[Cmp.lease(Keys.live(n.cpid), "==", lease.id)],
                    success=[Op.delete(Keys.live(n.cpid))],
                )
            if result.succeeded:
                self.counters.deletes += 1
            self._to_delete.pop(n.cpid, None)  # deleted, or no longer ours to delete

        results = await asyncio.gather(*(one(n) for n in nodes), return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            _log.warning(
                "could not delete %d live keys (retried next sweep): %s", len(failed), failed[0]
            )

    async def _sweeper(self) -> None:
        interval = max(0.05, self.heartbeat_s / 2)
        while True:
            await asyncio.sleep(interval)
            try:
                await self.sweep()
            except RetrievalError as exc:
                _log.warning("liveness sweep failed: %s", exc)
            except Exception:
                _log.exception("liveness sweep failed")


def _seq_value(w: _LiveWrite) -> bytes:
    return b'{"seq":%d,"observed_at":%d}' % (w.seq, w.observed_at)


def _stored_seq(kv: KV) -> int | None:
    """The ``seq`` of a ``/seq/`` value; ``None`` (logged) when it is unreadable."""
    try:
        obj = _json.loads(kv.value)
        seq = obj["seq"]
        if isinstance(seq, int) and not isinstance(seq, bool) and seq >= 0:
            return seq
    except (ValueError, KeyError, TypeError):
        pass
    _log.warning("ignoring unreadable %s = %r", kv.key, bytes(kv.value[:64]))
    return None
