"""Errors of the resolver, as branches of the one tree in :mod:`schemas.errors`.

Each class has a ``code`` (the ``error.code`` of an HTTP answer); :mod:`resolver.http`
maps classes to status codes in one middleware.
"""

from __future__ import annotations

from schemas.errors import InvalidDataError, RetrievalError

__all__ = ["ConfigError", "NotReadyError", "QueryError", "ResolverUnavailableError"]


class QueryError(InvalidDataError):
    """A discovery or watch query is malformed (HTTP 400)."""

    code = "invalid_query"


class ConfigError(InvalidDataError):
    """The resolver configuration is missing, unreadable or invalid."""

    code = "invalid_config"


class NotReadyError(RetrievalError):
    """The replica has not finished its first listing of the index yet (HTTP 503)."""

    code = "not_ready"


class ResolverUnavailableError(RetrievalError):
    """A resolver could not be reached over HTTP, or answered with a server error."""

    code = "resolver_unavailable"
