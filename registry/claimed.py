"""Claimed units of the registry's nodes, for the ``X-CPI-Claimed`` status answer header.

The registry answers every accepted status with the units claimed on that node
(``/cpi/v1/alloc/<cpid>``, written by the resolver's claims service), so the agent
can subtract them from the free capacity it reports and publish them as the metric
``claimed_units``.

Reading etcd on every heartbeat would put each heartbeat on etcd, which the protocol
section 3 rules out.  Instead the ``/alloc/`` keys of the registry's own namespaces
are listed once at start-up and kept current by a watch (re-listed after a
compaction): answering costs a dictionary lookup, and etcd load grows with the
number of claims, not with heartbeats.  A claim reaches the header within the
watch's delay (milliseconds); while etcd is unreachable the last known values are
served.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable

from registry.index import KV, Compacted, Index, Keys, Prefix, read_units
from schemas.cpid import ns_contains
from schemas.errors import InvalidDataError, RetrievalError

__all__ = ["CLAIMED_HEADER", "ClaimedUnits"]

_log = logging.getLogger(__name__)

CLAIMED_HEADER = "X-CPI-Claimed"
"""Header of the ``204`` answer to a status: units claimed on the node (an integer)."""


class ClaimedUnits:
    """``/cpi/v1/alloc/`` values of CPIDs in ``namespaces``, mirrored in memory."""

    def __init__(self, index: Index, namespaces: Iterable[str], *, retry_s: float = 1.0) -> None:
        held = sorted(set(namespaces))
        top = [ns for ns in held if not any(o != ns and ns_contains(o, ns) for o in held)]
        self._prefixes = [p for ns in top for p in Keys.prefixes_within(Prefix.ALLOC, ns)]
        self._index = index
        self._retry_s = retry_s
        self._units: dict[str, int] = {}
        self._tasks: list[asyncio.Task[None]] = []

    def units(self, cpid: str) -> int:
        """Units claimed on canonical ``cpid`` (0 when none)."""
        return self._units.get(cpid, 0)

    async def start(self) -> None:
        """List the held namespaces' ``/alloc/`` keys, then follow them with watches."""
        for prefix in self._prefixes:
            revision = await self._list(prefix)
            self._tasks.append(
                asyncio.create_task(self._follow(prefix, revision), name=f"claimed {prefix}")
            )

    async def stop(self) -> None:
        tasks, self._tasks = self._tasks, []
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t

    def _set(self, kv: KV) -> None:
        cpid = kv.key[len(Prefix.ALLOC) :]
        try:
            units = read_units(kv.value)
        except InvalidDataError as exc:
            # shown to the node as a count: unreadable counts as nothing claimed
            _log.warning("%s: %s; counted as 0 claimed", kv.key, exc)
            units = 0
        if units:
            self._units[cpid] = units
        else:
            self._units.pop(cpid, None)

    async def _list(self, prefix: str) -> int:
        kvs, revision = await self._index.get_prefix(prefix)
        for cpid in [c for c in self._units if (Prefix.ALLOC + c).startswith(prefix)]:
            del self._units[cpid]
        for kv in kvs:
            self._set(kv)
        return revision

    async def _follow(self, prefix: str, revision: int) -> None:
        while True:
            try:
                async with self._index.watch_prefix(
                    prefix, start_revision=revision + 1, prev_kv=False
                ) as watch:
                    async for item in watch:
                        if isinstance(item, Compacted):
                            break
                        if item.type == "put":
                            self._set(item.kv)
                        else:
                            self._units.pop(item.kv.key[len(Prefix.ALLOC) :], None)
                revision = await self._list(prefix)  # compacted: start again from a listing
            except RetrievalError as exc:
                _log.warning("watch of claimed units under %s failed (re-listing): %s", prefix, exc)
                while True:
                    await asyncio.sleep(self._retry_s)
                    try:
                        revision = await self._list(prefix)
                        break
                    except RetrievalError:
                        continue
