"""The verified local replica of the index, kept by list-then-watch.

:class:`Replica` is the I/O around :class:`resolver.state.ReplicaState`:

* **list**: one consistent snapshot of ``/certs/``, ``/revoked/``, ``/ns/``, ``/rec/``,
  ``/live/``, ``/alloc/`` and ``/claim/`` (the first collection fixes the revision,
  the others are read at it), applied as a diff against what the replica holds.  The
  first listing (into an empty replica) is streamed: ``/rec/`` is read last, and
  applied in batches as its pages arrive, so records are verified while the rest are
  still being read;
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
import collections
import contextlib
import ctypes
import ctypes.util
import gc
import logging
import random
import time
from collections import Counter
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Final

from registry.index import KV, ROOT, Compacted, Index, IndexCompactedError, Prefix
from resolver.events import Event
from resolver.snapshot import LoadedSnapshot, SnapshotStore, TrustedRunner, write_in_background
from resolver.state import Change, ReplicaState, Restored
from resolver.verify import Context, Job, Outcome, RecordFacts, Verifier
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
_PAGE_RETRIES: Final = 5
"""Times a page of the first listing is read again before the listing is started over."""
_LOAD_BATCH: Final = 10_000
"""The first listing applies ``/rec/`` in batches as its pages arrive: the first as soon
as this many keys are read, each later one with every key read in the meantime (at
least this many, or all that is left)."""


async def _nothing() -> AsyncGenerator[list[KV], None]:
    """No pages (``/live/`` when a first listing leaves it for after ready)."""
    return
    yield


def release_free_memory() -> bool:
    """Hand the C heap's free pages back to the OS (glibc ``malloc_trim``).

    A bulk load frees most of what it allocated (listed values, parsed JSON, verifier
    results); values over 512 bytes come from the C heap, which keeps freed pages
    unless asked.  Without this, resident memory after a load reflects its peak, not
    what the replica holds.  False where there is no glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.malloc_trim(0))
    except (OSError, AttributeError):
        return False


@dataclass(frozen=True, slots=True)
class SyncSettings:
    """Timing of the replica's background work (seconds)."""

    probe_interval: float = 1.0
    probe_timeout: float = 1.0
    stale_after: float = 5.0
    sweep_interval: float = 1.0
    retry_backoff_max: float = 2.0
    statuses_after_ready_from: int | None = 50_000
    """A first listing of at least this many records reads and verifies ``/live/`` after
    the resolver is ready (:meth:`Replica._read_statuses`); None: always before."""


