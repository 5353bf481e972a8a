"""Errors of the resolver, as branches of the one tree in :mod:`schemas.errors`.

Each class has a ``code`` (the ``error.code`` of an HTTP answer) and an ``http_status``;
the services answer it with that status.  :class:`ConfigError` is the one of
:mod:`schemas.errors`, shared with the registry, re-exported here.
"""

from __future__ import annotations

from schemas.errors import ConfigError, CPIError, InvalidDataError, RetrievalError

__all__ = [
    "ConfigError",
    "NotReadyError",
    "QueryError",
    "ResolverUnavailableError",
    "TooManyWatchesError",
    "WatchCapacityError",
]


class QueryError(InvalidDataError):
    """A discovery or watch query is malformed (HTTP 400)."""

    code = "invalid_query"


class NotReadyError(RetrievalError):
    """The replica has not finished its first listing of the index yet (HTTP 503)."""

    code = "not_ready"


class ResolverUnavailableError(RetrievalError):
    """A resolver could not be reached over HTTP, or answered with a server error."""

    code = "resolver_unavailable"


class TooManyWatchesError(CPIError):
    """This client address has ``max_watchers_per_address`` watches open (HTTP 429)."""

    code = "too_many_watches"
    http_status = 429


class WatchCapacityError(RetrievalError):
    """The resolver has ``max_watchers`` watches open (HTTP 503)."""

    code = "watch_capacity"
