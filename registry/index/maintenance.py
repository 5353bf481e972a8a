"""Keeping etcd inside its limits: history compaction, defragmentation, the space alarm.

etcd keeps every revision of every key until it is **compacted**; compaction frees
pages inside the database file but does not shrink it: only a **defragmentation**
of a member gives the free pages back.  When the file reaches the member's
``--quota-backend-bytes``, etcd raises the ``NOSPACE`` alarm and refuses every write
until space is freed *and* the alarm is cleared.  :class:`Maintainer` does the three
steps in the order etcd's operators' guide gives them:

1. compact history older than ``keep_revisions`` revisions (when etcd's own
   ``--auto-compaction-*`` is on, as ``cpi up`` starts it, this finds nothing to do);
2. defragment each member whose free pages exceed ``min_free_fraction`` of its file
   (and ``min_free_bytes``), or every member while ``NOSPACE`` is raised, **one member
   at a time**: a member answers nothing while it rewrites its file, and the others
   keep the quorum;
3. clear a ``NOSPACE`` alarm once every member is below its quota again.

It needs etcd's ``root`` (compaction, defragmentation and alarms are cluster
administration).  ``cpi up`` starts members with a quota and periodic compaction
(:mod:`cpi.etcdproc`); docs/operations.md gives the numbers and the schedule.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from registry.index.client import Index
from registry.index.values import IndexCompactedError
from schemas.errors import RetrievalError

__all__ = ["DefragResult", "Maintainer", "MaintenanceReport", "compact_history"]

_log = logging.getLogger(__name__)
_SETTLE_S = 0.5


@dataclass(frozen=True, slots=True)
class DefragResult:
    """One member's database file before and after (``defragmented`` False: skipped)."""

    endpoint: str
    size_before: int
    in_use: int
    size_after: int
    defragmented: bool


@dataclass(slots=True)
class MaintenanceReport:
    """What one :meth:`Maintainer.run_once` did."""

    compacted_at: int | None = None
    members: list[DefragResult] = field(default_factory=list)
    alarm_cleared: bool = False
    errors: list[str] = field(default_factory=list)


async def compact_history(index: Index, *, keep_revisions: int) -> int | None:
    """Compact everything older than the newest *keep_revisions* revisions; the
    revision compacted at, or ``None`` when there was nothing (new enough) to compact."""
    if keep_revisions < 1:
        raise ValueError(f"keep_revisions must be at least 1, got {keep_revisions}")
    target = await index.revision() - keep_revisions
    if target < 2:
        return None
    try:
        await index.compact(target, physical=True)
    except IndexCompactedError:
        return None  # already compacted at or past it (etcd's auto-compaction)
    return target


class Maintainer:
    """Compaction, defragmentation and the space alarm of one etcd cluster.

    Args:
        endpoints: Every member's client endpoint (defragmentation goes to each).
        open_index: Builds an :class:`Index` for a list of endpoints, with the
            credentials (etcd ``root``) and TLS to use.
        keep_revisions: History to keep on compaction; ``None``: leave compaction to
            etcd's ``--auto-compaction-*``.
        min_free_fraction, min_free_bytes: A member is defragmented when the free
            pages of its file are at least both.
        defrag_timeout: Bound on one member's defragmentation, seconds.
    """

    def __init__(
        self,
        endpoints: Sequence[str],
        open_index: Callable[[list[str]], Index],
        *,
        keep_revisions: int | None = 100_000,
        min_free_fraction: float = 0.25,
        min_free_bytes: int = 64 << 20,
        defrag_timeout: float = 600.0,
    ) -> None:
        if not endpoints:
            raise ValueError("at least one etcd endpoint is required")
        if not 0.0 <= min_free_fraction <= 1.0:
            raise ValueError(f"min_free_fraction must be in [0, 1], got {min_free_fraction}")
        self.endpoints = list(endpoints)
        self._open = open_index
        self.keep_revisions = keep_revisions
        self.min_free_fraction = min_free_fraction
        self.min_free_bytes = min_free_bytes
        self.defrag_timeout = defrag_timeout

    def due(self, db_size: int, in_use: int) -> bool:
        """Whether a member's file has enough free pages to be worth a defragmentation."""
        free = db_size - in_use
        return free >= self.min_free_bytes and free >= self.min_free_fraction * db_size

    async def run_once(self, *, force_defrag: bool = False) -> MaintenanceReport:
        """Compact, defragment the members that need it (all with *force_defrag*), one
        at a time, then clear a NOSPACE alarm.  A member that fails is reported in
        ``errors`` and the others are still done."""
        report = MaintenanceReport()
        async with self._open(self.endpoints) as cluster:
            try:
                nospace = any(kind == "NOSPACE" for _, kind in await cluster.alarms())
            except RetrievalError as exc:
                report.errors.append(f"alarms: {exc}")
                nospace = False
            if nospace:
                # writes are refused, so no backend commit updates a member's "in use"
                # figure after the compaction: defragment every member
                _log.warning("etcd raised NOSPACE: compacting and defragmenting every member")
                force_defrag = True
            if self.keep_revisions is not None:
                try:
                    report.compacted_at = await compact_history(
                        cluster, keep_revisions=self.keep_revisions
                    )
                    if report.compacted_at is not None:
                        # the freed pages show in a member's status after its backend's
                        # next commit (every 100 ms by default)
                        await asyncio.sleep(_SETTLE_S)
                except RetrievalError as exc:
                    report.errors.append(f"compaction: {exc}")
            for endpoint in self.endpoints:
                try:
                    report.members.append(await self._member(endpoint, force_defrag))
                except RetrievalError as exc:
                    report.errors.append(f"{endpoint}: {exc}")
            try:
                if nospace and any(kind == "NOSPACE" for _, kind in await cluster.alarms()):
                    await cluster.disarm_nospace()
                    report.alarm_cleared = True
                    _log.warning("cleared etcd's NOSPACE alarm after compaction and defrag")
            except RetrievalError as exc:
                report.errors.append(f"alarms: {exc}")
        return report

    async def _member(self, endpoint: str, force: bool) -> DefragResult:
        async with self._open([endpoint]) as member:
            before = await member.status()
            if not (force or self.due(before.db_size, before.db_size_in_use)):
                return DefragResult(
                    endpoint, before.db_size, before.db_size_in_use, before.db_size, False
                )
            _log.info(
                "defragmenting etcd member %s: %d MiB file, %d MiB in use",
                endpoint,
                before.db_size >> 20,
                before.db_size_in_use >> 20,
            )
            await member.defragment(timeout=self.defrag_timeout)
            after = await member.status()
            return DefragResult(
                endpoint, before.db_size, before.db_size_in_use, after.db_size, True
            )

    async def run(self, interval_s: float) -> None:
        """:meth:`run_once` every *interval_s* seconds until cancelled (errors logged)."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                report = await self.run_once()
            except RetrievalError as exc:
                _log.warning("etcd maintenance failed: %s", exc)
                continue
            for error in report.errors:
                _log.warning("etcd maintenance: %s", error)