class Replica:
    """Keeps ``state`` in step with the index behind ``index``.  Start with :meth:`start`."""

    def __init__(
        self,
        index: Index,
        state: ReplicaState,
        *,
        verifier: Verifier,
        settings: SyncSettings | None = None,
        snapshots: SnapshotStore | None = None,
        snapshot_interval: float = 300.0,
    ) -> None:
        self.index = index
        self.snapshots = snapshots
        self.snapshot_interval = snapshot_interval
        self.state = state
        self.verifier = verifier
        self.settings = settings or SyncSettings()
        self.ready = asyncio.Event()
        self.relists: Counter[str] = Counter()
        self.page_retries = 0
        """Pages of a first listing read again after a failure (the listing went on)."""
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
        self._first_records: int | None = 0
        """Records in the index when the first listing began (None: could not count)."""
        self._later: asyncio.Task[None] | None = None
        self._statuses_at = 0
        """The revision of a first listing that left ``/live/`` to be read after ready
        (0: none, or read since)."""
        self._live_touched: set[str] | None = None
        """While ``/live/`` is read after ready: the live keys the watch changed since."""
        self._relist_cause = "revision_regressed"
        self.statuses_pending = 0
        """Statuses still to be read and verified after ready (a large first listing,
        :attr:`SyncSettings.statuses_after_ready_from`; counted when the reading starts)."""
        self.statuses_after_ready_s: float | None = None
        """Seconds from start to the last of them verified (None: none were left)."""

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
        if self.snapshots is not None:
            self._tasks.append(asyncio.create_task(self._snapshot_loop(), name="replica-snapshot"))

    async def close(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if tasks and self.snapshots is not None and self.ready.is_set():
            await self.write_snapshot("shutdown")

    # -- snapshots (warm restarts, resolver.snapshot) -------------------------------------

    async def write_snapshot(self, cause: str = "periodic") -> bool:
        """Write a snapshot of the verified state if the revision moved since the last."""
        store = self.snapshots
        if store is None or not self.ready.is_set():
            return False
        if self._statuses_at:  # the replica does not hold /live/ as of its revision yet
            _log.info("replica snapshot (%s) not written: statuses are still being read", cause)
            return False
        if self.state.revision == store.written_revision:
            return False
        async with self._lock:
            started = time.monotonic()
            revision, chunks = await store.collect(self.state)
            collect_s = time.monotonic() - started
        try:
            size = await write_in_background(store, revision, chunks)
        except Exception as exc:
            store.write_failures += 1
            store.last_write_error = f"{type(exc).__name__}: {str(exc)[:300]}"
            _log.warning("could not write the replica snapshot to %s: %s", store.path, exc)
            return False
        _log.info(
            "wrote the replica snapshot at revision %d (%s): %.1f MB, collected in %.2f s "
            "(in the event loop, in slices), written in %.2f s (in a thread)",
            revision,
            cause,
            size / 1e6,
            collect_s,
            store.write_seconds,
        )
        return True

    async def _snapshot_loop(self) -> None:
        while True:
            await asyncio.sleep(self.snapshot_interval)
            try:
                await self.write_snapshot()
            except asyncio.CancelledError:
                raise
            except Exception:
                _log.exception("replica snapshot failed")

    async def _warm(self) -> tuple[int, int] | None:
        """Load the snapshot into the empty replica: (revision, keys), or None when there
        is none or it cannot be used (then the caller lists the index)."""
        store = self.snapshots
        assert store is not None
        started = time.monotonic()
        loop = asyncio.get_running_loop()
        try:
            files, freed = await loop.run_in_executor(None, store.remove_stale)
        except OSError as exc:
            _log.warning("cannot remove stale snapshot files from %s: %s", store.directory, exc)
        else:
            if files:
                _log.warning(
                    "removed %d unfinished snapshot file(s) from %s (%.1f MB): a resolver "
                    "was stopped while writing its snapshot (give it longer to stop)",
                    files,
                    store.directory,
                    freed / 1e6,
                )
        try:
            snap = await loop.run_in_executor(None, store.read)
        except FileNotFoundError:
            store.status = "absent"
            _log.info("no replica snapshot in %s: listing the index", store.directory)
            return None
        except Exception as exc:
            self._not_warm(f"unreadable: {exc}")
            return None
        current = await self.index.revision()
        if snap.revision > current:
            self._not_warm(f"its revision {snap.revision} is ahead of etcd's {current} (restored?)")
            return None
        try:
            await self.index.get_prefix(Prefix.NS, page_size=_PAGE, revision=snap.revision)
        except IndexCompactedError:
            self._not_warm(f"its revision {snap.revision} is compacted in etcd")
            return None
        read_s = time.monotonic() - started
        runner = TrustedRunner(snap, self.verifier.run)
        try:
            await self._restore(snap, runner)
        except Exception as exc:  # passed its MAC, so written by a resolver with a bug
            _log.exception("replica snapshot %s could not be restored", store.path)
            self.state.reset()
            self._not_warm(f"could not be restored: {exc}")
            return None
        n = snap.keys
        del snap
        store.status = "loaded"
        store.loaded_revision = self.state.revision
        # the file holds this revision: nothing to write until the revision moves
        store.written_revision = self.state.revision
        _log.info(
            "warm start from the snapshot at revision %d: %d keys (%d verdicts taken from "
            "the snapshot, %d verified); read in %.2f s, applied in %.2f s",
            self.state.revision,
            n,
            runner.trusted,
            runner.verified,
            read_s,
            time.monotonic() - started - read_s,
        )
        return self.state.revision, n

    async def _restore(self, snap: LoadedSnapshot, runner: TrustedRunner) -> None:
        """Apply a loaded snapshot to the (empty) replica, a chunk at a time: no second
        copy of it all."""
        async with self._lock:
            for batch in snap.batches():
                if isinstance(batch, Restored):
                    again = self.state.restore(batch, snap.revision)
                    runner.trusted += len(batch) - sum(c.key.startswith(Prefix.REC) for c in again)
                    del batch
                    if again:  # a chain that no longer verifies, a closed window: verify
                        await self.state.apply(again, snap.revision, check=runner, emit=False)
                    await asyncio.sleep(0)  # lookups of what is restored meanwhile
                else:
                    await self.state.apply(batch, snap.revision, check=runner, emit=False)

    def _not_warm(self, why: str) -> None:
        store = self.snapshots
        assert store is not None
        store.status = f"not used: {why}"
        store.fallbacks += 1
        _log.warning("replica snapshot %s not used (%s): listing the index", store.path, why)

    # -- listing ----------------------------------------------------------------------

    async def _snapshot(
        self, *, skip: tuple[Prefix, ...] = ()
    ) -> tuple[dict[str, tuple[bytes, int, int]], int]:
        """Every tracked key (but those of ``skip``) at one revision:
        key -> (value, mod_revision, lease)."""
        for attempt in range(1, 4):
            snapshot: dict[str, tuple[bytes, int, int]] = {}
            try:
                kvs, revision = await self.index.get_prefix(COLLECTIONS[0], page_size=_PAGE)
                snapshot.update((kv.key, (kv.value, kv.mod_revision, kv.lease)) for kv in kvs)
                if not self.ready.is_set():
                    n: int | None
                    try:
                        n = await self.index.count_prefix(Prefix.REC)
                    except RetrievalError as exc:  # counting a million keys can time out
                        _log.info("cannot count the records (%s): taking them as many", exc)
                        n = None
                    self._first_records = n
                    if self.verifier.workers and (n is None or n >= self.verifier.pool_min_jobs):
                        self.verifier.prepare()  # start workers while the listing runs
                for collection in COLLECTIONS[1:]:
                    if collection in skip:
                        continue
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

    async def _load(self) -> tuple[int, int, float]:
        """The first listing into an empty replica, streamed (no events).

        The small collections (certs, revocations, namespaces, claims) are read at one
        revision and applied first, so that each record job finds its chain; then
        ``/rec/`` and ``/live/`` are read at that revision side by side in CPID order,
        page by page, while the pages already read are applied in batches
        (:data:`_LOAD_BATCH`): verifying one batch overlaps reading the next, and each
        status rides along in its record's verification job.  A failed page is read
        again (:meth:`_pages`); if the listing still fails half-way, the next attempt is
        an ordinary listing, which applies the difference.  Returns (revision, keys,
        seconds spent reading before the first record batch could be applied).
        """
        started = time.monotonic()
        snapshot, revision = await self._snapshot(skip=(Prefix.REC, Prefix.LIVE))
        keys = len(snapshot)
        async with self._lock:
            await self.state.apply(
                self.state.diff(snapshot, revision), revision, check=self.verifier.run, emit=False
            )
        del snapshot
        later = self.settings.statuses_after_ready_from
        n = self._first_records
        if later is not None and (n is None or n >= later):
            # /live/ is read after ready, at this revision (_read_statuses)
            self._statuses_at = revision
        # /rec/ and /live/ (unless it is left for after ready, above) are read side by
        # side, both in CPID order: each page of records goes out with the statuses of
        # the same CPIDs, applied first, so that each status rides along in its record's
        # verification job and each entry is built once, complete.  (Reading every status before the first record job left the workers
        # idle for minutes at a million; reading them all while the records verified held
        # them all at once, and the entries were built twice.)  Bounded: pages read ahead
        # of verification are held as raw values (~1.4 KB a record with its status).
        pages: asyncio.Queue[list[Change] | None] = asyncio.Queue(
            maxsize=max(2, 2 * _LOAD_BATCH // _PAGE)
        )
        live_at = len(Prefix.LIVE)
        rec_at = len(Prefix.REC)

        async def read() -> None:
            lives = _nothing() if self._statuses_at else self._pages(Prefix.LIVE, revision)
            held: list[KV] = []  # statuses read ahead of the records
            more = True
            try:
                async for kvs in self._pages(Prefix.REC, revision):
                    if not kvs:
                        continue
                    last = kvs[-1].key[rec_at:]
                    while more and (not held or held[-1].key[live_at:] <= last):
                        try:
                            held += await anext(lives)
                        except StopAsyncIteration:
                            more = False
                    cut = 0
                    while cut < len(held) and held[cut].key[live_at:] <= last:
                        cut += 1
                    batch = [
                        Change("put", kv.key, kv.value, kv.mod_revision, kv.lease)
                        for kv in held[:cut]
                    ]
                    del held[:cut]
                    batch += [
                        Change("put", kv.key, kv.value, kv.mod_revision, kv.lease) for kv in kvs
                    ]
                    await pages.put(batch)
                while True:  # statuses after the last record (their records are absent)
                    rest = [
                        Change("put", kv.key, kv.value, kv.mod_revision, kv.lease) for kv in held
                    ]
                    if rest:
                        await pages.put(rest)
                    if not more:
                        break
                    try:
                        held = await anext(lives)
                    except StopAsyncIteration:
                        more = False
                        held = []
            finally:  # the end, also when reading failed
                await lives.aclose()
                try:
                    pages.put_nowait(None)
                except asyncio.QueueFull:
                    await pages.put(None)

        reader = asyncio.create_task(read(), name="replica-load")
        listed = 0.0
        try:
            done = False
            while not done:
                batch: list[Change] = []
                while not done and (len(batch) < _LOAD_BATCH or not pages.empty()):
                    page = await pages.get()
                    if page is None:
                        done = True
                    else:
                        batch += page
                if not listed:
                    listed = time.monotonic() - started
                if batch:
                    keys += len(batch)
                    at = time.monotonic()
                    async with self._lock:
                        await self.state.apply(batch, revision, check=self.verifier.run, emit=False)
                    _log.debug(
                        "first listing: %d records, from %.2f s for %.2f s",
                        len(batch),
                        at - started,
                        time.monotonic() - at,
                    )
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait({reader})
        reader.result()  # what reading raised, if it failed half-way
        return revision, keys, listed

    async def _pages(self, prefix: Prefix, revision: int) -> AsyncGenerator[list[KV], None]:
        """The keys of ``prefix`` at ``revision``, a page at a time.  A failed page is read
        again from the key after the last one read (at the same revision), up to
        :data:`_PAGE_RETRIES` times, not the whole listing."""
        last: str | None = None
        failed = 0
        while True:
            try:
                async for page in self.index.iter_prefix(
                    prefix,
                    page_size=_PAGE,
                    revision=revision,
                    **({} if last is None else {"after": last}),
                ):
                    self._contact()
                    if page.kvs:
                        last = page.kvs[-1].key
                    yield page.kvs
                return
            except IndexCompactedError:
                raise
            except RetrievalError as exc:
                failed += 1
                self.page_retries += 1
                if failed > _PAGE_RETRIES:
                    raise
                _log.warning(
                    "first listing: reading %s after %s failed (%s); retrying that page (%d of %d)",
                    prefix,
                    last or "the start",
                    exc,
                    failed,
                    _PAGE_RETRIES,
                )
                await asyncio.sleep(min(0.1 * 2**failed, self.settings.retry_backoff_max))

    async def _list(self, cause: str) -> int:
        """List the index and apply the difference; returns the listing's revision."""
        started = time.monotonic()
        first = not self.ready.is_set()
        later = self._later
        if later is not None and not later.done():
            later.cancel()  # this listing reads /live/ whole
            with contextlib.suppress(asyncio.CancelledError):
                await later
        # (a first listing that leaves /live/ for after ready says so again: _load)
        self._statuses_at, self._live_touched, self.statuses_pending = 0, None, 0
        gc_enabled = gc.isenabled()
        events: list[Event] = []
        if first and not self.state.keys():
            # a bulk load allocates ~20 objects per record that all live on: cyclic garbage
            # collection during it only rescans them, and after it only slows every later pass
            gc.disable()
            try:
                warm = await self._warm() if self.snapshots is not None else None
                if warm is not None:
                    (revision, n), list_s = warm, 0.0
                    cause = "snapshot"
                else:
                    revision, n, list_s = await self._load()
            finally:
                if gc_enabled:
                    gc.enable()
            bulk = n >= _BULK_KEYS
            changes = n
            self.state.log.reset((revision, 0))
        else:
            snapshot, revision = await self._snapshot()
            self._contact()
            list_s = time.monotonic() - started
            bulk = len(snapshot) >= _BULK_KEYS
            if bulk:
                gc.disable()
            try:
                async with self._lock:
                    diff = self.state.diff(snapshot, revision)
                    changes = len(diff)
                    del snapshot
                    events = await self.state.apply(
                        diff, revision, check=self.verifier.run, emit=not first
                    )
                    if first:
                        self.state.log.reset((revision, 0))
            finally:
                if gc_enabled:
                    gc.enable()
        if first and bulk:
            gc.freeze()  # the replica is long-lived: keep it out of future collections
        if bulk:
            release_free_memory()
        self.relists[cause] += 1
        sizes = self.state.sizes()
        _log.info(
            "listed the index at revision %d (%s): %d records (%d served), %d live, %d certs; "
            "%d changes, %d events; %.2f s (reading before verifying %.2f s)",
            revision,
            cause,
            sizes["records"],
            sizes["served"],
            sizes["live"],
            sizes["certs"],
            changes,
            len(events),
            time.monotonic() - started,
            list_s,
        )
        if first:
            self.ready_after_s = time.monotonic() - self._started
            self.probe_ok = True
            self.ready.set()
            if self.state.unfiled:  # before the watch starts, and first to take the lock
                await self._file_restored()
            if self._statuses_at and self._later is None:
                self.statuses_pending = self._first_records or 0  # counted when read starts
                self._live_touched = set()
                self._later = asyncio.create_task(
                    self._read_statuses(self._statuses_at), name="replica-statuses"
                )
                self._tasks.append(self._later)
        if self._later is None or self._later.done():
            # the workers are for bulk verification; re-list diffs are small: free the memory
            await self.verifier.close()
        return revision

    async def _file_restored(self) -> None:
        """File what a warm start left for after ready (statuses in the replica's
        bookkeeping, lease counts, deadlines: :meth:`ReplicaState.file_restored`), a
        chunk at a time, holding the lock: lookups go on in between, the watch starts
        after it, and a sweep or snapshot waits for it.  (Were the sweep to take the
        lock first, it would file everything at once, the event loop blocked for
        seconds at a million.)"""
        at = time.monotonic()
        gc_enabled = gc.isenabled()
        gc.disable()  # as for the load: what this makes lives on
        try:
            async with self._lock:
                for _ in range(self.state.unfiled):
                    self.state.file_restored(chunks=1)
                    await asyncio.sleep(0)  # lookups meanwhile
        finally:
            if gc_enabled:
                gc.enable()
        gc.freeze()
        _log.info("filed the warm start's bookkeeping in %.2f s after ready", time.monotonic() - at)

    async def _read_statuses(self, revision: int) -> None:
        """Read and verify the statuses a large first listing left for after ready (the
        resolver is ready: every record it serves verified): ``/live/`` at the listing's
        ``revision``, a page at a time.  Each page's jobs are made under the lock and
        verified on the workers without it, two pages in flight, so that the workers
        verify the next page while this process files one (under the lock: watch
        batches go in between).  A key the watch has changed since is skipped (the
        watch's is newer); each entry that gets its status is an ordinary ``put``
        event (reason ``status``).  If the revision is compacted meanwhile, or reading
        fails, the replica lists the index again (which brings every status).  Then
        the workers stop."""
        at = time.monotonic()
        with contextlib.suppress(RetrievalError):
            self.statuses_pending = await self.index.count_prefix(Prefix.LIVE)
        _log.info("reading and verifying ~%d statuses after ready", self.statuses_pending)
        touched = self._live_touched
        assert touched is not None
        state = self.state
        read = 0
        inflight: collections.deque[
            tuple[list[tuple[Change, str, RecordFacts]], asyncio.Task[list[Outcome]]]
        ] = collections.deque()

        async def verified(ctx: Context, jobs: list[Job]) -> list[Outcome]:
            out: list[Outcome] = []
            async for part in self.verifier.run(ctx, jobs, any_size=True):
                out += part
            return out

        async def file_oldest() -> None:
            targets, task = inflight.popleft()
            outcomes = await task
            async with self._lock:
                await state.file_statuses(targets, outcomes, touched, check=self.verifier.run)
            self.statuses_pending = max(0, self.statuses_pending - len(targets))

        gc_enabled = gc.isenabled()
        gc.disable()  # as for the first listing: what this makes lives on
        try:
            async for kvs in self._pages(Prefix.LIVE, revision):
                read += len(kvs)
                async with self._lock:  # the watch notes a key before it waits for the lock
                    ctx, jobs, targets, rest = state.status_jobs(
                        [
                            Change("put", kv.key, kv.value, kv.mod_revision, kv.lease)
                            for kv in kvs
                            if kv.key not in touched
                        ]
                    )
                    if rest:
                        await state.apply(rest, state.revision, check=self.verifier.run)
                inflight.append((targets, asyncio.create_task(verified(ctx, jobs))))
                while len(inflight) > 2:
                    await file_oldest()
            while inflight:
                await file_oldest()
        except Exception as exc:
            if isinstance(exc, IndexCompactedError | RetrievalError):
                _log.warning("reading the statuses after ready failed (%s); listing again", exc)
            else:  # a bug: the re-list still brings every status
                _log.exception("reading the statuses after ready failed; listing again")
            self._relist_cause = "statuses"
            self._relist.set()  # the re-list reads /live/ (and ends this)
            return
        finally:
            for _, task in inflight:
                task.cancel()
            if gc_enabled:
                gc.enable()
        self._statuses_at = 0
        self._live_touched = None
        self.statuses_pending = 0
        gc.freeze()
        release_free_memory()
        self.statuses_after_ready_s = time.monotonic() - self._started
        _log.info(
            "read and verified %d statuses after ready in %.2f s (%.2f s after start)",
            read,
            time.monotonic() - at,
            self.statuses_after_ready_s,
        )
        await self.verifier.close()

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
                    touched = self._live_touched
                    if touched is not None and kv.key.startswith(Prefix.LIVE):
                        touched.add(kv.key)  # newer than /live/ as read after ready
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
                    cause, self._relist_cause = self._relist_cause, "revision_regressed"
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
            # what was applied when the probe was sent: etcd's answer is at least that
            # unless etcd went back in time (the watch may apply newer revisions while the
            # probe is in flight, so comparing with the revision applied by the time the
            # answer arrives would see a regression in every race with a write)
            applied = self.state.revision
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
                if self.ready.is_set() and revision < applied:
                    _log.warning(
                        "etcd's revision %d is below the applied %d (restored from a backup?); "
                        "listing again",
                        revision,
                        applied,
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
