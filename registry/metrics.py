"""Prometheus metrics of one registry instance (each app gets its own collector registry)."""

from __future__ import annotations

import time
from types import TracebackType
from typing import Any

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

from schemas.observe import RequestStats

__all__ = ["RegistryMetrics"]

_ETCD_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_LAG_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class RegistryMetrics:
    """The registry's metrics, registered on a private :class:`CollectorRegistry`."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            r.register(collector)  # process_*, python_*: the default registry's collectors
        self.requests = RequestStats("registry")
        r.register(self.requests)
        self.registrations = Counter(
            "cpi_registry_registrations",
            "Accepted registrations by outcome (created, updated, renewed, unchanged)",
            ["outcome"],
            registry=r,
        )
        self.rejections = Counter(
            "cpi_registry_rejections",
            "Refused requests by endpoint and error code",
            ["endpoint", "reason"],
            registry=r,
        )
        self.deregistrations = Counter(
            "cpi_registry_deregistrations", "Accepted deregistrations", registry=r
        )
        self.heartbeats = Counter(
            "cpi_registry_heartbeats", "Accepted status updates (heartbeats)", registry=r
        )
        self.live_writes = Counter(
            "cpi_registry_live_writes",
            "Writes of /live/ keys by reason (first, changed, refresh, lease_regrant)",
            ["reason"],
            registry=r,
        )
        self.expirations = Counter(
            "cpi_registry_expirations", "Nodes made not-live for missing heartbeats", registry=r
        )
        self.live_nodes = Gauge(
            "cpi_registry_live_nodes",
            "Nodes this instance currently holds live, by namespace",
            ["namespace"],
            registry=r,
        )
        self.heartbeat_lag = Histogram(
            "cpi_registry_heartbeat_lag_seconds",
            "Receive time minus the status observed_at",
            buckets=_LAG_BUCKETS,
            registry=r,
        )
        self.etcd_latency = Histogram(
            "cpi_registry_etcd_seconds",
            "Latency of etcd calls made by the registry, by operation",
            ["op"],
            buckets=_ETCD_BUCKETS,
            registry=r,
        )
        self._etcd_children: dict[str, Any] = {}  # op -> its labelled histogram
        self.self_preservation = Gauge(
            "cpi_registry_self_preservation",
            "1 while expiry is suspended for the namespace (self-preservation), else 0",
            ["namespace"],
            registry=r,
        )
        self.self_preservation_enabled = Gauge(
            "cpi_registry_self_preservation_enabled",
            "0 after an operator switched self-preservation off, else 1",
            registry=r,
        )
        self.self_preservation_enabled.set(1)
        self.lease_regrants = Counter(
            "cpi_registry_lease_regrants", "Instance leases re-granted after a loss", registry=r
        )

    def etcd(self, op: str) -> _Timer:
        """Time an etcd call: ``async with metrics.etcd("txn-register"): ...``."""
        child = self._etcd_children.get(op)
        if child is None:
            child = self._etcd_children[op] = self.etcd_latency.labels(op)
        return _Timer(child)

    def render(self) -> bytes:
        """The Prometheus text exposition."""
        return generate_latest(self.registry)


class _Timer:
    """``async with``: observes the seconds spent inside into one labelled histogram (a
    plain class: an ``asynccontextmanager`` costs a generator per etcd call)."""

    __slots__ = ("_child", "_t0")

    def __init__(self, child: Any) -> None:
        self._child = child
        self._t0 = 0.0

    async def __aenter__(self) -> None:
        self._t0 = time.perf_counter()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._child.observe(time.perf_counter() - self._t0)
