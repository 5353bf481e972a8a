"""The verified local replica of the index, kept by list-then-watch.

:class:`Replica` is the I/O around :class:`resolver._state.ReplicaState`:

* **list**: one consistent snapshot of ``/certs/``, ``/revoked/``, ``/ns/``, ``/rec/``,
  ``/live/``, ``/alloc/`` and ``/claim/`` (the first collection fixes the revision,
  the others are read at it), applied as a diff against what the replica holds;
* **watch**: one watch over ``/cpi/v1/`` from the listing's revision + 1; events of
  other collections are skipped, the rest applied one etcd revision at a time (all
  events of one transaction together).  :class:`registry.index.Watch` resumes by
  itself after errors and etcd restarts; on :class:`~registry.index.Compacted` the
  replica lists again and applies the difference, so watchers see the changes they
  missed as ordinary events;
* **probe**: every ``probe_interval`` a cheap read tells whether etcd answers.  When it
  does not, the replica keeps serving what it has and reports itself *stale*; it also
  refreshes the TTLs of the leases that live keys hang on (for DNS TTLs), and notices
  an etcd whose revision went backwards (restored from a backup: list again);
* **sweep**: every ``sweep_interval`` the state acts on the clock (validity windows,
  mass-expiry holds).

Nothing here is on the lookup path: lookups read the state's dictionaries directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import random
import time
from collections import Counter
from dataclasses import dataclass
from typing import Final

from registry.index import ROOT, Compacted, Index, IndexCompactedError, Prefix
from resolver._pool import Verifier
from resolver._state import Change, ReplicaState
from schemas.errors import RetrievalError

__all__ = ["COLLECTIONS", "Replica", "SyncSettings"]

_log = logging.getLogger("resolver.replica")

COLLECTIONS: Final = (
    Prefix.CERTS,
    Prefix.REVOKED,
    Prefix.NS,
    Prefix.REC,
    Prefix.LIVE,
    Prefix.ALLOC,
    Prefix.CLAIM,
)
"""The collections the replica keeps (listed in this order, at one revision)."""
_TRACKED: Final = tuple(str(c) for c in COLLECTIONS)
_PAGE: Final = 2000
_MAX_LEASES_PER_PROBE: Final = 64
_BULK_KEYS: Final = 10_000
"""Listings at least this large pause cyclic GC while they are applied (and the first one
then freezes what it loaded, :func:`gc.freeze`)."""


@dataclass(frozen=True, slots=True)
class SyncSettings:
    """Timing of the replica's background work (seconds)."""

    probe_interval: float = 1.0
    probe_timeout: float = 1.0
    stale_after: float = 5.0
    sweep_interval: float = 1.0
    retry_backoff_max: float = 2.0


