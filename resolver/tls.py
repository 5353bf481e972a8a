"""The TLS context of the resolver's HTTP clients (``resolver.client``, ``resolver.claims.client``)."""

from __future__ import annotations

import os
import ssl
from pathlib import Path

from schemas.errors import InvalidDataError
from schemas.tls import client_context

__all__ = ["tls_context"]


def tls_context(cacert: str | os.PathLike[str] | None) -> ssl.SSLContext:
    """A client context trusting the CA file ``cacert`` (PEM), else the system roots."""
    if cacert is None:
        return client_context()
    try:
        pem = Path(cacert).read_bytes()
    except OSError as exc:
        raise InvalidDataError(f"CA certificate {cacert}: {exc.strerror}") from exc
    try:
        return client_context(pem)
    except (ssl.SSLError, ValueError) as exc:
        raise InvalidDataError(f"CA certificate {cacert}: {exc}") from exc
