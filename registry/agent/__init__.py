"""The node agent: registers a node, heartbeats its status, deregisters on shutdown.

* :mod:`registry.agent.agent`: the :class:`Agent` (usable as a library), its back-off
  and the registry client errors;
* :mod:`registry.agent.probe`: what the node has (GPUs, CPU, memory);
* :mod:`registry.agent.simulate`: many simulated agents in one process (demos, load).

The agent talks to registries over HTTP only; it imports neither the etcd client nor
:mod:`registry.claimed`.  The names of :mod:`registry.agent.agent` are re-exported here.
"""

from registry.agent.agent import (
    CLAIMED_HEADER,
    CLAIMED_METRIC,
    STATES,
    USER_AGENT,
    Agent,
    Backoff,
    Prober,
    RecordGoneError,
    RefusedError,
    Registration,
    RegistryRejectedError,
    RegistryUnavailableError,
    host_prober,
    parse_endpoint,
    parse_label,
    region_of,
    registry_urls,
)

__all__ = [
    "CLAIMED_HEADER",
    "CLAIMED_METRIC",
    "STATES",
    "USER_AGENT",
    "Agent",
    "Backoff",
    "Prober",
    "RecordGoneError",
    "RefusedError",
    "Registration",
    "RegistryRejectedError",
    "RegistryUnavailableError",
    "host_prober",
    "parse_endpoint",
    "parse_label",
    "region_of",
    "registry_urls",
]
