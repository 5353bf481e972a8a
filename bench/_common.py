"""Shared timing helpers: interleaved rounds, best-of, ratios against a same-run baseline."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def rate(fn: Callable[[], None], n: int) -> float:
    """Operations per second of ``fn`` run ``n`` times."""
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return n / (time.perf_counter() - t0)


def interleaved(cases: dict[str, Callable[[], None]], n: int, rounds: int) -> dict[str, float]:
    """Median rate of each case over ``rounds``, the cases taking turns within every round.

    Turn-taking means a noisy neighbour slows every case alike, so the ratios hold
    even when absolute numbers wander.
    """
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            samples[name].append(rate(fn, n))
    return {name: statistics.median(vals) for name, vals in samples.items()}
