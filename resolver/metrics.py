"""Prometheus metrics of one resolver (each resolver gets its own collector registry).

Request counters are updated by the HTTP front end; everything about the replica is
read from it when ``/metrics`` is scraped (:class:`_ReplicaCollector`), so keeping the
figures costs nothing on the lookup path.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from schemas.observe import RequestStats

if TYPE_CHECKING:
    from resolver.core import Resolver

__all__ = ["ResolverMetrics"]

_DISCOVER_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)


class ResolverMetrics:
    """Counters of the front ends plus the replica's figures, on a private registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            r.register(collector)  # process_*, python_*: the default registry's collectors
        self.requests = RequestStats("resolver")
        """``cpi_http_requests_total`` and ``cpi_http_request_duration_seconds``."""
        r.register(self.requests)
        self.not_found = Counter(
            "cpi_resolver_lookups_not_found", "Lookups of CPIDs without a served record", registry=r
        )
        self.errors = Counter(
            "cpi_resolver_http_errors",
            "HTTP error answers by route and error code",
            ["route", "code"],
            registry=r,
        )
        self.discover_seconds = Histogram(
            "cpi_resolver_discover_seconds",
            "Time to answer a discovery query (in-process, without HTTP)",
            buckets=_DISCOVER_BUCKETS,
            registry=r,
        )
        self.watchers = Gauge("cpi_resolver_watchers", "Open watch streams", registry=r)
        self.records_served = 0
        """Lookups answered 200 (a plain int: the hot path runs on one event loop, and a
        prometheus Counter takes a lock per increment); exported at scrape time."""
        self._collector: _ReplicaCollector | None = None
        self.dns_stats: Callable[[], dict[str, int]] | None = None
        """The DNS front end's counters (``DnsServer.stats``), set when it starts;
        exported at scrape time as ``cpi_resolver_dns_*``."""
        self.dns_answers: Callable[[], tuple[dict[tuple[str, str], int], list[int], int]] | None = (
            None
        )
        """The DNS front end's answers by type and rcode and their sizes
        (``DnsServer.answer_stats``), exported at scrape time."""

    def bind(self, resolver: Resolver) -> None:
        """Report the figures of ``resolver``'s replica at every scrape."""
        if self._collector is None:
            self._collector = _ReplicaCollector(lambda: resolver)
            self.registry.register(self._collector)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _ReplicaCollector(Collector):
    def __init__(self, resolver: Callable[[], Resolver]) -> None:
        self._resolver = resolver

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        r = self._resolver()
        state = r._state
        replica = r._replica
        yield CounterMetricFamily(
            "cpi_resolver_records_served",
            "Records served by GET /v1/resources/{cpid} (HTTP 200)",
            value=r.metrics.records_served,
        )
        failures = CounterMetricFamily(
            "cpi_resolver_verification_failures",
            "Rejected record (and status) revisions by reason; each counted once",
            labels=["reason"],
        )
        for reason, n in sorted(state.failures.items()):
            failures.add_metric([reason], n)
        yield failures
        rejected = GaugeMetricFamily(
            "cpi_resolver_rejected_records",
            "Records in the index that are not served, by reason",
            labels=["reason"],
        )
        for reason, n in sorted(state.rejected.items()):
            if n:
                rejected.add_metric([reason], n)
        yield rejected
        bad = GaugeMetricFamily(
            "cpi_resolver_bad_values",
            "Index keys whose value cannot be used (ignored, each alone), by collection",
            labels=["prefix"],
        )
        for prefix, n in sorted(state.bad_by_prefix().items()):
            bad.add_metric([prefix], n)
        yield bad
        found = CounterMetricFamily(
            "cpi_resolver_bad_values_found",
            "Unusable index values found, by collection; each key revision counted once",
            labels=["prefix"],
        )
        for prefix, n in sorted(state.bad_found.items()):
            found.add_metric([prefix], n)
        yield found
        size = GaugeMetricFamily(
            "cpi_resolver_replica_size", "Keys held by the replica, by collection", labels=["what"]
        )
        for what, n in state.sizes().items():
            size.add_metric([what], n)
        yield size
        yield GaugeMetricFamily(
            "cpi_resolver_revision", "etcd revision the replica has applied", value=state.revision
        )
        lag = max(0, replica.store_revision - state.revision) if replica.store_revision else 0
        yield GaugeMetricFamily(
            "cpi_resolver_watch_lag_revisions",
            "etcd store revision at the last probe minus the applied revision (an upper "
            "bound: writes outside the watched keys count too)",
            value=lag,
        )
        age = time.monotonic() - replica.last_contact if replica.last_contact else -1.0
        yield GaugeMetricFamily(
            "cpi_resolver_last_contact_age_seconds",
            "Seconds since etcd last answered (probe or watch event); -1 before the first",
            value=age,
        )
        yield GaugeMetricFamily(
            "cpi_resolver_stale", "1 while etcd is unreachable (answers are stale)", value=r.stale
        )
        yield GaugeMetricFamily(
            "cpi_resolver_ready", "1 once the first listing is applied", value=r.ready
        )
        yield GaugeMetricFamily(
            "cpi_resolver_statuses_pending",
            "Statuses of served records a large first listing left to verify after ready",
            value=replica.statuses_pending,
        )
        mass = GaugeMetricFamily(
            "cpi_resolver_mass_expiry",
            "1 for each namespace under mass-expiry protection",
            labels=["namespace"],
        )
        for ns in sorted(state.protected):
            mass.add_metric([ns], 1)
        yield mass
        yield GaugeMetricFamily(
            "cpi_resolver_mass_expiry_active",
            "1 while any namespace is under mass-expiry protection",
            value=1 if state.protected else 0,
        )
        yield GaugeMetricFamily(
            "cpi_resolver_mass_expiry_held",
            "Entries whose status is held by mass-expiry protection",
            value=len(state.held),
        )
        yield CounterMetricFamily(
            "cpi_resolver_mass_expiry_events",
            "Times mass-expiry protection engaged",
            value=state.mass_expiry_events,
        )
        relists = CounterMetricFamily(
            "cpi_resolver_relists", "Full listings of the index by cause", labels=["cause"]
        )
        for cause, n in sorted(replica.relists.items()):
            relists.add_metric([cause], n)
        yield relists
        snap = replica.snapshots
        if snap is not None:
            yield CounterMetricFamily(
                "cpi_resolver_snapshot_fallbacks",
                "Starts that could not use the replica snapshot and listed the index",
                value=snap.fallbacks,
            )
            yield CounterMetricFamily(
                "cpi_resolver_snapshot_writes", "Replica snapshots written", value=snap.writes
            )
            yield CounterMetricFamily(
                "cpi_resolver_snapshot_write_failures",
                "Replica snapshot writes that failed (the next restart is cold while they do)",
                value=snap.write_failures,
            )
            yield GaugeMetricFamily(
                "cpi_resolver_snapshot_revision",
                "Revision of the last replica snapshot written (0: none yet)",
                value=snap.written_revision,
            )
        yield CounterMetricFamily(
            "cpi_resolver_watch_reconnects",
            "Watch streams re-established after an error",
            value=r.index.watch_reconnects,
        )
        yield CounterMetricFamily(
            "cpi_resolver_events", "Change events appended to the ring", value=state.log.appended
        )
        yield GaugeMetricFamily(
            "cpi_resolver_event_ring_events", "Events held in the ring", value=state.log.size
        )
        checks = CounterMetricFamily(
            "cpi_resolver_verifications",
            "Envelopes verified, inline or in worker processes",
            labels=["where"],
        )
        checks.add_metric(["inline"], r._verifier.checked_inline)
        checks.add_metric(["pool"], r._verifier.checked_pool)
        yield checks
        yield from _dns_metrics(r.metrics.dns_stats)
        yield from _dns_answer_metrics(r.metrics.dns_answers)


