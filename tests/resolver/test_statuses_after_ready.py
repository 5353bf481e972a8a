"""A large first listing: ready once every record it serves is verified, statuses after.

The threshold (``SyncSettings.statuses_after_ready_from``) is set to 0 here so that a
handful of records takes the path a million takes; the reading of ``/live/`` after
ready is held at a gate to look at the resolver between ready and the statuses.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from registry.index import Index, Keys, Prefix
from resolver.core import Resolver
from resolver.discovery import Query
from resolver.events import Event
from resolver.replica import Replica
from resolver.state import Change, ReplicaState
from resolver.verify import Context, Job, Outcome, run_jobs
from schemas import keys
from tests.resolver.kit import FAST, Node, Pki, make_resolver, put_record, put_status, signed
from tests.until import until

LATER = dataclasses.replace(FAST, sync=dataclasses.replace(FAST.sync, statuses_after_ready_from=0))


class Gate:
    """Holds the reading of the statuses after ready until opened."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.open = asyncio.Event()
        self.started = False
        real = Replica._read_statuses

        async def held(replica: Replica, revision: int) -> None:
            self.started = True
            await self.open.wait()
            await real(replica, revision)

        monkeypatch.setattr(Replica, "_read_statuses", held)


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> Gate:
    return Gate(monkeypatch)


@contextlib.asynccontextmanager
async def _started(index: Index, pki: Pki, settings: Any = LATER) -> AsyncIterator[Resolver]:
    async with make_resolver(index, pki, settings) as r:
        async with asyncio.timeout(10):
            await r.wait_ready()
        yield r


def _live(r: Resolver) -> int:
    return sum(1 for e in r.entries() if e.live)


async def test_ready_with_every_record_verified_then_the_statuses(
    index: Index, pki: Pki, gate: Gate
) -> None:
    await pki.publish(index)
    nodes = [Node(model="H100") for _ in range(12)]
    for i, node in enumerate(nodes):
        await put_record(index, pki, node)
        await put_status(index, node, free=i % 8 + 1)
    async with _started(index, pki) as r:
        # ready: every record served, verified; no status yet, so no capacity either
        assert len(list(r.entries())) == 12
        assert _live(r) == 0
        assert r.discover(Query(accelerator="H100", min_free=1)).results == []
        health = r.health()
        assert health["ready"] and health["statuses_pending"] == 12
        assert "statuses_after_ready_s" not in health
        r.metrics.bind(r)
        assert "cpi_resolver_statuses_pending 12.0" in r.metrics.render().decode()
        events: list[Event] = []
        r._state.listeners.append(events.append)

        gate.open.set()
        await until(lambda: _live(r) == 12, what="every status verified after ready")
        await until(lambda: r.health()["statuses_pending"] == 0, what="nothing pending")
        assert r.health()["statuses_after_ready_s"] > 0
        assert "cpi_resolver_statuses_pending 0.0" in r.metrics.render().decode()
        for i, node in enumerate(nodes):
            entry = r.resolve(node.cpid)
            assert entry.live and entry.free == i % 8 + 1
        found = r.discover(Query(accelerator="H100", min_free=8, limit=50)).results
        assert [m.entry.cpid for m in found] == [nodes[7].cpid]
        # each entry got its status as an ordinary event
        puts = [e for e in events if e.type == "put"]
        assert sorted(e.cpid for e in puts) == sorted(n.cpid for n in nodes)
        assert {e.reason for e in puts} == {"status"}
        assert all(e.entry is not None and e.entry.live for e in puts)
        assert all(e.prev is not None and not e.prev.live for e in puts)


async def test_hostile_statuses_cost_themselves_after_ready(
    index: Index, pki: Pki, gate: Gate
) -> None:
    await pki.publish(index)
    good, forged, garbage, other, orphan = (Node() for _ in range(5))
    for node in (good, forged, garbage, other):
        await put_record(index, pki, node)
    await put_status(index, good, free=4)
    # signed by a key that is not the record's
    impostor = Node(key=keys.generate())
    stolen = impostor.status(free=8, cpid=forged.cpid)
    await index.put(Keys.live(forged.cpid), stolen.to_json())
    await index.put(Keys.live(garbage.cpid), b"\x00{not json")
    await put_status(index, other, free=8, cpid=good.cpid)  # about another CPID
    await put_status(index, orphan, free=8)  # no record: never verified, never served
    await index.put(Prefix.LIVE + "not-a-cpid", b"{}")  # a key no registry writes
    await index.put(Prefix.LIVE + "CN.31.CMCC/GPU.4K7Q9M2XH3PT-Y", b"{}")  # bad check char
    async with _started(index, pki) as r:
        assert r.health()["statuses_pending"] > 0
        gate.open.set()
        await until(lambda: r.health()["statuses_pending"] == 0, what="the pass to end")
        await until(lambda: r.resolve(good.cpid).live, what="the good status")
        assert r.resolve(good.cpid).free == 4
        for node in (forged, garbage, other):
            assert not r.resolve(node.cpid).live, node
        assert r.get(orphan.cpid) is None
        failures = r._state.failures
        assert failures["status_bad_signature"] == 1
        assert failures["status_wrong_key"] == 1
        assert failures["status_malformed"] == 1
        assert Keys.live(garbage.cpid) in r.health()["bad_values"]["keys"]


