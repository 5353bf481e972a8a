"""What the resolver serves for one CPID: a verified record and its verified status.

An :class:`Entry` exists only for a record whose chain verified (all five rules of
docs/protocol.md §2–5, plus the resolver's own check that the record sits under the key
of its own CPID).  Entries are replaced, never edited, when anything that a client can
see changes (the record, its status, its claimed units, the mass-expiry hold), so an
entry object is a safe cache key for anything rendered from it: the HTTP body is rendered once per entry and kept as bytes.

To keep a million entries small, an entry holds the envelopes as received plus a few
indexed facts; the pydantic models (:attr:`Entry.record`, :attr:`Entry.status`), the
decoded record and the rendered body are made from the already verified payloads the
first time they are asked for, and kept on the entry while it is among the last
:data:`CACHED_ENTRIES` entries to have cached something (a FIFO: hits cost nothing,
and a crawl of every entry cannot grow the resolver by the size of its index).
"""

from __future__ import annotations

import json
import sys
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

from resolver.sealed import Sealed, seal
from resolver.verify import RecordFacts, StatusFacts
from schemas import keys as _keys
from schemas.cpid import CPID
from schemas.dsse import Envelope, Signature
from schemas.models import Endpoint, Record, Status, parse_payload

__all__ = [
    "CACHED_ENTRIES",
    "NODE_KID",
    "Entry",
    "Sealed",
    "free_units",
    "node_kid",
    "seal",
    "split_cpid",
    "with_keyid",
]

NODE_KID: Final = "".join(("\x00", "node"))
"""The key id a verified status is held with when its signature named the node's key
(compared by identity: no parsed string is this object).  A status signed by the node
verifies only under the key id of the record's key (or none), so the replica keeps
this marker instead of a 65-byte copy per status, and puts the id back where the
envelope is shown (:meth:`Entry.status_envelope`) or verified again (an empty key id:
the verifier then tries the record's key, the one key it is given)."""

CACHED_ENTRIES: Final = 20_000
"""Entries that keep what they parsed or rendered (oldest first out)."""
_cached: deque[Entry] = deque()


class _Cache:
    """What an entry parsed or rendered (one object, made on first use, so that an entry
    that caches nothing carries one empty slot rather than five)."""

    __slots__ = ("body", "record", "record_dict", "record_text", "stale_body", "status")

    def __init__(self) -> None:
        self.record: Record | None = None
        self.status: Status | None = None
        self.body: bytes | None = None
        self.stale_body: bytes | None = None
        self.record_dict: dict[str, Any] | None = None
        self.record_text: str | None = None


def _cache_of(entry: Entry) -> _Cache:
    """``entry``'s cache (made now if it has none); past the bound the oldest entries
    forget theirs."""
    c = entry._cache
    if c is None:
        c = entry._cache = _Cache()
        _cached.append(entry)
        while len(_cached) > CACHED_ENTRIES:
            _cached.popleft()._cache = None
    return c


_D = TypeVar("_D", Record, Status)


def _reparse(sealed: Sealed, model: type[_D]) -> _D:
    """A payload that verified (its type, the strict JSON rules and the model were all
    checked then), parsed again on first use by pydantic's own JSON reader: twice as
    fast as reading it with the strict reader first (9.5 vs 18.5 µs for a record).  The
    full path is the fallback, should the two readers ever disagree."""
    try:
        return model.model_validate_json(sealed.payload)
    except ValueError:
        return parse_payload(sealed.payload_type, sealed.payload, model)


def node_kid(record: Sealed) -> str:
    """The key id of the node key in a verified record payload."""
    key = json.loads(record.payload)["public_key"]
    return _keys.kid(_keys.b64url_decode(key))


def with_keyid(env: Envelope, keyid: str) -> Envelope:
    """``env`` (one signature) with its signature's key id replaced."""
    return Envelope(env.payload_type, env.payload, (Signature(keyid, env.signatures[0].sig),))


def split_cpid(canonical: str) -> CPID:
    """A :class:`CPID` from text the verifier already accepted (rule 5), without re-checking."""
    prefix, _, suffix = canonical.partition("/")
    kind, _, rest = suffix.partition(".")
    serial, _, check = rest.rpartition("-")
    return CPID(prefix=sys.intern(prefix), kind=sys.intern(kind), serial=serial, check=check)


