"""registry.index.values: the transaction values refuse nonsense."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from registry.index import Cmp


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