class Replica:
    """Keeps ``state`` in step with the index behind ``index``.  Start with :meth:`start`."""

    def __init__(
        self,
        index: Index,
        state: ReplicaState,
        *,
        verifier: Verifier,
        settings: SyncSettings | None = None,
    ) -> None:
        self.index = index
        self.state = state
        self.verifier = verifier
        self.settings = settings or SyncSettings()
        self.ready = asyncio.Event()
        self.relists: Counter[str] = Counter()
        self.store_revision = 0
        self.last_contact = 0.0  # monotonic time etcd last answered
        self.probe_ok = True
        self._stale = False
        self.probe_error = ""
        self.ready_after_s: float | None = None
        self._lock = asyncio.Lock()
        self._relist = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._started = 0.0

    # -- status -----------------------------------------------------------------------

    @property
    def stale(self) -> bool:
        """True when etcd did not answer the last probe, or nothing came for
        ``stale_after`` seconds (kept up to date by the probe; reading it is free)."""
        return self._stale

    def _update_stale(self) -> None:
        self._stale = not self.probe_ok or (
            bool(self.last_contact)
            and time.monotonic() - self.last_contact > self.settings.stale_after
        )

    def _contact(self) -> None:
        self.last_contact = time.monotonic()

    # -- life cycle -------------------------------------------------------------------

    def start(self) -> None:
        """Start listing, watching, probing and sweeping in background tasks."""
        if self._tasks:
            return
        self._started = time.monotonic()
        self._tasks = [
            asyncio.create_task(self._sync(), name="replica-sync"),
            asyncio.create_task(self._probe(), name="replica-probe"),
            asyncio.create_task(self._sweep(), name="replica-sweep"),
        ]

    async def close(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # -- listing ----------------------------------------------------------------------

    async def _snapshot(self) -> tuple[dict[str, tuple[bytes, int, int]], int]:
        """Every tracked key at one revision: key -> (value, mod_revision, lease)."""
        for attempt in range(1, 4):
            snapshot: dict[str, tuple[bytes, int, int]] = {}
            try:
                kvs, revision = await self.index.get_prefix(COLLECTIONS[0], page_size=_PAGE)
                snapshot.update((kv.key, (kv.value, kv.mod_revision, kv.lease)) for kv in kvs)
                if not self.ready.is_set() and self.verifier.workers:
                    n = await self.index.count_prefix(Prefix.REC)
                    if n >= self.verifier.pool_min_jobs:
                        self.verifier.prepare()  # start workers while the listing runs
                for collection in COLLECTIONS[1:]:
                    kvs, _ = await self.index.get_prefix(
                        collection, page_size=_PAGE, revision=revision
                    )
                    snapshot.update((kv.key, (kv.value, kv.mod_revision, kv.lease)) for kv in kvs)
            except IndexCompactedError:
                if attempt == 3:
                    raise
                continue
            return snapshot, revision
        raise AssertionError("unreachable")

    async def _list(self, cause: str) -> int:
        """List the index and apply the difference; returns the listing's revision."""
        started = time.monotonic()
        snapshot, revision = await self._snapshot()
        self._contact()
        listed = time.monotonic()
        first = not self.ready.is_set()
        # a bulk load allocates ~20 objects per record that all live on: cyclic garbage
        # collection during it only rescans them, and after it only slows every later pass
        bulk = len(snapshot) >= _BULK_KEYS
        gc_enabled = gc.isenabled()
        if bulk:
            gc.disable()
        try:
            async with self._lock:
                changes = self.state.diff(snapshot, revision)
                del snapshot
                events = await self.state.apply(
                    changes, revision, check=self.verifier.run, emit=not first
                )
                if first:
                    self.state.log.reset((revision, 0))
        finally:
            if gc_enabled:
                gc.enable()
        if first and bulk:
            gc.freeze()  # the replica is long-lived: keep it out of future collections
        self.relists[cause] += 1
        sizes = self.state.sizes()
        _log.info(
            "listed the index at revision %d (%s): %d records (%d served), %d live, %d certs; "
            "%d changes, %d events; list %.2f s, verify %.2f s",
            revision,
            cause,
            sizes["records"],
            sizes["served"],
            sizes["live"],
            sizes["certs"],
            len(changes),
            len(events),
            listed - started,
            time.monotonic() - listed,
        )
        if first:
            self.ready_after_s = time.monotonic() - self._started
            self.probe_ok = True
            self.ready.set()
        # the workers are for bulk verification; re-list diffs are small: free the memory
        await self.verifier.close()
        return revision

    # -- watching ---------------------------------------------------------------------

    async def _consume(self, revision: int) -> str:
        """Apply watch events from ``revision + 1``; returns why a re-list is needed."""
        watch = self.index.watch_prefix(ROOT, start_revision=revision + 1, prev_kv=False)
        async with watch:
            pending: list[Change] = []
            async for item in watch:
                self._contact()
                if isinstance(item, Compacted):
                    _log.warning(
                        "watch from revision %d hit compaction at %d; listing again",
                        watch.next_revision,
                        item.compact_revision,
                    )
                    return "compacted"
                kv = item.kv
                if kv.key.startswith(_TRACKED):
                    pending.append(Change(item.type, kv.key, kv.value, item.revision, kv.lease))
                if watch.next_revision > item.revision and pending:
                    async with self._lock:
                        await self.state.apply(pending, item.revision, check=self.verifier.run)
                    pending = []
        return "watch_ended"

    async def _sync(self) -> None:
        cause = "initial"
        backoff = 0.1
        while True:
            try:
                revision = await self._list(cause)
                backoff = 0.1
                self._relist.clear()
                consume = asyncio.create_task(self._consume(revision), name="replica-watch")
                relist = asyncio.create_task(self._relist.wait(), name="replica-relist")
                try:
                    done, _ = await asyncio.wait(
                        {consume, relist}, return_when=asyncio.FIRST_COMPLETED
                    )
                finally:
                    for task in (consume, relist):
                        task.cancel()
                    for task in (consume, relist):
                        with contextlib.suppress(asyncio.CancelledError):
                            await task
                if consume in done and not consume.cancelled():
                    cause = consume.result()
                else:
                    cause = "revision_regressed"
            except asyncio.CancelledError:
                raise
            except RetrievalError as exc:
                if cause == "initial":
                    _log.warning("cannot list the index yet (%s); retrying", exc)
                else:
                    _log.warning("replica sync failed (%s); listing again", exc)
                    cause = "error"
            except Exception:
                _log.exception("replica sync failed unexpectedly; listing again")
                cause = "error" if cause != "initial" else cause
            else:
                continue
            await asyncio.sleep(backoff * random.uniform(0.5, 1.0))
            backoff = min(backoff * 2, self.settings.retry_backoff_max)

    # -- probing ----------------------------------------------------------------------

    async def _probe(self) -> None:
        s = self.settings
        while True:
            try:
                async with asyncio.timeout(s.probe_timeout):
                    revision = await self.index.revision()
            except (RetrievalError, TimeoutError) as exc:
                if self.probe_ok:
                    _log.warning(
                        "etcd does not answer (%s); serving stale answers", exc or "timeout"
                    )
                self.probe_ok = False
                self.probe_error = str(exc) or f"no answer within {s.probe_timeout:g} s"
                self._update_stale()
            except Exception:
                _log.exception("probe failed unexpectedly")
            else:
                if not self.probe_ok:
                    _log.warning("etcd answers again (revision %d)", revision)
                self.probe_ok = True
                self.probe_error = ""
                self._contact()
                self._update_stale()
                self.store_revision = revision
                if self.ready.is_set() and revision < self.state.revision:
                    _log.warning(
                        "etcd's revision %d is below the applied %d (restored from a backup?); "
                        "listing again",
                        revision,
                        self.state.revision,
                    )
                    self._relist.set()
                await self._refresh_leases()
            await asyncio.sleep(s.probe_interval)

    async def _refresh_leases(self) -> None:
        leases = self.state.live_leases()
        table = self.state.leases
        for lease in [k for k in table if k not in leases]:
            del table[lease]
        for lease in list(leases)[:_MAX_LEASES_PER_PROBE]:
            try:
                async with asyncio.timeout(self.settings.probe_timeout):
                    ttl = await self.index.lease_time_to_live(lease)
            except (RetrievalError, TimeoutError):
                return
            if ttl > 0:
                table[lease] = time.time() + ttl
            else:
                table.pop(lease, None)

    # -- sweeping ---------------------------------------------------------------------

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(self.settings.sweep_interval)
            if not self.ready.is_set():
                continue
            try:
                async with self._lock:
                    await self.state.sweep(check=self.verifier.run)
            except asyncio.CancelledError:
                raise
            except Exception:
                _log.exception("replica sweep failed")
