"""The replica's state: what the index holds, what verified, what is served.  No I/O.

:class:`ReplicaState` is fed key changes (:class:`Change`, from a listing or a watch),
one etcd revision at a time, through :meth:`ReplicaState.apply`; the clock drives
:meth:`ReplicaState.sweep`.  Both return the resulting :class:`~resolver.events.Event`
group and append it to the event ring.  Verification is the only expensive step;
it is handed to a runner (inline or a process pool, :mod:`resolver.verify`) and
awaited, which is the only place either method yields to the event loop.  Lookups in
the meantime see the state as it was before the batch: an entry is replaced only
after everything it depends on has been checked.

What is kept per collection (docs/protocol.md §6):

* ``/certs/``, ``/revoked/``: envelopes as stored; the chain of each signing key is
  verified once (:func:`resolver.signers.verify_signer`) and re-verified when a cert or
  revocation changes or a validity window closes;
* ``/rec/``: every record, served or not, with the outcome of its verification by
  :func:`schemas.chain.verify_record_prepared` (once per revision; again only when its
  chain's verdict changes, a revocation names its key, or its validity window closes);
* ``/live/``: statuses, verified under the record's key before use;
* ``/alloc/``, ``/claim/``: claimed units per CPID and the claims themselves;
* ``/ns/``: namespace entries (unsigned; shown with whether their key's chain verifies).

The index is not trusted input (docs/resolver.md, "Bad values"): a value that cannot be
read (not JSON, nested too deep, not a DSSE envelope, the wrong shape) or whose handling
raises costs that key alone.  It is filed in :attr:`ReplicaState.bad` by etcd key
(counted and logged once per key and revision), the key is treated as absent, and the
entry is cleared when the key is deleted or overwritten with a readable value.  No
exception a value can cause leaves :meth:`ReplicaState.apply`, so a bad value never
makes the replica list the index again.
"""

from __future__ import annotations

import contextlib
import functools
import heapq
import json
import logging
import math
import sys
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Generic, Literal, TypeVar, overload

from registry.index.layout import Prefix, parse_key, read_units
from resolver.discovery import DiscoveryIndex, LatencyTable
from resolver.entry import NODE_KID, Entry, Sealed, seal, with_keyid
from resolver.events import Event, EventLog
from resolver.sealed import Packed
from resolver.signers import SignerVerdict, label_of, pending_revocation, verify_signer
from resolver.verify import (
    NO_CHAIN,
    NO_ENVELOPE,
    Context,
    Job,
    Outcome,
    RecordFacts,
    StatusFacts,
    run_jobs,
)
from schemas import _json
from schemas import keys as _keys
from schemas.chain import CLOCK_SKEW, TrustAnchors
from schemas.dsse import Envelope
from schemas.errors import EnvelopeError, InvalidDataError

__all__ = [
    "BadValue",
    "Change",
    "MassExpiry",
    "NamespaceInfo",
    "ReplicaSettings",
    "ReplicaState",
    "Restored",
    "Runner",
    "node_key",
]

_log = logging.getLogger("resolver.replica")
_T = TypeVar("_T")
_V = TypeVar("_V")

UNREADABLE_ALLOC: Final = 1 << 30
"""Claimed units assumed when an ``/alloc/`` value cannot be read (nothing is free)."""

Runner = Callable[[Context, Sequence[Job]], AsyncIterator[list[Outcome]]]
"""Verifies a batch of jobs (:meth:`resolver.verify.Verifier.run`): yields outcome lists
that, concatenated, follow the jobs."""


@dataclass(frozen=True, slots=True)
class Change:
    """One key change: a put (value, its ``mod_revision`` and lease) or a delete."""

    type: Literal["put", "delete"]
    key: str
    value: bytes = b""
    revision: int = 0
    lease: int = 0
    envelope: Envelope | None = None
    """A ``/rec/`` or ``/live/`` value already parsed (a snapshot, :mod:`resolver.snapshot`):
    used instead of ``value``."""


Profile = tuple[str, str, tuple[str, ...], tuple[tuple[str, str], ...], bool]
"""A record's kind, region, accelerator models, labels and whether its payload is
canonical (:attr:`~resolver.verify.RecordFacts.canonical`): what many records repeat."""


@dataclass(frozen=True, slots=True)
class Restored:
    """Records (and their statuses) as :meth:`ReplicaState.restore` takes them from a
    snapshot: columns of equal length, one row per record; what repeats is an index
    into a table.  A row without a status has None in the status columns."""

    cpids: list[str]
    revisions: list[int]
    forms: list[int]  # index into form_table
    kids: list[int]  # index into kid_table
    blobs: list[bytes]
    versions: list[int]
    expires_at: list[int]
    profiles: list[int]  # index into profile_table
    status_revisions: list[int | None]
    leases: list[int | None]
    status_forms: list[int | None]  # index into form_table
    status_kids: list[str | None]  # a key id, or NODE_KID's text
    status_blobs: list[bytes | None]
    states: list[int | None]  # index into state_table
    accelerators_free: list[int | None]
    cpu_free: list[int | None]
    withheld: list[int | None]
    form_table: list[tuple[str, bool]]  # payload type, compressed (Packed)
    kid_table: list[str]
    profile_table: list[Profile]
    state_table: list[str]

    def __len__(self) -> int:
        return len(self.cpids)


@dataclass(frozen=True, slots=True)
class BadValue:
    """An etcd key whose value the replica cannot use (docs/resolver.md, "Bad values")."""

    key: str
    prefix: str  # the collection: rec, live, alloc, certs, revoked, ns, claim
    revision: int
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "prefix": self.prefix,
            "revision": self.revision,
            "detail": self.detail,
        }


_DETAIL_MAX: Final = 200
"""Longest detail kept (and logged) for a bad value: messages may quote the value."""


def describe_bad_value(exc: BaseException, limit: int = _DETAIL_MAX) -> str:
    """What is wrong with a value, from what reading it raised (at most *limit* characters)."""
    text = str(exc) or type(exc).__name__
    if not isinstance(exc, EnvelopeError | InvalidDataError | ValueError):
        text = f"{type(exc).__name__}: {text}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


_describe = describe_bad_value


def claim_problem(value: bytes) -> str:
    """Why a ``/claim/`` value is not a claim (what :class:`resolver.claims.model.Claim`
    reads), or ''."""
    obj = _json.loads(value)
    if not isinstance(obj, dict):
        return f"a claim must be a JSON object, got {type(obj).__name__}"
    units = obj.get("units")
    if not isinstance(units, int) or isinstance(units, bool) or units < 1:
        return "claim units must be a positive integer"
    if not isinstance(obj.get("holder"), str):
        return "claim holder must be a string"
    return ""


@dataclass(frozen=True, slots=True)
class ReplicaSettings:
    """Tunables of the replica (see ``docs/resolver.md``)."""

    mass_expiry_threshold: float = 0.5
    mass_expiry_min_live: int = 4
    mass_expiry_window_s: float = 10.0
    mass_expiry_hold_s: float = 300.0
    skew: int = CLOCK_SKEW


@dataclass(frozen=True, slots=True)
class NamespaceInfo:
    """A ``/cpi/v1/ns/<prefix>`` entry and whether its key's chain verifies."""

    prefix: str
    kid: str
    endpoints: tuple[str, ...]
    revision: int
    verified: bool


@dataclass(slots=True)
class MassExpiry:
    """A namespace under mass-expiry protection."""

    namespace: str
    since: float
    until: float
    disappeared: int
    live_before: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "namespace": self.namespace,
            "since": int(self.since),
            "until": int(self.until),
            "disappeared": self.disappeared,
            "live_before": self.live_before,
        }


class _Rare(Generic[_V]):
    """An attribute that settled objects leave at its default (an error, a reason a
    record is not served, a value not parsed yet): kept in the object's ``note`` dict,
    which exists only while some rare attribute is set.  A million served records then
    carry one empty slot instead of five."""

    __slots__ = ("default", "name")

    def __init__(self, default: _V) -> None:
        self.default = default
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, obj: None, owner: type) -> _Rare[_V]: ...
    @overload
    def __get__(self, obj: _Noted, owner: type) -> _V: ...
    def __get__(self, obj: _Noted | None, owner: type) -> _V | _Rare[_V]:
        if obj is None:
            return self
        note = obj.note
        if note is None:
            return self.default
        return note.get(self.name, self.default)  # type: ignore[no-any-return]

    def __set__(self, obj: _Noted, value: _V) -> None:
        note = obj.note
        if value is self.default or value == self.default:
            if note is not None:
                note.pop(self.name, None)
                if not note:
                    obj.note = None
        elif note is None:
            obj.note = {self.name: value}
        else:
            note[self.name] = value


class _Noted:
    __slots__ = ("note",)

    def __init__(self) -> None:
        self.note: dict[str, Any] | None = None


