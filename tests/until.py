"""The one polling helper of the test suite: wait for a condition, fail with a message."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable

import pytest

POLL_S = 0.02
"""Seconds between two looks at the predicate."""


async def until(
    predicate: Callable[[], object], within: float = 10.0, what: str = "the condition"
) -> None:
    """Call ``predicate`` (sync, or returning an awaitable) until its value is true.

    Fails the test with ``timed out after <within> s waiting for <what>`` once ``within``
    seconds have passed without a true value.  The predicate is always called at least once.
    """
    deadline = time.monotonic() + within
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {within} s waiting for {what}")
        await asyncio.sleep(POLL_S)
