"""Per-request observability of the HTTP services: request ids and per-route HTTP metrics.

* :func:`request_id` takes a client's ``X-Request-Id`` when it is 1-64 characters of
  ``[A-Za-z0-9._-]`` and otherwise makes one (16 hex digits: 6 random per process, then
  a counter; unique, cheap, not secret); the id is echoed on every
  answer and put in :data:`REQUEST_ID` (a context variable the log formatter reads, so
  every log line written while handling the request carries it).
* :class:`RequestStats` counts answers by ``route`` (the route's path template, never
  the raw path: ``other`` for no route), ``method`` and ``status``, and times them, as
  ``cpi_http_requests_total`` and ``cpi_http_request_duration_seconds`` with
  with the ``service`` label each service gives it (``registry``, ``resolver``).  Plain
  ints and lists, read at scrape time: no lock per request.

Both sides use this one module (the registry and the resolver may share only
:mod:`schemas`); it does no I/O: the services serve what it counts.
"""

from __future__ import annotations

import itertools
import os
import re
from bisect import bisect_left
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from typing import Final

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = [
    "REQUEST_ID",
    "REQUEST_ID_HEADER",
    "RequestStats",
    "request_id",
    "route_label",
]

REQUEST_ID_HEADER: Final = "X-Request-Id"
REQUEST_ID: ContextVar[str | None] = ContextVar("cpi_request_id", default=None)
"""The id of the request being handled (``None`` outside a request)."""

_VALID_ID: Final = re.compile(r"[A-Za-z0-9._-]{1,64}")
_METHODS: Final = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})
BUCKETS: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


def request_id(headers: Mapping[str, str]) -> str:
    """The client's ``X-Request-Id`` when valid, else a new random one."""
    given = headers.get(REQUEST_ID_HEADER)
    if given is not None and _VALID_ID.fullmatch(given):
        return given
    return "%016x" % next(_SERIAL)  # noqa: UP031 (the fastest of the three spellings)


_PREFIX: Final = int.from_bytes(os.urandom(3), "big")
_SERIAL = itertools.count(_PREFIX << 40 | int.from_bytes(os.urandom(4), "big"))
"""The ids made here: the process's 24 random bits, then a 40-bit counter from a random
start (one number, so one formatting per id)."""


def route_label(resource: object) -> str:
    """The path template of an aiohttp resource (``/v1/resources/{cpid}``), or ``other``."""
    canonical = getattr(resource, "canonical", None)
    return canonical if isinstance(canonical, str) and canonical else "other"


class RequestStats(Collector):
    """Request counts and latency histograms by route, method and status."""

    def __init__(self, service: str) -> None:
        self.service = service
        self._slots: dict[tuple[str, str], tuple[dict[int, int], list[float]]] = {}
        """(route, method) -> (count by status, [count per bucket ..., +Inf count, sum])."""

    def slot(self, route: str, method: str) -> tuple[dict[int, int], list[float]]:
        """The counters of ``route`` and ``method``, for a hot path that updates them
        itself (see :meth:`observe`)."""
        if method not in _METHODS:
            method = "other"
        got = self._slots.get((route, method))
        if got is None:
            got = self._slots[(route, method)] = ({}, [0.0] * (len(BUCKETS) + 2))
        return got

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        counts, hist = self.slot(route, method)
        counts[status] = counts.get(status, 0) + 1
        hist[bisect_left(BUCKETS, seconds)] += 1
        hist[-1] += seconds

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        labels = ["service", "route", "method", "status"]
        requests = CounterMetricFamily(
            "cpi_http_requests", "HTTP answers by route template, method and status", labels=labels
        )
        slots = sorted(self._slots.items())
        for (route, method), (counts, _) in slots:
            for status, n in sorted(counts.items()):
                requests.add_metric([self.service, route, method, str(status)], n)
        yield requests
        duration = HistogramMetricFamily(
            "cpi_http_request_duration_seconds",
            "Time from routing a request to its handler's answer, by route template and method",
            labels=["service", "route", "method"],
        )
        for (route, method), (_, h) in slots:
            buckets: list[tuple[str, float]] = []
            total = 0.0
            for le, c in zip((*(str(b) for b in BUCKETS), "+Inf"), h[:-1], strict=True):
                total += c
                buckets.append((le, total))
            duration.add_metric([self.service, route, method], buckets, h[-1])
        yield duration
