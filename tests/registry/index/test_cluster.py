"""registry.index against a 3-member etcd cluster whose leader dies mid-stream."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cpi.etcdproc import EtcdProcess, start_cluster
from registry.index import Compacted, Index, Watch, WatchEvent
from schemas.errors import RetrievalError
from tests.until import until

pytestmark = pytest.mark.cluster


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[list[EtcdProcess]]:
    members = start_cluster(
        tmp_path, 3, heartbeat_interval_ms=50, election_timeout_ms=500, snapshot_count=200
    )
    try:
        yield members
    finally:
        for member in members:
            member.stop()


async def put_acknowledged(index: Index, key: str, value: bytes) -> int:
    """Put until etcd acknowledges it (an election may refuse a few attempts)."""
    deadline = time.monotonic() + 15.0
    while True:
        try:
            return await index.put(key, value)
        except RetrievalError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


def caught_up(out: list[WatchEvent | Compacted], revision: int) -> bool:
    return bool(out) and isinstance(out[-1], WatchEvent) and out[-1].revision >= revision


async def test_watch_and_writes_survive_losing_the_leader(cluster: list[EtcdProcess]) -> None:
    async with Index(endpoints=[m.endpoint for m in cluster], timeout=5.0) as index:
        members = await index.member_list()
        assert sorted(m.name for m in members) == ["m0", "m1", "m2"]
        start = await index.revision() + 1

        # one watch stream per member (the channel round-robins new streams over members),
        # so one of them is certainly served by the leader that is about to die
        for _ in range(6):
            await index.ping()
        watches = [index.watch_prefix("/t/ha/", start_revision=start) for _ in range(3)]
        items: list[list[WatchEvent | Compacted]] = [[], [], []]

        async def consume(watch: Watch, out: list[WatchEvent | Compacted]) -> None:
            async for item in watch:
                out.append(item)

        consumers = [
            asyncio.create_task(consume(w, out)) for w, out in zip(watches, items, strict=True)
        ]
        acked: dict[int, str] = {}
        for i in range(20):
            key = f"/t/ha/{i:03d}"
            acked[await put_acknowledged(index, key, b"before")] = key

        # every watch is mid-stream when the leader dies
        before_rev = max(acked)
        await until(lambda: all(caught_up(out, before_rev) for out in items), 10.0, "first events")
        status = await index.status()
        old_leader = status.leader_id
        assert old_leader != 0
        leader_url = next(m.client_urls[0] for m in members if m.id == old_leader)
        leader = next(m for m in cluster if m.url == leader_url)
        leader.kill()  # a crash, not a graceful hand-over

        for i in range(20, 40):
            key = f"/t/ha/{i:03d}"
            acked[await put_acknowledged(index, key, b"after")] = key
            kv = await index.get(key)
            assert kv is not None and kv.value == b"after"

        final, final_rev = await index.get_prefix("/t/ha/")
        await until(
            lambda: all(caught_up(out, final_rev) for out in items), 15.0, "watches to catch up"
        )
        for consumer in consumers:
            consumer.cancel()
        await asyncio.gather(*consumers, return_exceptions=True)
        for watch in watches:
            await watch.aclose()

        new_status = await index.status()
        assert new_status.leader_id not in (0, old_leader)

    assert len(final) == 40
    assert sum(w.reconnects for w in watches) >= 1  # the leader's stream did break
    for out in items:
        seen = [e for e in out if isinstance(e, WatchEvent)]
        assert seen == out  # no Compacted
        # every write went to the watched prefix: each watch sees every revision, once
        assert [e.revision for e in seen] == list(range(start, final_rev + 1))
        assert all(key == seen[rev - start].kv.key for rev, key in acked.items())
        assert {e.kv.key: e.kv.value for e in seen} == {kv.key: kv.value for kv in final}
