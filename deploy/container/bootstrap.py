"""One-shot bootstrap of the compose stack (deploy/compose.yaml): the national root,
the namespace tree, the etcd users and roles, the log key and join tokens.

Run once before the registries start (compose runs it as the ``bootstrap`` service);
safe to run again: everything that exists is reused.  What it makes, under
``$CPI_BOOTSTRAP_DIR`` (a volume the other services mount read-only):

* ``national/root.key``, ``national/anchor.json``: the root and the trust anchor
  (for production keep ``root.key`` offline: docs/operations.md);
* ``national/keys/<NS>.key``: one key per namespace of ``$CPI_SEEDS``, certified and
  published with the registry URL of its group (regions: ``$CPI_REGISTRY_REGIONAL_URL``,
  industry nodes: ``$CPI_REGISTRY_INDUSTRY_URL``);
* ``etcd-auth/<user>.password``: ``root``, ``registry``, ``resolver``, ``logsigner``,
  each with its role (docs/protocol.md section 6.1); etcd authentication is turned on;
* ``log/log.key`` and ``log/log.vkey``: the transparency-log key and verifier key;
* ``usage/usage.key``: the resolvers' usage signing key, its ``usagesigner.v1``
  (signed by the root) published in the index (docs/claims.md, Usage receipts);
* ``tokens/<NS>.token``: a join token per namespace (30 days) for agents.

Environment: ``CPI_ETCD_ENDPOINTS`` (every member), ``CPI_BOOTSTRAP_DIR``,
``CPI_SEEDS``, ``CPI_REGISTRY_REGIONAL_URL``, ``CPI_REGISTRY_INDUSTRY_URL``.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import sys
from pathlib import Path

from registry import national, tokens
from registry.index import Index, Keys
from registry.index.auth import (
    LOGSIGNER_ROLE,
    REGISTRY_ROLE,
    RESOLVER_CLAIMS_ROLE,
    RESOLVER_READ_ROLE,
    ROOT_USER,
    apply_roles,
)
from registry.logsigner import init_log_key
from schemas._settings import split_list

USERS = {
    "registry": [REGISTRY_ROLE.name],
    "resolver": [RESOLVER_READ_ROLE.name, RESOLVER_CLAIMS_ROLE.name],
    "logsigner": [LOGSIGNER_ROLE.name],
}
TOKEN_TTL_S = 30 * 86_400


def _secret_file(path: Path, make: str) -> str:
    """The first line of ``path``, created 0600 with ``make`` when missing."""
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(make + "\n")
    return path.read_text().splitlines()[0]


def _prepare(out: Path) -> dict[str, str]:
    """The directories, the etcd passwords (created when missing) and the log key;
    returns ``{user: password}``."""
    out.mkdir(parents=True, exist_ok=True)
    for sub in ("etcd-auth", "log", "tokens"):
        (out / sub).mkdir(mode=0o700, exist_ok=True)
    init_log_key(out / "log" / "log.key")
    return {
        user: _secret_file(out / "etcd-auth" / f"{user}.password", secrets.token_urlsafe(24))
        for user in [ROOT_USER, *USERS]
    }


async def _setup_auth(endpoints: list[str], passwords: dict[str, str]) -> None:
    """Users, roles, auth on (idempotent)."""
    async with Index(endpoints=endpoints, timeout=10.0) as anonymous:
        enabled = await anonymous.auth_enabled()
    root = passwords[ROOT_USER]
    async with Index(
        endpoints=endpoints,
        timeout=10.0,
        user=ROOT_USER if enabled else None,
        password=root if enabled else None,
    ) as index:
        await index.ensure_user(ROOT_USER, root)
        await index.grant_role(ROOT_USER, "root")
        await apply_roles(index)
        for user, roles in USERS.items():
            await index.ensure_user(user, passwords[user])
            for role in roles:
                await index.grant_role(user, role)
        await index.enable_auth()


def _token_files(out: Path, namespaces: list[str]) -> dict[str, Path]:
    return {ns: out / "tokens" / f"{ns}.token" for ns in namespaces}


def _read(path: Path) -> str:
    return path.read_text().strip() if path.exists() else ""


async def bootstrap(
    *, endpoints: list[str], out: Path, seeds: Path, regional_url: str, industry_url: str
) -> dict[str, Path]:
    """Everything above; returns ``{namespace: key path}``."""
    passwords = _prepare(out)
    await _setup_auth(endpoints, passwords)
    national_dir = out / "national"
    root_key, _ = national.init_root(national_dir, "CN")
    _, nodes = national.load_seeds(seeds)
    by_ns = {n.prefix: [regional_url if n.role == "region" else industry_url] for n in nodes}
    token_files = _token_files(out, list(by_ns))
    old = {ns: _read(path) for ns, path in token_files.items()}
    new: dict[str, str] = {}
    async with Index(
        endpoints=endpoints, timeout=10.0, user=ROOT_USER, password=passwords[ROOT_USER]
    ) as index:
        keys = await national.bootstrap_tree(
            index,
            seeds_path=seeds,
            data_dir=national_dir,
            root_key=root_key,
            endpoints_by_ns=by_ns,
        )
        await national.publish_usage_signer(
            index, root_key=root_key, subject="CN", key_path=out / "usage" / "usage.key"
        )
        for ns in by_ns:
            if old[ns] and await index.get(Keys.token(tokens.hash_token(old[ns]))) is not None:
                continue
            new[ns] = await tokens.create_token(index, namespace=ns, ttl_s=TOKEN_TTL_S)
    for ns, token in new.items():
        token_files[ns].unlink(missing_ok=True)
        _secret_file(token_files[ns], token)
    return keys


def main() -> int:
    env = os.environ
    keys = asyncio.run(
        bootstrap(
            endpoints=split_list(env["CPI_ETCD_ENDPOINTS"]),
            out=Path(env.get("CPI_BOOTSTRAP_DIR", "/var/lib/cpi/bootstrap")),
            seeds=Path(env["CPI_SEEDS"]),
            regional_url=env["CPI_REGISTRY_REGIONAL_URL"],
            industry_url=env["CPI_REGISTRY_INDUSTRY_URL"],
        )
    )
    print(f"bootstrap done: {len(keys)} namespaces, etcd auth on", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
