"""The read side: verified lookups, discovery and watches over a replica of the index.

The library's front door is :class:`resolver.core.Resolver`; the HTTP service is
:func:`resolver.http.create_app`, its client :class:`resolver.client.ResolverClient`.
Sub-packages: :mod:`resolver.dns` (DNS front end), :mod:`resolver.claims` (claims) and
:mod:`resolver.audit` (auditing).  See ``docs/resolver.md``.

The names below are imported on first use, so that importing one submodule (the
verification workers import only :mod:`resolver.verify`) does not import the etcd client
and the rest of the package.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from resolver.client import ResolverClient
    from resolver.config import ResolverConfig
    from resolver.core import DiscoveryResult, Resolver, ResolverSettings
    from resolver.discovery import LatencyTable, Match, Query
    from resolver.entry import Entry
    from resolver.events import Event

__all__ = [
    "DiscoveryResult",
    "Entry",
    "Event",
    "LatencyTable",
    "Match",
    "Query",
    "Resolver",
    "ResolverClient",
    "ResolverConfig",
    "ResolverSettings",
]

_HOME = {
    "ResolverClient": "resolver.client",
    "ResolverConfig": "resolver.config",
    "DiscoveryResult": "resolver.core",
    "Resolver": "resolver.core",
    "ResolverSettings": "resolver.core",
    "LatencyTable": "resolver.discovery",
    "Match": "resolver.discovery",
    "Query": "resolver.discovery",
    "Entry": "resolver.entry",
    "Event": "resolver.events",
}


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module 'resolver' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value
