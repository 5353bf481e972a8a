"""The ``--etcd`` option shared by commands that read or write the index."""

from __future__ import annotations

import argparse
import os

from registry.index import Index
from schemas.errors import InvalidDataError

ETCD_ENV = "CPI_ETCD"
"""Environment variable read when ``--etcd`` is not given."""


def etcd_argument(parser: argparse.ArgumentParser) -> None:
    """Add ``--etcd URL[,URL...]``, defaulting to ``$CPI_ETCD``; required when that is unset."""
    default = os.environ.get(ETCD_ENV)
    parser.add_argument(
        "--etcd",
        default=default,
        required=default is None,
        help=f"etcd endpoints, comma-separated (default: ${ETCD_ENV})",
    )


def open_index(urls: str, *, timeout: float = 5.0) -> Index:
    """An :class:`Index` on the comma-separated ``urls``; use as ``async with``."""
    try:
        return Index.from_url_list(urls, timeout=timeout)
    except ValueError as exc:
        raise InvalidDataError(f"--etcd {urls!r}: {exc}") from exc