_DNS_GAUGES = frozenset({"cached", "rrl_prefixes", "tcp_open"})


def _dns_metrics(stats: Callable[[], dict[str, int]] | None) -> Iterator[Metric]:
    """``cpi_resolver_dns_<counter>`` for each of the DNS front end's counters."""
    if stats is None:
        return
    for key, value in sorted(stats().items()):
        name = f"cpi_resolver_dns_{key}"
        text = f"DNS front end: {key.replace('_', ' ')} (docs/dns.md)"
        if key in _DNS_GAUGES:
            yield GaugeMetricFamily(name, text, value=value)
        else:
            yield CounterMetricFamily(name, text, value=value)


def _dns_answer_metrics(
    answers: Callable[[], tuple[dict[tuple[str, str], int], list[int], int]] | None,
) -> Iterator[Metric]:
    """``cpi_resolver_dns_answers_total{qtype,rcode}`` and the answer-size histogram."""
    if answers is None:
        return
    from resolver.dns.answerer import ANSWER_SIZE_BUCKETS

    by_kind, sizes, total_bytes = answers()
    family = CounterMetricFamily(
        "cpi_resolver_dns_answers",
        "DNS answers (cache hits included) by query type and rcode",
        labels=["qtype", "rcode"],
    )
    for (qtype, rcode), n in sorted(by_kind.items()):
        family.add_metric([qtype, rcode], n)
    yield family
    if not sizes:
        return
    buckets: list[tuple[str, float]] = []
    running = 0
    for le, n in zip((*(str(b) for b in ANSWER_SIZE_BUCKETS), "+Inf"), sizes, strict=True):
        running += n
        buckets.append((le, running))
    sizes_family = HistogramMetricFamily(
        "cpi_resolver_dns_answer_bytes", "Size of DNS answers sent (bytes, before UDP/TCP framing)"
    )
    sizes_family.add_metric([], buckets, total_bytes)
    yield sizes_family
