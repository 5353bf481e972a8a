"""registry.index.lease against a real etcd: keep-alive, expiry, loss."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from cpi.etcdproc import EtcdProcess
from registry.index import Index
from tests.until import until


async def test_revoking_a_lease_deletes_its_keys(index: Index) -> None:
    lease = await index.grant_lease(30)
    assert lease.ttl >= 30 and lease.alive
    await index.put("/t/live/a", b"up", lease=lease.id)
    kv = await index.get("/t/live/a")
    assert kv is not None and kv.lease == lease.id
    assert 0 < await lease.time_to_live() <= 30
    await lease.revoke()
    assert not lease.alive
    assert await index.get("/t/live/a") is None
    assert await lease.time_to_live() == -1
    assert await index.revoke_lease(lease.id) is False


async def test_lease_expires_without_keepalive(index: Index) -> None:
    lease = await index.grant_lease(2)
    await index.put("/t/live/b", b"up", lease=lease.id)
    assert await index.get("/t/live/b") is not None

    async def gone() -> bool:
        return await index.get("/t/live/b") is None

    await until(gone, 8.0, "the leased key to expire")
    assert await lease.time_to_live() == -1


async def test_keepalive_keeps_the_lease_and_exit_revokes_it(index: Index) -> None:
    lease = await index.grant_lease(2)
    await index.put("/t/live/c", b"up", lease=lease.id)
    async with lease:
        await asyncio.sleep(3.0)  # 1.5 TTLs: the lease had to be renewed
        assert await index.get("/t/live/c") is not None
        assert lease.alive and not lease.lost.is_set()
        assert await lease.time_to_live() > 0
    assert not lease.alive
    assert await index.get("/t/live/c") is None


async def test_lease_revoked_behind_the_handles_back_is_lost(
    index: Index, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="registry.index")
    lease = await index.grant_lease(3)
    async with lease:
        assert await index.revoke_lease(lease.id) is True
        await asyncio.wait_for(lease.lost.wait(), 4.0)
        assert not lease.alive
        assert lease.lost_reason is not None and "no longer exists" in lease.lost_reason
    assert any(r.levelno == logging.ERROR and "lost" in r.getMessage() for r in caplog.records)


async def test_lease_is_lost_when_etcd_is_unreachable_for_a_ttl(
    etcd_private: EtcdProcess, private_index: Index, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="registry.index")
    lease = await private_index.grant_lease(2, revoke_on_exit=False)
    async with lease:
        await asyncio.sleep(0.3)
        etcd_private.kill()
        started = time.monotonic()
        await asyncio.wait_for(lease.lost.wait(), 6.0)
        assert time.monotonic() - started < 3.0
    assert lease.lost_reason is not None and "no keep-alive answer" in lease.lost_reason
    assert any("keep-alive failed" in r.getMessage() for r in caplog.records)
