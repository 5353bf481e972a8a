"""Claims API tokens: ``POST /v1/claims`` needs one; only its SHA-256 is stored.

A token is a random string shown once at creation (``cpi claims token create``).  The
index holds ``/cpi/v1/claimtokens/<sha256 hex of the token>`` with::

    {"holder": "lab-7", "max_units": 16 | null, "within": "CN.31" | null,
     "expires_at": 1700086400, "created_at": 1700000000}

``holder`` names who holds the claims made with the token (several tokens may share a
holder, e.g. one per machine of a tenant); ``max_units`` is the holder's quota: the
most units it may hold at once over all resources (``null``: no quota); ``within``
restricts claims to CPIDs at or below a namespace (segment-wise; ``null``: anywhere).
The same pattern as the registry's join tokens (:mod:`registry.tokens`).

Expired tokens stay (so a refusal can say "expired") until :func:`prune` removes
those expired for longer than a grace period.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any, Final

from registry.index import Index, Keys, Prefix
from schemas import _json
from schemas.cpid import ns_contains, parse_namespace
from schemas.errors import InvalidDataError

__all__ = [
    "HOLDER_PATTERN",
    "TOKEN_PREFIX",
    "ClaimScopeError",
    "ClaimsTokenError",
    "ClaimsTokenExpiredError",
    "ClaimsTokenInfo",
    "TokenCache",
    "UnknownClaimsTokenError",
    "check_holder",
    "check_scope",
    "create_token",
    "hash_token",
    "lookup",
    "prune",
]

TOKEN_PREFIX: Final = "cpi_ct_"
"""Claims tokens start with this (join tokens with ``cpi_jt_``), so they are easy to spot."""

HOLDER_PATTERN: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
"""What a holder name may look like (it is part of a key: no ``/``, no whitespace)."""


class ClaimsTokenError(InvalidDataError):
    """A claims token problem; subclasses say which."""

    code = "invalid_token"
    http_status = 403


class UnknownClaimsTokenError(ClaimsTokenError):
    """No ``Authorization: Bearer`` token, or one the index does not know (HTTP 401)."""

    code = "invalid_token"
    http_status = 401


class ClaimsTokenExpiredError(ClaimsTokenError):
    """The token's ``expires_at`` has passed (HTTP 403)."""

    code = "token_expired"


class ClaimScopeError(ClaimsTokenError):
    """The token does not cover the resource or namespace asked for (HTTP 403)."""

    code = "token_scope"


def hash_token(token: str) -> str:
    """SHA-256 hex of a token: its key name in the index."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def check_holder(holder: str) -> str:
    """Return ``holder`` if it is a valid holder name, else raise InvalidDataError."""
    if not isinstance(holder, str) or not HOLDER_PATTERN.fullmatch(holder):
        raise InvalidDataError(
            f"holder {holder!r} is not a valid name: expected 1-64 characters of "
            "A-Z a-z 0-9 . _ @ -, starting with a letter or digit"
        )
    return holder


@dataclass(frozen=True, slots=True)
class ClaimsTokenInfo:
    """What the index stores about a claims token."""

    holder: str
    max_units: int | None
    within: str | None
    expires_at: int
    created_at: int

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "holder": self.holder,
                "max_units": self.max_units,
                "within": self.within,
                "expires_at": self.expires_at,
                "created_at": self.created_at,
            },
            separators=(",", ":"),
        ).encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes) -> ClaimsTokenInfo:
        obj: Any = _json.loads(data)
        max_units = obj.get("max_units")
        within = obj.get("within")
        return cls(
            holder=check_holder(obj["holder"]),
            max_units=None if max_units is None else int(max_units),
            within=None if within is None else parse_namespace(within),
            expires_at=int(obj["expires_at"]),
            created_at=int(obj["created_at"]),
        )

    def check_valid(self, *, now: int) -> None:
        """Refuse an expired token (403)."""
        if now >= self.expires_at:
            raise ClaimsTokenExpiredError(
                f"claims token of holder {self.holder} expired at {self.expires_at} (now {now}); "
                "create a new one with cpi claims token create"
            )

    def check_scope(self, namespace: str) -> None:
        """Refuse a CPID prefix or query namespace outside the token's ``within`` (403)."""
        if self.within is not None:
            check_scope(self.within, namespace, holder=self.holder)


