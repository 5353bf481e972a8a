"""registry.index.values: the transaction values refuse nonsense."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from registry.index import Cmp, IndexAccessDeniedError, IndexRejectedError
from schemas.errors import CPIError, IndexTimeoutError, IndexUnavailableError


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: Cmp.version("k", "=~", 1), "operator"),  # type: ignore[arg-type]
        (lambda: Cmp("k", "value", "==", 1), "bytes"),
        (lambda: Cmp("k", "version", "==", b"1"), "int"),
        (lambda: Cmp("k", "size", "==", 1), "target"),  # type: ignore[arg-type]
    ],
)
def test_cmp_rejects_nonsense(build: Callable[[], Cmp], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build()


@pytest.mark.parametrize(
    ("error", "status", "retryable"),
    [
        (IndexRejectedError("refused"), 502, False),
        (IndexAccessDeniedError("permission denied"), 502, False),
        (IndexUnavailableError("no member reachable"), 503, True),
        (IndexTimeoutError("deadline"), 503, True),
    ],
)
def test_an_index_refusal_is_not_a_retry_may_help_error(
    error: CPIError, status: int, retryable: bool
) -> None:
    assert error.http_status == status
    assert error.retryable is retryable
