"""Compaction, defragmentation and the NOSPACE alarm against a real etcd with a tiny quota."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from cpi.etcdproc import EtcdProcess
from registry.index import Index, IndexCompactedError, Maintainer
from registry.index.maintenance import compact_history
from schemas.errors import RetrievalError

QUOTA = 24 << 20


@pytest.fixture
def small_etcd(tmp_path: Path) -> Iterator[EtcdProcess]:
    proc = EtcdProcess(
        data_dir=tmp_path / "etcd", quota_backend_bytes=QUOTA, auto_compaction_retention=None
    )
    proc.start()
    try:
        proc.wait_healthy(30)
        yield proc
    finally:
        proc.stop()


def test_members_get_a_quota_and_periodic_compaction_by_default(tmp_path: Path) -> None:
    cmd = EtcdProcess(data_dir=tmp_path).command()
    assert cmd[cmd.index("--quota-backend-bytes") + 1] == str(8 << 30)
    assert cmd[cmd.index("--auto-compaction-mode") + 1] == "periodic"
    assert cmd[cmd.index("--auto-compaction-retention") + 1] == "1h"
    bare = EtcdProcess(
        data_dir=tmp_path, quota_backend_bytes=None, auto_compaction_retention=None
    ).command()
    assert "--quota-backend-bytes" not in bare and "--auto-compaction-mode" not in bare


async def test_full_database_is_recovered_by_compaction_defrag_and_disarm(
    small_etcd: EtcdProcess,
) -> None:
    value = b"x" * (512 << 10)
    async with Index(endpoints=[small_etcd.endpoint], timeout=10) as index:
        # one key rewritten again and again: its history fills the quota
        with pytest.raises(RetrievalError, match="space exceeded"):
            for _ in range(200):
                await index.put("/cpi/v1/rec/big", value)
        assert any(kind == "NOSPACE" for _, kind in await index.alarms())
        with pytest.raises(RetrievalError, match="space exceeded"):
            await index.put("/cpi/v1/rec/other", b"1")

        def open_index(endpoints: list[str]) -> Index:
            return Index(endpoints=endpoints, timeout=10)

        maintainer = Maintainer(
            [small_etcd.endpoint], open_index, keep_revisions=1, min_free_bytes=1 << 20
        )
        report = await maintainer.run_once()
        assert report.errors == []
        assert report.compacted_at is not None
        (member,) = report.members
        assert member.defragmented
        assert member.size_after < member.size_before / 2
        assert report.alarm_cleared
        assert await index.alarms() == []
        await index.put("/cpi/v1/rec/other", b"1")  # writable again
        kv = await index.get("/cpi/v1/rec/big")
        assert kv is not None and kv.value == value  # the newest value survives
        with pytest.raises(IndexCompactedError):  # the history does not
            await index.get_prefix("/cpi/v1/rec/", revision=2)

        # nothing left to free: the next run skips the defragmentation
        again = await maintainer.run_once()
        assert again.members[0].defragmented is False
        assert again.alarm_cleared is False


async def test_compact_history_keeps_the_newest_revisions(small_etcd: EtcdProcess) -> None:
    async with Index(endpoints=[small_etcd.endpoint], timeout=10) as index:
        for i in range(20):
            await index.put("/cpi/v1/rec/k", str(i))
        head = await index.revision()
        assert await compact_history(index, keep_revisions=5) == head - 5
        await index.get_prefix("/cpi/v1/rec/", revision=head - 4)  # kept
        with pytest.raises(IndexCompactedError):
            await index.get_prefix("/cpi/v1/rec/", revision=head - 6)
        assert await compact_history(index, keep_revisions=5) is None  # nothing new
        assert await compact_history(index, keep_revisions=10_000) is None
        with pytest.raises(ValueError):
            await compact_history(index, keep_revisions=0)


async def test_an_unreachable_member_is_reported_and_the_others_done(
    small_etcd: EtcdProcess,
) -> None:
    from cpi.etcdproc import free_port

    dead = f"127.0.0.1:{free_port()}"

    def open_index(endpoints: list[str]) -> Index:
        return Index(endpoints=endpoints, timeout=1.5)

    maintainer = Maintainer([small_etcd.endpoint, dead], open_index, keep_revisions=None)
    # the cluster index round-robins over both; only the per-member step may fail
    report = await maintainer.run_once(force_defrag=True)
    assert [m.endpoint for m in report.members] == [small_etcd.endpoint]
    assert report.members[0].defragmented
    assert any(dead in e for e in report.errors)


async def test_run_repeats_until_cancelled_and_survives_errors(
    small_etcd: EtcdProcess, caplog: pytest.LogCaptureFixture
) -> None:
    import asyncio

    def open_index(endpoints: list[str]) -> Index:
        return Index(endpoints=endpoints, timeout=2)

    from cpi.etcdproc import free_port

    dead = f"127.0.0.1:{free_port()}"
    maintainer = Maintainer([small_etcd.endpoint, dead], open_index, keep_revisions=None)
    task = asyncio.create_task(maintainer.run(0.05))
    caplog.set_level("WARNING", logger="registry.index.maintenance")
    for _ in range(200):
        await asyncio.sleep(0.05)
        if caplog.text.count(f"etcd maintenance: {dead}") >= 2:
            break
    assert not task.done()  # a failing member does not end the schedule
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert caplog.text.count(f"etcd maintenance: {dead}") >= 2