def check_scope(within: str, namespace: str, *, holder: str) -> None:
    """Refuse ``namespace`` (a CPID prefix or a query's ``within``) unless it lies at or
    below ``within``, segment by segment (:class:`ClaimScopeError`, 403)."""
    if not ns_contains(within, namespace):
        raise ClaimScopeError(
            f"claims token of holder {holder} covers {within} (and below), "
            f"the request is for {namespace}"
        )


async def create_token(
    index: Index,
    *,
    holder: str,
    ttl_s: int,
    max_units: int | None = None,
    within: str | None = None,
    now: int | None = None,
) -> str:
    """Create a claims token, store its hash and return the token (shown once)."""
    check_holder(holder)
    if ttl_s < 1:
        raise InvalidDataError(f"token TTL must be at least 1 s, got {ttl_s}")
    if max_units is not None and (isinstance(max_units, bool) or max_units < 1):
        raise InvalidDataError(f"--max-units must be at least 1, got {max_units}")
    ns = None if within is None else parse_namespace(within)
    t = int(time.time()) if now is None else now
    info = ClaimsTokenInfo(holder, max_units, ns, expires_at=t + ttl_s, created_at=t)
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    result = await index.put_if_absent(Keys.claim_token(hash_token(token)), info.to_json())
    if not result.succeeded:  # 256 random bits: only a broken RNG gets here
        raise InvalidDataError("token hash collision; try again")
    return token


async def lookup(index: Index, token: str | None, *, now: int | None = None) -> ClaimsTokenInfo:
    """Read and check a presented token: 401 when absent or unknown, 403 when expired."""
    info = await _read(index, token)
    info.check_valid(now=int(time.time()) if now is None else now)
    return info


async def _read(index: Index, token: str | None) -> ClaimsTokenInfo:
    if not token:
        raise UnknownClaimsTokenError(
            "no claims token: send 'Authorization: Bearer <token>' "
            "(create one with cpi claims token create)"
        )
    kv = await index.get(Keys.claim_token(hash_token(token)))
    if kv is None:
        raise UnknownClaimsTokenError("unknown claims token (never issued, or pruned after expiry)")
    try:
        return ClaimsTokenInfo.from_json(kv.value)
    except (ValueError, KeyError, TypeError) as exc:
        raise UnknownClaimsTokenError(
            f"claims token record in the index is unreadable: {exc}"
        ) from exc


class TokenCache:
    """Token lookups remembered for ``ttl_s`` seconds (one etcd read per token and period).

    Only known tokens are cached, by hash; expiry is checked on every use.  A token deleted from
    the index keeps working for at most ``ttl_s`` seconds.
    """

    def __init__(self, index: Index, *, ttl_s: float = 5.0, max_entries: int = 10_000) -> None:
        self._index = index
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._cache: dict[str, tuple[float, ClaimsTokenInfo]] = {}

    async def lookup(self, token: str | None, *, now: float | None = None) -> ClaimsTokenInfo:
        t = time.time() if now is None else now
        sha = hash_token(token) if token else ""
        hit = self._cache.get(sha) if sha else None
        if hit is not None and hit[0] > t:
            info = hit[1]
        else:
            info = await _read(self._index, token)
            if len(self._cache) >= self.max_entries:
                self._cache.clear()
            self._cache[sha] = (t + self.ttl_s, info)
        info.check_valid(now=int(t))
        return info


async def prune(index: Index, *, now: int | None = None, grace_s: int = 86_400) -> int:
    """Delete claims tokens that expired more than ``grace_s`` ago; return how many."""
    t = int(time.time()) if now is None else now
    kvs, _ = await index.get_prefix(Prefix.CLAIM_TOKENS)
    removed = 0
    for kv in kvs:
        try:
            info = ClaimsTokenInfo.from_json(kv.value)
        except (ValueError, KeyError, TypeError, InvalidDataError):
            continue
        if info.expires_at + grace_s < t:
            res = await index.compare_and_delete(kv.key, mod_revision=kv.mod_revision)
            removed += int(res.succeeded)
    return removed
