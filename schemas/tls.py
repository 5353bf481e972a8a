"""TLS contexts from PEM bytes (no file access here: callers read the files).

Every HTTP service of the project serves TLS and every client verifies the server's
certificate against a CA it was given (``--cacert``); plain HTTP needs an explicit
``--insecure`` (docs/protocol.md section 8).
"""

from __future__ import annotations

import ssl
from urllib.parse import urlsplit

from schemas.errors import InvalidDataError

__all__ = ["check_url", "client_context"]


def client_context(ca_pem: bytes | None = None) -> ssl.SSLContext:
    """A client context verifying server certificates and host names (TLS 1.2+).

    ``ca_pem``: the CA certificate(s) to trust (PEM); ``None``: the system roots.
    """
    ctx = ssl.create_default_context(cadata=ca_pem.decode("ascii") if ca_pem else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def check_url(url: str, *, insecure: bool, what: str = "URL") -> str:
    """``url`` if it is https://, or http:// with ``insecure``; else InvalidDataError."""
    scheme = urlsplit(url).scheme.lower()
    if scheme == "https":
        return url
    if scheme == "http":
        if insecure:
            return url
        raise InvalidDataError(
            f"{what} {url} is plain http://: use https:// (with --cacert or $CPI_CACERT for "
            "a private CA), or pass --insecure to allow plain HTTP"
        )
    raise InvalidDataError(f"{what} {url!r} is not an http(s):// URL")
