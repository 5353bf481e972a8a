"""Token buckets for registrations: bursts after an outage get a clear 429.

A bucket holds up to ``burst`` tokens and refills at ``rate`` tokens per second; each
registration takes one.  When it is empty the caller is told how long until the next
token (the ``Retry-After`` header, whole seconds, at least 1).

:class:`BucketTable` keeps one bucket per key (a join token's hash, a client address),
at most ``max_keys`` of them: the least recently used is dropped first, and a bucket
that is full again carries no state, so dropping it changes nothing.  A flood of new
addresses or made-up tokens therefore cannot grow memory without bound.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable

from registry.errors import RateLimitedError

__all__ = ["BucketTable", "TokenBucket"]


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


class BucketTable:
    """One :class:`TokenBucket` per key, at most ``max_keys`` (least recently used dropped)."""

    def __init__(
        self,
        *,
        rate: float,
        burst: int,
        max_keys: int = 10_000,
        what: str = "registration",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_keys < 1:
            raise ValueError(f"max_keys must be at least 1, got {max_keys}")
        TokenBucket(rate=rate, burst=burst, clock=clock)  # checks rate and burst
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self.what = what
        self._clock = clock
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def bucket(self, key: str) -> TokenBucket:
        """The bucket of ``key`` (a new, full one if it has none), now the most recent."""
        b = self._buckets.get(key)
        if b is None:
            b = TokenBucket(rate=self.rate, burst=self.burst, clock=self._clock)
            self._buckets[key] = b
            while len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
        return b

    def take(self, key: str, what: str | None = None) -> None:
        """Take one token from ``key``'s bucket or raise :class:`RateLimitedError`."""
        self.bucket(key).take(what or self.what)
