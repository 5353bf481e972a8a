"""Shared fixtures: real etcd members on free loopback ports, and a connected Index.

* ``etcd_server`` (session): one etcd for the whole run.  Never stop, restart or
  compact it in a test; use ``etcd_private`` for that.
* ``index`` (function): an :class:`~registry.index.Index` connected to ``etcd_server``
  on an empty keyspace (every key is deleted before the test).
* ``etcd_private`` (function): a throwaway etcd for tests that stop, kill, restart,
  compact or enable auth on it.  Connect with ``Index(endpoints=[etcd_private.endpoint])``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from cpi.etcdproc import EtcdProcess
from registry.index import Index

INDEX_TIMEOUT = 5.0
"""Timeout of the ``index`` fixture's calls, in seconds."""


def _start_etcd(data_dir: Path) -> EtcdProcess:
    proc = EtcdProcess(data_dir=data_dir, snapshot_count=500)
    proc.start()
    try:
        proc.wait_healthy(30.0)
    except BaseException:
        proc.stop()
        raise
    return proc


@pytest.fixture(scope="session")
def etcd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdProcess]:
    """One etcd member shared by the whole test session; stopped by PID at the end."""
    proc = _start_etcd(tmp_path_factory.mktemp("etcd-session"))
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def etcd_private(tmp_path: Path) -> Iterator[EtcdProcess]:
    """A throwaway etcd member for one test (free to stop, kill, restart or compact)."""
    proc = _start_etcd(tmp_path / "etcd-private")
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture
async def index(etcd_server: EtcdProcess) -> AsyncIterator[Index]:
    """An Index on ``etcd_server`` with an empty keyspace."""
    assert etcd_server.running, f"the session etcd died; log:\n{etcd_server.log_tail()}"
    async with Index(endpoints=[etcd_server.endpoint], timeout=INDEX_TIMEOUT) as idx:
        await idx.delete_everything()
        yield idx
