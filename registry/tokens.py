"""Join tokens: a registration needs one; only its SHA-256 is stored.

A token is a random string shown once at creation (``cpi registry token create``).
The index holds ``/cpi/v1/tokens/<sha256 hex of the token>`` with::

    {"namespace": "CN.31.CMCC", "kind": "GPU" | null, "uses_left": 5 | null,
     "expires_at": 1700086400, "created_at": 1700000000}

``namespace`` scopes the token: it admits registrations into exactly that namespace.
A namespace below it is refused too (403 ``token_scope``, :meth:`Token.check_delegated`,
checked once the registry knows it holds the namespace): records are signed by their
own namespace's key, and a parent does not issue into a namespace it delegated.  ``kind`` (when set) admits only that kind.  ``uses_left`` (when set)
counts the **new CPIDs** the token may still create; re-registering an existing CPID
with its own key uses none, so an agent that restarts with a single-use token gets
its CPID back.  A use is consumed inside the registration's own transaction, which
compares the token key's ``mod_revision``: two registrations racing for the last use
cannot both succeed.

Expired and used-up tokens stay in the index (so refusals can say why) until
:func:`prune` removes those expired for longer than a grace period.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from registry.errors import (
    TokenExpiredError,
    TokenScopeError,
    TokenUsedUpError,
    UnknownTokenError,
)
from registry.index import KV, Cmp, Index, Keys, Op, Prefix
from schemas import _json
from schemas.cpid import KINDS, ns_contains, parse_namespace
from schemas.dsse import Envelope
from schemas.errors import InvalidDataError, OutsideNamespaceError
from schemas.models import Cert, parse_payload

__all__ = [
    "TOKEN_PREFIX",
    "Token",
    "TokenInfo",
    "consume_ops",
    "create_token",
    "hash_token",
    "held_namespaces_in_index",
    "lookup",
    "parse_duration",
    "prune",
]

TOKEN_PREFIX = "cpi_jt_"
"""Tokens start with this, so they are easy to spot (and to scan for in leaked logs)."""


def hash_token(token: str) -> str:
    """SHA-256 hex of a token: its key name in the index."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


@dataclass(frozen=True, slots=True)
class TokenInfo:
    """What the index stores about a token."""

    namespace: str
    kind: str | None
    uses_left: int | None
    expires_at: int
    created_at: int

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "namespace": self.namespace,
                "kind": self.kind,
                "uses_left": self.uses_left,
                "expires_at": self.expires_at,
                "created_at": self.created_at,
            },
            separators=(",", ":"),
        ).encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes) -> TokenInfo:
        obj: Any = _json.loads(data)
        return cls(
            namespace=str(obj["namespace"]),
            kind=obj.get("kind"),
            uses_left=obj.get("uses_left"),
            expires_at=int(obj["expires_at"]),
            created_at=int(obj["created_at"]),
        )


@dataclass(frozen=True, slots=True)
class Token:
    """A token as read for one request: its hash, stored info and the KV (for the compare)."""

    sha256: str
    info: TokenInfo
    kv: KV

    @property
    def key(self) -> str:
        return Keys.token(self.sha256)

    def check_valid(self, *, now: int) -> None:
        """Refuse an expired token (403)."""
        if now >= self.info.expires_at:
            raise TokenExpiredError(
                f"join token expired at {self.info.expires_at} (now {now}); "
                "ask the registry operator for a new one"
            )

    def check_uses(self) -> None:
        """Refuse a token with no uses left (403)."""
        if self.info.uses_left is not None and self.info.uses_left <= 0:
            raise TokenUsedUpError("join token has no uses left; ask for a new one")

    def check_delegated(self, *, namespace: str) -> None:
        """Refuse a registration below the token's namespace (403): a namespace below
        it is a namespace of its own, signed by its own key, and a parent does not issue
        into a namespace it delegated (docs/protocol.md, the namespace rule)."""
        if self.info.namespace != namespace:
            raise TokenScopeError(
                f"join token is for namespace {self.info.namespace}, the registration asks "
                f"for {namespace}, a namespace of its own: ask the registry of {namespace} "
                "for a token"
            )

    def check_scope(self, *, namespace: str, kind: str) -> None:
        """Refuse a registration outside the token's namespace or kind (403)."""
        if not ns_contains(self.info.namespace, namespace):
            raise TokenScopeError(
                f"join token is for namespace {self.info.namespace} (and below), "
                f"the registration asks for {namespace}"
            )
        if self.info.kind is not None and self.info.kind != kind:
            raise TokenScopeError(
                f"join token is for kind {self.info.kind}, the registration asks for {kind}"
            )


