"""Fixtures of the registry.index tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from cpi.etcdproc import EtcdProcess
from registry.index import Index


@pytest.fixture
async def private_index(etcd_private: EtcdProcess) -> AsyncIterator[Index]:
    async with Index(endpoints=[etcd_private.endpoint], timeout=3.0) as idx:
        yield idx
