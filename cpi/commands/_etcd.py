"""The ``--etcd`` option shared by commands that read or write the index."""

from __future__ import annotations

import argparse
import os

from registry.index import ENV_ETCD_ENDPOINTS, ENV_ETCD_ENDPOINTS_ALIAS, Index, endpoints_from_env
from schemas.errors import InvalidDataError

ETCD_ENV = ENV_ETCD_ENDPOINTS
"""Environment variable read when ``--etcd`` is not given (``$CPI_ETCD`` also works)."""


def etcd_argument(parser: argparse.ArgumentParser) -> None:
    """Add ``--etcd URL[,URL...]``, defaulting to ``$CPI_ETCD_ENDPOINTS`` (or its other
    name ``$CPI_ETCD``); required when both are unset."""
    default = endpoints_from_env(os.environ)
    parser.add_argument(
        "--etcd",
        default=default,
        required=default is None,
        help=(
            "etcd endpoints, comma-separated "
            f"(default: ${ENV_ETCD_ENDPOINTS} or ${ENV_ETCD_ENDPOINTS_ALIAS})"
        ),
    )


def open_index(urls: str, *, timeout: float = 5.0) -> Index:
    """An :class:`Index` on the comma-separated ``urls``; use as ``async with``."""
    try:
        return Index.from_url_list(urls, timeout=timeout)
    except ValueError as exc:
        raise InvalidDataError(f"--etcd {urls!r}: {exc}") from exc
