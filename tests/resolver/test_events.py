"""The event ring: cursors, groups, the floor, waiting."""

from __future__ import annotations

import asyncio

import pytest

from resolver.errors import QueryError
from resolver.events import Event, EventLog, format_cursor, parse_cursor


def group(log: EventLog, revision: int, n: int = 1) -> list[Event]:
    cursor = log.next_cursor(revision)
    events = [Event("delete", f"CN/GPU.{i}", cursor, final=i == n - 1) for i in range(n)]
    log.append(events)
    return events


def test_cursor_text() -> None:
    assert parse_cursor("42") == (42, 0)
    assert parse_cursor(" 42.3 ") == (42, 3)
    assert format_cursor((42, 0)) == "42" and format_cursor((42, 3)) == "42.3"
    for bad in ("", "x", "4.x", "-1", "1.-2"):
        with pytest.raises(QueryError, match="event id"):
            parse_cursor(bad)


def test_groups_after_a_cursor_and_the_floor() -> None:
    log = EventLog(capacity=4)
    log.reset((10, 0))
    assert log.after((10, 0)) == [] and log.after((9, 0)) is None
    group(log, 11, 2)
    group(log, 11)  # the clock, at the same revision: (11, 1)
    group(log, 13)
    assert [g[0].cursor for g in log.after((10, 0)) or []] == [(11, 0), (11, 1), (13, 0)]
    assert [g[0].cursor for g in log.after((11, 0)) or []] == [(11, 1), (13, 0)]
    assert log.after((12, 0)) == log.after((11, 1))
    group(log, 14, 2)  # 6 events held > 4: the oldest group goes, the floor rises
    assert log.floor == (11, 0) and log.size == 4
    assert log.after((10, 0)) is None
    assert [g[0].cursor for g in log.after((11, 0)) or []] == [(11, 1), (13, 0), (14, 0)]
    with pytest.raises(ValueError, match="not after"):
        log.append([Event("put", "x", (13, 0))])


async def test_waiting_for_new_groups() -> None:
    log = EventLog()
    log.reset((5, 0))
    assert await log.wait((5, 0), 0.01) is False
    waiter = asyncio.create_task(log.wait((5, 0), 5))
    await asyncio.sleep(0)
    group(log, 6)
    assert await waiter is True
    log.close()
    assert await log.wait((6, 0), 5) is False
