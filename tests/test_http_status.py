"""One mapping from errors to HTTP: each class of the error tree carries its status.

The table below is what the registry, resolver, claims and log services answered
before the mapping moved onto the classes; it must not change.
"""

from __future__ import annotations

import pytest

from registry import errors as reg
from resolver.claims import model as claim_model
from resolver.claims import tokens as claim_tokens
from resolver.errors import (
    NotReadyError,
    QueryError,
    ResolverUnavailableError,
    TooManyWatchesError,
    WatchCapacityError,
)
from schemas import errors as base
from schemas.http import bearer_token

STATUS: list[tuple[type[base.CPIError], str, int]] = [
    (base.CPIError, "error", 500),
    (base.InvalidDataError, "invalid", 400),
    (base.InvalidCPIDError, "invalid_cpid", 400),
    (base.EnvelopeError, "invalid_envelope", 400),
    (base.SignatureError, "bad_signature", 400),
    (base.ChainError, "chain_invalid", 400),
    (base.ExpiredError, "expired", 400),
    (base.RevokedError, "revoked", 400),
    (base.OutsideNamespaceError, "outside_namespace", 403),
    (base.ConflictError, "conflict", 409),
    (base.NotFoundError, "not_found", 404),
    (base.BodyTooLargeError, "body_too_large", 413),
    (base.RequestTimeoutError, "request_timeout", 408),
    (base.RetrievalError, "unavailable", 503),
    (base.IndexUnavailableError, "index_unavailable", 503),
    (base.IndexTimeoutError, "index_timeout", 503),
    (reg.UnknownTokenError, "invalid_token", 401),
    (reg.TokenError, "invalid_token", 403),
    (reg.TokenExpiredError, "token_expired", 403),
    (reg.TokenUsedUpError, "token_used_up", 403),
    (reg.TokenScopeError, "token_scope", 403),
    (reg.AdminAuthError, "unauthorized", 401),
    (reg.RateLimitedError, "rate_limited", 429),
    (reg.StaleTimestampError, "stale_timestamp", 400),
    (reg.ReplayedNonceError, "replayed_nonce", 409),
    (reg.StaleSequenceError, "stale_seq", 409),
    (QueryError, "invalid_query", 400),
    (NotReadyError, "not_ready", 503),
    (ResolverUnavailableError, "resolver_unavailable", 503),
    (TooManyWatchesError, "too_many_watches", 429),
    (WatchCapacityError, "watch_capacity", 503),
    (claim_tokens.UnknownClaimsTokenError, "invalid_token", 401),
    (claim_tokens.ClaimsTokenError, "invalid_token", 403),
    (claim_model.ClaimForbiddenError, "forbidden", 403),
    (claim_model.QuotaExceededError, "quota_exceeded", 429),
    (claim_model.ClaimConflictError, "conflict", 409),
    (claim_model.InsufficientCapacityError, "insufficient_capacity", 409),
    (claim_model.ClaimNotFoundError, "claim_not_found", 404),
    (claim_model.InvalidClaimError, "invalid_claim", 400),
]


@pytest.mark.parametrize(("cls", "code", "status"), STATUS, ids=[c.__name__ for c, _, _ in STATUS])
def test_each_error_class_carries_its_code_and_http_status(
    cls: type[base.CPIError], code: str, status: int
) -> None:
    assert cls.code == code
    assert cls.http_status == status


def test_there_is_one_body_too_large_error() -> None:
    assert reg.BodyTooLargeError is base.BodyTooLargeError


@pytest.mark.parametrize(
    ("header", "token"),
    [
        ("Bearer abc", "abc"),
        ("bearer  abc ", "abc"),
        ("BEARER x.y-z", "x.y-z"),
        ("", None),
        ("Bearer", None),
        ("Bearer   ", None),
        ("Basic abc", None),
        ("abc", None),
    ],
)
def test_bearer_token_reads_the_authorization_header(header: str, token: str | None) -> None:
    assert bearer_token(header) == token
