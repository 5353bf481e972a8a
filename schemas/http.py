"""HTTP conventions shared by the services (no I/O): how a bearer token is sent.

Error answers are ``{"error": {"code", "message"}}`` with the status of the error's
class (``http_status`` in :mod:`schemas.errors`).
"""

from __future__ import annotations

__all__ = ["bearer_token"]


def bearer_token(authorization: str) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header value, or None.

    The scheme is case-insensitive; surrounding blanks are dropped; an empty token,
    another scheme or no header at all give None.
    """
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()
