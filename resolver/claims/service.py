"""On-demand acquisition: atomic claims on verified, live capacity.  No HTTP here.

A claim reserves ``units`` of one resource for ``ttl_s`` seconds on behalf of a
*holder* (named by its claims token, :mod:`resolver.claims.tokens`).  Three kinds of
keys (docs/protocol.md §6; built by :class:`registry.index.Keys` only):

* ``/cpi/v1/claim/<cpid>/<claim-id>``: ``{"claim_id", "cpid", "holder", "units",
  "created_at", "expires_at"}``, on the claim's **own lease** (TTL ``ttl_s``);
* ``/cpi/v1/alloc/<cpid>``: ``{"units": N}``, the units claimed on the resource, the
  compare-and-swap point of its capacity;
* ``/cpi/v1/holders/<holder>``: ``{"units": N}``, the units the holder holds over all
  resources, the compare-and-swap point of its quota.

**Claim.**  The record comes from the resolver's replica (verified: chain, revocations,
validity).  The live key, ``/alloc/`` and ``/holders/`` are read from etcd (the status
envelope is verified under the record's key), capacity and quota are checked, and
**one transaction** compares the ``mod_revision`` of all three, writes both new totals
and puts the claim key on its lease.  A status change (the node starts draining,
its live key expires), another claim on the resource or another claim by the holder
between the read and the write fails the compare; the transaction's failure branch
returns the fresh keys and the claim is re-checked and retried, up to
``max_attempts`` times with jittered back-off, then refused with what is free.

Within one process, claims on one CPID queue for that CPID's leader task, which
checks them in order and commits up to :data:`_BATCH` of them in one such
transaction (group commit: each claim still has its own key and lease).  The keys
written last are remembered, so a claim costs one transaction in the common case,
its lease is granted while it queues, and compares fail only against other
processes.  A refusal is only ever based on values read from etcd during the
request.

**Release** compares the claim key, ``/alloc/`` and ``/holders/``, deletes the claim
and writes both totals decreased, in one transaction, then revokes the claim's lease.

**Expiry.**  A lease that runs out deletes the claim key but not the totals.  The
reconciler (:meth:`ClaimService.reconcile`) reads ``/claim/``, ``/alloc/`` and
``/holders/`` at one revision and sets every total that differs from the sum of the
live claim keys with a compare-and-put (logged).  It runs at start, every
``reconcile_interval_s`` and ``reconcile_delay_s`` after a watch on ``/claim/`` sees
a claim key deleted.  Claims written by a process that died expire with their
leases; any instance's reconciler then fixes the totals.  A claim whose ``expires_at``
has passed never counts, even while its key remains (etcd re-arms leases to their full
TTL when it restarts): listings leave it out, a capacity or quota refusal first removes
such claims and reads again, and every pass removes those it lists, each in a
release-like transaction.  A pass also deletes the ``/alloc/`` keys of records that are
gone and that no claim names.

**Free units** (:func:`available_units`): the node's verified status reports
``accelerators_free`` (CPU cores for records without accelerators) *after*
subtracting the units it knew to be claimed, reported as the metric
``claimed_units``; so what a new claim may take is
``reported free + claimed_units - /alloc/`` (never below 0, never above the record's
hardware).  A node that does not subtract (no ``claimed_units`` metric) gives
``reported free - /alloc/``.

**Usage receipts** (:mod:`resolver.claims.usage`): with a usage key, each claim is
metered (its meter is put in the claim transaction; a gang has one meter listing its
parts) and the release, purge and reconcile transactions that end it append its signed
receipt to the transparency log in the same transaction; a renewal writes the receipt
of the period it ends and moves the meter in the transaction that rewrites the keys.

**Claim ids** are ``<prefix>~<suffix>~<random>`` (the CPID with ``~`` for ``/``, then
16 random URL-safe characters), so a release finds the key without a lookup.

**Gangs** (:meth:`ClaimService.claim_gang`, parts chosen by
:func:`resolver.claims.gang.plan_gang`) claim units on several resources under one
claim id, all or nothing: one transaction compares the live and ``/alloc/`` key of
every part and the holder's key, writes every total and puts one claim key per part,
all on one lease.  The id names the *anchor* part, whose value lists every part.
Within a process, a gang and the leaders of its CPIDs take turns on per-CPID gates.

**Renewal** (:meth:`ClaimService.renew`) moves every key of a claim to a new lease with
a new ``expires_at`` in one transaction comparing each key, then revokes the old lease:
the units are held throughout.

Where a claim ends or is renewed (one place each, for hooks): :meth:`ClaimService._release`
(a single claim released; it hands a gang to :meth:`ClaimService._release_gang`),
:meth:`ClaimService._purge_one` (a single claim past ``expires_at`` removed; a gang goes to
:meth:`ClaimService._purge_gang`), both gang paths through
:meth:`ClaimService._remove_gang` (which returns the gang as a whole), and
:meth:`ClaimService._renew` (the previous term ends, the new one starts at the returned
claim's ``expires_at``).  A lease that runs out deletes the keys in etcd with no code of
ours on the path; the reconciler's watch (:meth:`ClaimService._watch_claims`) sees the
deletes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import time
from collections import Counter as Tally
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

from registry.index import (
    KV,
    Cmp,
    Compacted,
    Index,
    Keys,
    Lease,
    Op,
    Prefix,
    TxnResult,
    parse_key,
)
from resolver.claims import tokens as claim_tokens
from resolver.claims.gang import Candidate, GangPlan, GangSpec, plan_gang
from resolver.claims.model import (
    CLAIMED_METRIC,
    ID_SEPARATOR,
    MAX_UNITS,
    Claim,
    ClaimConflictError,
    ClaimForbiddenError,
    ClaimNotFoundError,
    ClaimsMetrics,
    ClaimsSettings,
    ContentionError,
    DrainingError,
    InsufficientCapacityError,
    InvalidClaimError,
    NotLiveError,
    QuotaExceededError,
    ReconcileReport,
    available_units,
    new_claim_id,
    parse_claim_id,
    read_units,
    reported_claimed,
    units_json,
)
from resolver.claims.usage import NO_RECEIPT, Meter, Reason, UsageParts, UsageRecorder
from resolver.core import Resolver
from resolver.discovery import Query
from resolver.entry import Entry
from resolver.events import Event
from schemas.chain import open_signed
from schemas.cpid import parse as parse_cpid
from schemas.dsse import Envelope
from schemas.errors import CPIError, InvalidDataError, NotFoundError, RetrievalError
from schemas.models import Record, Status

__all__ = [
    "CLAIMED_METRIC",
    "ID_SEPARATOR",
    "MAX_UNITS",
    "Claim",
    "ClaimConflictError",
    "ClaimForbiddenError",
    "ClaimNotFoundError",
    "ClaimService",
    "ClaimsMetrics",
    "ClaimsSettings",
    "ContentionError",
    "DrainingError",
    "GangSpec",
    "InsufficientCapacityError",
    "InvalidClaimError",
    "NotLiveError",
    "QuotaExceededError",
    "ReconcileReport",
    "available_units",
    "new_claim_id",
    "parse_claim_id",
    "reported_claimed",
]

_log = logging.getLogger("resolver.claims")

_MAX_CACHED_KEYS: Final = 50_000


# =============================================================================
# Internals
# =============================================================================


class _KeyedLocks:
    """One asyncio lock per name, dropped when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[str, list[Any]] = {}  # name -> [lock, users]

    @contextlib.asynccontextmanager
    async def hold(self, name: str) -> AsyncIterator[None]:
        slot = self._locks.get(name)
        if slot is None:
            slot = self._locks[name] = [asyncio.Lock(), 0]
        slot[1] += 1
        try:
            async with slot[0]:
                yield
        finally:
            slot[1] -= 1
            if slot[1] == 0:
                del self._locks[name]

    @contextlib.asynccontextmanager
    async def hold_all(self, names: Iterable[str]) -> AsyncIterator[None]:
        """The locks of every name, taken in sorted order (so two holders never deadlock)."""
        async with contextlib.AsyncExitStack() as stack:
            for name in sorted(set(names)):
                await stack.enter_async_context(self.hold(name))
            yield


@dataclass(slots=True)
class _Snapshot:
    """The live key, ``/alloc/`` and the ``/holders/`` keys of one claim attempt."""

    live: KV | None
    alloc: KV | None
    holders: dict[str, KV | None]
    """Holder name -> its ``/holders/`` key."""
    fresh: bool
    """Read from etcd during this attempt (a refusal needs that)."""


@dataclass(eq=False, slots=True)
class _Request:
    """One claim waiting in its CPID's queue (see :meth:`ClaimService._lead`)."""

    claim_id: str
    units: int
    ttl: int
    holder: str
    max_units: int | None
    future: asyncio.Future[Claim]
    lease: Lease | None = None
    started: int = 0


_BATCH: Final = 40
"""Claims committed in one transaction at most (etcd allows 128 operations in one)."""


def _rev(kv: KV | None) -> int:
    return 0 if kv is None else kv.mod_revision


@dataclasses.dataclass(frozen=True, slots=True)
class _Return:
    """The transaction that deletes a claim and gives its units back to the resource's
    ``/alloc/`` total and the holder's ``/holders/`` total, all compared unchanged."""

    compare: list[Cmp]
    success: list[Op]
    new_alloc: bytes
    new_held: bytes
    readable: bool
    """False when a total was unreadable (written as if it were 0: the reconciler fixes it)."""


