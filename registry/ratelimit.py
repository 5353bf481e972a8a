"""A token bucket for registrations: bursts after an outage get a clear 429.

The bucket holds up to ``burst`` tokens and refills at ``rate`` tokens per second;
each registration takes one.  When it is empty the caller is told how long until the
next token (the ``Retry-After`` header, whole seconds, at least 1).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from registry.errors import RateLimitedError

__all__ = ["TokenBucket"]


class TokenBucket:
    """Token bucket; not thread-safe (one per event loop)."""

    def __init__(
        self, *, rate: float, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError(f"rate must be > 0 and burst >= 1, got rate={rate}, burst={burst}")
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._tokens = float(burst)
        self._stamp = clock()

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now

    @property
    def tokens(self) -> float:
        """Tokens available now."""
        self._refill()
        return self._tokens

    def try_take(self) -> float:
        """Take one token; return 0.0 on success, else the seconds until one is available."""
        self._refill()
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return 0.0
        return (1.0 - self._tokens) / self.rate

    def take(self, what: str = "registration") -> None:
        """Take one token or raise :class:`RateLimitedError` with a ``retry_after``."""
        wait = self.try_take()
        if wait > 0:
            retry = max(1, math.ceil(wait))
            raise RateLimitedError(
                f"{what} rate limit exceeded ({self.rate:g}/s, burst {self.burst}); "
                f"retry after {retry} s",
                retry_after=retry,
            )
