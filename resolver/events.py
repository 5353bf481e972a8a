"""Change events of the replica and the in-memory ring that watchers resume from.

Every change to what the resolver serves becomes an :class:`Event`: ``put`` (an entry
appeared or changed: record, status, claimed units, hold) or ``delete`` (it is no longer
served: deregistered, revoked, expired, failed verification).  Events carry the etcd
revision that caused them.  Changes the resolver makes on its own clock (a record
reaching ``expires_at``, a mass-expiry hold ending) have no etcd revision; they get the
current revision and a sub-sequence number, so their id is ``"<revision>.<n>"``.

Events are appended in groups, one group per applied etcd revision (or per clock
sweep); ids increase strictly from group to group.  A watcher that has seen every event
up to id ``c`` resumes by asking for the groups after ``c``; the ring answers with them,
or with ``None`` when they are no longer held (the watcher must re-list).
"""

from __future__ import annotations

import asyncio
import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from resolver.entry import Entry
from resolver.errors import QueryError
from schemas.http import parse_int

__all__ = ["Cursor", "Event", "EventLog", "format_cursor", "parse_cursor"]

Cursor = tuple[int, int]
"""``(etcd revision, sub-sequence)``; ``(r, 0)`` is written ``"r"``, ``(r, n)`` ``"r.n"``."""


def format_cursor(cursor: Cursor) -> str:
    r, n = cursor
    return str(r) if n == 0 else f"{r}.{n}"


def parse_cursor(text: str) -> Cursor:
    """Parse an event id (``Last-Event-ID``): ``"<revision>"`` or ``"<revision>.<n>"``."""
    head, dot, tail = text.strip().partition(".")
    r = parse_int(head, negative=True)
    n = parse_int(tail, negative=True) if dot else 0
    if r is None or n is None:
        raise QueryError(
            f"event id {text!r} is not '<revision>' or '<revision>.<n>' "
            "(decimal integers, ASCII digits 0-9 only)"
        )
    if r < 0 or n < 0:
        raise QueryError(f"event id {text!r} must not be negative")
    return r, n


@dataclass(frozen=True, slots=True)
class Event:
    """One change, or a control message for a watcher.

    ``type``:

    * ``put``: ``entry`` is served now (``prev`` is what was served before, if anything);
    * ``delete``: ``prev`` is no longer served (``entry`` is None);
    * ``relist``: the watcher's position is older than the ring: re-list (discover) and
      carry on from this event's id;
    * ``progress``: nothing matched for a while; the stream is alive at this id.

    ``reason`` says what changed (``record``, ``status``, ``alloc``, ``verify``,
    ``expired``, ``mass_expiry``, ``deleted``, ``query`` when a watcher's filter stops
    matching, ...).  ``final`` marks the last event of its group (the watcher's resume
    position only advances on a final event).
    """

    type: Literal["put", "delete", "relist", "progress"]
    cpid: str
    cursor: Cursor
    entry: Entry | None = None
    prev: Entry | None = None
    reason: str = ""
    final: bool = True

    @property
    def revision(self) -> int:
        """The etcd revision this event belongs to."""
        return self.cursor[0]

    @property
    def id(self) -> str:
        """The event id (SSE ``id:``): ``"<revision>"`` or ``"<revision>.<n>"``."""
        return format_cursor(self.cursor)

    def to_dict(self) -> dict[str, object]:
        """The JSON form sent to watch clients."""
        out: dict[str, object] = {"type": self.type, "id": self.id, "revision": self.revision}
        if self.cpid:
            out["cpid"] = self.cpid
        if self.reason:
            out["reason"] = self.reason
        if self.type == "put" and self.entry is not None:
            out.update(self.entry.view())
            out["type"] = self.type
            out["id"] = self.id
            out["revision"] = self.revision
        return out


class EventLog:
    """A bounded ring of event groups, with waiting for new ones.

    ``floor``: every event after this cursor is held (events at or before it may not
    be).  Appending more than ``capacity`` events drops the oldest groups and raises the
    floor.
    """

    def __init__(self, capacity: int = 10_000) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        self._cursors: list[Cursor] = []
        self._groups: list[tuple[Event, ...]] = []
        self._start = 0  # index of the oldest group still held
        self._held = 0  # number of events held
        self.floor: Cursor = (0, 0)
        self.last: Cursor = (0, 0)
        self.appended = 0
        self._changed = asyncio.Event()
        self.closed = False

    def reset(self, cursor: Cursor) -> None:
        """Start (or start over) at ``cursor``: nothing before it is held."""
        self._cursors.clear()
        self._groups.clear()
        self._start = self._held = 0
        self.floor = self.last = cursor

    def next_cursor(self, revision: int) -> Cursor:
        """The cursor for a new group caused by etcd ``revision`` (or by the clock)."""
        if revision > self.last[0]:
            return (revision, 0)
        return (self.last[0], self.last[1] + 1)

    def append(self, events: Sequence[Event]) -> None:
        """Append one group (all events share one cursor, greater than any before)."""
        if not events:
            return
        cursor = events[0].cursor
        if cursor <= self.last:
            raise ValueError(f"event cursor {cursor} is not after the last one {self.last}")
        self._cursors.append(cursor)
        self._groups.append(tuple(events))
        self._held += len(events)
        self.appended += len(events)
        self.last = cursor
        while self._held > self.capacity and len(self._groups) - self._start > 1:
            dropped = self._groups[self._start]
            self._held -= len(dropped)
            self.floor = self._cursors[self._start]
            self._groups[self._start] = ()
            self._start += 1
        if self._start > 1024 and self._start * 2 > len(self._groups):
            del self._groups[: self._start]
            del self._cursors[: self._start]
            self._start = 0
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def after(self, cursor: Cursor) -> list[tuple[Event, ...]] | None:
        """Every group after ``cursor``; None if some of them are no longer held."""
        if cursor < self.floor:
            return None
        i = bisect.bisect_right(self._cursors, cursor, lo=self._start)
        return self._groups[i:]

    @property
    def size(self) -> int:
        """Events currently held."""
        return self._held

    async def wait(self, cursor: Cursor, max_wait: float | None = None) -> bool:
        """Wait until a group after ``cursor`` exists (True) or ``max_wait`` s pass (False)."""
        while self.last <= cursor and not self.closed:
            waiter = self._changed
            try:
                async with asyncio.timeout(max_wait):
                    await waiter.wait()
            except TimeoutError:
                return False
        return self.last > cursor

    def close(self) -> None:
        """Wake every waiter for good (watch iterators end)."""
        self.closed = True
        self._wake()
