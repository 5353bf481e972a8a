"""Response rate limiting (RRL) for DNS over UDP, per client prefix; no sockets, no clock of its own.

The way NSD and Knot do it, simplified to one bucket per client prefix (``/24`` for
IPv4, ``/56`` for IPv6): each prefix has a token bucket that refills at
``responses_per_s`` tokens a second and holds at most that many (one second of burst).
A response takes a token; without one it is *limited*: every ``slip``-th limited
response is *slipped* (sent as an empty answer with TC set, so a real client asks again
over TCP, which a spoofed source cannot do), the others are dropped.  ``slip=0`` drops
every limited response, ``slip=1`` slips every one.

:class:`RateLimiter` is pure: the caller passes the time (``time.monotonic()`` read once
per burst of datagrams) with each call.  The table of prefixes is bounded: when it
reaches ``max_prefixes``, buckets that have refilled (idle for a second or more, the
same as absent) are dropped, and if that is not enough the table is cleared.
"""

from __future__ import annotations

import socket
from typing import Final

__all__ = [
    "DROP",
    "MAX_PREFIXES",
    "RRL_RESPONSES_PER_S",
    "RRL_SLIP",
    "SEND",
    "SLIP",
    "RateLimiter",
    "prefix_of",
]

SEND: Final = 0
"""Answer normally."""
DROP: Final = 1
"""Over the limit: send nothing."""
SLIP: Final = 2
"""Over the limit: send an empty answer with TC set (the client may retry over TCP)."""

RRL_RESPONSES_PER_S: Final = 50
"""Default responses per second per client prefix (0 disables rate limiting)."""
RRL_SLIP: Final = 2
"""Default: every second limited response is slipped (TC=1), the others are dropped."""
MAX_PREFIXES: Final = 100_000

_AF_INET6: Final = socket.AF_INET6
_inet_pton = socket.inet_pton


def prefix_of(host: str) -> str | bytes:
    """The client prefix of an address as the socket reports it: ``/24`` (IPv4), ``/56`` (IPv6).

    IPv4 prefixes are the first three dotted octets as text, IPv6 ones the first seven
    bytes; an IPv4-mapped IPv6 address counts as IPv4.  A zone suffix (``%eth0``) is
    ignored.  Unparsable text is its own prefix.
    """
    if ":" not in host:
        return host.rpartition(".")[0]
    if "." in host:  # ::ffff:192.0.2.1
        return host.rpartition(":")[2].rpartition(".")[0]
    try:
        return _inet_pton(_AF_INET6, host.partition("%")[0])[:7]
    except OSError:
        return host


class RateLimiter:
    """Token buckets of responses per second, one per client prefix.

    Args:
        responses_per_s: refill rate and bucket size; must be at least 1.
        slip: every ``slip``-th limited response is slipped (0: none, 1: all).
        max_prefixes: bound on the table of buckets.

    :meth:`check` is the hot path: one prefix computation, one dictionary lookup and a
    few float operations.
    """

    __slots__ = (
        "_buckets",
        "_last_bucket",
        "_last_host",
        "_slip_count",
        "limited",
        "max_prefixes",
        "rate",
        "slip",
        "slipped",
    )

    def __init__(
        self,
        responses_per_s: int = RRL_RESPONSES_PER_S,
        slip: int = RRL_SLIP,
        *,
        max_prefixes: int = MAX_PREFIXES,
    ) -> None:
        if responses_per_s < 1 or slip < 0 or max_prefixes < 1:
            raise ValueError("responses_per_s >= 1, slip >= 0, max_prefixes >= 1")
        self.rate = float(responses_per_s)
        self.slip = slip
        self.max_prefixes = max_prefixes
        self._buckets: dict[str | bytes, list[float]] = {}  # prefix -> [tokens, last refill]
        self._slip_count = 0
        # the bucket of the last host asked about: floods come from few addresses
        self._last_host = ""
        self._last_bucket: list[float] = []
        self.limited = 0
        """Responses over the limit (slipped or dropped)."""
        self.slipped = 0
        """Limited responses sent as TC=1 empty answers."""

    def __len__(self) -> int:
        return len(self._buckets)

    def check(self, host: str, now: float) -> int:
        """:data:`SEND`, :data:`DROP` or :data:`SLIP` for a response to ``host`` at ``now``."""
        rate = self.rate
        if host == self._last_host:
            bucket = self._last_bucket
        else:
            key = prefix_of(host)
            found = self._buckets.get(key)
            if found is None:
                if len(self._buckets) >= self.max_prefixes:
                    self._prune(now)
                found = self._buckets[key] = [rate - 1.0, now]
                self._last_host, self._last_bucket = host, found
                return SEND
            bucket = found
            self._last_host, self._last_bucket = host, bucket
        tokens = bucket[0] + (now - bucket[1]) * rate
        if tokens > rate:
            tokens = rate
        bucket[1] = now
        if tokens >= 1.0:
            bucket[0] = tokens - 1.0
            return SEND
        bucket[0] = tokens
        self.limited += 1
        if self.slip:
            self._slip_count += 1
            if self._slip_count >= self.slip:
                self._slip_count = 0
                self.slipped += 1
                return SLIP
        return DROP

    def _prune(self, now: float) -> None:
        full = [k for k, (_, last) in self._buckets.items() if now - last >= 1.0]
        for k in full:
            del self._buckets[k]
        if len(self._buckets) >= self.max_prefixes:
            self._buckets.clear()
        self._last_host = ""  # its bucket may be gone

    def stats(self) -> dict[str, int]:
        return {
            "rrl_limited": self.limited,
            "rrl_slipped": self.slipped,
            "rrl_dropped": self.limited - self.slipped,
            "rrl_prefixes": len(self._buckets),
        }
