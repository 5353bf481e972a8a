"""The resolver library: verified lookups, discovery and watches over a local replica.

Use::

    async with Resolver.from_config(config) as resolver:
        await resolver.wait_ready()
        entry = resolver.resolve("CN.31.CMCC/GPU.4K7Q9M2XH3PT-Z")   # no I/O
        best = resolver.discover(Query(kind="GPU", near="31", min_free=4))
        async for event in resolver.watch(Query(within="CN.31")):
            ...

:meth:`Resolver.get`, :meth:`Resolver.resolve` and :meth:`Resolver.discover` are plain
(synchronous) methods: they read in-memory dictionaries and never wait on etcd, so an
asyncio protocol callback (the DNS front end) can call them directly.  Everything they
return has been verified (see :mod:`resolver.signers`); a record that fails is never
returned, whatever etcd holds.

Front ends that cache rendered answers check :attr:`Resolver.generation` (it increases
whenever a served entry changes), key them by the entry object, or subscribe with :meth:`Resolver.add_listener` and drop the cached bytes
of a CPID when an event for it arrives.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from registry.index import Index
from resolver import ranking
from resolver.config import ResolverConfig
from resolver.discovery import LatencyTable, Match, Query
from resolver.entry import Entry
from resolver.errors import NotReadyError
from resolver.events import Cursor, Event, EventLog, format_cursor, parse_cursor
from resolver.metrics import ResolverMetrics
from resolver.replica import Replica, SyncSettings
from resolver.snapshot import SnapshotStore
from resolver.state import MassExpiry, NamespaceInfo, ReplicaSettings, ReplicaState
from resolver.verify import Verifier
from schemas.chain import TrustAnchors
from schemas.cpid import CPID
from schemas.cpid import parse as parse_cpid
from schemas.errors import NotFoundError

__all__ = ["DiscoveryResult", "Resolver", "ResolverSettings"]


@dataclass(frozen=True, slots=True)
class ResolverSettings:
    """Tunables of a :class:`Resolver` (defaults suit production; tests shorten timings)."""

    replica: ReplicaSettings = field(default_factory=ReplicaSettings)
    sync: SyncSettings = field(default_factory=SyncSettings)
    event_ring_size: int = 10_000
    verify_workers: int | None = None
    snapshot_dir: Path | None = None
    """Where to keep the replica snapshot for warm restarts (:mod:`resolver.snapshot`);
    None: no snapshot (the default for library use)."""
    snapshot_interval_s: float = 300.0

    @classmethod
    def from_config(cls, config: ResolverConfig) -> ResolverSettings:
        return cls(
            replica=ReplicaSettings(
                mass_expiry_threshold=config.mass_expiry_threshold,
                mass_expiry_min_live=config.mass_expiry_min_live,
                mass_expiry_window_s=config.mass_expiry_window_s,
                mass_expiry_hold_s=config.mass_expiry_hold_s,
            ),
            sync=SyncSettings(
                probe_interval=config.probe_interval_s,
                probe_timeout=config.probe_timeout_s,
                stale_after=config.stale_after_s,
                sweep_interval=config.sweep_interval_s,
                statuses_after_ready_from=config.statuses_after_ready_from,
            ),
            event_ring_size=config.event_ring_size,
            verify_workers=config.verify_workers,
            snapshot_dir=config.snapshot_dir,
            snapshot_interval_s=config.snapshot_interval_s,
        )


@dataclass(frozen=True, slots=True)
class DiscoveryResult:
    """The result of a discovery: matches (best first) and the replica revision they reflect."""

    results: list[Match]
    revision: int
    stale: bool
    ranking: dict[str, Any] | None = None
    """The order of the answer: ``{"sort", "function", "weights"}``."""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "results": [m.to_dict() for m in self.results],
            "revision": self.revision,
        }
        if self.ranking is not None:
            out["ranking"] = self.ranking
        if self.stale:
            out["stale"] = True
        return out

    def to_json(self) -> bytes:
        """:meth:`to_dict` as UTF-8 JSON, each result's record spliced in as text
        (:meth:`~resolver.discovery.Match.to_json`)."""
        tail: dict[str, Any] = {"revision": self.revision}
        if self.ranking is not None:
            tail["ranking"] = self.ranking
        if self.stale:
            tail["stale"] = True
        rest = json.dumps(tail, separators=(",", ":"), ensure_ascii=False)
        results = ",".join(m.to_json() for m in self.results)
        return f'{{"results":[{results}],{rest[1:]}'.encode()


class Resolver:
    """Verified lookups, discovery and watches, served from a local replica of the index.

    Args:
        index: the etcd index (connected by :meth:`start` when ``own_index``).
        anchors: the trust anchors records must chain to.
        latency: region-to-region latency table for ``near`` (empty: latency unknown).
        settings: timings and limits.
        own_index: connect ``index`` on start and close it on :meth:`close`.
    """

    def __init__(
        self,
        *,
        index: Index,
        anchors: TrustAnchors,
        latency: LatencyTable | None = None,
        settings: ResolverSettings | None = None,
        own_index: bool = False,
        metrics: ResolverMetrics | None = None,
    ) -> None:
        self.settings = settings or ResolverSettings()
        self.index = index
        self.latency = latency or LatencyTable()
        self._own_index = own_index
        self._log = EventLog(self.settings.event_ring_size)
        self._state = ReplicaState(
            anchors=anchors, latency=self.latency, settings=self.settings.replica, log=self._log
        )
        self._verifier = Verifier(workers=self.settings.verify_workers)
        s = self.settings
        self.snapshots = None if s.snapshot_dir is None else SnapshotStore(s.snapshot_dir, anchors)
        self._replica = Replica(
            index,
            self._state,
            verifier=self._verifier,
            settings=s.sync,
            snapshots=self.snapshots,
            snapshot_interval=s.snapshot_interval_s,
        )
        self.metrics = metrics or ResolverMetrics()
        self.metrics.bind(self)
        self._started = False

    @classmethod
    def from_config(
        cls, config: ResolverConfig, *, metrics: ResolverMetrics | None = None
    ) -> Resolver:
        """A resolver for ``config`` that owns its etcd connection."""
        latency = LatencyTable.from_file(config.latency_table_path())  # before any connection
        return cls(
            index=config.etcd.open_index(),
            anchors=config.load_anchors(),
            latency=latency,
            settings=ResolverSettings.from_config(config),
            own_index=True,
            metrics=metrics,
        )

    # -- life cycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Connect (if owning the index) and start the replica; returns before it is ready."""
        if self._started:
            return
        if self._own_index:
            await self.index.connect()
        self._replica.start()
        self._started = True

    async def wait_ready(self) -> None:
        """Wait for the first listing to be applied (bound it with ``asyncio.timeout``)."""
        await self._replica.ready.wait()

    async def close(self) -> None:
        """Stop the replica, end every watch, close the worker pool (and the index if owned)."""
        self._log.close()
        await self._replica.close()
        await self._verifier.close()
        if self._own_index:
            await self.index.close()
        self._started = False

    def end_watches(self) -> None:
        """End every :meth:`watch` iterator now (at shutdown, before :meth:`close`)."""
        self._log.close()

    async def __aenter__(self) -> Resolver:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- status -----------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """True once the first listing of the index has been verified and applied."""
        return self._replica.ready.is_set()

    @property
    def stale(self) -> bool:
        """True while etcd is unreachable: answers come from the last known state."""
        return self._replica.stale

    @property
    def revision(self) -> int:
        """The etcd revision the replica has applied."""
        return self._state.revision

    @property
    def generation(self) -> int:
        """Increases whenever any served entry changes (a cheap cache-invalidation check)."""
        return self._state.generation

    @property
    def mass_expiry(self) -> list[MassExpiry]:
        """Namespaces under mass-expiry protection."""
        return list(self._state.protected.values())

    def health(self) -> dict[str, Any]:
        """What ``/readyz`` reports."""
        r = self._replica
        sizes = self._state.sizes()
        age = time.monotonic() - r.last_contact if r.last_contact else None
        out: dict[str, Any] = {
            "ready": self.ready and not self.stale,
            "listed": self.ready,
            "stale": self.stale,
            "revision": self.revision,
            "store_revision": r.store_revision,
            "served": sizes["served"],
            "records": sizes["records"],
            "rejected": {k: v for k, v in sorted(self._state.rejected.items()) if v},
            # keys whose value cannot be used: each costs itself alone (docs/resolver.md)
            "bad_values": self._state.bad_values(),
            "mass_expiry": [m.to_dict() for m in self.mass_expiry],
            "held": sizes["held"],
            "last_contact_s": None if age is None else round(age, 3),
            "ready_after_s": None if r.ready_after_s is None else round(r.ready_after_s, 3),
            # a large first listing's statuses, verified after ready (docs/resolver.md, "Ready")
            "statuses_pending": r.statuses_pending,
        }
        if r.statuses_after_ready_s is not None:
            out["statuses_after_ready_s"] = round(r.statuses_after_ready_s, 3)
        if r.probe_error:
            out["etcd_error"] = r.probe_error
        if self.snapshots is not None:
            snap = self.snapshots
            out["snapshot"] = {
                "status": snap.status,  # loaded, absent, or "not used: <why>"
                "loaded_revision": snap.loaded_revision,
                "written_revision": snap.written_revision,
                "fallbacks": snap.fallbacks,
                "write_failures": snap.write_failures,
            }
            if snap.last_write_error:
                out["snapshot"]["last_write_error"] = snap.last_write_error
        return out

    async def write_snapshot(self) -> bool:
        """Write the replica snapshot now (if configured and the revision moved)."""
        return await self._replica.write_snapshot("requested")

    # -- lookups (synchronous, never wait on etcd) -----------------------------------------

    def _check_ready(self) -> None:
        if not self._replica.ready.is_set():
            raise NotReadyError("the resolver has not finished listing the index yet")

    def get(self, cpid: str | CPID) -> Entry | None:
        """The verified entry for ``cpid`` (any case), or None if none is served.

        Raises :class:`~schemas.errors.InvalidCPIDError` for a malformed CPID and
        :class:`~resolver.errors.NotReadyError` before the first listing is done.
        """
        self._check_ready()
        if isinstance(cpid, CPID):
            return self._state.get(cpid.to_text())
        entry = self._state.get(cpid)
        if entry is not None:
            return entry
        return self._state.get(parse_cpid(cpid).to_text())

    def resolve(self, cpid: str | CPID) -> Entry:
        """Like :meth:`get` but raises :class:`~schemas.errors.NotFoundError` when absent."""
        if isinstance(cpid, str):  # fast path: a canonical CPID that is served
            entry = self._state.served.get(cpid)
            if entry is not None and entry.valid_until >= time.time():
                return entry
        entry = self.get(cpid)
        if entry is not None:
            return entry
        canonical = cpid.to_text() if isinstance(cpid, CPID) else parse_cpid(cpid).to_text()
        rejected = self._state.rejection(canonical)
        if rejected is not None:
            raise NotFoundError(
                f"{canonical} has no verified record (the index holds one that fails "
                f"verification: {rejected[0]})"
            )
        raise NotFoundError(f"{canonical} is not in the index")

    def entries(self) -> Iterable[Entry]:
        """Every served entry (a live view; do not hold across awaits)."""
        self._check_ready()
        return self._state.served.values()

    def namespaces(self) -> list[NamespaceInfo]:
        """The ``/ns/`` entries of the index, each with whether its key's chain verifies."""
        return self._state.namespaces()

    def discover(self, query: Query) -> DiscoveryResult:
        """The best ``query.limit`` entries for ``query``, best first (see :mod:`resolver.discovery`)."""
        self._check_ready()
        started = time.perf_counter()
        results = self._state.discovery.search(query)
        self.metrics.discover_seconds.observe(time.perf_counter() - started)
        order = {
            "sort": query.order,
            "function": ranking.FUNCTION,
            "weights": dict(query.weight_map),
        }
        return DiscoveryResult(results, self.revision, self.stale, order)

    # -- change notification -------------------------------------------------------------

    def add_listener(self, callback: Callable[[Event], None]) -> Callable[[], None]:
        """Call ``callback(event)`` synchronously for every put/delete; returns a remover.

        Events arrive right after the replica changed; a callback must not block.
        """
        self._state.listeners.append(callback)

        def remove() -> None:
            if callback in self._state.listeners:
                self._state.listeners.remove(callback)

        return remove

    async def watch(
        self,
        query: Query | None = None,
        *,
        since: str | Cursor | None = None,
        heartbeat: float | None = None,
    ) -> AsyncIterator[Event]:
        """Put/delete events for entries matching ``query``, in order, from ``since``.

        ``since`` is an event id (``"<revision>"`` or ``"<revision>.<n>"``, e.g. an SSE
        ``Last-Event-ID``): events after it are replayed from the ring first.  Without
        it the watch starts now, and the first event is a ``progress`` event carrying
        the starting id.  When ``since`` is older than the ring holds, or ahead of the
        resolver's current position, a ``relist`` event comes first: re-list (discover) and carry on.  An entry that stops
        matching the query (e.g. its free units fall below ``min_free``) yields a
        ``delete`` with reason ``query``.  With ``heartbeat``, a ``progress`` event comes
        after that many seconds without one.  The iterator ends when the resolver closes.
        """
        if not self._replica.ready.is_set():
            await self._replica.ready.wait()
        log = self._log
        table = self.latency
        cursor: Cursor
        if since is None:
            cursor = log.last
            yield Event("progress", "", cursor)
        else:
            cursor = parse_cursor(since) if isinstance(since, str) else since
            if cursor > log.last:  # from another resolver, or before an etcd restore
                asked = format_cursor(cursor)
                cursor = log.last
                yield Event(
                    "relist",
                    "",
                    cursor,
                    reason=f"event id {asked} is ahead of this resolver "
                    f"(at {format_cursor(cursor)})",
                )
        while not log.closed:
            groups = log.after(cursor)
            if groups is None:
                cursor = log.last
                yield Event("relist", "", cursor, reason="events after the given id are gone")
                continue
            for group in groups:
                out = [e for e in (_filter(ev, query, table) for ev in group) if e is not None]
                cursor = group[0].cursor
                for i, ev in enumerate(out):
                    final = i == len(out) - 1
                    yield ev if ev.final == final else _with_final(ev, final)
            if log.closed:
                return
            if not await log.wait(cursor, heartbeat) and heartbeat is not None and not log.closed:
                yield Event("progress", "", cursor)


def _with_final(ev: Event, final: bool) -> Event:
    return Event(ev.type, ev.cpid, ev.cursor, ev.entry, ev.prev, ev.reason, final)


def _filter(ev: Event, query: Query | None, table: LatencyTable) -> Event | None:
    if query is None:
        return ev
    if ev.type == "put":
        assert ev.entry is not None
        if query.matches(ev.entry, table):
            return ev
        if ev.prev is not None and query.matches(ev.prev, table):
            return Event("delete", ev.cpid, ev.cursor, None, ev.prev, "query", ev.final)
        return None
    if ev.type == "delete" and ev.prev is not None and query.matches(ev.prev, table):
        return ev
    return None
