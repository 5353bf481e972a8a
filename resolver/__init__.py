"""The read side: verified lookups, discovery and watches over a replica of the index.

The library's front door is :class:`resolver.core.Resolver`; the HTTP service is
:func:`resolver.http.create_app`, its client :class:`resolver.client.ResolverClient`.
See ``docs/resolver.md``.
"""

from resolver.core import Discovery, Resolver, ResolverSettings
from resolver.discovery import LatencyTable, Match, Query
from resolver.entry import Entry
from resolver.events import Event

__all__ = [
    "Discovery",
    "Entry",
    "Event",
    "LatencyTable",
    "Match",
    "Query",
    "Resolver",
    "ResolverSettings",
]