async def test_what_the_watch_brings_meanwhile_wins(index: Index, pki: Pki, gate: Gate) -> None:
    await pki.publish(index)
    nodes = [Node() for _ in range(4)]
    for node in nodes:
        await put_record(index, pki, node)
        await put_status(index, node, free=8)
    renewed, deleted, unstatused, untouched = nodes
    async with _started(index, pki) as r:
        # while the pass waits: a new status, a record deleted, a status deleted
        await put_status(index, renewed, free=2)
        await until(lambda: r.resolve(renewed.cpid).live, what="the new status, verified now")
        assert r.resolve(renewed.cpid).free == 2
        await index.delete(Keys.rec(deleted.cpid))
        await index.delete(Keys.live(unstatused.cpid))
        await until(lambda: r.get(deleted.cpid) is None, what="the record's deletion")
        gate.open.set()
        await until(lambda: r.health()["statuses_pending"] == 0, what="the pass to end")
        await until(lambda: r.resolve(untouched.cpid).live, what="the status held back")
        assert r.resolve(renewed.cpid).free == 2  # not the older status of the listing
        assert r.get(deleted.cpid) is None
        assert not r.resolve(unstatused.cpid).live
        assert r.discover(Query(min_free=1, limit=50)).results != []


@pytest.mark.parametrize("threshold", [100, None])
async def test_small_listings_verify_statuses_before_ready(
    index: Index, pki: Pki, gate: Gate, threshold: int | None
) -> None:
    await pki.publish(index)
    nodes = [Node() for _ in range(3)]
    for node in nodes:
        await put_record(index, pki, node)
        await put_status(index, node, free=5)
    sync = dataclasses.replace(FAST.sync, statuses_after_ready_from=threshold)
    async with _started(index, pki, dataclasses.replace(FAST, sync=sync)) as r:
        assert _live(r) == 3  # at ready, no gate involved
        assert r.health()["statuses_pending"] == 0
        assert not gate.started and "statuses_after_ready_s" not in r.health()


async def test_no_snapshot_before_the_statuses_and_a_compaction_lists_again(
    index: Index, pki: Pki, gate: Gate, tmp_path: Path
) -> None:
    await pki.publish(index)
    nodes = [Node() for _ in range(3)]
    for node in nodes:
        await put_record(index, pki, node)
        await put_status(index, node, free=6)
    settings = dataclasses.replace(LATER, snapshot_dir=tmp_path)
    async with _started(index, pki, settings) as r:
        # a snapshot now would miss the statuses at its revision: a warm start from it
        # would never see them
        assert await r.write_snapshot() is False
        assert not (tmp_path / "replica.snap").exists()
        late = Node()
        await put_record(index, pki, late)
        rev = await put_status(index, late, free=3)
        await until(lambda: r.get(late.cpid) is not None and r.resolve(late.cpid).live, what="late")
        await index.compact(rev)  # the first listing's revision is gone
        gate.open.set()
        await until(
            lambda: all(r.resolve(n.cpid).live for n in nodes), what="statuses from a re-list"
        )
        assert r._replica.relists["statuses"] == 1
        assert r.health()["statuses_pending"] == 0
        assert r.resolve(late.cpid).free == 3 and r.resolve(nodes[0].cpid).free == 6
        assert await r.write_snapshot() is True


async def test_statuses_after_ready_on_the_worker_pool(index: Index, pki: Pki) -> None:
    """The path a million takes: pages verified by worker processes, filed as they come."""
    await pki.publish(index)
    nodes = [Node() for _ in range(40)]
    for i, node in enumerate(nodes):
        await put_record(index, pki, node)
        if i == 7:  # signed by another node's key
            await index.put(Keys.live(node.cpid), nodes[0].status(cpid=node.cpid).to_json())
        else:
            await put_status(index, node, free=i % 5)
    settings = dataclasses.replace(LATER, verify_workers=2)
    async with _started(index, pki, settings) as r:
        await until(lambda: r.health()["statuses_pending"] == 0, within=30, what="the pass")
        assert r._verifier.checked_pool == 40  # the statuses (40 records: verified inline)
        for i, node in enumerate(nodes):
            entry = r.resolve(node.cpid)
            assert entry.live == (i != 7) and (i == 7 or entry.free == i % 5), i
        assert r._state.failures["status_bad_signature"] == 1


async def test_a_status_whose_record_changed_while_it_was_verified(pki: Pki) -> None:
    """Jobs are made under the lock and filed under it later: a record rewritten in
    between (new facts) has its status verified again against it, not filed."""
    state = ReplicaState(anchors=pki.anchors)
    certs = [Change("put", Keys.cert(pki.kid(ns)), c.to_json(), 2) for ns, c in pki.certs.items()]
    node = Node()
    rec = Change("put", Keys.rec(node.cpid), signed(pki, node.record()).to_json(), 3)
    await state.apply([*certs, rec], 3, check=_inline)
    live = Change("put", Keys.live(node.cpid), node.status(free=5).to_json(), 3)
    ctx, jobs, targets, rest = state.status_jobs([live])
    assert len(jobs) == 1 and rest == []
    outcomes = [o for part in [run_jobs(ctx, jobs)] for o in part]
    v2 = Change("put", Keys.rec(node.cpid), signed(pki, node.record(version=2)).to_json(), 4)
    await state.apply([v2], 4, check=_inline)
    events = await state.file_statuses(targets, outcomes, set(), check=_inline)
    entry = state.get(node.cpid)
    assert entry is not None and entry.live and entry.free == 5 and entry.version == 2
    assert state.lives[node.cpid].checked is state.recs[node.cpid].facts
    assert [e.reason for e in events] == ["status"]
    # and a key the watch changed meanwhile is left alone
    newer = Change("put", Keys.live(node.cpid), node.status(free=1).to_json(), 5)
    await state.apply([newer], 5, check=_inline)
    assert await state.file_statuses(targets, outcomes, {live.key}, check=_inline) == []
    assert state.get(node.cpid).free == 1  # type: ignore[union-attr]


async def _inline(ctx: Context, jobs: Sequence[Job]) -> AsyncIterator[list[Outcome]]:
    yield run_jobs(ctx, jobs)