def _return_units(
    claim_key: str,
    claim_kv: KV,
    units: int,
    alloc: tuple[str, KV | None],
    holder: tuple[str, KV | None],
) -> _Return:
    (alloc_key, alloc_kv), (holder_key, holder_kv) = alloc, holder
    allocated, held = read_units(alloc_kv), read_units(holder_kv)
    new_alloc = units_json(max(0, (allocated or 0) - units))
    new_held = units_json(max(0, (held or 0) - units))
    return _Return(
        compare=[
            Cmp.mod_revision(claim_key, "==", claim_kv.mod_revision),
            Cmp.mod_revision(alloc_key, "==", _rev(alloc_kv)),
            Cmp.mod_revision(holder_key, "==", _rev(holder_kv)),
        ],
        success=[
            Op.delete(claim_key),
            Op.put(alloc_key, new_alloc),
            Op.put(holder_key, new_held),
        ],
        new_alloc=new_alloc,
        new_held=new_held,
        readable=allocated is not None and held is not None,
    )


def _written(key: str, value: bytes, old: KV | None, revision: int) -> KV:
    """The KV a successful put of ours left (for the cache of known keys)."""
    return KV(
        key=key,
        value=value,
        create_revision=old.create_revision if old is not None else revision,
        mod_revision=revision,
        version=(old.version if old is not None else 0) + 1,
        lease=0,
    )


# =============================================================================
# The service
# =============================================================================


