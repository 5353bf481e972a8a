"""registry.index.watch against a real etcd: order, resumption, compaction."""

from __future__ import annotations

import asyncio
import logging

import pytest

from cpi.etcdproc import EtcdProcess
from registry.index import Compacted, Index, IndexCompactedError, Op
from tests.registry.index.kit import events, take
from tests.until import until


async def test_watch_sees_puts_and_deletes_in_order(index: Index) -> None:
    start = await index.revision() + 1
    async with index.watch_prefix("/t/w/", start_revision=start) as watch:
        r1 = await index.put("/t/w/a", b"1")
        r2 = await index.put("/t/w/b", b"2")
        await index.put("/t/other", b"not watched")
        r3 = await index.put("/t/w/a", b"3")
        await index.delete("/t/w/b")
        r4 = await index.revision()
        both = await index.txn(success=[Op.put("/t/w/c", b"c"), Op.put("/t/w/d", b"d")])
        got = events(await take(watch, 6))
        assert watch.next_revision == both.revision + 1
    assert [(e.type, e.kv.key, e.revision) for e in got] == [
        ("put", "/t/w/a", r1),
        ("put", "/t/w/b", r2),
        ("put", "/t/w/a", r3),
        ("delete", "/t/w/b", r4),
        ("put", "/t/w/c", both.revision),
        ("put", "/t/w/d", both.revision),
    ]
    assert got[2].kv.value == b"3" and got[2].kv.version == 2
    assert got[2].prev is not None and got[2].prev.value == b"1"
    assert got[0].prev is None
    assert got[3].kv.value == b"" and got[3].kv.mod_revision == r4
    assert got[3].prev is not None and got[3].prev.value == b"2"


async def test_watch_from_an_old_revision_replays_history(index: Index) -> None:
    first = await index.put("/t/h/0", b"0")
    for i in range(1, 5):
        await index.put(f"/t/h/{i}", str(i))
    watch = index.watch_prefix("/t/h/", start_revision=first + 2)
    got = events(await take(watch, 3))
    await watch.aclose()
    assert [e.kv.key for e in got] == ["/t/h/2", "/t/h/3", "/t/h/4"]
    assert [e.revision for e in got] == [first + 2, first + 3, first + 4]


async def test_closing_the_index_ends_its_watches(etcd_server: EtcdProcess) -> None:
    idx = Index(endpoints=[etcd_server.endpoint])
    await idx.connect()
    watch = idx.watch_prefix("/t/closing/", start_revision=await idx.revision() + 1)
    consumer = asyncio.ensure_future(take(watch, 1))
    await asyncio.sleep(0.2)
    assert not consumer.done()
    await idx.close()
    assert await asyncio.wait_for(consumer, 2.0) == []  # ended quietly, not cancelled


def test_watch_needs_an_explicit_start_revision() -> None:
    idx = Index(endpoints=["127.0.0.1:1"])
    with pytest.raises(ValueError, match="revision"):
        idx.watch_prefix("/t/", start_revision=0)


async def test_watch_resumes_after_etcd_restart_without_gap_or_duplicate(
    etcd_private: EtcdProcess, private_index: Index, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="registry.index")
    start = await private_index.revision() + 1
    watch = private_index.watch_prefix("/t/r/", start_revision=start)
    before = [await private_index.put(f"/t/r/{i}", b"before") for i in range(3)]
    got = await take(watch, 3)

    etcd_private.stop()
    pending = asyncio.ensure_future(take(watch, 4, within=20.0))
    await asyncio.sleep(1.0)  # the watcher sees the outage and retries
    assert not pending.done()
    etcd_private.start()
    etcd_private.wait_healthy()
    # written at once, most likely before the watcher has reconnected
    after = [await private_index.put(f"/t/r/{i}", b"after") for i in range(3, 5)]
    after.append(await private_index.put("/t/r/0", b"again"))
    after.append(await private_index.put("/t/r/9", b"last"))
    got += await pending
    await watch.aclose()

    revisions = [e.revision for e in events(got)]
    assert revisions == before + after
    assert revisions == list(range(start, start + 7))
    assert [e.kv.key for e in events(got)] == [
        "/t/r/0", "/t/r/1", "/t/r/2", "/t/r/3", "/t/r/4", "/t/r/0", "/t/r/9",
    ]  # fmt: skip
    assert watch.reconnects >= 1 and private_index.watch_reconnects >= 1
    assert any("reconnect #1" in r.getMessage() for r in caplog.records)


async def test_watch_started_during_an_outage_catches_up(
    etcd_private: EtcdProcess, private_index: Index
) -> None:
    first = await private_index.put("/t/c/00", b"0")
    for i in range(1, 10):
        await private_index.put(f"/t/c/{i:02d}", b"x")
    etcd_private.stop()
    watch = private_index.watch_prefix("/t/c/", start_revision=first)
    pending = asyncio.ensure_future(take(watch, 11, within=20.0))
    await asyncio.sleep(0.5)
    etcd_private.start()
    etcd_private.wait_healthy()

    async def caught_up() -> bool:
        return watch.next_revision == first + 10

    await until(caught_up, 10.0, "the watch to replay history")
    last = await private_index.put("/t/c/10", b"new")
    got = events(await pending)
    await watch.aclose()
    assert [e.revision for e in got] == [*range(first, first + 10), last]
    assert last == first + 10


async def test_watch_reports_compaction_and_ends(
    private_index: Index,
) -> None:
    first = await private_index.put("/t/x/0", b"0")
    for i in range(1, 10):
        await private_index.put(f"/t/x/{i}", b"x")
    await private_index.compact(first + 5)

    watch = private_index.watch_prefix("/t/x/", start_revision=first + 2)
    items = [item async for item in watch]  # ends by itself
    assert items == [Compacted(first + 5)]

    ok = private_index.watch_prefix("/t/x/", start_revision=first + 5)
    got = events(await take(ok, 5))
    await ok.aclose()
    assert [e.revision for e in got] == list(range(first + 5, first + 10))

    with pytest.raises(IndexCompactedError, match="compacted"):
        await private_index.get_prefix("/t/x/", revision=first + 1)
    kvs, _ = await private_index.get_prefix("/t/x/")
    assert len(kvs) == 10
