"""Liveness logic with a fake clock against real etcd: writes on change, expiry, self-preservation."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator

import pytest

from registry.errors import StaleSequenceError
from registry.index import Index, Keys, Prefix
from registry.liveness import Liveness, capacity_changed
from schemas import dsse
from schemas.models import Capacity, Status
from tests.registry.service_kit import Node


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def liveness(index: Index, clock: Clock) -> AsyncIterator[Liveness]:
    lv = Liveness(
        index,
        heartbeat_s=10,
        expire_after_heartbeats=3,
        live_refresh_s=240,
        lease_ttl_s=30,
        threshold=0.5,
        min_nodes=3,
        clock=clock,
    )
    await lv.start(sweep=False)
    try:
        yield lv
    finally:
        await lv.stop()


async def _registered(index: Index, n: int, group: str = "CN.31.CMCC") -> list[Node]:
    nodes = [Node() for _ in range(n)]
    for node in nodes:
        await index.put(Keys.rec(node.cpid), b"{}")
    return nodes


async def beat(lv: Liveness, node: Node, *, free: int = 8, state: str = "up") -> bool:
    env = dsse.Envelope.from_json(node.status(free=free, state=state))
    st = Status.model_validate_json(env.payload)
    tracked = lv.get(node.cpid) or lv.track(
        node.cpid, group="CN.31.CMCC", public_key=node.public_key
    )
    return await lv.heartbeat(tracked, st, env)


async def live_keys(index: Index) -> set[str]:
    kvs, _ = await index.get_prefix(Prefix.LIVE)
    return {kv.key for kv in kvs}


@pytest.mark.parametrize(
    ("old", "new", "changed"),
    [
        (None, Capacity(accelerators_free=1), True),
        (Capacity(accelerators_free=1), Capacity(accelerators_free=1), False),
        (Capacity(accelerators_free=1), Capacity(accelerators_free=2), True),
        (
            Capacity(accelerators_free=1, cpu_free=4),
            Capacity(accelerators_free=1, cpu_free=5),
            True,
        ),
        (
            Capacity(accelerators_free=1, memory_free_gib=100.0),
            Capacity(accelerators_free=1, memory_free_gib=95.0),
            False,
        ),
        (
            Capacity(accelerators_free=1, memory_free_gib=100.0),
            Capacity(accelerators_free=1, memory_free_gib=80.0),
            True,
        ),
        (Capacity(accelerators_free=1), Capacity(accelerators_free=1, memory_free_gib=1.0), True),
    ],
)
def test_capacity_changed(old: Capacity | None, new: Capacity, changed: bool) -> None:
    assert capacity_changed(old, new) is changed


async def test_writes_on_first_change_and_refresh_only(
    index: Index, liveness: Liveness, clock: Clock
) -> None:
    (node,) = await _registered(index, 1)
    assert await beat(liveness, node) is True  # first
    for _ in range(20):
        clock.t += 10
        assert await beat(liveness, node) is False  # 200 s: unchanged, no refresh yet
    clock.t += 40
    assert await beat(liveness, node) is True  # 240 s since the last write: refresh
    assert await beat(liveness, node, free=7) is True  # capacity changed
    assert await beat(liveness, node, free=7, state="draining") is True  # state changed
    assert liveness.counters.heartbeats == 24
    assert liveness.counters.writes == 4
    assert dict(liveness.counters.by_reason) == {"first": 1, "refresh": 1, "changed": 2}


async def test_silent_node_expires_after_three_intervals(
    index: Index, liveness: Liveness, clock: Clock
) -> None:
    a, b, c, d = await _registered(index, 4)
    for n in (a, b, c, d):
        await beat(liveness, n)
    clock.t += 20
    for n in (b, c, d):
        await beat(liveness, n)
    assert await liveness.sweep() == []
    clock.t += 10.5  # a: silent 30.5 s > 3 x 10 s; 1 of 4 silent: no self-preservation
    assert await liveness.sweep() == [a.cpid]
    assert await live_keys(index) == {Keys.live(n.cpid) for n in (b, c, d)}
    assert liveness.get(a.cpid) is None


async def test_self_preservation_and_override(
    index: Index, liveness: Liveness, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    nodes = await _registered(index, 10)
    for n in nodes:
        await beat(liveness, n)
    clock.t += 31  # all ten silent at once
    with caplog.at_level(logging.WARNING, logger="registry.liveness"):
        assert await liveness.sweep() == []
        assert await liveness.sweep() == []
    warnings = [r for r in caplog.records if "self-preservation" in r.getMessage()]
    assert len(warnings) == 1  # logged once per episode
    assert "10 of 10 live nodes of CN.31.CMCC" in warnings[0].getMessage()
    assert liveness.protecting == {"CN.31.CMCC"}
    assert len(await live_keys(index)) == 10

    # six return: 4 of 10 silent is under the threshold, the four expire
    for n in nodes[:6]:
        await beat(liveness, n)
    expired = await liveness.sweep()
    assert sorted(expired) == sorted(n.cpid for n in nodes[6:])
    assert liveness.protecting == set()

    # the six go silent: protected again; the operator switches it off
    clock.t += 31
    assert await liveness.sweep() == []
    assert liveness.protecting == {"CN.31.CMCC"}
    liveness.set_self_preservation(False)
    assert sorted(await liveness.sweep()) == sorted(n.cpid for n in nodes[:6])
    assert await live_keys(index) == set()


async def test_small_groups_are_not_protected(
    index: Index, liveness: Liveness, clock: Clock
) -> None:
    a, b = await _registered(index, 2)  # below min_nodes = 3
    for n in (a, b):
        await beat(liveness, n)
    clock.t += 31
    assert sorted(await liveness.sweep()) == sorted([a.cpid, b.cpid])


async def test_expiry_never_deletes_a_live_key_written_by_another_instance(
    index: Index, liveness: Liveness, clock: Clock
) -> None:
    (node,) = await _registered(index, 1)
    await beat(liveness, node)
    other = await index.grant_lease(30)
    await index.put(Keys.live(node.cpid), b"from another instance", lease=other.id)
    clock.t += 31
    assert await liveness.sweep() == [node.cpid]
    kv = await index.get(Keys.live(node.cpid))
    assert kv is not None and kv.value == b"from another instance"
    await other.revoke()


async def test_heartbeat_for_a_deleted_record_raises_not_found(
    index: Index, liveness: Liveness
) -> None:
    from schemas.errors import NotFoundError

    (node,) = await _registered(index, 1)
    await index.delete(Keys.rec(node.cpid))
    with pytest.raises(NotFoundError, match="register again"):
        await beat(liveness, node)
    assert liveness.get(node.cpid) is None
    assert await live_keys(index) == set()


async def test_concurrent_live_writes_share_transactions(index: Index, liveness: Liveness) -> None:
    nodes = await _registered(index, 150)
    wrote = await asyncio.gather(*(beat(liveness, n) for n in nodes))
    assert all(wrote)
    assert await live_keys(index) == {Keys.live(n.cpid) for n in nodes}
    assert liveness.counters.writes == 150
    # 150 first writes in at most a few grouped transactions (60 nodes each at most)
    assert 3 <= liveness.counters.txns <= 10
    for n in nodes:  # every seq key written beside its live key
        kv = await index.get(Keys.seq(n.cpid))
        assert kv is not None and json.loads(kv.value)["seq"] == n.seq


async def test_a_failed_compare_in_a_group_costs_only_that_node(
    index: Index, liveness: Liveness
) -> None:
    from schemas.errors import NotFoundError

    nodes = await _registered(index, 20)
    await asyncio.gather(*(beat(liveness, n) for n in nodes))
    gone, raced = nodes[0], nodes[1]
    await index.delete(Keys.rec(gone.cpid))
    # another instance accepted a later status of `raced` and stored its seq
    await index.put(Keys.seq(raced.cpid), json.dumps({"seq": raced.seq + 5, "observed_at": 1}))
    results = await asyncio.gather(
        *(beat(liveness, n, free=n.seq % 3) for n in nodes), return_exceptions=True
    )
    assert isinstance(results[0], NotFoundError)
    assert isinstance(results[1], StaleSequenceError)  # seq raced.seq <= stored: refused
    assert all(r is True for r in results[2:])
    kv = await index.get(Keys.seq(raced.cpid))
    assert kv is not None and json.loads(kv.value)["seq"] == raced.seq + 4
    for n in nodes[2:]:
        kv = await index.get(Keys.seq(n.cpid))
        assert kv is not None and json.loads(kv.value)["seq"] == n.seq


async def test_first_contact_reads_are_grouped_and_respect_stored_seq(
    index: Index, liveness: Liveness
) -> None:
    nodes = await _registered(index, 30)
    for n in nodes[:10]:  # statuses written by an earlier run of the registry
        await index.put(Keys.seq(n.cpid), json.dumps({"seq": 100, "observed_at": 1}))
    results = await asyncio.gather(*(beat(liveness, n) for n in nodes), return_exceptions=True)
    assert all(isinstance(r, StaleSequenceError) for r in results[:10])
    assert all(r is True for r in results[10:])
    assert liveness._reads.batches < 10  # 30 first contacts, not 30 reads
