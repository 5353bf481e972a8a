"""etcd users and roles of the components (docs/protocol.md section 6.1).

Each component gets an etcd user whose roles let it read what it needs and write only
the key prefixes it owns.  :data:`ROLES` is the table; :func:`apply_roles` makes an
etcd (connected as ``root``, or before auth is on) hold exactly those roles.
Setting up users, passwords and turning auth on is up to the caller (``cpi up``), with
:meth:`Index.ensure_user`, :meth:`Index.grant_role` and :meth:`Index.enable_auth`.

Like :mod:`registry.index.layout`, this module imports neither gRPC nor the etcd
client.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from registry.index.layout import ROOT, Prefix

if TYPE_CHECKING:
    from registry.index.client import Index

__all__ = [
    "LOGSIGNER_ROLE",
    "REGISTRY_ROLE",
    "RESOLVER_CLAIMS_ROLE",
    "RESOLVER_READ_ROLE",
    "ROLES",
    "ROOT_USER",
    "SEQ_PREFIX",
    "RoleSpec",
    "apply_roles",
]

ROOT_USER: Final = "root"
"""etcd's administrator (role ``root``): national tools run as this user."""

SEQ_PREFIX: Final = f"{ROOT}seq/"
"""``/cpi/v1/seq/<cpid>``: the last accepted status ``seq``, written by registries."""


@dataclass(frozen=True, slots=True)
class RoleSpec:
    """One role: prefixes it may read, prefixes it may read and write, single keys it
    may read (``/cpi/v1/`` itself, which :meth:`Index.revision` reads)."""

    name: str
    read: tuple[str, ...] = ()
    readwrite: tuple[str, ...] = ()
    read_keys: tuple[str, ...] = (ROOT,)
    why: str = ""


REGISTRY_ROLE: Final = RoleSpec(
    "cpi-registry",
    read=(Prefix.NS, Prefix.CERTS, Prefix.REVOKED, Prefix.ALLOC),
    readwrite=(
        Prefix.REC,
        Prefix.LIVE,
        SEQ_PREFIX,
        Prefix.AUDIT,
        Prefix.NONCE,
        Prefix.TOKENS,
    ),
    why="records, statuses, status seq, the audit stream, nonces; consumes and prunes "
    "join tokens; reads certs and revocations for its signing chain, /alloc/ for the "
    "claimed header",
)
RESOLVER_READ_ROLE: Final = RoleSpec(
    "cpi-resolver-read",
    read=(ROOT,),
    read_keys=(),
    why="the replica, the audit sweep and the log routes: read-only, the whole tree, "
    "because the replica follows all of /cpi/v1/ with one watch (one revision order) and "
    "etcd checks a watch's whole range; tokens are stored only as SHA-256",
)
RESOLVER_CLAIMS_ROLE: Final = RoleSpec(
    "cpi-resolver-claims",
    read=(Prefix.LIVE,),
    readwrite=(
        Prefix.CLAIM,
        Prefix.ALLOC,
        Prefix.HOLDERS,
        Prefix.CLAIM_TOKENS,
        Prefix.METER,
        Prefix.USAGE,
        Prefix.AUDIT,
    ),
    why="claims and their totals; looks claims tokens up and prunes expired ones; "
    "meters claims and appends their signed usage receipts to the audit stream",
)
LOGSIGNER_ROLE: Final = RoleSpec(
    "cpi-logsigner",
    read=(Prefix.AUDIT,),
    readwrite=(Prefix.LOG,),
    why="reads the audit stream, writes checkpoints",
)

ROLES: Final[tuple[RoleSpec, ...]] = (
    REGISTRY_ROLE,
    RESOLVER_READ_ROLE,
    RESOLVER_CLAIMS_ROLE,
    LOGSIGNER_ROLE,
)
"""Every role of the stack (``root`` is etcd's own and not listed)."""


async def apply_roles(index: Index, roles: Sequence[RoleSpec] = ROLES) -> None:
    """Make each role in *roles* exist with exactly its permissions."""
    for role in roles:
        await index.ensure_role(
            role.name,
            read=[str(p) for p in role.read],
            readwrite=[str(p) for p in role.readwrite],
            read_keys=[str(k) for k in role.read_keys],
        )