def parse_duration(text: str) -> int:
    """``90s``, ``10m``, ``24h``, ``7d`` or plain seconds -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}
    t = text.strip().lower()
    try:
        value = float(t[:-1]) * units[t[-1]] if t and t[-1] in units else float(t)
    except ValueError:
        value = -1
    if not 0 < value < 10 * 365 * 86_400:
        raise InvalidDataError(
            f"duration {text!r}: expected a positive number (up to ten years) with a unit s, m, h, d or w, e.g. 24h"
        )
    return int(value)


async def lookup(index: Index, token: str | None) -> Token:
    """Read a presented token, or raise :class:`UnknownTokenError` (401)."""
    if not token:
        raise UnknownTokenError(
            "no join token: send 'Authorization: Bearer <token>' "
            "(create one with cpi registry token create)"
        )
    sha = hash_token(token)
    kv = await index.get(Keys.token(sha))
    if kv is None:
        raise UnknownTokenError("unknown join token (never issued, or pruned after expiry)")
    try:
        info = TokenInfo.from_json(kv.value)
    except (ValueError, KeyError, TypeError) as exc:
        raise UnknownTokenError(f"join token record in the index is unreadable: {exc}") from exc
    return Token(sha, info, kv)


def consume_ops(token: Token, *, consume: bool) -> tuple[list[Cmp], list[Op]]:
    """Compares and ops for a registration's transaction.

    The token key's ``mod_revision`` is always compared (a token deleted or used
    concurrently fails the transaction); with ``consume`` and a use count, the count
    is decremented.
    """
    cmps = [Cmp.mod_revision(token.key, "==", token.kv.mod_revision)]
    ops: list[Op] = []
    if consume and token.info.uses_left is not None:
        left = TokenInfo(
            namespace=token.info.namespace,
            kind=token.info.kind,
            uses_left=token.info.uses_left - 1,
            expires_at=token.info.expires_at,
            created_at=token.info.created_at,
        )
        ops.append(Op.put(token.key, left.to_json()))
    return cmps, ops


async def create_token(
    index: Index,
    *,
    namespace: str,
    ttl_s: int,
    kind: str | None = None,
    uses: int | None = None,
    within: Iterable[str] | None = None,
    now: int | None = None,
) -> str:
    """Create a join token, store its hash and return the token (shown once).

    ``within``: the namespaces the issuing registry holds; the token's namespace must
    be one of them (a namespace below is delegated to its own key), else
    :class:`OutsideNamespaceError`.
    ``None`` skips that check (the caller has checked otherwise).
    """
    ns = parse_namespace(namespace)
    if kind is not None:
        kind = kind.upper()
        if kind not in KINDS:
            raise InvalidDataError(f"unknown kind {kind!r}, expected one of {', '.join(KINDS)}")
    if uses is not None and uses < 1:
        raise InvalidDataError(f"--uses must be at least 1, got {uses}")
    if ttl_s < 1:
        raise InvalidDataError(f"token TTL must be at least 1 s, got {ttl_s}")
    if within is not None:
        held = [parse_namespace(h) for h in within]
        if ns not in held:
            below = [h for h in held if ns_contains(h, ns)]
            raise OutsideNamespaceError(
                f"namespace {ns} is outside the registry's namespaces "
                f"({', '.join(held) or 'none'}); a token must be for one of them"
                + (
                    f" ({ns} is delegated to its own key: its own registry makes its tokens)"
                    if below
                    else ""
                )
            )
    t = int(time.time()) if now is None else now
    info = TokenInfo(namespace=ns, kind=kind, uses_left=uses, expires_at=t + ttl_s, created_at=t)
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    result = await index.put_if_absent(Keys.token(hash_token(token)), info.to_json())
    if not result.succeeded:  # 256 random bits: only a broken RNG gets here
        raise InvalidDataError("token hash collision; try again")
    return token


async def held_namespaces_in_index(index: Index) -> list[str]:
    """Subjects of every cert in the index that holds scope ``issue``.

    What ``cpi registry token create`` checks a token's namespace against when it is
    not given the registry's config.  A cheap scoping guard, not a verification.
    """
    kvs, _ = await index.get_prefix(Prefix.CERTS)
    out: set[str] = set()
    for kv in kvs:
        try:
            env = Envelope.from_json(kv.value)
            cert = parse_payload(env.payload_type, env.payload, Cert)
        except InvalidDataError:
            continue
        if "issue" in cert.scopes:
            out.add(cert.subject)
    return sorted(out)


async def prune(index: Index, *, now: int | None = None, grace_s: int = 86_400) -> int:
    """Delete tokens that expired more than ``grace_s`` ago; return how many."""
    t = int(time.time()) if now is None else now
    kvs, _ = await index.get_prefix(Prefix.TOKENS)
    removed = 0
    for kv in kvs:
        try:
            info = TokenInfo.from_json(kv.value)
        except (ValueError, KeyError, TypeError):
            continue
        if info.expires_at + grace_s < t:
            res = await index.compare_and_delete(kv.key, mod_revision=kv.mod_revision)
            removed += int(res.succeeded)
    return removed