class ClaimService:
    """Claims over the index, with records and discovery from a :class:`Resolver`.

    Use ``async with ClaimService(index=..., resolver=...) as claims:`` (that starts the
    reconciler; ``start(reconcile=False)`` runs none), or :meth:`start` / :meth:`close`.
    The resolver must be started (and ready before claims are answered).

    Args:
        index: the etcd index, connected (usually ``resolver.index``).
        resolver: where verified records and discovery come from.
        settings: bounds and timings.
        metrics: counters (a private registry when not given).
        clock: Unix time (tests).
        usage: signs usage receipts and meters claims (None: claims are not metered).
    """

    def __init__(
        self,
        *,
        index: Index,
        resolver: Resolver,
        settings: ClaimsSettings | None = None,
        metrics: ClaimsMetrics | None = None,
        clock: Callable[[], float] = time.time,
        usage: UsageRecorder | None = None,
    ) -> None:
        self._index = index
        self.usage = usage
        self._resolver = resolver
        self.settings = settings or ClaimsSettings()
        self.metrics = metrics or ClaimsMetrics()
        self._clock = clock
        self._locks = _KeyedLocks()
        self._gate = _KeyedLocks()
        """Per CPID: held by its leader while it commits a batch and by a gang while it
        reads and commits (so gangs and leaders in one process take turns, not compares)."""
        self._pending: dict[str, int] = {}  # CPID -> units of claims in progress on it
        self._queues: dict[str, list[_Request]] = {}  # CPID -> claims waiting for its leader
        self._leaders: dict[str, asyncio.Task[None]] = {}  # CPID -> its leader task
        self._background: set[asyncio.Task[None]] = set()  # lease revocations
        self._known: dict[str, KV | None] = {}
        self._statuses: dict[str, tuple[int, str, Status]] = {}
        self._rng = random.Random()
        self._trigger = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._last_prune = 0.0
        self._unlisten: Callable[[], None] | None = None
        self.passes = 0
        """Reconciliation passes run so far."""

    # -- life cycle -------------------------------------------------------------------

    async def start(self, *, reconcile: bool = True) -> None:
        """Start the reconciler (a pass now, then periodic and after claim expiries)."""
        if reconcile and not self._tasks:
            self._unlisten = self._resolver.add_listener(self._on_event)
            self._tasks = [
                asyncio.create_task(self._reconcile_loop(), name="claims-reconciler"),
                asyncio.create_task(self._watch_claims(), name="claims-watch"),
            ]

    async def close(self) -> None:
        """Stop the reconciler; claims still queued are refused (503).  Claims made stay
        (they expire with their leases)."""
        tasks, self._tasks = [*self._tasks, *self._leaders.values()], []
        if self._unlisten is not None:
            self._unlisten()
            self._unlisten = None
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)

    async def __aenter__(self) -> ClaimService:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- requests ---------------------------------------------------------------------

    def check_request(self, *, units: object, ttl_s: object = None) -> tuple[int, int]:
        """``(units, ttl_s)`` validated (default TTL filled in); InvalidClaimError otherwise."""
        if not isinstance(units, int) or isinstance(units, bool):
            raise InvalidClaimError(f"units must be an integer, got {units!r}")
        if not 1 <= units <= MAX_UNITS:
            raise InvalidClaimError(f"units must be between 1 and {MAX_UNITS}, got {units}")
        s = self.settings
        ttl = s.default_ttl_s if ttl_s is None else ttl_s
        if not isinstance(ttl, int) or isinstance(ttl, bool):
            raise InvalidClaimError(f"ttl_s must be an integer number of seconds, got {ttl!r}")
        if not 1 <= ttl <= s.max_ttl_s:
            raise InvalidClaimError(f"ttl_s must be between 1 and {s.max_ttl_s} s, got {ttl}")
        return units, ttl

    async def claim(
        self,
        cpid: str,
        *,
        units: int,
        ttl_s: int | None = None,
        holder: str,
        max_units: int | None = None,
        within: str | None = None,
    ) -> Claim:
        """Claim ``units`` of ``cpid`` for ``holder`` (see the module docstring).

        ``max_units`` is the holder's quota, ``within`` the namespace its token covers.

        Raises:
            InvalidClaimError, InvalidCPIDError: bad units, TTL or CPID (400).
            ClaimScopeError: the CPID is outside ``within`` (403).
            NotFoundError: no verified record for the CPID (404).
            QuotaExceededError: over the holder's quota (429).
            ClaimConflictError: not live, draining, too few units, contention (409).
            RetrievalError: etcd unreachable, or the replica not ready (503).
        """
        units, ttl = self.check_request(units=units, ttl_s=ttl_s)
        claim_tokens.check_holder(holder)
        parsed = parse_cpid(cpid)
        if within is not None:
            claim_tokens.check_scope(within, parsed.prefix, holder=holder)
        return await self._counted(self._claim_one(parsed.to_text(), units, ttl, holder, max_units))

    async def claim_query(
        self,
        query: Query,
        *,
        units: int,
        ttl_s: int | None = None,
        holder: str,
        max_units: int | None = None,
        within: str | None = None,
    ) -> Claim:
        """Claim ``units`` on the best-ranked live resource matching ``query`` that can
        hold them all (no partial claims); the next candidate is tried when one fails.

        ``query.limit`` (at most ``settings.max_candidates``) bounds the candidates.
        Raises as :meth:`claim`; with no candidate left, InsufficientCapacityError
        carrying the most units any candidate had free.
        """
        units, ttl = self.check_request(units=units, ttl_s=ttl_s)
        claim_tokens.check_holder(holder)
        if within is not None:
            if query.within is None:
                query = dataclasses.replace(query, within=within)
            else:
                claim_tokens.check_scope(within, query.within, holder=holder)
        q = dataclasses.replace(
            query,
            min_free=max(query.min_free or 0, units),
            live=True,
            limit=min(query.limit, self.settings.max_candidates),
        )
        return await self._counted(self._claim_best(q, units, ttl, holder, max_units))

    async def _counted(self, work: Awaitable[Claim]) -> Claim:
        try:
            claim = await work
        except (InvalidDataError, RetrievalError) as exc:
            self.metrics.claims.labels(exc.code).inc()
            raise
        self.metrics.claims.labels("created").inc()
        return claim

    async def _claim_best(
        self, q: Query, units: int, ttl: int, holder: str, max_units: int | None
    ) -> Claim:
        found = self._resolver.discover(q).results
        if not found:
            raise InsufficientCapacityError(
                f"no live resource matching the query has {units} units free",
                cpid=None,
                requested=units,
                free=0,
            )
        best = 0
        refused: list[str] = []
        for match in found:
            try:
                return await self._claim_one(match.cpid, units, ttl, holder, max_units)
            except ClaimConflictError as exc:
                best = max(best, exc.free)
                refused.append(f"{match.cpid} {exc.code} ({exc.free} free)")
            except NotFoundError:
                refused.append(f"{match.cpid} gone")
        shown = "; ".join(refused[:3]) + ("; ..." if len(refused) > 3 else "")
        raise InsufficientCapacityError(
            f"none of the {len(found)} resources matching the query could take {units} units "
            f"(at most {best} free): {shown}",
            cpid=None,
            requested=units,
            free=best,
        )

    # -- gang claims -------------------------------------------------------------------

    async def claim_gang(
        self,
        query: Query,
        *,
        spec: GangSpec,
        ttl_s: int | None = None,
        holder: str,
        max_units: int | None = None,
        within: str | None = None,
    ) -> Claim:
        """Claim ``spec.units`` over several resources matching ``query``, all or nothing
        (docs/claims.md, "Gang claims").  Returns the gang as a whole: ``cpid`` is its
        anchor (the first part), ``units`` the total, ``parts`` every ``(cpid, units)``.

        Raises as :meth:`claim_query`; a capacity refusal carries ``available``, the
        parts of the largest gang that fits now (``free`` is their total).
        """
        _, ttl = self.check_request(units=spec.units, ttl_s=ttl_s)
        claim_tokens.check_holder(holder)
        if within is not None:
            if query.within is None:
                query = dataclasses.replace(query, within=within)
            else:
                claim_tokens.check_scope(within, query.within, holder=holder)
        q = dataclasses.replace(
            query,
            min_free=max(query.min_free or 0, spec.per_min),
            live=True,
            limit=min(query.limit, self.settings.max_gang_candidates),
        )
        return await self._counted(self._claim_gang(q, spec, ttl, holder, max_units))

    def _room(self, cpid: str, live: KV | None, alloc: KV | None) -> int:
        """Units ``cpid`` can take on these freshly read keys (0: not live, draining,
        unreadable total, record gone)."""
        entry = self._resolver.get(cpid)
        if entry is None:
            return 0
        status, _ = self._status(entry, live)
        allocated = read_units(alloc)
        if allocated is None:
            self._trigger.set()  # the reconciler rewrites it
            return 0
        return available_units(entry.record, status, allocated)

    async def _read_rooms(self, cpids: list[str], rooms: dict[str, int]) -> None:
        """Read the live and ``/alloc/`` keys of ``cpids`` (60 per transaction, at once) and
        set their ``rooms``."""
        chunks = [cpids[i : i + 60] for i in range(0, len(cpids), 60)]
        results = await asyncio.gather(
            *(
                self._index.txn(
                    success=[
                        op for c in chunk for op in (Op.get(Keys.live(c)), Op.get(Keys.alloc(c)))
                    ]
                )
                for chunk in chunks
            )
        )
        for chunk, result in zip(chunks, results, strict=True):
            kvs = [r.kvs[0] if r.kvs else None for r in result.responses]
            for i, c in enumerate(chunk):
                self._remember(Keys.live(c), kvs[2 * i])
                self._remember(Keys.alloc(c), kvs[2 * i + 1])
                rooms[c] = self._room(c, kvs[2 * i], kvs[2 * i + 1])

    @staticmethod
    def _gang_reads(cpids: list[str], holder: str) -> list[Op]:
        return [
            *(op for c in cpids for op in (Op.get(Keys.live(c)), Op.get(Keys.alloc(c)))),
            Op.get(Keys.holder(holder)),
        ]

    def _gang_snapshot(
        self, cpids: list[str], holder: str, responses: list[Any]
    ) -> tuple[dict[str, tuple[KV | None, KV | None]], KV | None]:
        """The answers to :meth:`_gang_reads` (remembered, as :meth:`_snapshot` does)."""
        kvs = [r.kvs[0] if r.kvs else None for r in responses]
        keys = {c: (kvs[2 * i], kvs[2 * i + 1]) for i, c in enumerate(cpids)}
        for c, (live, alloc) in keys.items():
            self._remember(Keys.live(c), live)
            self._remember(Keys.alloc(c), alloc)
        self._remember(Keys.holder(holder), kvs[-1])
        return keys, kvs[-1]

    def _gang_cached(
        self, cpids: list[str], holder: str
    ) -> tuple[dict[str, tuple[KV | None, KV | None]], KV | None, bool] | None:
        """The gang's keys as remembered (not fresh), or None when one is unknown."""
        known = self._known
        names = [k for c in cpids for k in (Keys.live(c), Keys.alloc(c))]
        if not all(k in known for k in (*names, Keys.holder(holder))):
            return None
        keys = {c: (known[Keys.live(c)], known[Keys.alloc(c)]) for c in cpids}
        return keys, known[Keys.holder(holder)], False

    async def _purge_expired_where(self, keep: Callable[[Claim], bool]) -> int:
        """Remove the claims past ``expires_at`` that ``keep`` selects; how many."""
        kvs, _ = await self._index.get_prefix(Prefix.CLAIM)
        now = self._clock()
        stale: list[Claim] = []
        for kv in kvs:
            try:
                c = Claim.from_kv(kv)
            except (ValueError, InvalidDataError):
                continue
            if c.expired(now) and keep(c):
                stale.append(c)
        return await self.purge_expired(stale) if stale else 0

    async def _claim_gang(
        self, q: Query, spec: GangSpec, ttl: int, holder: str, max_units: int | None
    ) -> Claim:
        found = self._resolver.discover(q).results
        regions = {m.cpid: m.entry.region for m in found}
        order = [m.cpid for m in found]
        wanted = set(order)
        rooms = {m.cpid: m.free for m in found}  # the replica's view until read from etcd
        table = self._resolver.latency
        all_read = purged = purged_holder = False
        use_cache = True
        given: tuple[dict[str, tuple[KV | None, KV | None]], KV | None] | None = None
        attempt = 0
        lease: Lease | None = None
        started = 0

        def plan() -> GangPlan:
            cands = [Candidate(c, regions[c], rooms[c]) for c in order]
            return plan_gang(cands, spec, table.rtt)

        try:
            for _ in range(4 * self.settings.max_attempts + 4):
                chosen = plan()
                if not chosen.fits:
                    if not all_read:  # refuse only on what etcd says now
                        await self._read_rooms(order, rooms)
                        all_read = True
                        continue
                    if not purged:  # claims past expires_at count as gone: remove, look again
                        purged = True
                        if await self._purge_expired_where(lambda c: c.cpid in wanted):
                            all_read = False
                            continue
                    raise self._gang_refusal(spec, chosen, len(order))
                cpids = [c for c, _ in chosen.parts]
                if lease is None:  # granted outside the gate (a refusal revokes it)
                    started = int(self._clock())
                    lease = await self._index.grant_lease(ttl, revoke_on_exit=False)
                async with self._gate.hold_all(cpids):
                    snap = None
                    if given is not None and set(given[0]) == set(cpids):
                        snap = (*given, True)  # the last failure branch's fresh keys
                    elif use_cache:
                        snap = self._gang_cached(cpids, holder)
                    given = None
                    if snap is None:
                        result = await self._index.txn(success=self._gang_reads(cpids, holder))
                        snap = (*self._gang_snapshot(cpids, holder, result.responses), True)
                    keys, holder_kv, fresh = snap
                    got = {c: self._room(c, live, alloc) for c, (live, alloc) in keys.items()}
                    if fresh:  # remembered keys never lower what a refusal is based on
                        rooms.update(got)
                    held = read_units(holder_kv)
                    short = any(got[c] < u for c, u in chosen.parts)
                    over = held is None or (max_units is not None and held + spec.units > max_units)
                    if (short or over) and not fresh:
                        use_cache = False  # decide on what etcd says now
                        continue
                    if short:
                        continue  # fewer units than the replica showed: choose again
                    if held is None:
                        self._trigger.set()
                        raise ContentionError(
                            f'{Keys.holder(holder)} does not hold {{"units": N}}; the '
                            "reconciler rewrites it, retry shortly",
                            cpid=None,
                            requested=spec.units,
                            free=0,
                        )
                    if max_units is not None and held + spec.units > max_units:
                        if not purged_holder:
                            purged_holder = True
                            if await self._purge_expired_where(lambda c: c.holder == holder):
                                continue
                        raise QuotaExceededError(
                            f"holder {holder} holds {held} units and may hold at most "
                            f"{max_units}; a gang of {spec.units} more would exceed its quota",
                            holder=holder,
                            max_units=max_units,
                            held=held,
                            requested=spec.units,
                        )
                    whole = self._gang_of(chosen.parts, holder, started, lease)
                    done, given = await self._commit_gang(whole, keys, holder_kv)
                    if done:
                        lease = None  # the claim keys own it now
                        return whole
                    assert given is not None
                    for c, (live, alloc) in given[0].items():
                        rooms[c] = self._room(c, live, alloc)
                    attempt += 1
                    self.metrics.retries.inc()
                    if attempt >= self.settings.max_attempts:
                        break
                await asyncio.sleep(self._backoff(attempt))
            last = plan()
            raise ContentionError(
                f"gang of {spec.units} units: gave up after {attempt} attempts lost to "
                f"concurrent claims or status changes; {last.largest_units} units could be "
                "had at the last attempt (retry)",
                cpid=None,
                requested=spec.units,
                free=last.largest_units,
                available=last.largest,
            )
        finally:
            if lease is not None:
                self._revoke_lease_later(lease.id)

    @staticmethod
    def _gang_refusal(spec: GangSpec, plan: GangPlan, candidates: int) -> InsufficientCapacityError:
        per = (
            f"{spec.per_min}"
            if spec.per_min == spec.per_max
            else f"{spec.per_min} to {spec.per_max}"
        )
        where = []
        if spec.same_region:
            where.append("in one region")
        if spec.max_pairwise_latency_ms is not None:
            where.append(f"within {spec.max_pairwise_latency_ms:g} ms of each other")
        return InsufficientCapacityError(
            f"no gang of {spec.units} units ({per} per resource"
            f"{', ' + ' and '.join(where) if where else ''}) fits among the {candidates} "
            f"matching live resources; the largest that fits now has {plan.largest_units} "
            f"units in {len(plan.largest)} parts",
            cpid=None,
            requested=spec.units,
            free=plan.largest_units,
            available=plan.largest,
        )

    def _gang_of(
        self, parts: tuple[tuple[str, int], ...], holder: str, started: int, lease: Lease
    ) -> Claim:
        """The gang as a whole (its anchor is the first part; a fresh claim id)."""
        anchor = parts[0][0]
        return Claim(
            new_claim_id(anchor),
            anchor,
            holder,
            sum(u for _, u in parts),
            created_at=started,
            expires_at=started + lease.ttl,
            lease=lease.id,
            gang_units=sum(u for _, u in parts),
            gang_parts=len(parts),
            parts=parts,
        )

    @staticmethod
    def _part_claims(whole: Claim) -> list[Claim]:
        """The stored parts of a gang (the anchor carries the list of parts)."""
        return [
            dataclasses.replace(
                whole, cpid=c, units=u, parts=whole.parts if c == whole.cpid else ()
            )
            for c, u in whole.parts
        ]

    async def _commit_gang(
        self,
        whole: Claim,
        keys: dict[str, tuple[KV | None, KV | None]],
        holder_kv: KV | None,
    ) -> tuple[bool, tuple[dict[str, tuple[KV | None, KV | None]], KV | None] | None]:
        """The gang's transaction: it compares every part's live and ``/alloc/`` key and
        the holder's key, writes every ``/alloc/`` total, the holder's total and every
        part's claim key (all on the gang's one lease), and the gang's one meter (with a
        usage key; it lists the parts).  ``(True, None)`` when it committed, else
        ``(False, fresh keys)``."""
        cpids = [c for c, _ in whole.parts]
        holder_key = Keys.holder(whole.holder)
        new_alloc = {c: units_json((read_units(keys[c][1]) or 0) + u) for c, u in whole.parts}
        new_held = units_json((read_units(holder_kv) or 0) + whole.units)
        compare = [
            *(
                cmp
                for c in cpids
                for cmp in (
                    Cmp.mod_revision(Keys.live(c), "==", _rev(keys[c][0])),
                    Cmp.mod_revision(Keys.alloc(c), "==", _rev(keys[c][1])),
                )
            ),
            Cmp.mod_revision(holder_key, "==", _rev(holder_kv)),
        ]
        success = [
            *(Op.put(Keys.alloc(c), new_alloc[c]) for c in cpids),
            Op.put(holder_key, new_held),
            *(Op.put(p.key, p.to_json(), lease=whole.lease) for p in self._part_claims(whole)),
            *((self.usage.meter_op(whole),) if self.usage is not None else ()),  # one per gang
        ]
        try:
            result = await self._index.txn(
                compare=compare, success=success, failure=self._gang_reads(cpids, whole.holder)
            )
        except RetrievalError:
            # the outcome is unknown: the anchor's key (a fresh random name) tells
            self._forget(holder_key, *(Keys.alloc(c) for c in cpids))
            if await self._index.get(whole.key) is None:
                raise
            _log.info("gang %s: transaction outcome was unknown; it is in place", whole.claim_id)
            return True, None
        if result.succeeded:
            for c in cpids:
                key = Keys.alloc(c)
                self._remember(key, _written(key, new_alloc[c], keys[c][1], result.revision))
            self._remember(holder_key, _written(holder_key, new_held, holder_kv, result.revision))
            return True, None
        return False, self._gang_snapshot(cpids, whole.holder, result.responses)

    async def _claim_one(
        self, cpid: str, units: int, ttl: int, holder: str, max_units: int | None
    ) -> Claim:
        """Queue a claim on ``cpid``; the CPID's leader commits it (see :meth:`_lead`)."""
        self._resolver.resolve(cpid)  # 404 (503 before the first listing) before any write
        ahead = self._pending.get(cpid, 0)
        self._pending[cpid] = ahead + units
        try:
            loop = asyncio.get_running_loop()
            req = _Request(new_claim_id(cpid), units, ttl, holder, max_units, loop.create_future())
            if self._likely_fits(cpid, units, ahead, holder, max_units):
                req.started = int(self._clock())  # granted before queueing: grants overlap
                req.lease = await self._index.grant_lease(ttl, revoke_on_exit=False)
            self._queues.setdefault(cpid, []).append(req)
            if cpid not in self._leaders:
                self._leaders[cpid] = asyncio.create_task(self._lead(cpid), name=f"claims {cpid}")
            return await req.future  # cancelling this cancels the request (see _settle)
        finally:
            left = self._pending[cpid] - units
            if left:
                self._pending[cpid] = left
            else:
                del self._pending[cpid]

    def _likely_fits(
        self, cpid: str, units: int, ahead: int, holder: str, max_units: int | None
    ) -> bool:
        """Whether the remembered keys leave room for this claim after the ``ahead`` units
        of claims queued before it on the same CPID.  Then its lease is granted before it
        queues, overlapping with the others' transactions; a wrong guess costs a lease
        grant and revoke, never correctness.  No I/O."""
        snap = self._cached(cpid, [holder])
        entry = self._resolver.get(cpid)
        if snap is None or entry is None:
            return False
        status, _ = self._status(entry, snap.live)
        allocated, held = read_units(snap.alloc), read_units(snap.holders[holder])
        if status is None or allocated is None or held is None:
            return False
        if max_units is not None and held + units > max_units:
            return False
        return available_units(entry.record, status, allocated + ahead) >= units

    async def _lead(self, cpid: str) -> None:
        """Commit the queued claims on ``cpid``, up to :data:`_BATCH` per transaction,
        until the queue is empty.  One leader task per CPID and process: claims on one
        resource never race each other here, only against other processes."""
        batch: list[_Request] = []
        try:
            while True:
                queue = self._queues.get(cpid)
                if not queue:
                    return
                batch, queue[:] = queue[:_BATCH], queue[_BATCH:]
                try:
                    async with self._gate.hold(cpid):
                        await self._commit_batch(cpid, batch)
                except (InvalidDataError, RetrievalError) as exc:
                    for r in batch:
                        self._fail(r, exc)
                except Exception as exc:
                    _log.exception("claims on %s failed", cpid)
                    for r in batch:
                        self._fail(r, RetrievalError(f"claims on {cpid} failed: {exc!r}"))
        finally:
            stopping = RetrievalError("the claims service is stopping; retry")
            for r in [*batch, *self._queues.pop(cpid, [])]:
                self._fail(r, stopping)
            self._leaders.pop(cpid, None)

    async def _commit_batch(self, cpid: str, batch: list[_Request]) -> None:
        """Check ``batch`` in order against the index and commit what fits in one
        transaction; answer every request (claim or refusal)."""
        holders = sorted({r.holder for r in batch})
        snap = self._cached(cpid, holders)
        attempt = 0
        purged = False
        while True:
            batch = [r for r in batch if not self._dropped(r)]
            if not batch:
                return
            entry = self._resolver.resolve(cpid)  # verified, or NotFoundError
            if snap is None:
                snap = await self._read(cpid, holders)
            accepted, refused, allocated, held = self._evaluate(entry, snap, batch)
            if refused and not snap.fresh:
                snap = None  # refuse only on what etcd says now
                continue
            if refused and not purged:
                purged = True  # claims past expires_at count as gone: remove them, look again
                if await self._purge_refusal(cpid, refused):
                    snap = None
                    continue
            if accepted:
                await self._grant([r for r in accepted if r.lease is None])
                claims = [self._claim_of(cpid, r) for r in accepted]
                done, snap = await self._commit(cpid, snap, claims, allocated, held)
                if not done:
                    attempt += 1
                    self.metrics.retries.inc()
                    if attempt >= self.settings.max_attempts:
                        status, _ = self._status(entry, snap.live)
                        free = available_units(entry.record, status, read_units(snap.alloc) or 0)
                        for r in batch:
                            self._fail(
                                r,
                                ContentionError(
                                    f"{cpid}: gave up after {attempt} attempts, each lost to a "
                                    f"concurrent claim or status change; {free} units were free "
                                    "at the last attempt (retry)",
                                    cpid=cpid,
                                    requested=r.units,
                                    free=free,
                                ),
                            )
                        return
                    await asyncio.sleep(self._backoff(attempt))
                    continue  # every request of the batch again, on the fresh keys
                for r, claim in zip(accepted, claims, strict=True):
                    self._settle(r, claim)
            for r, exc in refused:
                self._fail(r, exc)
            return

    def _evaluate(
        self, entry: Entry, snap: _Snapshot, batch: list[_Request]
    ) -> tuple[list[_Request], list[tuple[_Request, CPIError]], int, dict[str, int]]:
        """Requests in order against ``snap``, each after those accepted before it:
        ``(accepted, refused, allocated after, held after by holder)``."""
        cpid = entry.cpid
        status, why = self._status(entry, snap.live)
        allocated = read_units(snap.alloc)
        held = {h: read_units(kv) for h, kv in snap.holders.items()}
        accepted: list[_Request] = []
        refused: list[tuple[_Request, CPIError]] = []
        for r in batch:
            try:
                self._check(cpid, entry.record, status, why, allocated, held[r.holder], r)
            except (ClaimConflictError, QuotaExceededError) as exc:
                refused.append((r, exc))
                continue
            assert allocated is not None
            accepted.append(r)
            allocated += r.units
            held[r.holder] = (held[r.holder] or 0) + r.units
        return accepted, refused, allocated or 0, {h: u or 0 for h, u in held.items()}

    def _check(
        self,
        cpid: str,
        record: Record,
        status: Status | None,
        why: str,
        allocated: int | None,
        held: int | None,
        r: _Request,
    ) -> None:
        """Liveness, quota and capacity for one request; raises the refusal."""
        units = r.units
        if status is None:
            raise NotLiveError(
                f"{cpid} cannot be claimed: {why}", cpid=cpid, requested=units, free=0
            )
        if status.state != "up":
            cls = DrainingError if status.state == "draining" else NotLiveError
            raise cls(
                f"{cpid} cannot be claimed: its node reports state {status.state!r} "
                "(claims need 'up')",
                cpid=cpid,
                requested=units,
                free=0,
            )
        if allocated is None or held is None:
            self._trigger.set()
            bad = Keys.alloc(cpid) if allocated is None else Keys.holder(r.holder)
            raise ContentionError(
                f'{bad} does not hold {{"units": N}}; the reconciler rewrites it, retry shortly',
                cpid=cpid,
                requested=units,
                free=0,
            )
        if r.max_units is not None and held + units > r.max_units:
            raise QuotaExceededError(
                f"holder {r.holder} holds {held} units and may hold at most {r.max_units}; "
                f"{units} more would exceed its quota (release a claim, or use a token with "
                "a larger --max-units)",
                holder=r.holder,
                max_units=r.max_units,
                held=held,
                requested=units,
            )
        free = available_units(record, status, allocated)
        if units > free:
            raise InsufficientCapacityError(
                f"{cpid} has {free} units free ({allocated} claimed), {units} requested",
                cpid=cpid,
                requested=units,
                free=free,
            )

    def _status(self, entry: Entry, live: KV | None) -> tuple[Status | None, str]:
        """The verified status in ``live`` (under the record's key), or ``(None, why)``."""
        if live is None:
            return None, "it has no live status (its node is not heartbeating)"
        if entry.status is not None and entry.status_revision == live.mod_revision:
            return entry.status, ""
        key = entry.record.public_key
        cached = self._statuses.get(entry.cpid)
        if cached is not None and cached[0] == live.mod_revision and cached[1] == key:
            return cached[2], ""
        try:
            status = open_signed(Envelope.from_json(live.value), public_key=key, expected=Status)
        except InvalidDataError as exc:
            _log.warning(
                "status of %s (revision %d) ignored: %s", entry.cpid, live.mod_revision, exc
            )
            return None, f"its status does not verify under the record's key ({exc})"
        if status.cpid != entry.cpid:
            return None, f"its live key holds a status about {status.cpid}"
        if len(self._statuses) > _MAX_CACHED_KEYS:
            self._statuses.clear()
        self._statuses[entry.cpid] = (live.mod_revision, key, status)
        return status, ""

    async def _grant(self, requests: list[_Request]) -> None:
        """A lease (TTL ``ttl``) for each request, granted concurrently."""
        if not requests:
            return
        started = int(self._clock())
        leases = await asyncio.gather(
            *(self._index.grant_lease(r.ttl, revoke_on_exit=False) for r in requests),
            return_exceptions=True,
        )
        failed: BaseException | None = None
        for r, lease in zip(requests, leases, strict=True):
            if isinstance(lease, BaseException):
                failed = lease
            else:
                r.lease, r.started = lease, started
        if failed is not None:
            raise failed

    @staticmethod
    def _claim_of(cpid: str, r: _Request) -> Claim:
        assert r.lease is not None
        return Claim(
            r.claim_id,
            cpid,
            r.holder,
            r.units,
            created_at=r.started,
            expires_at=r.started + r.lease.ttl,
            lease=r.lease.id,
        )

    async def _commit(
        self,
        cpid: str,
        snap: _Snapshot,
        claims: list[Claim],
        allocated: int,
        held: dict[str, int],
    ) -> tuple[bool, _Snapshot]:
        """The claim transaction: ``(True, snap)`` when it committed, else ``(False, fresh)``.

        It compares the live key, ``/alloc/`` and the claiming holders' keys, and writes
        both totals and every claim key (each on its own lease).
        """
        live_key, alloc_key = Keys.live(cpid), Keys.alloc(cpid)
        writers = sorted({c.holder for c in claims})
        assert snap.live is not None
        new_alloc = units_json(allocated)
        new_held = {h: units_json(held[h]) for h in writers}
        try:
            result = await self._index.txn(
                compare=[
                    Cmp.mod_revision(live_key, "==", snap.live.mod_revision),
                    Cmp.mod_revision(alloc_key, "==", _rev(snap.alloc)),
                    *(
                        Cmp.mod_revision(Keys.holder(h), "==", _rev(snap.holders[h]))
                        for h in writers
                    ),
                ],
                success=[
                    Op.put(alloc_key, new_alloc),
                    *(Op.put(Keys.holder(h), new_held[h]) for h in writers),
                    *(Op.put(c.key, c.to_json(), lease=c.lease) for c in claims),
                    *(self.usage.meter_op(c) for c in claims if self.usage is not None),
                ],
                failure=self._reads(cpid, list(snap.holders)),
            )
        except RetrievalError:
            # the outcome is unknown: our claim keys (fresh random names) tell
            self._forget(alloc_key, *(Keys.holder(h) for h in writers))
            kv = await self._index.get(claims[0].key)
            if kv is None:
                raise
            _log.info("claims on %s: transaction outcome was unknown; they are in place", cpid)
            return True, snap
        if result.succeeded:
            self._remember(alloc_key, _written(alloc_key, new_alloc, snap.alloc, result.revision))
            for h in writers:
                key = Keys.holder(h)
                self._remember(key, _written(key, new_held[h], snap.holders[h], result.revision))
            return True, snap
        return False, self._snapshot(cpid, list(snap.holders), result.responses)

    def _dropped(self, r: _Request) -> bool:
        """True (and its lease revoked) when the requester went away before the commit."""
        if not r.future.done():
            return False
        self._revoke_later(r)
        return True

    def _settle(self, r: _Request, claim: Claim) -> None:
        if r.future.done():  # cancelled meanwhile: take the claim back
            _log.info("claim %s: the requester went away; releasing it", claim.claim_id)
            self._revoke_later(r)
            self._trigger.set()
            return
        r.lease = None  # the claim key owns it now
        r.future.set_result(claim)

    def _fail(self, r: _Request, exc: BaseException) -> None:
        if not r.future.done():
            r.future.set_exception(exc)
        self._revoke_later(r)

    def _revoke_later(self, r: _Request) -> None:
        lease, r.lease = r.lease, None
        if lease is not None:
            self._revoke_lease_later(lease.id)

    def _revoke_lease_later(self, lease_id: int) -> None:
        task = asyncio.create_task(self._revoke(lease_id), name=f"revoke {lease_id:x}")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- release and listing ----------------------------------------------------------

    async def release(self, claim_id: str, *, holder: str) -> Claim:
        """Release a claim of ``holder`` at once (one transaction), then revoke its lease.

        Raises InvalidClaimError (malformed id, 400), ClaimNotFoundError (404),
        ClaimForbiddenError (another holder's claim, 403), ContentionError (409).
        """
        try:
            claim = await self._release(claim_id, holder)
        except (InvalidDataError, RetrievalError) as exc:
            self.metrics.releases.labels(exc.code).inc()
            raise
        self.metrics.releases.labels("released").inc()
        return claim

    async def _release(self, claim_id: str, holder: str) -> Claim:
        """Delete one claim and give its units back (one transaction); a gang goes to
        :meth:`_release_gang`.  The claim has ended when this returns."""
        cpid = parse_claim_id(claim_id)
        claim_key, alloc_key = Keys.claim(cpid, claim_id), Keys.alloc(cpid)
        gang: Claim | None = None
        async with self._locks.hold(cpid):
            kv = await self._index.get(claim_key)
            for attempt in range(1, self.settings.max_attempts + 1):
                if kv is None:
                    raise ClaimNotFoundError(f"no claim {claim_id} (released, or expired)")
                try:
                    claim = Claim.from_kv(kv)
                except (ValueError, InvalidDataError) as exc:
                    raise ClaimNotFoundError(f"claim {claim_id} is unreadable: {exc}") from exc
                if claim.holder != holder:
                    raise ClaimForbiddenError(
                        f"claim {claim_id} belongs to another holder, not to {holder}"
                    )
                if claim.is_gang:
                    gang = claim
                    break
                holder_key = Keys.holder(claim.holder)
                alloc_kv, holder_kv = await self._pair(alloc_key, holder_key)
                ret = _return_units(
                    claim_key, kv, claim.units, (alloc_key, alloc_kv), (holder_key, holder_kv)
                )
                end = int(self._clock())  # its receipt, in the same transaction
                usage = await self.usage_parts(claim, end=end, reason="release")
                result = await self.usage_commit(
                    usage,
                    compare=ret.compare,
                    success=ret.success,
                    failure=[Op.get(claim_key), Op.get(alloc_key), Op.get(holder_key)],
                )
                if result.succeeded:
                    self._remember(
                        alloc_key, _written(alloc_key, ret.new_alloc, alloc_kv, result.revision)
                    )
                    self._remember(
                        holder_key, _written(holder_key, ret.new_held, holder_kv, result.revision)
                    )
                    if not ret.readable:
                        self._trigger.set()  # a total was unreadable: let the reconciler fix it
                    if claim.lease:
                        await self._revoke(claim.lease)
                    return dataclasses.replace(claim, revision=result.revision)
                self.metrics.retries.inc()
                got = [r.kvs[0] if r.kvs else None for r in result.responses]
                kv = got[0]
                self._remember(alloc_key, got[1])
                self._remember(holder_key, got[2])
                if attempt < self.settings.max_attempts:
                    await asyncio.sleep(self._backoff(attempt))
        if gang is not None:
            return await self._release_gang(gang, holder)
        raise ContentionError(
            f"release of {claim_id}: gave up after {self.settings.max_attempts} attempts lost "
            "to concurrent writers (retry)",
            cpid=cpid,
            requested=0,
            free=0,
        )

    async def _release_gang(self, anchor: Claim, holder: str) -> Claim:
        """Release a whole gang (every part in one transaction); the gang has ended when
        this returns.  ``anchor``: its anchor part as read."""
        whole = await self._remove_gang(anchor, holder=holder, expired_only=False)
        if whole is None:
            raise ClaimNotFoundError(f"no claim {anchor.claim_id} (released, or expired)")
        return whole

    async def _remove_gang(
        self, part: Claim, *, holder: str | None, expired_only: bool
    ) -> Claim | None:
        """Delete every part of the gang ``part`` belongs to and give their units back to
        each ``/alloc/`` total and the holder's total, in one transaction comparing all of
        those keys (that also writes the gang's usage receipt and deletes its meter);
        then revoke the gang's lease.  Returns the gang as a whole, or None
        when it is gone (or, with ``expired_only``, not past its ``expires_at``).

        Raises ClaimForbiddenError when ``holder`` is given and is not the gang's, and
        ContentionError when every attempt lost to concurrent writers.
        """
        claim_id = part.claim_id
        anchor_cpid = part.anchor
        if part.parts and part.cpid == anchor_cpid:
            anchor_kv_parts = part.parts
        else:
            kv = await self._index.get(Keys.claim(anchor_cpid, claim_id))
            if kv is None:
                return None
            try:
                anchor_kv_parts = Claim.from_kv(kv).parts
            except (ValueError, InvalidDataError):
                return None
        cpids = list(dict.fromkeys(c for c, _ in anchor_kv_parts)) or [anchor_cpid]
        claim_keys = [Keys.claim(c, claim_id) for c in cpids]
        alloc_keys = [Keys.alloc(c) for c in cpids]
        n = len(cpids)
        async with self._locks.hold_all(cpids):
            for attempt in range(1, self.settings.max_attempts + 1):
                holder_name = part.holder
                holder_key = Keys.holder(holder_name)
                got = await self._index.txn(
                    success=[*map(Op.get, claim_keys), *map(Op.get, alloc_keys), Op.get(holder_key)]
                )
                kvs = [r.kvs[0] if r.kvs else None for r in got.responses]
                part_kvs, alloc_kvs, holder_kv = kvs[:n], kvs[n : 2 * n], kvs[-1]
                parts: list[Claim] = []
                for kv in part_kvs:
                    if kv is not None:
                        with contextlib.suppress(ValueError, InvalidDataError):
                            parts.append(Claim.from_kv(kv))
                if not parts:
                    return None  # gone meanwhile (lease, release, another instance)
                first = next((p for p in parts if p.parts), parts[0])
                if holder is not None and first.holder != holder:
                    raise ClaimForbiddenError(
                        f"claim {claim_id} belongs to another holder, not to {holder}"
                    )
                if expired_only and not first.expired(self._clock()):
                    return None  # renewed meanwhile
                if first.holder != holder_name:  # a part names another holder: use its key
                    part = first
                    continue
                units = {p.cpid: p.units for p in parts}
                present = [i for i, kv in enumerate(part_kvs) if kv is not None]
                new_alloc = {
                    cpids[i]: units_json(
                        max(0, (read_units(alloc_kvs[i]) or 0) - units.get(cpids[i], 0))
                    )
                    for i in present
                }
                total = sum(units.values())
                new_held = units_json(max(0, (read_units(holder_kv) or 0) - total))
                readable = read_units(holder_kv) is not None and all(
                    read_units(alloc_kvs[i]) is not None for i in present
                )
                # the gang's receipt (one, listing its parts) in the same transaction
                end = first.expires_at if expired_only else int(self._clock())
                usage = await self.usage_parts(
                    first, end=end, reason="expiry" if expired_only else "release"
                )
                result = await self.usage_commit(
                    usage,
                    compare=[
                        *(
                            Cmp.mod_revision(claim_keys[i], "==", _rev(part_kvs[i]))
                            for i in range(n)
                        ),
                        *(
                            Cmp.mod_revision(alloc_keys[i], "==", _rev(alloc_kvs[i]))
                            for i in present
                        ),
                        Cmp.mod_revision(holder_key, "==", _rev(holder_kv)),
                    ],
                    success=[
                        *(Op.delete(claim_keys[i]) for i in present),
                        *(Op.put(alloc_keys[i], new_alloc[cpids[i]]) for i in present),
                        Op.put(holder_key, new_held),
                    ],
                )
                if not result.succeeded:
                    self.metrics.retries.inc()
                    self._forget(holder_key, *alloc_keys)
                    if attempt < self.settings.max_attempts:
                        await asyncio.sleep(self._backoff(attempt))
                    continue
                for i in present:
                    key = alloc_keys[i]
                    self._remember(
                        key, _written(key, new_alloc[cpids[i]], alloc_kvs[i], result.revision)
                    )
                self._remember(
                    holder_key, _written(holder_key, new_held, holder_kv, result.revision)
                )
                if not readable:
                    self._trigger.set()
                for lease in {p.lease for p in parts if p.lease}:
                    await self._revoke(lease)
                return dataclasses.replace(
                    first,
                    cpid=anchor_cpid,
                    units=first.gang_units or total,
                    parts=first.parts or tuple((p.cpid, p.units) for p in parts),
                    revision=result.revision,
                )
        raise ContentionError(
            f"removal of gang {claim_id}: gave up after {self.settings.max_attempts} attempts "
            "lost to concurrent writers (retry)",
            cpid=None,
            requested=0,
            free=0,
        )

    # -- renewal ----------------------------------------------------------------------

    async def renew(self, claim_id: str, *, holder: str, ttl_s: object) -> Claim:
        """Extend a claim of ``holder`` (one resource, or a whole gang): it then expires
        ``ttl_s`` seconds from now.  Its keys move to a new lease in one transaction, so
        the units are held throughout; the old lease is revoked afterwards.

        Raises InvalidClaimError (malformed id or ttl, 400), ClaimNotFoundError (gone or
        past its ``expires_at``, 404), ClaimForbiddenError (403), ContentionError (409).
        """
        s = self.settings
        if not isinstance(ttl_s, int) or isinstance(ttl_s, bool):
            raise InvalidClaimError(f"ttl_s must be an integer number of seconds, got {ttl_s!r}")
        if not 1 <= ttl_s <= s.max_ttl_s:
            raise InvalidClaimError(f"ttl_s must be between 1 and {s.max_ttl_s} s, got {ttl_s}")
        try:
            claim = await self._renew(claim_id, holder, ttl_s)
        except (InvalidDataError, RetrievalError) as exc:
            self.metrics.renewals.labels(exc.code).inc()
            raise
        self.metrics.renewals.labels("renewed").inc()
        return claim

    async def _renew(self, claim_id: str, holder: str, ttl: int) -> Claim:
        """Rewrite every key of the claim with the new ``expires_at`` on a new lease, in
        one transaction comparing each key unchanged (that also writes the receipt of
        the period ending now and moves the meter to the next); then revoke the old
        lease(s).  The claim is renewed (its previous term ended) when this returns."""
        anchor = parse_claim_id(claim_id)
        anchor_key = Keys.claim(anchor, claim_id)
        kv = await self._index.get(anchor_key)
        if kv is None:
            raise ClaimNotFoundError(f"no claim {claim_id} (released, or expired)")
        try:
            first = Claim.from_kv(kv)
        except (ValueError, InvalidDataError) as exc:
            raise ClaimNotFoundError(f"claim {claim_id} is unreadable: {exc}") from exc
        if first.holder != holder:
            raise ClaimForbiddenError(
                f"claim {claim_id} belongs to another holder, not to {holder}"
            )
        cpids = list(dict.fromkeys(c for c, _ in first.parts)) if first.parts else [anchor]
        keys = [Keys.claim(c, claim_id) for c in cpids]
        started = int(self._clock())
        lease: Lease | None = await self._index.grant_lease(ttl, revoke_on_exit=False)
        assert lease is not None
        try:
            async with self._locks.hold_all(cpids):
                for attempt in range(1, self.settings.max_attempts + 1):
                    got = await self._index.txn(success=[Op.get(k) for k in keys])
                    kvs = [r.kvs[0] if r.kvs else None for r in got.responses]
                    if any(kv is None for kv in kvs):
                        raise ClaimNotFoundError(f"no claim {claim_id} (released, or expired)")
                    try:
                        parts = [Claim.from_kv(kv) for kv in kvs if kv is not None]
                    except (ValueError, InvalidDataError) as exc:
                        raise ClaimNotFoundError(f"claim {claim_id} is unreadable: {exc}") from exc
                    now = self._clock()
                    if any(p.holder != holder for p in parts):
                        raise ClaimForbiddenError(
                            f"claim {claim_id} belongs to another holder, not to {holder}"
                        )
                    if any(p.expired(now) for p in parts):
                        raise ClaimNotFoundError(
                            f"claim {claim_id} expired at {min(p.expires_at for p in parts)}; "
                            "make a new claim"
                        )
                    expires_at = started + lease.ttl
                    renewed = [
                        dataclasses.replace(p, expires_at=expires_at, lease=lease.id) for p in parts
                    ]
                    # the period that ends now: its receipt, and the meter moved to the next
                    # period, in the transaction that rewrites the keys
                    usage = await self.usage_parts(
                        self._whole(parts),
                        end=started,
                        reason="renewal",
                        renew_until=expires_at,
                    )
                    try:
                        result = await self.usage_commit(
                            usage,
                            compare=[
                                Cmp.mod_revision(k, "==", kv.mod_revision)
                                for k, kv in zip(keys, kvs, strict=True)
                                if kv is not None
                            ],
                            success=[
                                Op.put(k, p.to_json(), lease=lease.id)
                                for k, p in zip(keys, renewed, strict=True)
                            ],
                        )
                    except RetrievalError:
                        back = await self._index.get(anchor_key)
                        if back is None or back.lease != lease.id:
                            raise
                        result = None
                    if result is None or result.succeeded:
                        new_lease, lease = lease, None  # the keys own it now
                        for old in {p.lease for p in parts if p.lease and p.lease != new_lease.id}:
                            await self._revoke(old)
                        return self._whole(renewed, revision=result.revision if result else 0)
                    self.metrics.retries.inc()
                    if attempt < self.settings.max_attempts:
                        await asyncio.sleep(self._backoff(attempt))
        finally:
            if lease is not None:
                self._revoke_lease_later(lease.id)
        raise ContentionError(
            f"renewal of {claim_id}: gave up after {self.settings.max_attempts} attempts lost "
            "to concurrent writers (retry)",
            cpid=anchor,
            requested=0,
            free=0,
        )

    @staticmethod
    def _whole(parts: list[Claim], *, revision: int = 0) -> Claim:
        """A claim as the API shows it: a single claim as is; a gang as one claim whose
        ``cpid`` is its anchor, ``units`` its total and ``parts`` every part."""
        first = next((p for p in parts if p.parts), parts[0])
        if not first.is_gang:
            return dataclasses.replace(first, revision=revision or first.revision)
        return dataclasses.replace(
            first,
            cpid=first.anchor,
            units=first.gang_units,
            parts=first.parts or tuple((p.cpid, p.units) for p in parts),
            revision=revision or first.revision,
        )

    async def list_claims(self, holder: str | None = None) -> list[Claim]:
        """Active claims (of ``holder``, or all), oldest first; a gang is one entry
        (:meth:`_whole`).  Reads every claim key."""
        kvs, _ = await self._index.get_prefix(Prefix.CLAIM)
        now = self._clock()
        out: list[Claim] = []
        gangs: dict[str, list[Claim]] = {}
        expired: list[Claim] = []
        for kv in kvs:
            try:
                c = Claim.from_kv(kv)
            except (ValueError, InvalidDataError):
                continue
            if c.expired(now):
                expired.append(c)
            elif holder is None or c.holder == holder:
                if c.is_gang:
                    gangs.setdefault(c.claim_id, []).append(c)
                else:
                    out.append(c)
        out.extend(self._whole(parts) for parts in gangs.values())
        if expired:
            self._purge_later(expired)
        out.sort(key=lambda c: (c.created_at, c.claim_id))
        return out

    # -- claims past their expires_at -------------------------------------------------

    async def _purge_refusal(self, cpid: str, refused: list[tuple[_Request, CPIError]]) -> bool:
        """Before refusing for capacity or quota: remove the claims on ``cpid`` (and, for a
        quota refusal, of the holder) whose ``expires_at`` has passed.  True when it looked
        (the totals must then be read again: a removal elsewhere may have raced the read)."""
        capacity = any(isinstance(e, InsufficientCapacityError) for _, e in refused)
        holders = {r.holder for r, e in refused if isinstance(e, QuotaExceededError)}
        if not capacity and not holders:
            return False
        prefix = Prefix.CLAIM if holders else Keys.claims(cpid)
        kvs, _ = await self._index.get_prefix(prefix)
        now = self._clock()
        stale: list[Claim] = []
        for kv in kvs:
            try:
                c = Claim.from_kv(kv)
            except (ValueError, InvalidDataError):
                continue
            if c.expired(now) and (c.cpid == cpid or c.holder in holders):
                stale.append(c)
        await self.purge_expired(stale)
        return True  # expired claims may have gone meanwhile (here or elsewhere): read again

    def _purge_later(self, claims: list[Claim]) -> None:
        task = asyncio.create_task(self._purge_quietly(claims), name="claims purge")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _purge_quietly(self, claims: list[Claim]) -> None:
        try:
            await self.purge_expired(claims)
        except RetrievalError as exc:
            _log.warning("removing expired claims failed (the reconciler retries): %s", exc)

    async def purge_expired(self, claims: list[Claim]) -> int:
        """Delete the claim keys of ``claims`` whose ``expires_at`` has passed, each in one
        transaction that also decreases ``/alloc/`` and ``/holders/`` (as a release does);
        returns how many were removed."""
        now = self._clock()
        removed = 0
        gangs: set[str] = set()
        for c in claims:
            if c.is_gang:
                if c.claim_id in gangs:
                    continue  # one removal takes every part
                gangs.add(c.claim_id)
            if c.expired(now) and await self._purge_one(c):
                removed += 1
        return removed

    async def _purge_one(self, claim: Claim) -> bool:
        """Remove one claim past its ``expires_at`` whose key remained (a gang: all its
        parts, :meth:`_purge_gang`).  The claim has ended when this returns True."""
        if claim.is_gang:
            return await self._purge_gang(claim)
        claim_key, alloc_key = claim.key, Keys.alloc(claim.cpid)
        holder_key = Keys.holder(claim.holder)
        async with self._locks.hold(claim.cpid):
            for _ in range(self.settings.max_attempts):
                meter_key = Keys.meter(claim.claim_id)
                result = await self._index.txn(
                    success=[
                        Op.get(claim_key),
                        Op.get(alloc_key),
                        Op.get(holder_key),
                        Op.get(meter_key),
                    ]
                )
                kv, alloc_kv, holder_kv, meter_kv = (
                    r.kvs[0] if r.kvs else None for r in result.responses
                )
                if kv is None:
                    return False  # gone meanwhile (lease, release, another instance)
                try:
                    current = Claim.from_kv(kv)
                except (ValueError, InvalidDataError):
                    return False
                if not current.expired(self._clock()):
                    return False  # re-written with a later expiry
                ret = _return_units(
                    claim_key, kv, current.units, (alloc_key, alloc_kv), (holder_key, holder_kv)
                )
                usage = await self.usage_parts(  # its receipt, ending at expires_at
                    current, end=current.expires_at, reason="expiry", meter=meter_kv
                )
                done = await self.usage_commit(usage, compare=ret.compare, success=ret.success)
                self._forget(alloc_key, holder_key)
                if not done.succeeded:
                    self.metrics.retries.inc()
                    continue
                if not ret.readable:
                    self._trigger.set()
                _log.info(
                    "claim %s of %s expired at %d but its key remained (a lease re-armed by an "
                    "etcd restart?); removed it and returned its %d units",
                    current.claim_id,
                    current.holder,
                    current.expires_at,
                    current.units,
                )
                if current.lease:
                    await self._revoke(current.lease)
                return True
        return False

    async def _purge_gang(self, part: Claim) -> bool:
        """Remove a gang past its ``expires_at`` (every part, one transaction)."""
        try:
            whole = await self._remove_gang(part, holder=None, expired_only=True)
        except ContentionError:
            return False  # the next pass tries again
        if whole is None:
            return False
        _log.info(
            "gang %s of %s expired at %d but its keys remained (a lease re-armed by an etcd "
            "restart?); removed its %d parts and returned its %d units",
            whole.claim_id,
            whole.holder,
            whole.expires_at,
            len(whole.parts),
            whole.units,
        )
        return True

    # -- reconciliation ---------------------------------------------------------------

    async def reconcile(self) -> ReconcileReport:
        """One pass: set every ``/alloc/`` and ``/holders/`` total that differs from the
        sum of the live claim keys (read at one revision) with a compare-and-put."""
        rev = await self._index.revision()
        claims, _ = await self._index.get_prefix(Prefix.CLAIM, revision=rev)
        allocs, _ = await self._index.get_prefix(Prefix.ALLOC, revision=rev)
        holders, _ = await self._index.get_prefix(Prefix.HOLDERS, revision=rev)
        by_cpid: Tally[str] = Tally()
        by_holder: Tally[str] = Tally()
        for kv in claims:
            try:
                c = Claim.from_kv(kv)
            except (ValueError, InvalidDataError) as exc:
                _log.warning("claims reconciler: ignoring unreadable claim %s: %s", kv.key, exc)
                continue
            by_cpid[c.cpid] += c.units
            by_holder[c.holder] += c.units
        fixed: list[str] = []
        allocs = await self._drop_leftover_allocs(allocs, by_cpid, fixed)
        lost = 0
        for collection, kvs, want, key_of in (
            ("alloc", allocs, by_cpid, Keys.alloc),
            ("holders", holders, by_holder, Keys.holder),
        ):
            current: dict[str, KV] = {}
            for kv in kvs:
                try:
                    current[parse_key(kv.key).name] = kv
                except ValueError:
                    _log.warning("claims reconciler: ignoring %s (not a key of the layout)", kv.key)
            for name in sorted(set(current) | set(want)):
                cur = current.get(name)
                have, target = read_units(cur), want.get(name, 0)
                if have == target or (cur is None and target == 0):
                    continue
                key = key_of(name)
                value = units_json(target)
                res = await self._index.compare_and_put(key, value, mod_revision=_rev(cur))
                if not res.succeeded:
                    lost += 1
                    self._forget(key)
                    _log.debug("claims reconciler: %s changed meanwhile; next pass", key)
                    continue
                self._remember(key, _written(key, value, cur, res.revision))
                self.metrics.reconciled.labels(collection).inc()
                was = "absent" if cur is None else ("unreadable" if have is None else str(have))
                fixed.append(f"{key}: {was} -> {target}")
                _log.info(
                    "claims reconciler: %s said %s units, its live claims sum to %d; corrected "
                    "(claims expired or were lost with a crashed writer)",
                    key,
                    was,
                    target,
                )
        await self._purge_listed(claims)
        await self._close_orphan_meters(rev, claims)
        self.passes += 1
        return ReconcileReport(rev, len(claims), fixed, lost)

    async def _drop_leftover_allocs(
        self, allocs: list[KV], claimed: Tally[str], fixed: list[str]
    ) -> list[KV]:
        """Delete the ``/alloc/`` keys of resources whose record is gone and that no claim
        key names (a release leaves ``{"units": 0}``, an expiry a total the reconciler
        would lower), each in a transaction comparing it unchanged and the record absent
        (a claim in flight writes ``/alloc/``, so it fails that compare, or ours fails).
        Returns the ``allocs`` still in place; adds ``"<key>: <was> -> 0"`` to ``fixed``
        for each removed (an absent total reads as 0)."""
        kept: list[KV] = []
        for kv in allocs:
            try:
                cpid = parse_key(kv.key).name
            except ValueError:
                kept.append(kv)
                continue
            if claimed.get(cpid) or self._resolver.get(cpid) is not None:
                kept.append(kv)
                continue
            result = await self._index.txn(
                compare=[
                    Cmp.mod_revision(kv.key, "==", kv.mod_revision),
                    Cmp.version(Keys.rec(cpid), "==", 0),
                ],
                success=[Op.delete(kv.key)],
            )
            if not result.succeeded:
                kept.append(kv)
                continue
            self._forget(kv.key)
            self.metrics.reconciled.labels("alloc").inc()
            have = read_units(kv)
            fixed.append(f"{kv.key}: {'unreadable' if have is None else have} -> 0")
            _log.info(
                "claims reconciler: removed %s (%r): its record is gone and no claim names it",
                kv.key,
                kv.value[:64],
            )
        return kept

    # -- usage receipts (resolver/claims/usage.py) -------------------------------------

    async def usage_parts(
        self,
        claim: Claim,
        *,
        end: int,
        reason: Reason,
        meter: KV | Literal["read"] | None = "read",
        renew_until: int | None = None,
    ) -> UsageParts:
        """The parts that write the receipt of ``claim``'s current period (ending at
        ``end``) in the caller's transaction; empty when the service has no usage key or
        the claim no meter.  A renewal passes ``reason="renewal"`` and ``renew_until``
        (the new ``expires_at``): the meter moves to the next period.  Run the
        transaction with :meth:`usage_commit`."""
        if self.usage is None:
            return NO_RECEIPT
        return await self.usage.parts(
            claim.claim_id,
            end=end,
            reason=reason,
            meter=meter,
            renew_until=renew_until,
            expires_at=claim.expires_at,
        )

    async def usage_commit(
        self,
        parts: UsageParts | Sequence[UsageParts],
        *,
        compare: Sequence[Cmp] = (),
        success: Sequence[Op] = (),
        failure: Sequence[Op] = (),
    ) -> TxnResult:
        """The caller's transaction plus ``parts`` (one, or one per part of a claim ended
        at once) and each receipt's audit entry, in one etcd transaction (a plain one
        without a receipt).  ``responses`` are the caller's ``success`` ops first, or
        its ``failure`` ops when any compare failed."""
        if self.usage is None:
            return await self._index.txn(compare=compare, success=success, failure=failure)
        return await self.usage.commit(parts, compare=compare, success=success, failure=failure)

    async def _close_orphan_meters(self, rev: int, claims: list[KV]) -> None:
        """Receipts for meters whose claim key is gone at ``rev``: etcd deleted it when
        its lease ran out (perhaps while no resolver ran); ``end`` is the meter's
        ``expires_at`` (or now, if earlier: a lease revoked before its time)."""
        if self.usage is None:
            return
        meters, _ = await self._index.get_prefix(Prefix.METER, revision=rev)
        live = {kv.key for kv in claims}
        for kv in meters:
            try:
                m = Meter.from_json(kv.value)
                claim_key = Keys.claim(m.cpid, m.claim_id)
            except ValueError as exc:
                _log.warning("claims reconciler: ignoring unreadable meter %s: %s", kv.key, exc)
                continue
            if claim_key in live or kv.key != Keys.meter(m.claim_id):
                continue
            parts = await self.usage.parts(
                m.claim_id, end=int(self._clock()), reason="expiry", meter=kv
            )
            result = await self.usage.commit(parts, compare=[Cmp.version(claim_key, "==", 0)])
            if result.succeeded and parts.receipt is not None:
                _log.info(
                    "claims reconciler: claim %s of %s ended with its lease; wrote its usage "
                    "receipt %d",
                    m.claim_id,
                    m.holder,
                    m.n,
                )

    def _on_event(self, event: Event) -> None:
        """A record no longer served (deregistered, ...): a pass removes its ``/alloc/``."""
        if event.type == "delete":
            self._trigger.set()

    async def _purge_listed(self, kvs: list[KV]) -> None:
        """Remove the listed claims past their ``expires_at`` (the totals above counted
        their keys; each removal decreases them with the key)."""
        now = self._clock()
        stale: list[Claim] = []
        for kv in kvs:
            with contextlib.suppress(ValueError, InvalidDataError):
                c = Claim.from_kv(kv)
                if c.expired(now):
                    stale.append(c)
        if stale:
            await self.purge_expired(stale)

    def trigger_reconcile(self) -> None:
        """Ask for a reconciliation pass soon (after ``reconcile_delay_s``)."""
        self._trigger.set()

    async def _reconcile_loop(self) -> None:
        s = self.settings
        while True:
            try:
                await self.reconcile()
            except RetrievalError as exc:
                _log.warning("claims reconciliation failed (retried): %s", exc)
            except Exception:
                _log.exception("claims reconciliation failed")
            await self._maybe_prune()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(s.reconcile_interval_s):
                    await self._trigger.wait()
                    await asyncio.sleep(s.reconcile_delay_s)
            self._trigger.clear()

    async def _maybe_prune(self) -> None:
        now = self._clock()
        if now - self._last_prune < self.settings.token_prune_interval_s:
            return
        self._last_prune = now
        try:
            removed = await claim_tokens.prune(self._index)
        except RetrievalError as exc:
            _log.warning("claims token pruning failed: %s", exc)
            return
        if removed:
            _log.info("pruned %d claims tokens expired for over a day", removed)

    async def _watch_claims(self) -> None:
        """Trigger a pass whenever a claim key is deleted (expiry, or a release elsewhere)."""
        while True:
            try:
                start = await self._index.revision() + 1
                self._trigger.set()  # whatever happened before this watch starts
                async with self._index.watch_prefix(
                    Prefix.CLAIM, start_revision=start, prev_kv=False
                ) as watch:
                    async for item in watch:
                        if isinstance(item, Compacted) or item.type == "delete":
                            self._trigger.set()
            except RetrievalError as exc:
                _log.warning("claims watch failed (restarting): %s", exc)
                await asyncio.sleep(1.0)

    # -- etcd helpers -----------------------------------------------------------------

    @staticmethod
    def _reads(cpid: str, holders: list[str]) -> list[Op]:
        return [Op.get(Keys.live(cpid)), Op.get(Keys.alloc(cpid))] + [
            Op.get(Keys.holder(h)) for h in holders
        ]

    def _snapshot(self, cpid: str, holders: list[str], responses: list[Any]) -> _Snapshot:
        """A fresh snapshot from the answers to :meth:`_reads` (and remember the keys)."""
        kvs = [r.kvs[0] if r.kvs else None for r in responses]
        snap = _Snapshot(kvs[0], kvs[1], dict(zip(holders, kvs[2:], strict=True)), fresh=True)
        self._remember(Keys.live(cpid), snap.live)
        self._remember(Keys.alloc(cpid), snap.alloc)
        for h, kv in snap.holders.items():
            self._remember(Keys.holder(h), kv)
        return snap

    async def _read(self, cpid: str, holders: list[str]) -> _Snapshot:
        """The keys at one revision (one round trip)."""
        result = await self._index.txn(success=self._reads(cpid, holders))
        return self._snapshot(cpid, holders, result.responses)

    async def _pair(self, a: str, b: str) -> tuple[KV | None, KV | None]:
        if a in self._known and b in self._known:
            return self._known[a], self._known[b]
        result = await self._index.txn(success=[Op.get(a), Op.get(b)])
        kvs = [r.kvs[0] if r.kvs else None for r in result.responses]
        self._remember(a, kvs[0])
        self._remember(b, kvs[1])
        return kvs[0], kvs[1]

    def _cached(self, cpid: str, holders: list[str]) -> _Snapshot | None:
        """A snapshot from remembered keys (not fresh), or None when one is unknown."""
        known = self._known
        keys = [Keys.live(cpid), Keys.alloc(cpid), *(Keys.holder(h) for h in holders)]
        if not all(k in known for k in keys):
            return None
        return _Snapshot(
            known[keys[0]],
            known[keys[1]],
            {h: known[k] for h, k in zip(holders, keys[2:], strict=True)},
            fresh=False,
        )

    def _remember(self, key: str, kv: KV | None) -> None:
        if len(self._known) >= _MAX_CACHED_KEYS:
            self._known.clear()
        self._known[key] = kv

    def _forget(self, *keys: str) -> None:
        for k in keys:
            self._known.pop(k, None)

    def _backoff(self, attempt: int) -> float:
        s = self.settings
        return self._rng.uniform(0, min(s.retry_backoff_max_s, s.retry_backoff_s * 2**attempt))

    async def _revoke(self, lease_id: int) -> None:
        try:
            await self._index.revoke_lease(lease_id)
        except RetrievalError as exc:  # it expires by itself
            _log.debug("revoking lease %x failed (it expires by itself): %s", lease_id, exc)