class _Rec(_Noted):
    """One ``/rec/`` key and what its verification found."""

    __slots__ = ("cpid", "facts", "revision", "sealed", "valid_until")

    error = _Rare("")  # why the value is not an envelope
    reason = _Rare("")  # why it is not served ("pending" until decided; "" when served)
    detail = _Rare("")
    counted = _Rare("")  # reason already counted and logged for this revision
    raw: _Rare[bytes | None] = _Rare(None)  # the value, while a bulk load has not parsed it

    def __init__(
        self,
        cpid: str,  # the CPID in the key
        revision: int,
        sealed: Sealed | None,
        error: str = "",
        *,
        facts: RecordFacts | None = None,  # set once it verified
        reason: str = "pending",
        valid_until: float = math.inf,
        raw: bytes | None = None,
    ) -> None:
        super().__init__()
        self.cpid = cpid
        self.revision = revision
        self.sealed = sealed
        self.facts = facts
        self.valid_until = valid_until
        if error:
            self.error = error
        if reason:
            self.reason = reason
        if raw is not None:
            self.raw = raw

    @property
    def signer(self) -> str:
        return self.sealed.keyid if self.sealed is not None else ""

    @property
    def envelope(self) -> Envelope | None:
        return None if self.sealed is None else self.sealed.envelope()


class _Live(_Noted):
    """One ``/live/`` key and its verification."""

    __slots__ = ("checked", "facts", "lease", "revision", "sealed")

    error = _Rare("")
    reason = _Rare("")
    counted = _Rare(False)
    raw: _Rare[bytes | None] = _Rare(None)  # the value, while a bulk load has not parsed it

    def __init__(
        self,
        revision: int,
        lease: int,
        sealed: Sealed | None,
        error: str = "",
        *,
        facts: StatusFacts | None = None,  # set once verified under ``checked``
        checked: RecordFacts | None = None,  # the record it was checked against (identity)
        raw: bytes | None = None,
    ) -> None:
        super().__init__()
        self.revision = revision
        self.lease = lease
        self.sealed = sealed
        self.facts = facts
        self.checked = checked
        if error:
            self.error = error
        if raw is not None:
            self.raw = raw

    @property
    def envelope(self) -> Envelope | None:
        return None if self.sealed is None else self.sealed.envelope()

    @property
    def stored(self) -> Envelope | bytes | None:
        """What a verification job gets: the envelope (a key id held as
        :data:`~resolver.entry.NODE_KID` given as none: the job has one key), or the
        value not parsed yet."""
        raw = self.raw
        if raw is not None:
            return raw
        st = self.sealed
        if st is None:
            return None
        env = st.envelope()
        return with_keyid(env, "") if st.keyid is NODE_KID else env

    @property
    def token(self) -> Sealed | bytes | None:
        """What :attr:`stored` is made from (compared by identity: unchanged since)."""
        raw = self.raw
        return self.sealed if raw is None else raw


_new = object.__new__


def _served_rec(
    cpid: str, revision: int, sealed: Sealed, facts: RecordFacts, valid_until: float
) -> _Rec:
    """A :class:`_Rec` that verified and is served (a third of the constructor's cost:
    a warm start makes one per record)."""
    rs: _Rec = _new(_Rec)
    rs.note = None
    rs.cpid = cpid
    rs.revision = revision
    rs.sealed = sealed
    rs.facts = facts
    rs.valid_until = valid_until
    return rs


def _verified_live(
    revision: int, lease: int, sealed: Sealed, facts: StatusFacts, checked: RecordFacts
) -> _Live:
    """A :class:`_Live` verified against ``checked`` (as :func:`_served_rec`)."""
    lv: _Live = _new(_Live)
    lv.note = None
    lv.revision = revision
    lv.lease = lease
    lv.sealed = sealed
    lv.facts = facts
    lv.checked = checked
    return lv


@dataclass(slots=True)
class _Batch:
    """What one apply/sweep touched."""

    revision: int
    now: int
    dirty_recs: set[str] = field(default_factory=set)
    dirty_lives: set[str] = field(default_factory=set)
    touched: dict[str, Entry | None] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)
    live_deleted: list[tuple[str, _Live]] = field(default_factory=list)
    rec_deleted: set[str] = field(default_factory=set)
    bulk: bool = False  # records are parsed by the verification jobs (see _put_rec)
    emit: bool = True  # False: the first listing (no events; entries built as verified)
    built: set[str] = field(default_factory=set)  # entries already final in this batch


_REC: Final = str(Prefix.REC)
_NO_ALLOC: Final = (0, 0)
_BULK: Final = 2000
"""Batches with at least this many changes leave record envelopes to the verification
jobs to parse (``raw`` jobs, :mod:`resolver.verify`): in worker processes, in parallel."""


_SERIAL: Final = 12


def _serial_of(cpid: str) -> str:
    """The serial part of a CPID in a key (``.../GPU.<serial>-<check>``), or ''."""
    return cpid.rpartition(".")[2].rpartition("-")[0]


def node_key(rs: _Rec) -> str:
    """The node's public key (b64url) in ``rs``'s verified record payload (what a status
    is checked with; the replica does not keep it beside the payload)."""
    assert rs.sealed is not None
    key = json.loads(rs.sealed.payload)["public_key"]
    assert isinstance(key, str)
    return key


def _namespace_of(cpid: str) -> str:
    return cpid.partition("/")[0]


class _Deadlines:
    """When records must be decided again (validity windows, retries): CPIDs bucketed by
    whole second, the seconds in a heap.  Records issued together expire together, so a
    million deadlines cost about a list slot each rather than a tuple, a float and an int.

    A bucket comes due at its second, up to a second before the deadlines in it: the
    caller checks each record and pushes back those not yet due."""

    def __init__(self) -> None:
        self._heap: list[int] = []
        self._at: dict[int, list[str]] = {}

    def push(self, when: float, cpid: str) -> None:
        sec = math.floor(when)
        bucket = self._at.get(sec)
        if bucket is None:
            self._at[sec] = [cpid]
            heapq.heappush(self._heap, sec)
        else:
            bucket.append(cpid)

    def due(self, now: float) -> list[str]:
        """Every CPID of the buckets whose second has come (removed)."""
        out: list[str] = []
        while self._heap and self._heap[0] <= now:
            out += self._at.pop(heapq.heappop(self._heap))
        return out

    def __len__(self) -> int:
        return sum(len(b) for b in self._at.values())


