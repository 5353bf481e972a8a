"""Helpers of the registry.index tests."""

from __future__ import annotations

import asyncio

import pytest

from registry.index import Compacted, Index, Op, Watch, WatchEvent


async def put_many(index: Index, items: dict[str, bytes]) -> None:
    """Write many keys quickly, 100 per transaction."""
    pairs = list(items.items())
    for i in range(0, len(pairs), 100):
        await index.txn(success=[Op.put(k, v) for k, v in pairs[i : i + 100]])


async def take(watch: Watch, n: int, within: float = 10.0) -> list[WatchEvent | Compacted]:
    """The next *n* items of *watch*, failing if they do not arrive in time."""
    items: list[WatchEvent | Compacted] = []

    async def run() -> None:
        async for item in watch:
            items.append(item)
            if len(items) == n:
                return

    try:
        await asyncio.wait_for(run(), within)
    except TimeoutError:
        pytest.fail(f"watch delivered {len(items)} of {n} items in {within} s: {items}")
    return items


def events(items: list[WatchEvent | Compacted]) -> list[WatchEvent]:
    assert all(isinstance(i, WatchEvent) for i in items), items
    return [i for i in items if isinstance(i, WatchEvent)]
