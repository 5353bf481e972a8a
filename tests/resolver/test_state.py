"""The replica state alone (no etcd, no I/O), on an injected clock: what is served, when."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence

import pytest

from registry.index import Keys
from resolver.state import Change, ReplicaState
from resolver.verify import Context, Job, Outcome, run_jobs
from schemas.chain import CLOCK_SKEW
from tests.resolver.kit import Node, Pki, signed


async def inline(ctx: Context, jobs: Sequence[Job]) -> AsyncIterator[list[Outcome]]:
    yield run_jobs(ctx, jobs)


class Clock:
    """Starts at the real time (the kit's certs and default records are valid around it)."""

    def __init__(self) -> None:
        self.now = float(int(time.time()))

    def __call__(self) -> float:
        return self.now


class World:
    def __init__(self, pki: Pki) -> None:
        self.pki = pki
        self.clock = Clock()
        self.t0 = int(self.clock.now)
        self.state = ReplicaState(anchors=pki.anchors, clock=self.clock)
        self.rev = 1

    async def put(self, key: str, value: bytes) -> None:
        self.rev += 1
        await self.state.apply([Change("put", key, value, self.rev)], self.rev, check=inline)

    async def delete(self, key: str) -> None:
        self.rev += 1
        await self.state.apply([Change("delete", key, b"", self.rev)], self.rev, check=inline)


@pytest.fixture
async def world(pki: Pki) -> World:
    w = World(pki)
    for ns, cert in pki.certs.items():
        await w.put(Keys.cert(pki.kid(ns)), cert.to_json())
    return w


@pytest.mark.parametrize(
    ("issued", "expires", "served", "reason"),
    [
        (-10, 3600, True, None),
        (-7200, -3600, False, "expired"),
        (-7200, -CLOCK_SKEW + 5, True, None),  # ended, but within the allowed clock skew
        (3600, 7200, False, "not_yet_valid"),
        (CLOCK_SKEW - 5, 7200, True, None),  # starts within the skew
    ],
    ids=["valid", "ended", "ended-within-skew", "not-yet-valid", "starts-within-skew"],
)
async def test_a_record_is_served_only_inside_its_window(
    world: World, issued: int, expires: int, served: bool, reason: str | None
) -> None:
    node = Node()
    t0 = world.t0
    rec = node.record(issued_at=t0 + issued, expires_at=t0 + expires)
    await world.put(Keys.rec(node.cpid), signed(world.pki, rec).to_json())
    assert (world.state.get(node.cpid) is not None) is served
    if reason is not None:
        assert world.state.failures[reason] == 1
        rejected = world.state.rejection(node.cpid)
        assert rejected is not None and rejected[0] == reason


async def test_the_clock_sweep_drops_a_record_when_its_window_closes(world: World) -> None:
    node = Node()
    t0 = world.t0
    rec = node.record(issued_at=t0 - 10, expires_at=t0 + 100)
    await world.put(Keys.rec(node.cpid), signed(world.pki, rec).to_json())
    assert world.state.get(node.cpid) is not None
    assert await world.state.sweep(check=inline) == []  # nothing is due yet
    world.clock.now = t0 + 100 + CLOCK_SKEW + 1
    events = await world.state.sweep(check=inline)
    assert [(e.type, e.cpid) for e in events] == [("delete", node.cpid)]
    assert world.state.get(node.cpid) is None


async def test_a_status_is_served_only_under_its_records_key(world: World) -> None:
    node, other = Node(), Node()
    await world.put(Keys.rec(node.cpid), signed(world.pki, node.record()).to_json())
    await world.put(Keys.live(node.cpid), other.status(cpid=node.cpid).to_json())
    entry = world.state.get(node.cpid)
    assert entry is not None and entry.status_facts is None
    await world.put(Keys.live(node.cpid), node.status(free=3).to_json())
    entry = world.state.get(node.cpid)
    assert entry is not None and entry.status_facts is not None and entry.free == 3


async def test_deleting_the_record_stops_serving(world: World) -> None:
    node = Node()
    await world.put(Keys.rec(node.cpid), signed(world.pki, node.record()).to_json())
    rev = world.state.revision
    await world.delete(Keys.rec(node.cpid))
    assert world.state.get(node.cpid) is None
    assert world.state.revision == rev + 1
