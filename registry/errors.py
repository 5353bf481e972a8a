"""Errors of the registry service, as branches of the one tree in :mod:`schemas.errors`.

Each class has a ``code`` (the ``error.code`` of the HTTP answer) and an
``http_status`` (the status the service answers it with, :mod:`registry.service`).
:class:`BodyTooLargeError` is the one of :mod:`schemas.errors`, re-exported here.
"""

from __future__ import annotations

from schemas.errors import (
    BodyTooLargeError,
    ConflictError,
    CPIError,
    InvalidDataError,
)

__all__ = [
    "AdminAuthError",
    "BodyTooLargeError",
    "RateLimitedError",
    "ReplayedNonceError",
    "RevokedKeyError",
    "StaleSequenceError",
    "StaleTimestampError",
    "StartupError",
    "TokenError",
    "TokenExpiredError",
    "TokenScopeError",
    "TokenUsedUpError",
    "UnknownTokenError",
    "UnpublishedNamespaceError",
]


class TokenError(InvalidDataError):
    """A join token problem; subclasses say which."""

    code = "invalid_token"
    http_status = 403


class UnknownTokenError(TokenError):
    """No ``Authorization: Bearer`` token, or one the index does not know (HTTP 401)."""

    code = "invalid_token"
    http_status = 401


class TokenExpiredError(TokenError):
    """The token's ``expires_at`` has passed (HTTP 403)."""

    code = "token_expired"


class TokenUsedUpError(TokenError):
    """The token has no uses left (HTTP 403)."""

    code = "token_used_up"


class TokenScopeError(TokenError):
    """The token is for another namespace or kind than the registration (HTTP 403)."""

    code = "token_scope"


class AdminAuthError(InvalidDataError):
    """A missing or wrong admin token on an operator endpoint (HTTP 401)."""

    code = "unauthorized"
    http_status = 401


class StaleTimestampError(InvalidDataError):
    """A signed ``timestamp``/``observed_at`` is outside the allowed clock skew (HTTP 400)."""

    code = "stale_timestamp"


class ReplayedNonceError(ConflictError):
    """The nonce was already used by this key within the replay window (HTTP 409)."""

    code = "replayed_nonce"


class StaleSequenceError(ConflictError):
    """A status ``seq`` that does not increase (HTTP 409)."""

    code = "stale_seq"


class RevokedKeyError(InvalidDataError):
    """A revoked key: the registry's own signing key (or a cert above it), or the
    node's record key (HTTP 403)."""

    code = "revoked"
    http_status = 403


class UnpublishedNamespaceError(InvalidDataError):
    """A registration into a namespace that is not published under ``/cpi/v1/ns/`` (403)."""

    code = "unpublished_namespace"
    http_status = 403


class RateLimitedError(CPIError):
    """Too many registrations; retry after ``retry_after`` seconds (HTTP 429)."""

    code = "rate_limited"
    http_status = 429

    def __init__(self, message: str, *, retry_after: int) -> None:
        self.retry_after = retry_after
        super().__init__(message)


class StartupError(InvalidDataError):
    """The registry cannot start: a key, cert or anchor is missing or does not fit."""

    code = "startup"