def free_units(facts: RecordFacts, status: StatusFacts | None, claimed: int) -> int:
    """Free units a client can still claim: reported free + units the node already
    withheld for claims (``claimed_units``) - units claimed in ``/alloc/``.

    The same arithmetic as :func:`resolver.claims.service.available_units`, so a node whose agent
    subtracts its claims is not counted twice.  Units are accelerators for records that
    list accelerators, CPU cores otherwise.  A node without a verified status, or whose
    state is not ``up``, has none.
    """
    if status is None or status.state != "up":
        return 0
    units = status.accelerators_free if facts.accelerators else (status.cpu_free or 0)
    return max(0, units + status.withheld - claimed)


@dataclass(slots=True, eq=False)
class Entry:
    """One served CPID.  Treat as read-only; the replica builds a new one on every change.

    Attributes:
        cpid: canonical CPID text.
        facts: the record's indexed fields (kind, key, version, region, models, labels).
        sealed: the record envelope as stored in etcd (:attr:`envelope` rebuilds it).
        chain: cert envelopes from the signer's cert up to the anchor's issue.
        record_revision: etcd ``mod_revision`` of ``/rec/<cpid>``.
        status_facts: the verified status's state and free capacity, or None.
        status_sealed: the status envelope (signed by the record's key), or None.
        status_revision: etcd ``mod_revision`` of ``/live/<cpid>`` (0 without status).
        lease: etcd lease of the live key (0 without status).
        live_held: the status is kept by mass-expiry protection although its live key
            is gone (see ``docs/resolver.md``).
        held_until: Unix time at which a held status is dropped (0 when not held).
        claimed: units claimed (``/alloc/<cpid>``).
        revision: etcd revision of the latest change that produced this entry.
        valid_until: Unix time after which the record (or a cert of its chain) is
            outside its validity window; the entry is not served after it.
    """

    facts: RecordFacts
    sealed: Sealed
    chain: tuple[Envelope, ...]
    record_revision: int
    status_facts: StatusFacts | None
    status_sealed: Sealed | None
    status_revision: int
    lease: int
    live_held: bool
    held_until: float
    claimed: int
    revision: int
    valid_until: float
    leases: Mapping[int, float] = field(repr=False)
    free: int = field(init=False)
    _cache: _Cache | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.free = free_units(self.facts, self.status_facts, self.claimed)

    @property
    def cpid(self) -> str:
        """Canonical CPID text (the record key's; the facts hold it)."""
        return self.facts.cpid

    # -- what the DNS front end and other callers read ----------------------------------

    @property
    def envelope(self) -> Envelope:
        """The record envelope as stored in etcd (rebuilt on each call)."""
        return self.sealed.envelope()

    @property
    def status_envelope(self) -> Envelope | None:
        """The status envelope as stored in etcd (rebuilt on each call), or None."""
        st = self.status_sealed
        if st is None:
            return None
        if st.keyid is NODE_KID:
            return with_keyid(st.envelope(), node_kid(self.sealed))
        return st.envelope()

    @property
    def kid(self) -> str:
        """Key id of the registry key that signed the record."""
        return self.sealed.keyid

    @property
    def _record(self) -> Record | None:
        """The parsed record, when cached."""
        return None if self._cache is None else self._cache.record

    @property
    def _status(self) -> Status | None:
        """The parsed status, when cached."""
        return None if self._cache is None else self._cache.status

    @property
    def record(self) -> Record:
        """The verified ``record.v1`` payload (parsed on first use)."""
        c = self._cache
        rec = None if c is None else c.record
        if rec is None:
            env = self.sealed
            rec = _cache_of(self).record = _reparse(env, Record)
        return rec

    @property
    def status(self) -> Status | None:
        """The verified ``status.v1`` (parsed on first use), or None."""
        env = self.status_sealed
        if env is None:
            return None
        c = self._cache
        st = None if c is None else c.status
        if st is None:
            st = _cache_of(self).status = _reparse(env, Status)
        return st

    @property
    def id(self) -> CPID:
        """The parsed CPID (made from :attr:`cpid`, which the verifier accepted, on each
        call: keeping one per entry cost ~190 bytes a record)."""
        return split_cpid(self.cpid)

    @property
    def version(self) -> int:
        """The record's ``version``."""
        return self.facts.version

    @property
    def kind(self) -> str:
        return self.facts.kind

    @property
    def namespace(self) -> str:
        """The CPID's prefix (the namespace of the registry that issued it)."""
        return self.cpid.partition("/")[0]

    @property
    def region(self) -> str:
        return self.facts.region

    @property
    def accelerators(self) -> tuple[str, ...]:
        """Accelerator models, case-folded."""
        return self.facts.accelerators

    @property
    def endpoints(self) -> list[Endpoint]:
        return self.record.endpoints

    @property
    def labels(self) -> dict[str, str]:
        return dict(self.facts.labels)

    @property
    def live(self) -> bool:
        """A verified status is present (or held) and its state is not ``down``."""
        return self.status_facts is not None and self.status_facts.state != "down"

    @property
    def live_expires_at(self) -> float | None:
        """Unix time by which liveness lapses unless renewed, or None if unknown/not live.

        For a status in etcd this is the expiry of the lease its live key is attached to
        (refreshed from etcd every probe interval); for a held status it is the end of
        the hold.  DNS TTLs for live answers must not exceed it.
        """
        if not self.live:
            return None
        if self.live_held:
            return self.held_until
        return self.leases.get(self.lease)

    def live_ttl(self, now: float | None = None, *, default: int = 0) -> int:
        """Whole seconds until :attr:`live_expires_at` (``default`` when unknown)."""
        expires = self.live_expires_at
        if expires is None:
            return default
        t = time.time() if now is None else now
        return max(0, int(expires - t))

    # -- rendering ------------------------------------------------------------------------

    def bundle(self) -> dict[str, Any]:
        """The ``GET /v1/resources/{cpid}`` object: signed envelopes plus liveness."""
        status = self.status_envelope
        out: dict[str, Any] = {
            "record": self.envelope.to_dict(),
            "chain": [c.to_dict() for c in self.chain],
            "status": None if status is None else status.to_dict(),
            "live": self.live,
            "revision": self.revision,
        }
        if self.live_held:
            out["live_held"] = True
        return out

    def body(self, *, stale: bool = False) -> bytes:
        """:meth:`bundle` as JSON bytes, rendered once per entry (``"stale": true`` added)."""
        c = self._cache
        if stale:
            stale_body = None if c is None else c.stale_body
            if stale_body is None:
                stale_body = self.body()[:-1] + b',"stale":true}'
                _cache_of(self).stale_body = stale_body
            return stale_body
        body = None if c is None else c.body
        if body is None:
            body = json.dumps(self.bundle(), separators=(",", ":")).encode()
            _cache_of(self).body = body
        return body

    def record_dict(self) -> dict[str, Any]:
        """The record payload as a JSON-ready dict (cached)."""
        c = self._cache
        d = None if c is None else c.record_dict
        if d is None:
            d = self.record.model_dump(mode="json", exclude_none=True)
            _cache_of(self).record_dict = d
        return d

    def record_text(self) -> str:
        """:meth:`record_dict` as JSON text (cached), as pydantic's own serializer writes
        it: what a discovery answer splices in (:meth:`resolver.discovery.Match.to_json`).
        A payload verification found :attr:`~resolver.verify.RecordFacts.canonical` is
        that text already (2 µs instead of 20 for parsing and writing it again)."""
        c = self._cache
        text = None if c is None else c.record_text
        if text is None:
            if self.facts.canonical:
                text = self.sealed.payload.decode()
            else:
                text = self.record.model_dump_json(exclude_none=True)
            _cache_of(self).record_text = text
        return text

    def view(self) -> dict[str, Any]:
        """A decoded summary (discovery results and watch events use it)."""
        status = self.status
        return {
            "cpid": self.cpid,
            "kid": self.kid,
            "version": self.version,
            "record": self.record_dict(),
            "status": status.model_dump(mode="json", exclude_none=True) if status else None,
            "live": self.live,
            "live_held": self.live_held,
            "free": self.free,
            "claimed": self.claimed,
            "revision": self.revision,
        }
