"""Fixtures of the resolver tests (helpers live in :mod:`tests.resolver.kit`)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from registry.index import Index
from resolver.core import Resolver
from tests.resolver.kit import Pki, make_resolver


@pytest.fixture
def pki() -> Pki:
    return Pki()


@pytest.fixture
def anchor_file(pki: Pki, tmp_path: Path) -> Path:
    return pki.write_anchor(tmp_path / "anchor.json")


@pytest.fixture
async def resolver(index: Index, pki: Pki) -> AsyncIterator[Resolver]:
    """A ready resolver on the session etcd (keyspace emptied; the PKI published)."""
    await pki.publish(index)
    async with make_resolver(index, pki) as r:
        async with asyncio.timeout(10):
            await r.wait_ready()
        yield r