class _SerialFilter:
    """The serials of the records ever held, as a bit set of their hashes (4 MB): "no"
    is certain, "maybe" is wrong for ~3 % of unknown serials at a million records.
    Bits are never cleared (a record deleted only costs a needless pass later)."""

    _BITS: Final = 1 << 25

    def __init__(self) -> None:
        self._bits = bytearray(self._BITS // 8)

    def add(self, serial: str) -> None:
        h = hash(serial) & (self._BITS - 1)
        self._bits[h >> 3] |= 1 << (h & 7)

    def update(self, serials: Iterable[str]) -> None:
        bits, mask = self._bits, self._BITS - 1
        for serial in serials:
            h = hash(serial) & mask
            bits[h >> 3] |= 1 << (h & 7)

    def __contains__(self, serial: object) -> bool:
        h = hash(serial) & (self._BITS - 1)
        return bool(self._bits[h >> 3] & (1 << (h & 7)))


class _Shared:
    """One object for each value that many entries repeat (kinds, regions, payload types,
    signing key ids, accelerator and label tuples): a million records hold a few hundred
    distinct ones, and each copy would cost 50-300 bytes.  Verification results come from
    worker processes as fresh objects; the replica keeps these instead."""

    _MAX: Final = 200_000

    def __init__(self) -> None:
        self._values: dict[object, object] = {}

    def get(self, value: _T) -> _T:
        got = self._values.get(value)
        if got is None:
            if len(self._values) >= self._MAX:  # hostile variety: stop sharing, stay bounded
                return value
            self._values[value] = got = value
        return got  # type: ignore[return-value]

    def labels(self, labels: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
        got = self._values.get(labels)
        if got is None:
            return self.get(tuple(self.get((sys.intern(k), self.get(v))) for k, v in labels))
        return got  # type: ignore[return-value]

    def seal(self, env: Envelope | Sealed, *, keyids: bool = True) -> Sealed:
        """``env`` held compactly (:class:`~resolver.sealed.Sealed`) with its payload type
        (and key id) shared.  ``keyids=False`` for statuses: each is signed by its own
        node's key.  A sealed envelope (from a worker) is kept, its strings swapped."""
        if isinstance(env, Sealed):
            env.payload_type = self.get(env.payload_type)
            if keyids:
                env.keyid = self.get(env.keyid)
            return env
        if not env.signatures:
            return seal(env)
        return seal(
            env,
            payload_type=self.get(env.payload_type),
            keyid=self.get(env.signatures[0].keyid) if keyids else None,
        )

    def record_facts(self, f: RecordFacts, cpid: str) -> RecordFacts:
        """``f`` filed: strings shared, and without the node's public key (``""``), which
        the payload holds; a copy per record cost 92 bytes (:func:`node_key`)."""
        return RecordFacts(
            cpid,  # the key's text: the canonical form of the payload's (case may vary)
            self.get(f.kind),
            "",
            f.version,
            f.expires_at,
            self.get(f.region),
            self.get(tuple(self.get(a) for a in f.accelerators)),
            self.labels(f.labels),
            f.canonical,
        )

    def status_facts(self, f: StatusFacts) -> StatusFacts:
        """``f`` filed: its CPID was checked against the live key, so it is dropped
        (``""``) and the facts shared among equal ones (a few thousand distinct state /
        free / CPU / withheld combinations for a million statuses, ~70 bytes each)."""
        return self.get(
            StatusFacts("", self.get(f.state), f.accelerators_free, f.cpu_free, f.withheld)
        )


class ReplicaState:
    """The verified replica.  Feed it changes; read :attr:`served` and :attr:`discovery`.

    ``served`` maps canonical CPIDs to :class:`Entry`; nothing else is ever served.
    """

    def __init__(
        self,
        *,
        anchors: TrustAnchors,
        latency: LatencyTable | None = None,
        settings: ReplicaSettings | None = None,
        log: EventLog | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.anchors = anchors
        self.settings = settings or ReplicaSettings()
        self.log = log or EventLog()
        self.clock = clock
        self.listeners: list[Callable[[Event], None]] = []
        self._empty(latency or LatencyTable())

    def reset(self) -> None:
        """Forget everything held, as a new replica (the trust anchors, settings, event
        log, clock, latency table and listeners stay): what a warm start that could not
        be completed leaves behind before the index is listed."""
        self._empty(self.discovery.table)

    def _empty(self, latency: LatencyTable) -> None:
        self.served: dict[str, Entry] = {}
        self.discovery = DiscoveryIndex(self.served, latency)
        self.revision = 0
        self.generation = 0
        self.certs: dict[str, tuple[Envelope, int]] = {}
        self.revocations: dict[str, tuple[Envelope, int]] = {}
        self.ns: dict[str, tuple[str, tuple[str, ...], int]] = {}
        self.recs: dict[str, _Rec] = {}
        self.lives: dict[str, _Live] = {}
        self.allocs: dict[str, tuple[int, int]] = {}
        self.claims: dict[str, dict[str, tuple[bytes, int, int]]] = {}
        self.leases: dict[int, float] = {}
        self.held: dict[str, tuple[_Live, int]] = {}
        self.protected: dict[str, MassExpiry] = {}
        self.failures: Counter[str] = Counter()
        self.rejected: Counter[str] = Counter()
        self.bad: dict[str, BadValue] = {}
        """Keys whose value cannot be used, by etcd key (cleared when the key is deleted
        or overwritten with a readable value)."""
        self.bad_found: Counter[str] = Counter()
        """Bad values found, by collection; each (key, revision) counted once."""
        self.mass_expiry_events = 0
        self._revocation_envs: dict[str, Envelope] = {}
        self._signers: dict[str, SignerVerdict] = {}
        self._signer_refs: Counter[str] = Counter()
        """Records by the key id that signed them (a count per key: which records a
        changed chain concerns is found by a pass over the records, when it happens)."""
        self._revoked_serials: set[str] = set()
        self._serial_seen = _SerialFilter()
        self._deadlines = _Deadlines()
        self._claim_deadlines: list[tuple[float, str]] = []  # (expires_at, cpid)
        self._claim_soonest: dict[str, float] = {}
        """CPID -> at most the earliest ``expires_at`` of its claims (absent: unknown), so
        an entry rebuild skips looking at every claim while none can have expired."""
        self._live_count: Counter[str] = Counter()
        self._lease_refs: Counter[int] = Counter()  # lease id -> live keys on it
        self._windows: dict[str, deque[tuple[float, str, _Live]]] = {}
        self._reported_signers: set[tuple[object, ...]] = set()
        self._context: Context | None = None  # of the last record batch
        self._chain_revs: dict[str, tuple[SignerVerdict, int]] = {}
        self._shared = _Shared()
        self._unfiled: list[tuple[list[Entry], int]] = []
        """Entries :meth:`restore` served whose bookkeeping is not filed yet (their
        statuses in :attr:`lives`, lease counts, deadlines, serials), a list per chunk
        with how many have a status: see :meth:`file_restored`, which every path that
        reads those runs first."""
        self._unfiled_lives = 0

    # ==================================================================================
    # reading
    # ==================================================================================

    def get(self, cpid: str) -> Entry | None:
        """The served entry for canonical ``cpid`` (None if absent or past its validity)."""
        entry = self.served.get(cpid)
        if entry is not None and entry.valid_until < self.clock():
            return None
        return entry

    def rejection(self, cpid: str) -> tuple[str, str] | None:
        """``(reason, detail)`` when the index holds a record for ``cpid`` that is not served."""
        rs = self.recs.get(cpid)
        if rs is None or not rs.reason:
            return None
        return rs.reason, rs.detail

    def namespaces(self) -> list[NamespaceInfo]:
        out = []
        for prefix, (kid, endpoints, rev) in sorted(self.ns.items()):
            v = self._signer(kid, int(self.clock()))
            out.append(NamespaceInfo(prefix, kid, endpoints, rev, v.ok and v.subject == prefix))
        return out

    def live_leases(self) -> set[int]:
        """Leases of the live keys held (their expiry feeds DNS TTLs); right after a warm
        start, those filed so far (:meth:`file_restored`)."""
        return set(self._lease_refs)

    @property
    def unfiled(self) -> int:
        """Chunks of restored entries whose bookkeeping is not filed yet."""
        return len(self._unfiled)

    def sizes(self) -> dict[str, int]:
        return {
            "served": len(self.served),
            "records": len(self.recs),
            "live": len(self.lives) + self._unfiled_lives,
            "certs": len(self.certs),
            "revoked": len(self.revocations),
            "ns": len(self.ns),
            "alloc": len(self.allocs),
            "claims": sum(len(c) for c in self.claims.values()),
            "held": len(self.held),
        }

    def bad_values(self, limit: int = 10) -> dict[str, Any]:
        """What ``/readyz`` shows of :attr:`bad`: the count, the count by collection and
        the first ``limit`` keys (sorted)."""
        return {
            "count": len(self.bad),
            "by_prefix": dict(sorted(self.bad_by_prefix().items())),
            "keys": heapq.nsmallest(limit, self.bad),
        }

    def bad_by_prefix(self) -> Counter[str]:
        return Counter(b.prefix for b in self.bad.values())

    def keys(self) -> dict[str, int]:
        """Every key the replica tracks, with its ``mod_revision`` (for re-list diffs).

        Bad values are tracked too, so that a re-list does not deliver them again."""
        self.file_restored()
        out: dict[str, int] = {key: b.revision for key, b in self.bad.items()}
        for kid, (_, rev) in self.certs.items():
            out[Prefix.CERTS + kid] = rev
        for ident, (_, rev) in self.revocations.items():
            out[Prefix.REVOKED + ident] = rev
        for prefix, (_, _, rev) in self.ns.items():
            out[Prefix.NS + prefix] = rev
        for cpid, rs in self.recs.items():
            out[Prefix.REC + cpid] = rs.revision
        for cpid, lv in self.lives.items():
            out[Prefix.LIVE + cpid] = lv.revision
        for cpid, (_, rev) in self.allocs.items():
            out[Prefix.ALLOC + cpid] = rev
        for cpid, claims in self.claims.items():
            for claim_id, (_, rev, _) in claims.items():
                out[f"{Prefix.CLAIM}{cpid}/{claim_id}"] = rev
        return out

    def diff(self, snapshot: Mapping[str, tuple[bytes, int, int]], revision: int) -> list[Change]:
        """Changes that turn the tracked keys into ``snapshot`` (key -> value, mod_revision, lease)."""
        current = self.keys()
        changes = [
            Change("put", key, value, rev, lease)
            for key, (value, rev, lease) in snapshot.items()
            if current.get(key) != rev
        ]
        changes.extend(
            Change("delete", key, revision=revision) for key in current if key not in snapshot
        )
        return changes

    # ==================================================================================
    # feeding
    # ==================================================================================

    async def apply(
        self, changes: Sequence[Change], revision: int, *, check: Runner, emit: bool = True
    ) -> list[Event]:
        """Apply the changes of etcd ``revision`` (a watch batch or a re-list diff).

        ``emit=False`` (the first listing) builds the state without events.
        """
        self.file_restored()
        batch = _Batch(revision, int(self.clock()), bulk=len(changes) >= _BULK, emit=emit)
        trust_changed = False
        revoked_ids: set[str] = set()
        for ch in changes:
            if ch.envelope is not None:  # from a snapshot: keys it holds were parsed before
                collection = Prefix.REC if ch.key.startswith(_REC) else Prefix.LIVE
                name = ch.key[len(collection) :]
            else:
                try:
                    collection, name = parse_key(ch.key)
                except ValueError:
                    continue
            was_bad = self.bad.get(ch.key)
            try:
                trust_changed |= self._put(collection, name, ch, batch, revoked_ids)
            except Exception as exc:  # whatever a value can cause costs that key alone
                self._mark_bad(collection, ch.key, ch.revision, _describe(exc))
                gone = Change("delete", ch.key, revision=ch.revision)
                try:
                    self._put(collection, name, gone, batch, revoked_ids)
                except Exception:
                    _log.exception("could not forget %s after a bad value", ch.key)
                trust_changed |= collection in (Prefix.CERTS, Prefix.REVOKED)
            if was_bad is not None and self.bad.get(ch.key) is was_bad:
                del self.bad[ch.key]  # deleted, or overwritten with a usable value
        if trust_changed:
            self._trust_changed(batch, revoked_ids)
        self.revision = max(self.revision, revision)
        return await self._commit(batch, check=check, emit=emit)

    def restore(self, chunk: Restored, revision: int) -> list[Change]:
        """Load records (and their statuses) that this resolver verified before, from its
        own integrity-checked snapshot (:mod:`resolver.snapshot`), without verifying their
        signatures again: the fast path of a warm start, into an empty replica.

        The chain of each signing key is judged now (certs, revocations and validity
        windows as they are at ``revision``, from what was applied before); a record whose
        chain no longer verifies, whose validity window has closed, or whose key has a
        revocation pending, is not restored but returned as a change for :meth:`apply`,
        which verifies it as on a cold start (with its status).  No events (like the
        first listing).  Each entry is built here directly, as :meth:`_build` would for
        a replica that holds nothing else of its CPID yet: a warm start spends most of
        its time in this loop (~7.5 µs per record at a million), so what repeats is
        resolved once per chunk, from its tables.
        """
        now = int(self.clock())
        shared = self._shared
        skew = self.settings.skew
        again: list[Change] = []
        recs, refs = self.recs, self._signer_refs
        served, discovery, live_count = self.served, self.discovery, self._live_count
        allocs, claims = self.allocs, self.claims
        revoked = self._revoked_serials
        restored: list[Entry] = []  # their bookkeeping is filed later (file_restored)
        with_status = 0
        # the chunk's tables, each value shared
        forms = [(Packed if packed else Sealed, shared.get(pt)) for pt, packed in chunk.form_table]
        signers: list[tuple[SignerVerdict, int, str]] = []  # verdict, chain revision, kid
        for kid in chunk.kid_table:
            v = self._signer(kid, now)
            signers.append((v, self._chain_revision(v) if v.ok else 0, shared.get(kid)))
        profiles = [
            (
                shared.get(kind),
                shared.get(region),
                shared.get(tuple(shared.get(a) for a in accelerators)),
                shared.labels(labels),
                canonical is True,
            )
            for kind, region, accelerators, labels, canonical in chunk.profile_table
        ]
        states = [shared.get(name) for name in chunk.state_table]
        statuses: dict[tuple[int, int, int | None, int], StatusFacts] = {}
        # entries alike for the discovery index (kind, models and region as an index into
        # `places`; namespace, free units, live): they go into one set
        place_ids: dict[tuple[str, tuple[str, ...], str], int] = {}
        places = [place_ids.setdefault((p[0], p[2], p[1]), len(place_ids)) for p in profiles]
        alike: dict[tuple[int, str, int, bool], list[Entry]] = {}
        group: list[Entry] = []
        last: tuple[int, int, bool] = (-1, -1, False)  # the group of the row before
        head = ""  # its namespace and "/"
        rows = zip(
            chunk.cpids,
            chunk.revisions,
            chunk.forms,
            chunk.kids,
            chunk.blobs,
            chunk.versions,
            chunk.expires_at,
            chunk.profiles,
            chunk.status_revisions,
            chunk.leases,
            chunk.status_forms,
            chunk.status_kids,
            chunk.status_blobs,
            chunk.states,
            chunk.accelerators_free,
            chunk.cpu_free,
            chunk.withheld,
            strict=True,
        )
        for (
            cpid,
            rev,
            f,
            k,
            blob,
            ver,
            exp,
            p,
            lrev,
            lease,
            lf,
            lkid,
            lblob,
            si,
            af,
            cf,
            wh,
        ) in rows:
            v, chain_rev, kid = signers[k]
            form, pt = forms[f]
            sealed = form(pt, kid, blob)
            st: Sealed | None = None
            if lblob is not None and lf is not None and lkid is not None:
                form, pt = forms[lf]
                st = form(pt, NODE_KID if lkid == NODE_KID else lkid, lblob)
            valid_until = float(exp + skew)
            if v.valid_until < valid_until:
                valid_until = v.valid_until
            serial = cpid.rpartition(".")[2].rpartition("-")[0]
            kind, region, accelerators, labels, canonical = profiles[p]
            facts = RecordFacts(cpid, kind, "", ver, exp, region, accelerators, labels, canonical)
            rs = _served_rec(cpid, rev, sealed, facts, valid_until)
            if (
                not v.ok
                or valid_until <= now
                or serial in revoked
                or recs.setdefault(cpid, rs) is not rs  # (held already: a repeated key)
            ):
                again.append(Change("put", Prefix.REC + cpid, b"", rev, 0, sealed.envelope()))
                if st is not None:
                    env = st.envelope()
                    again.append(Change("put", Prefix.LIVE + cpid, b"", lrev or 0, lease or 0, env))
                continue
            refs[kid] += 1
            sf: StatusFacts | None = None
            status_rev = lease_id = 0
            if st is not None:
                if si is None:  # verified as it is applied
                    env = st.envelope()
                    again.append(Change("put", Prefix.LIVE + cpid, b"", lrev or 0, lease or 0, env))
                    st = None
                else:
                    key = (si, af, cf, wh)
                    sf = statuses.get(key)
                    if sf is None:
                        sf = statuses[key] = shared.status_facts(
                            StatusFacts("", states[si], af, cf, wh)
                        )
                    status_rev, lease_id = lrev or 0, lease or 0
                    with_status += 1
            # the entry, as _build makes it for a replica that holds nothing else of it
            claimed, alloc_rev = allocs.get(cpid, _NO_ALLOC)
            if cpid in claims:
                claimed = max(0, claimed - self._expired_claim_units(cpid))
            entry = Entry(
                facts,
                sealed,
                v.chain,
                rev,
                sf,
                st,
                status_rev,
                lease_id,
                False,
                0.0,
                claimed,
                max(rev, status_rev, alloc_rev, chain_rev),
                valid_until,
                self.leases,
            )
            served[cpid] = entry
            restored.append(entry)
            live = sf is not None and sf.state != "down"
            place, free = places[p], entry.free
            if place == last[0] and free == last[1] and live == last[2] and cpid.startswith(head):
                group.append(entry)  # as the row before (rows come a set at a time)
                continue
            namespace = cpid.partition("/")[0]
            head = namespace + "/"
            last = (place, free, live)
            group = alike.setdefault((place, namespace, free, live), [])
            group.append(entry)
        self._unfiled.append((restored, with_status))
        self._unfiled_lives += with_status
        for (_, namespace, _, live), entries in alike.items():
            discovery.add_alike(entries)
            if live:
                live_count[namespace] += len(entries)
        self.generation += 1
        self.revision = max(self.revision, revision)
        return again

    def file_restored(self, chunks: int | None = None) -> bool:
        """File the bookkeeping of entries :meth:`restore` served (``chunks`` of them at
        most; None: all): each status as verified under its record (:attr:`lives`), the
        lease counts, validity deadlines and serials.  What a lookup or a discovery
        reads is complete without it, so a warm start is ready before (the replica
        files the rest right after, :meth:`Replica._file_restored`); every path that
        reads these (apply, sweep, re-list keys, snapshots) files them first.  Returns
        True when nothing is left."""
        unfiled = self._unfiled
        lives, leases, served = self.lives, self._lease_refs, self.served
        push = self._deadlines.push
        n = 0
        while unfiled and (chunks is None or n < chunks):
            entries, with_status = unfiled.pop()
            n += 1
            serials: list[str] = []
            for e in entries:
                facts = e.facts
                cpid = facts.cpid
                if served.get(cpid) is not e:  # not expected: apply and sweep file first
                    continue
                serials.append(cpid.rpartition(".")[2].rpartition("-")[0])
                if e.valid_until < math.inf:
                    push(e.valid_until, cpid)
                sf, st = e.status_facts, e.status_sealed
                if sf is not None and st is not None:
                    lease = e.lease
                    lives[cpid] = _verified_live(e.status_revision, lease, st, sf, facts)
                    if lease:
                        leases[lease] += 1
            self._serial_seen.update(serials)
            self._unfiled_lives -= with_status
        return not unfiled

    async def sweep(self, *, check: Runner) -> list[Event]:
        """Act on the clock: validity windows that closed (or opened), holds that ended."""
        self.file_restored()
        now = self.clock()
        batch = _Batch(self.revision, int(now))
        early: list[tuple[float, str]] = []
        for cpid in self._deadlines.due(now):
            rs = self.recs.get(cpid)
            if rs is None:
                continue
            if rs.reason == "not_yet_valid" or (not rs.reason and rs.valid_until <= now):
                batch.dirty_recs.add(cpid)
            elif not rs.reason and rs.valid_until < math.inf:
                early.append((rs.valid_until, cpid))  # due later within its second
        for when, cpid in early:
            self._deadlines.push(when, cpid)
        self._claims_expired(now, batch)
        for kid, verdict in list(self._signers.items()):
            if verdict.valid_until <= now:
                del self._signers[kid]
                new = self._signer(kid, batch.now)
                if new.fingerprint() != verdict.fingerprint():
                    batch.dirty_recs |= self._signed_by({kid})
        for ns, prot in list(self.protected.items()):
            if prot.until <= now:
                dropped = [c for c in self.held if _namespace_of(c) == ns]
                _log.warning(
                    "mass-expiry hold of %s ended after %.0f s: %d held entries were not "
                    "renewed and are no longer shown as live",
                    ns,
                    now - prot.since,
                    len(dropped),
                )
                for cpid in dropped:
                    del self.held[cpid]
                    self._touch(batch, cpid, "mass_expiry", override=True)
                del self.protected[ns]
        for ns in list(self._windows):
            self._prune_window(ns, now)
        return await self._commit(batch, check=check, emit=True)

    # -- bad values -------------------------------------------------------------------

    def _mark_bad(self, collection: Prefix, key: str, revision: int, detail: str) -> None:
        """File ``key`` as a bad value; counted and logged once per (key, revision)."""
        old = self.bad.get(key)
        prefix = collection.name.lower()
        self.bad[key] = BadValue(key, prefix, revision, detail)
        if old is not None and old.revision == revision:
            return
        self.bad_found[prefix] += 1
        _log.warning("ignoring %s at revision %d, an unusable value: %s", key, revision, detail)

    # -- per collection ---------------------------------------------------------------

    def _put(
        self, collection: Prefix, name: str, ch: Change, batch: _Batch, revoked_ids: set[str]
    ) -> bool:
        """Apply one change; True when the trust (certs, revocations) changed."""
        if collection is Prefix.CERTS:
            return self._put_cert(name, ch)
        if collection is Prefix.REVOKED:
            revoked_ids.add(name)
            return self._put_revocation(name, ch)
        if collection is Prefix.NS:
            self._put_ns(name, ch)
        elif collection is Prefix.REC:
            self._put_rec(name, ch, batch)
        elif collection is Prefix.LIVE:
            self._put_live(name, ch, batch)
        elif collection is Prefix.ALLOC:
            self._put_alloc(name, ch, batch)
        elif collection is Prefix.CLAIM:
            self._put_claim(name, ch)
        return False

    def _put_cert(self, kid: str, ch: Change) -> bool:
        if ch.type == "delete":
            return self.certs.pop(kid, None) is not None
        try:
            env = Envelope.from_json(ch.value)
        except EnvelopeError as exc:
            self._mark_bad(Prefix.CERTS, ch.key, ch.revision, _describe(exc))
            return self.certs.pop(kid, None) is not None
        self.certs[kid] = (env, ch.revision)
        return True

    def _put_revocation(self, ident: str, ch: Change) -> bool:
        if ch.type == "delete":
            self._revocation_envs.pop(ident, None)
            self._revoked_serials = {k[:_SERIAL] for k in self._revocation_envs if k != ident}
            return self.revocations.pop(ident, None) is not None
        try:
            env = Envelope.from_json(ch.value)
        except EnvelopeError as exc:
            self._mark_bad(Prefix.REVOKED, ch.key, ch.revision, _describe(exc))
            self._revocation_envs.pop(ident, None)
            self._revoked_serials = {k[:_SERIAL] for k in self._revocation_envs}
            return self.revocations.pop(ident, None) is not None
        self.revocations[ident] = (env, ch.revision)
        self._revocation_envs[ident] = env
        self._revoked_serials.add(ident[:_SERIAL])
        return True

    def _put_ns(self, prefix: str, ch: Change) -> None:
        if ch.type == "delete":
            self.ns.pop(prefix, None)
            return
        try:
            obj = _json.loads(ch.value)
            if not isinstance(obj, dict):
                raise TypeError(f"expected a JSON object, got {type(obj).__name__}")
            kid, endpoints = obj["kid"], obj.get("endpoints", [])
            if not isinstance(kid, str) or not isinstance(endpoints, list):
                raise TypeError("kid must be a string and endpoints a list")
            if not all(isinstance(e, str) for e in endpoints):
                raise TypeError("endpoints must be strings")
        except Exception as exc:
            self._mark_bad(Prefix.NS, ch.key, ch.revision, _describe(exc))
            self.ns.pop(prefix, None)
            return
        self.ns[prefix] = (kid, tuple(endpoints), ch.revision)

    def _put_rec(self, cpid: str, ch: Change, batch: _Batch) -> None:
        old = self.recs.pop(cpid, None)
        if old is not None:
            self._forget_rec(old)
        self._touch(batch, cpid, "record")
        if ch.type == "delete":
            batch.rec_deleted.add(cpid)
            batch.reasons[cpid] = "deleted"
            self.held.pop(cpid, None)
            return
        if ch.envelope is not None:
            rs = _Rec(cpid, ch.revision, self._shared.seal(ch.envelope))
            self._signer_refs[rs.signer] += 1
        elif batch.bulk:  # parsed by its verification job (_verify_records, _parsed)
            rs = _Rec(cpid, ch.revision, None, raw=ch.value)
        else:
            try:
                env: Sealed | None = self._shared.seal(Envelope.from_json(ch.value))
                error = ""
            except EnvelopeError as exc:
                env, error = None, str(exc)
                self._mark_bad(Prefix.REC, ch.key, ch.revision, _describe(exc))
            rs = _Rec(cpid, ch.revision, env, error)
            self._signer_refs[rs.signer] += 1
        self.recs[cpid] = rs
        self._serial_seen.add(_serial_of(cpid))
        lv = self.lives.pop(cpid, None)
        if lv is not None:  # keyed by this string from now on: one per CPID (_put_live)
            self.lives[cpid] = lv
        batch.dirty_recs.add(cpid)
        batch.dirty_lives.add(cpid)

    def _parsed(self, rs: _Rec, outcome: Outcome | None, error: str = "") -> None:
        """File the envelope a ``raw`` job parsed (None and ``error`` when it is not one)."""
        rs.raw = None
        env = outcome.envelope if outcome is not None else None
        rs.sealed = self._shared.seal(env) if env is not None else None
        rs.error = error
        self._signer_refs[rs.signer] += 1

    def _forget_rec(self, rs: _Rec) -> None:
        if rs.raw is None:  # counted once parsed (_put_rec, _parsed)
            refs = self._signer_refs
            refs[rs.signer] -= 1
            if refs[rs.signer] <= 0:
                del refs[rs.signer]
        if rs.reason and rs.reason != "pending":
            self.rejected[rs.reason] -= 1

    def _put_live(self, cpid: str, ch: Change, batch: _Batch) -> None:
        rs = self.recs.get(cpid)
        if rs is not None:
            cpid = rs.cpid  # one string per CPID for both dicts (and the entry, the facts)
        old = self.lives.pop(cpid, None)
        if old is not None and old.lease:
            self._lease_refs[old.lease] -= 1
            if not self._lease_refs[old.lease]:
                del self._lease_refs[old.lease]
        if ch.type == "put" and ch.lease:
            self._lease_refs[ch.lease] += 1
        self._touch(batch, cpid, "status")
        batch.dirty_lives.add(cpid)
        if ch.type == "delete":
            if old is not None and old.facts is not None:
                batch.live_deleted.append((cpid, old))
            return
        self.held.pop(cpid, None)
        if batch.bulk and ch.envelope is None:
            # parsed by the job that verifies it, in a worker (_verify_records, _file_status)
            self.lives[cpid] = _Live(ch.revision, ch.lease, None, raw=ch.value)
            return
        try:
            env: Sealed | None = self._shared.seal(
                ch.envelope if ch.envelope is not None else Envelope.from_json(ch.value),
                keyids=False,
            )
            error = ""
        except EnvelopeError as exc:
            env, error = None, str(exc)
            self._mark_bad(Prefix.LIVE, ch.key, ch.revision, _describe(exc))
        lv = _Live(ch.revision, ch.lease, env, error)
        if old is not None and env is not None and old.sealed == env:
            # the same envelope re-written (e.g. on a new lease): already verified
            lv.facts = old.facts
            lv.checked, lv.reason = old.checked, old.reason
        self.lives[cpid] = lv

    def _put_alloc(self, cpid: str, ch: Change, batch: _Batch) -> None:
        self._touch(batch, cpid, "alloc")
        if ch.type == "delete":
            self.allocs.pop(cpid, None)
            return
        try:
            _json.loads(ch.value)  # bounded nesting, before read_units parses it
            units = read_units(ch.value)
        except Exception as exc:
            self._mark_bad(
                Prefix.ALLOC,
                ch.key,
                ch.revision,
                f"{_describe(exc)} (nothing of {cpid} counts as free)",
            )
            units = UNREADABLE_ALLOC
        self.allocs[cpid] = (units, ch.revision)

    def _put_claim(self, name: str, ch: Change) -> None:
        cpid, _, claim_id = name.rpartition("/")
        if ch.type == "delete":
            claims = self.claims.get(cpid)
            if claims is not None:
                claims.pop(claim_id, None)
                if not claims:
                    del self.claims[cpid]
            return
        try:
            problem = claim_problem(ch.value)
        except Exception as exc:
            problem = _describe(exc)
        if problem:
            self._mark_bad(Prefix.CLAIM, ch.key, ch.revision, problem)
            self._put_claim(name, Change("delete", ch.key, revision=ch.revision))
            return
        self.claims.setdefault(cpid, {})[claim_id] = (ch.value, ch.revision, ch.lease)
        expires_at = _claim_expiry(ch.value)
        if expires_at and cpid in self._claim_soonest:
            self._claim_soonest[cpid] = min(self._claim_soonest[cpid], expires_at)
        if expires_at:
            heapq.heappush(self._claim_deadlines, (expires_at, cpid))

    def _claims_expired(self, now: float, batch: _Batch) -> None:
        """Rebuild the entries of CPIDs whose claims reached ``expires_at`` (their units
        stop counting then, even while the key remains: see :meth:`_expired_claim_units`)."""
        while self._claim_deadlines and self._claim_deadlines[0][0] <= now:
            _, cpid = heapq.heappop(self._claim_deadlines)
            if cpid in self.recs:
                batch.dirty_recs.add(cpid)
        if len(self._claim_deadlines) > 4096:  # released claims leave theirs behind
            held = sum(len(c) for c in self.claims.values())
            if len(self._claim_deadlines) > 2 * held:
                live = [
                    (exp, cpid)
                    for cpid, claims in self.claims.items()
                    for value, _, _ in claims.values()
                    if (exp := _claim_expiry(value)) > now
                ]
                heapq.heapify(live)
                self._claim_deadlines = live

    def _expired_claim_units(self, cpid: str) -> int:
        """Units of the claims on ``cpid`` whose ``expires_at`` has passed but whose keys
        remain (a lease re-armed by an etcd restart): ``/alloc/`` still counts them."""
        now = self.clock()
        if self._claim_soonest.get(cpid, 0.0) > now:
            return 0  # no claim on it can have expired yet
        total = 0
        soonest = math.inf
        for value, _, _ in self.claims.get(cpid, {}).values():
            units, expires_at = _claim_terms(value)
            if expires_at:
                soonest = min(soonest, expires_at)
                if expires_at <= now:
                    total += units
        if cpid in self.claims:
            self._claim_soonest[cpid] = soonest
        else:
            self._claim_soonest.pop(cpid, None)
        return total

    # -- trust ------------------------------------------------------------------------

    def _signer(self, kid: str, now: int) -> SignerVerdict:
        v = self._signers.get(kid)
        if v is None:
            certs = self.certs

            def lookup(k: str) -> Envelope | None:
                found = certs.get(k)
                return None if found is None else found[0]

            try:
                v = verify_signer(
                    kid,
                    lookup,
                    anchors=self.anchors,
                    revocations=self._revocation_envs,
                    now=now,
                    skew=self.settings.skew,
                )
            except Exception as exc:  # a hostile cert or revocation: this chain fails
                _log.warning("the chain of key %s cannot be checked: %s", kid, _describe(exc))
                v = SignerVerdict(kid, (), False, "unreadable", _describe(exc), 2, "chain readable")
            self._signers[kid] = v
        return v

    def _trust_changed(self, batch: _Batch, revoked_ids: set[str]) -> None:
        old = self._signers
        self._signers = {}
        changed = set()
        for kid in self._signer_refs:
            before = old.get(kid)
            after = self._signer(kid, batch.now)
            if before is None or before.fingerprint() != after.fingerprint():
                changed.add(kid)
        batch.dirty_recs |= self._signed_by(changed)
        # a node key's kid starts with its CPID's serial, so a revocation of kid K concerns
        # the records whose serial is K[:12]: found by one pass over the records, made
        # only when a record may have that serial (an index of every serial cost ~160
        # bytes a record; the filter costs 4 MB, and spares the pass for revocations of
        # cert serials, of keys without records, or a flood of them)
        seen = self._serial_seen
        serials = {s for ident in revoked_ids if (s := ident[:_SERIAL]) in seen}
        if serials:
            batch.dirty_recs.update(c for c in self.recs if _serial_of(c) in serials)

    def _signed_by(self, kids: set[str]) -> set[str]:
        """The records whose envelope names one of ``kids`` as its signer (a pass over
        the records: chains change rarely, and a set of CPIDs per signer cost ~90 bytes
        a record)."""
        if not kids:
            return set()
        return {cpid for cpid, rs in self.recs.items() if rs.signer in kids}

    # -- commit -----------------------------------------------------------------------

    def _touch(self, batch: _Batch, cpid: str, reason: str, *, override: bool = False) -> None:
        """Note that ``cpid``'s entry may change in this batch, and why (first reason wins)."""
        if cpid not in batch.touched:
            batch.touched[cpid] = self.served.get(cpid)
        if override:
            batch.reasons[cpid] = reason
        else:
            batch.reasons.setdefault(cpid, reason)

    async def _commit(self, batch: _Batch, *, check: Runner, emit: bool) -> list[Event]:
        await self._verify_records(batch, check)
        await self._verify_statuses(batch, check)
        if emit:
            self._mass_expiry(batch)
        events = self._rebuild(batch, emit=emit)
        for ns in [
            ns for ns in self.protected if not any(_namespace_of(c) == ns for c in self.held)
        ]:
            prot = self.protected.pop(ns)
            _log.warning(
                "mass-expiry protection of %s ended: the live keys came back (held since %d)",
                ns,
                int(prot.since),
            )
        return events

    async def _verify_records(self, batch: _Batch, check: Runner) -> None:
        """Verify every dirty record with the contract's verifier, then decide on it.

        A record whose status has not been verified yet takes it along in the same job.
        Records a bulk load has not parsed go as ``raw`` jobs, with the chain of every
        signer that verifies.  During the first listing, the entries of each chunk of
        outcomes are built as it arrives, while the workers verify the next.
        """
        now = batch.now
        jobs: list[Job] = []
        targets: list[tuple[_Rec, Sealed | bytes | None]] = []  # and the status it carries
        decided: list[tuple[_Rec, Outcome | None]] = []
        chains: dict[str, tuple[Envelope, ...]] = {}
        raw = False
        for cpid in batch.dirty_recs:
            rs = self.recs.get(cpid)
            if rs is None:
                continue
            lv = self.lives.get(cpid)
            carrying = lv is not None and lv.checked is None
            carry = lv.stored if carrying and lv is not None else None
            token = lv.token if carrying and lv is not None else None
            if rs.raw is not None:
                raw = True
                jobs.append(("raw", rs.raw, carry))
                targets.append((rs, token))
                continue
            if rs.sealed is None:
                decided.append((rs, None))
                continue
            v = self._signer(rs.signer, now)
            if not v.ok:
                # verify_record_prepared stops at the chain's own failure: same outcome
                decided.append((rs, Outcome(False, v.rule, v.what, v.check_detail, v.detail)))
                continue
            chains[v.kid] = v.chain
            jobs.append(("record", v.kid, rs.sealed.envelope(), carry))
            targets.append((rs, token))
        for rs, outcome in decided:
            self._evaluate(rs, outcome, batch)
        if not jobs:
            return
        if raw:  # a raw job looks its signer up in the context: every chain that verifies
            for kid in self.certs:
                v = self._signer(kid, now)
                if v.ok:
                    chains[v.kid] = v.chain
        ctx = Context(
            tuple(self.anchors), chains, dict(self._revocation_envs), now, self.settings.skew
        )
        if ctx == self._context:  # same chains, revocations and time: workers keep their
            ctx = self._context  # walked chains (the token names them), e.g. a bulk load
        self._context = ctx
        i = 0
        async for outcomes in check(ctx, jobs):
            done: list[str] = []
            for outcome in outcomes:
                rs, carried = targets[i]
                i += 1
                if self.recs.get(rs.cpid) is not rs:
                    continue
                decision = outcome if rs.raw is None else self._raw_outcome(rs, outcome, ctx)
                self._evaluate(rs, decision, batch)
                if decision is not None and decision.status is not None and rs.facts is not None:
                    lv = self.lives.get(rs.cpid)
                    if lv is not None and carried is not None and lv.token is carried:
                        on = rs.facts
                        if self._file_status(rs.cpid, lv, on, decision.status):
                            self._status_outcome(rs.cpid, lv, on, decision.status)
                done.append(rs.cpid)
            if not batch.emit:
                self._settle(batch, done)

    def _raw_outcome(self, rs: _Rec, outcome: Outcome, ctx: Context) -> Outcome | None:
        """File the envelope a ``raw`` job parsed; returns the outcome to decide ``rs`` by
        (None when the value is not an envelope, as :meth:`_evaluate` takes it)."""
        if outcome.envelope is None:
            assert outcome.what == NO_ENVELOPE, outcome
            self._parsed(rs, None, outcome.message)
            detail = outcome.message
            if len(detail) > _DETAIL_MAX:
                detail = detail[: _DETAIL_MAX - 3] + "..."
            self._mark_bad(Prefix.REC, Prefix.REC + rs.cpid, rs.revision, detail)
            return None
        self._parsed(rs, outcome)
        if outcome.ok or outcome.what != NO_CHAIN:
            return outcome
        v = self._signer(rs.signer, ctx.now)
        if v.ok:  # not expected: the context holds the chain of every signer that verifies
            assert rs.envelope is not None
            job: Job = ("record", v.kid, rs.envelope, None)
            alone = Context(ctx.anchors, {v.kid: v.chain}, ctx.revocations, ctx.now, ctx.skew)
            return run_jobs(alone, [job])[0]
        # verify_record_prepared stops at the chain's own failure: same outcome
        return Outcome(False, v.rule, v.what, v.check_detail, v.detail)

    def _evaluate(self, rs: _Rec, outcome: Outcome | None, batch: _Batch) -> None:
        """Decide whether ``rs`` is served, from the verifier's ``outcome``."""
        now = batch.now
        skew = self.settings.skew
        was = rs.reason
        reason = detail = ""
        valid_until = math.inf
        retry_at: float | None = None
        v: SignerVerdict | None = None
        before, rs.facts = rs.facts, None
        if rs.sealed is None or outcome is None:
            reason, detail = "malformed", f"not a DSSE envelope: {rs.error}"
        else:
            v = self._signer(rs.signer, now)
            if not outcome.ok:
                reason = label_of(outcome.rule, outcome.what, outcome.detail)
                detail = outcome.message
                if reason == "not_yet_valid":
                    retry_at = float(now + 60)
            else:
                facts = outcome.facts
                assert isinstance(facts, RecordFacts)
                canonical = facts.cpid.upper()  # verified well formed (rule 5): only case varies
                if canonical != rs.cpid:
                    reason = "wrong_key"
                    detail = f"record for {canonical} is stored under the key of {rs.cpid}"
                else:
                    key = facts.public_key
                    facts = self._shared.record_facts(facts, rs.cpid)
                    if before is not None and before == facts:  # the same payload again: its
                        facts = before  # statuses stay checked against it (_Live.checked)
                    rs.facts = facts  # the model is parsed on first use (Entry)
                    valid_until = min(float(facts.expires_at + skew), v.valid_until)
                    if _serial_of(rs.cpid) in self._revoked_serials:  # rare: hash the key
                        valid_until = min(
                            valid_until,
                            pending_revocation(
                                _keys.kid(_keys.b64url_decode(key)),
                                _namespace_of(rs.cpid),
                                v,
                                self._revocation_envs,
                                now=now,
                                skew=skew,
                            ),
                        )
        if reason:
            rs.valid_until = -math.inf
            if retry_at is not None:
                self._deadlines.push(retry_at, rs.cpid)
        else:
            rs.valid_until = valid_until
            if valid_until < math.inf:
                self._deadlines.push(valid_until, rs.cpid)
        rs.reason, rs.detail = reason, detail
        if was != reason:
            if was and was != "pending":
                self.rejected[was] -= 1
            if reason:
                self.rejected[reason] += 1
        # served or not, what is shown may change (a new revision, a new chain)
        self._touch(batch, rs.cpid, reason or "verify")
        batch.dirty_lives.add(rs.cpid)
        if reason and rs.counted != reason:
            rs.counted = reason
            self.failures[reason] += 1
            self._report(rs, v)

    def _report(self, rs: _Rec, v: SignerVerdict | None) -> None:
        """Log a rejected record once per (CPID, revision, reason); chain failures once per chain."""
        if v is not None and not v.ok:
            fp = (v.kid, v.fingerprint())
            if fp not in self._reported_signers:
                if len(self._reported_signers) > 10_000:
                    self._reported_signers.clear()
                self._reported_signers.add(fp)
                _log.warning(
                    "records signed by key %s are not served (%s): %s",
                    v.kid or "<none>",
                    v.reason,
                    v.detail,
                )
            _log.debug(
                "not serving %s (revision %d): %s: %s", rs.cpid, rs.revision, rs.reason, rs.detail
            )
            return
        _log.warning(
            "not serving %s (revision %d): %s: %s", rs.cpid, rs.revision, rs.reason, rs.detail
        )

    # -- statuses read after ready (a large first listing; Replica._read_statuses) ------

    def status_jobs(
        self, changes: Sequence[Change]
    ) -> tuple[Context, list[Job], list[tuple[Change, str, RecordFacts]], list[Change]]:
        """Verification jobs for ``/live/`` values as listed (puts): a job for each whose
        record is served, to verify without the lock held and file with
        :meth:`file_statuses`; the others are returned to :meth:`apply` as they are
        (their statuses are kept unverified until the record is served)."""
        ctx = Context(tuple(self.anchors), {}, {}, int(self.clock()), self.settings.skew)
        jobs: list[Job] = []
        targets: list[tuple[Change, str, RecordFacts]] = []
        rest: list[Change] = []
        for ch in changes:
            try:
                collection, cpid = parse_key(ch.key)
            except ValueError:
                continue
            rs = self.recs.get(cpid)
            if (
                collection != Prefix.LIVE
                or ch.type != "put"
                or rs is None
                or rs.reason
                or rs.facts is None
            ):
                rest.append(ch)
                continue
            jobs.append(("status", node_key(rs), ch.value))
            targets.append((ch, cpid, rs.facts))
        return ctx, jobs, targets, rest

    async def file_statuses(
        self,
        targets: Sequence[tuple[Change, str, RecordFacts]],
        outcomes: Sequence[Outcome],
        skip: Collection[str],
        *,
        check: Runner,
    ) -> list[Event]:
        """File the ``outcomes`` of :meth:`status_jobs`' jobs: each status as verified
        under its record, served with it (a ``put`` event, reason ``status``).  A key in
        ``skip`` (changed by the watch since: newer) is left alone; one whose record
        changed meanwhile is applied as a change (verified again, inline)."""
        self.file_restored()
        batch = _Batch(self.revision, int(self.clock()), bulk=True)
        again: list[Change] = []
        for (ch, cpid, on), o in zip(targets, outcomes, strict=True):
            if ch.key in skip:
                continue
            rs = self.recs.get(cpid)
            if rs is None or rs.reason or rs.facts is not on:
                again.append(ch)
                continue
            self._put_live(cpid, ch, batch)  # held as it came, as in a bulk listing
            lv = self.lives[rs.cpid]
            if self._file_status(rs.cpid, lv, on, o):
                self._status_outcome(rs.cpid, lv, on, o)
        events = self._rebuild(batch, emit=True)
        if again:
            events += await self.apply(again, self.revision, check=check)
        return events

    async def _verify_statuses(self, batch: _Batch, check: Runner) -> None:
        """Verify every dirty status not yet verified under its (served) record's key."""
        jobs: list[Job] = []
        targets: list[tuple[str, _Live, RecordFacts]] = []
        for cpid in batch.dirty_lives:
            lv = self.lives.get(cpid)
            if lv is None:
                continue
            self._touch(batch, cpid, "status")
            rs = self.recs.get(cpid)
            if rs is None or rs.reason or rs.facts is None:
                continue  # kept unverified until its record is served
            on = rs.facts
            if lv.checked is on:
                continue
            stored = lv.stored
            if stored is None:
                self._status_failed(cpid, lv, on, "status_malformed", lv.error)
                continue
            jobs.append(("status", node_key(rs), stored))
            targets.append((cpid, lv, on))
        if not jobs:
            return
        ctx = Context(tuple(self.anchors), {}, {}, batch.now, self.settings.skew)
        i = 0
        async for outcomes in check(ctx, jobs):
            for o in outcomes:
                cpid, lv, on = targets[i]
                i += 1
                if self.lives.get(cpid) is lv and self._file_status(cpid, lv, on, o):
                    self._status_outcome(cpid, lv, on, o)

    def _file_status(self, cpid: str, lv: _Live, on: RecordFacts, o: Outcome) -> bool:
        """File the envelope a job parsed from a status value (bulk loads); False when
        the value is not an envelope: a bad value, the status is ignored (as when
        :meth:`_put_live` cannot parse it)."""
        if lv.raw is None:
            return True
        lv.raw = None
        if o.envelope is not None:
            lv.sealed = self._shared.seal(o.envelope, keyids=False)
            return True
        lv.error = o.message
        detail = (
            o.message if len(o.message) <= _DETAIL_MAX else o.message[: _DETAIL_MAX - 3] + "..."
        )
        self._mark_bad(Prefix.LIVE, Prefix.LIVE + cpid, lv.revision, detail)
        self._status_failed(cpid, lv, on, "status_malformed", lv.error)
        return False

    def _status_outcome(self, cpid: str, lv: _Live, on: RecordFacts, o: Outcome) -> None:
        """File the outcome of checking ``lv`` against the record whose facts are ``on``."""
        if not o.ok:
            self._status_failed(cpid, lv, on, f"status_{o.what}", o.message)
            return
        facts = o.facts
        assert isinstance(facts, StatusFacts)
        if facts.cpid != cpid:
            self._status_failed(
                cpid,
                lv,
                on,
                "status_wrong_key",
                f"status is about {facts.cpid}, but is stored under the live key of {cpid}",
            )
            return
        lv.facts, lv.checked, lv.reason = self._shared.status_facts(facts), on, ""
        st = lv.sealed
        if st is not None and st.keyid and type(st) in (Sealed, Packed):
            # it verified under the key of this id (the verifier looks the key up by it)
            st.keyid = NODE_KID

    def _status_failed(
        self, cpid: str, lv: _Live, on: RecordFacts, label: str, message: str
    ) -> None:
        lv.facts, lv.checked, lv.reason = None, on, message
        if not lv.counted:
            lv.counted = True
            self.failures[label] += 1
            _log.warning("ignoring the status of %s (revision %d): %s", cpid, lv.revision, message)

    # -- mass expiry ------------------------------------------------------------------

    def _prune_window(self, ns: str, now: float) -> None:
        win = self._windows.get(ns)
        if win is None:
            return
        horizon = now - self.settings.mass_expiry_window_s
        while win and win[0][0] < horizon:
            win.popleft()
        if not win:
            del self._windows[ns]

    def _mass_expiry(self, batch: _Batch) -> None:
        """Hold the statuses of a namespace whose live keys vanish en masse."""
        if not batch.live_deleted:
            return
        s = self.settings
        now = self.clock()
        by_ns: dict[str, list[tuple[str, _Live]]] = {}
        for cpid, lv in batch.live_deleted:
            rs = self.recs.get(cpid)
            if cpid in batch.rec_deleted or rs is None or rs.reason or cpid in self.lives:
                continue
            by_ns.setdefault(_namespace_of(cpid), []).append((cpid, lv))
        for ns, items in by_ns.items():
            if ns in self.protected:
                for cpid, lv in items:
                    self.held[cpid] = (lv, batch.revision)
                    self._touch(batch, cpid, "mass_expiry", override=True)
                self.protected[ns].disappeared += len(items)
                continue
            self._prune_window(ns, now)
            win = self._windows.setdefault(ns, deque())
            earlier = len(win)
            win.extend((now, cpid, lv) for cpid, lv in items)
            # live when the window opened: still counted (this batch not yet removed) + earlier losses
            live_before = self._live_count[ns] + earlier
            if (
                live_before < s.mass_expiry_min_live
                or len(win) / live_before <= s.mass_expiry_threshold
            ):
                continue
            prot = MassExpiry(ns, now, now + s.mass_expiry_hold_s, len(win), live_before)
            self.protected[ns] = prot
            self.mass_expiry_events += 1
            for _, cpid, lv in win:
                rs = self.recs.get(cpid)
                if rs is not None and not rs.reason and cpid not in self.lives:
                    self.held[cpid] = (lv, batch.revision)
                    self._touch(batch, cpid, "mass_expiry", override=True)
            del self._windows[ns]
            _log.warning(
                "mass expiry in %s: %d of %d live entries disappeared within %.0f s; keeping "
                "their last verified status for up to %.0f s (until the live keys return)",
                ns,
                prot.disappeared,
                live_before,
                s.mass_expiry_window_s,
                s.mass_expiry_hold_s,
            )

    # -- entries ----------------------------------------------------------------------

    def _build(self, cpid: str, revision: int) -> Entry | None:
        rs = self.recs.get(cpid)
        if rs is None or rs.reason or rs.facts is None or rs.sealed is None:
            return None
        v = self._signers.get(rs.signer)
        if v is None or not v.ok:
            return None
        lv = self.lives.get(cpid)
        live: _Live | None = None
        held = False
        held_until = 0.0
        status_rev = 0
        if lv is not None and lv.facts is not None:
            live, status_rev = lv, lv.revision
        elif cpid in self.held:
            live, status_rev = self.held[cpid]
            prot = self.protected.get(_namespace_of(cpid))
            held, held_until = True, prot.until if prot is not None else 0.0
        claimed, alloc_rev = self.allocs.get(cpid, (0, 0))
        claimed = max(0, claimed - self._expired_claim_units(cpid))
        chain_rev = self._chain_revision(v)
        entry = Entry(
            facts=rs.facts,  # its cpid: the record key's string (not the /live/ key's)
            sealed=rs.sealed,
            chain=v.chain,
            record_revision=rs.revision,
            status_facts=live.facts if live is not None else None,
            status_sealed=live.sealed if live is not None else None,
            status_revision=status_rev,
            lease=live.lease if live is not None else 0,
            live_held=held,
            held_until=held_until,
            claimed=claimed,
            revision=max(rs.revision, status_rev, alloc_rev, chain_rev),
            valid_until=rs.valid_until,
            leases=self.leases,
        )
        return entry

    def _chain_revision(self, v: SignerVerdict) -> int:
        """The latest ``mod_revision`` of the certs ``v`` looked at; kept per verdict (a
        cert written or deleted always replaces the verdicts, see :meth:`_trust_changed`)."""
        got = self._chain_revs.get(v.kid)
        if got is None or got[0] is not v:
            got = (v, max((self.certs[k][1] for k in v.kids if k in self.certs), default=0))
            self._chain_revs[v.kid] = got
        return got[1]

    @staticmethod
    def _same(a: Entry, b: Entry) -> bool:
        return (
            a.sealed is b.sealed
            and a.status_sealed is b.status_sealed
            and a.status_facts == b.status_facts
            and a.claimed == b.claimed
            and a.live_held == b.live_held
            and a.lease == b.lease
            and a.chain == b.chain
        )

    def _replace(self, batch: _Batch, cpid: str, old: Entry | None) -> tuple[bool, Entry | None]:
        """Serve what ``cpid``'s entry is now instead of ``old``: (whether anything a
        client sees changed, the new entry or None when it is no longer served)."""
        new = self._build(cpid, batch.revision)
        if new is not None and old is not None and self._same(old, new):
            old.valid_until = new.valid_until
            return False, old
        if new is None and old is None:
            return False, None
        if old is not None:
            self.discovery.remove(old)
            if old.live and not old.live_held:
                self._live_count[old.namespace] -= 1
        if new is not None:
            self.generation += 1
            self.served[new.cpid] = new
            self.discovery.add(new)
            if new.live and not new.live_held:
                self._live_count[new.namespace] += 1
        else:
            del self.served[cpid]
        return True, new

    def _settle(self, batch: _Batch, cpids: Iterable[str]) -> None:
        """First listing: serve the entries of records just decided whose status is
        decided too (it rode along, or there is none), while the workers verify the next
        chunk.  No event is emitted for the first listing, and nothing later in the batch
        changes these entries (mass-expiry holds only follow events), so the final
        :meth:`_rebuild` skips them."""
        for cpid in cpids:
            rs = self.recs.get(cpid)
            lv = self.lives.get(cpid)
            if rs is None or (
                rs.facts is not None and lv is not None and lv.checked is not rs.facts
            ):
                continue  # its status is verified after the records (_verify_statuses)
            self._replace(batch, cpid, batch.touched.get(cpid))
            batch.built.add(cpid)

    def _rebuild(self, batch: _Batch, *, emit: bool) -> list[Event]:
        events: list[Event] = []
        cursor = self.log.next_cursor(batch.revision) if emit else (batch.revision, 0)
        built = batch.built
        for cpid, old in batch.touched.items():
            if cpid in built:
                continue
            changed, new = self._replace(batch, cpid, old)
            if not changed or not emit:
                continue
            reason = batch.reasons.get(cpid, "verify")
            if new is None:
                rs = self.recs.get(cpid)
                if rs is not None and rs.reason:
                    reason = rs.reason
                events.append(Event("delete", cpid, cursor, None, old, reason))
            else:
                events.append(Event("put", cpid, cursor, new, old, reason))
        if events:
            events = [
                Event(e.type, e.cpid, e.cursor, e.entry, e.prev, e.reason, i == len(events) - 1)
                for i, e in enumerate(events)
            ]
            self.log.append(events)
            for ev in events:
                for listener in list(self.listeners):
                    try:
                        listener(ev)
                    except Exception:
                        _log.exception("replica listener %r failed", listener)
        return events

    def iter_entries(self) -> Iterable[Entry]:
        return self.served.values()


def _claim_expiry(value: bytes) -> float:
    """A claim value's ``expires_at`` (0 when unreadable: such a claim is not expired)."""
    return _claim_terms(value)[1]


@functools.lru_cache(maxsize=16_384)
def _claim_terms(value: bytes) -> tuple[int, float]:
    """``(units, expires_at)`` of a claim value (0 for what is unreadable).  Cached by
    value: an entry rebuild looks at every claim on its CPID, and parsing each claim's
    JSON every time made a resource with thousands of claims cost seconds per write."""
    units, exp = 0, 0.0
    with _suppress_bad_claim():
        obj = _json.loads(value)
        if isinstance(obj, dict):
            e = obj.get("expires_at")
            if isinstance(e, int | float) and not isinstance(e, bool):
                exp = float(e)
            u = obj.get("units")
            if isinstance(u, int) and not isinstance(u, bool) and u > 0:
                units = u
    return units, exp


def _suppress_bad_claim() -> contextlib.suppress:
    return contextlib.suppress(ValueError, TypeError, KeyError, UnicodeDecodeError)
