"""Configuration of a resolver (``cpi resolver serve``).

Three layers, later ones winning: a JSON file, then the environment, then command-line
flags (passed as ``overrides``).  The result is a frozen :class:`ResolverConfig`; every
field is described in ``docs/resolver.md``.

Environment variables:

* ``CPI_ETCD_ENDPOINTS``: comma-separated etcd endpoints (replaces ``etcd.endpoints``);
* ``CPI_ETCD_PASSWORD``: etcd password (so it need not sit in the file);
* ``CPI_ETCD_USER``, ``CPI_ETCD_PASSWORD_FILE``: etcd user, and a file (0600) whose
  first line is its password (replace ``etcd.user`` and ``etcd.password_file``);
* ``CPI_RESOLVER_LISTEN``: ``host:port`` for HTTP (``[::1]:8700`` for IPv6);
* ``CPI_RESOLVER_ANCHOR``: anchor file(s), comma-separated (replaces ``anchor_files``);
* ``CPI_RESOLVER_BUNDLE``: an anchor bundle (replaces ``anchor_bundle``; federation);
* ``CPI_RESOLVER_ZONE``: DNS zone (replaces ``zone``).

Relative paths in the file (anchors, latency table, TLS material) are resolved against
the directory of the file.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

import seeds
from registry import index
from registry.index import ENV_ETCD_ENDPOINTS, ENV_ETCD_PASSWORD, Index
from resolver.errors import ConfigError
from schemas import _json
from schemas._settings import (
    apply_overrides,
    config_object,
    parse_listen,
    resolve_path,
    split_list,
    validate_config,
)
from schemas.chain import TrustAnchors
from schemas.errors import KeyFileError

__all__ = [
    "DEFAULT_PORT",
    "ENV_ANCHOR",
    "ENV_BUNDLE",
    "ENV_ETCD_ENDPOINTS",
    "ENV_ETCD_PASSWORD",
    "ENV_LISTEN",
    "ENV_ZONE",
    "EtcdSettings",
    "ResolverConfig",
    "load_anchor_files",
    "load_config",
    "parse_listen",
]

ENV_LISTEN = "CPI_RESOLVER_LISTEN"
ENV_ANCHOR = "CPI_RESOLVER_ANCHOR"
ENV_ZONE = "CPI_RESOLVER_ZONE"
ENV_BUNDLE = "CPI_RESOLVER_BUNDLE"

DEFAULT_PORT = 8700


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class EtcdSettings(index.EtcdSettings):
    """:class:`registry.index.EtcdSettings`; the index waits at most 1 s between watch reconnects."""

    def open_index(self, **options: Any) -> Index:
        return super().open_index(**{"watch_backoff_max": 1.0, **options})


class ResolverConfig(_Model):
    """Everything ``cpi resolver serve`` needs; ``docs/resolver.md`` describes each field."""

    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = DEFAULT_PORT
    etcd: EtcdSettings = Field(default_factory=EtcdSettings)
    anchor_files: list[Path] = Field(default_factory=list)
    # federation (docs/resolver.md "Federation"): several roots, each with its own index
    anchor_bundle: Path | None = None
    zone: str = "cpi."
    dns_host: str = "127.0.0.1"
    dns_port: Annotated[int, Field(ge=0, le=65535)] | None = None  # None: no DNS; 0: any free port
    # DNS abuse limits (docs/dns.md): UDP response rate limiting per client prefix, TCP caps
    dns_rrl_responses_per_s: Annotated[int, Field(ge=0)] = 50  # 0: no rate limiting
    dns_rrl_slip: Annotated[int, Field(ge=0)] = 2
    dns_max_udp_ratio: Annotated[int, Field(ge=0)] = 10  # 0: no bound; else >= 2
    dns_tcp_idle_s: Annotated[float, Field(gt=0)] = 10.0
    dns_tcp_max_per_client: Annotated[int, Field(ge=1)] = 16
    dns_tcp_max_clients: Annotated[int, Field(ge=1)] = 256
    latency_table: Path | None = None
    # replica
    probe_interval_s: Annotated[float, Field(gt=0)] = 1.0
    probe_timeout_s: Annotated[float, Field(gt=0)] = 1.0
    stale_after_s: Annotated[float, Field(gt=0)] = 5.0
    sweep_interval_s: Annotated[float, Field(gt=0)] = 1.0
    verify_workers: Annotated[int, Field(ge=0, le=64)] | None = None
    # a first listing of at least this many records verifies statuses after ready (None: before)
    statuses_after_ready_from: Annotated[int, Field(ge=0)] | None = 50_000
    # warm restarts: a snapshot of the verified replica (None: always list the index)
    snapshot_dir: Path | None = None
    snapshot_interval_s: Annotated[float, Field(gt=0)] = 300.0
    # HTTP worker processes sharing the port (SO_REUSEPORT), each with its own replica
    workers: Annotated[int, Field(ge=1, le=64)] = 1
    # mass-expiry protection
    mass_expiry_threshold: Annotated[float, Field(gt=0, le=1)] = 0.5
    mass_expiry_min_live: Annotated[int, Field(ge=1)] = 4
    mass_expiry_window_s: Annotated[float, Field(ge=0)] = 10.0
    mass_expiry_hold_s: Annotated[float, Field(gt=0)] = 300.0
    # API
    event_ring_size: Annotated[int, Field(ge=16)] = 10_000
    discover_default_limit: Annotated[int, Field(ge=1)] = 20
    discover_max_limit: Annotated[int, Field(ge=1, le=10_000)] = 500
    watch_heartbeat_s: Annotated[float, Field(gt=0)] = 15.0
    watch_ping_s: Annotated[float, Field(gt=0)] = 10.0
    watch_write_timeout_s: Annotated[float, Field(gt=0)] = 30.0
    max_watchers: Annotated[int, Field(ge=1)] = 1024
    max_watchers_per_address: Annotated[int, Field(ge=1)] = 64
    # HTTP serving (docs/resolver.md "Limits and timeouts")
    body_timeout_s: Annotated[float, Field(gt=0)] = 10.0
    header_timeout_s: Annotated[float, Field(gt=0)] = 10.0
    keepalive_timeout_s: Annotated[float, Field(gt=0)] = 30.0
    max_connections: Annotated[int, Field(ge=1)] = 10_000
    max_connections_per_address: Annotated[int, Field(ge=1)] = 256
    # TLS (docs/resolver.md): the HTTP API's certificate chain and key (0600)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    insecure: bool = False  # serve plain HTTP (tests only); needed when there is no TLS

    @model_validator(mode="after")
    def _trust(self) -> ResolverConfig:
        if not self.anchor_files and self.anchor_bundle is None:
            raise ValueError(
                "anchor_files: give at least one anchor file (or anchor_bundle for a "
                "federation of roots)"
            )
        if self.anchor_files and self.anchor_bundle is not None:
            raise ValueError(
                "anchor_files and anchor_bundle exclude each other: a bundle names each "
                "root's anchor with its own index"
            )
        return self

    @property
    def federated(self) -> bool:
        """Whether this resolver serves the roots of an anchor bundle (resolver.federation)."""
        return self.anchor_bundle is not None

    @property
    def tls(self) -> bool:
        """Whether the HTTP API serves TLS (``tls_cert`` and ``tls_key`` given)."""
        return self.tls_cert is not None and self.tls_key is not None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}"

    def latency_table_path(self) -> Path:
        """``latency_table``, else the table shipped in the ``seeds`` package.

        Either must exist: a missing file is a :class:`ConfigError` naming it.
        """
        if self.latency_table is not None:
            return seeds.require(self.latency_table, "latency table")
        return seeds.path(seeds.LATENCY)

    def load_anchors(self) -> TrustAnchors:
        """The anchors of ``anchor_files`` or, with a bundle, of its roots that have one."""
        if self.anchor_bundle is not None and not self.anchor_files:
            from resolver.federation import load_bundle  # federation imports this module

            specs = load_bundle(self.anchor_bundle)
            anchors = {s.root: s.anchor for s in specs if s.anchor is not None}
            return TrustAnchors(anchors.values())
        return load_anchor_files(self.anchor_files)

    def summary(self) -> str:
        """One line for the log (no secrets)."""
        if self.anchor_bundle is not None:
            return f"resolver at {self.url} (anchor bundle {self.anchor_bundle}, zone {self.zone})"
        return (
            f"resolver at {self.url} (etcd {','.join(self.etcd.endpoints)}, anchors "
            f"{', '.join(str(p) for p in self.anchor_files)}, zone {self.zone})"
        )


def load_anchor_files(paths: list[Path]) -> TrustAnchors:
    """Every anchor in the given files (each holds one ``anchor.v1`` or a list)."""
    items: list[Any] = []
    for path in paths:
        try:
            obj = _json.loads(Path(path).read_bytes())
        except OSError as exc:
            raise ConfigError(f"anchor file {path}: {exc.strerror}") from exc
        except ValueError as exc:
            raise ConfigError(f"anchor file {path}: not valid JSON: {exc}") from exc
        items.extend(obj if isinstance(obj, list) else [obj])
    try:
        return TrustAnchors.from_json(json.dumps(items))
    except KeyFileError as exc:
        raise ConfigError(f"anchor files {', '.join(map(str, paths))}: {exc}") from exc


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    data: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> ResolverConfig:
    """Build a config from a JSON file (or ``data``), the environment and ``overrides``.

    ``overrides`` are command-line flags keyed by field name, dotted for nested fields
    (``{"port": 9000, "etcd.endpoints": [...]}``); ``None`` values are ignored.  ``env``
    defaults to ``os.environ``.  Raises :class:`ConfigError` naming every bad field.
    """
    source, base = "config", Path.cwd()
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        try:
            text = p.read_bytes()
        except OSError as exc:
            raise ConfigError(f"{p}: cannot read config file: {exc.strerror}") from exc
        source, raw, base = str(p), config_object(text, source=str(p)), p.resolve().parent
    if data is not None:
        raw = {**raw, **copy.deepcopy(dict(data))}
    if isinstance(raw.get("anchor_files"), list):
        raw["anchor_files"] = [resolve_path(base, a) for a in raw["anchor_files"]]
    for name in ("latency_table", "tls_cert", "tls_key", "anchor_bundle"):
        if name in raw:
            raw[name] = resolve_path(base, raw[name])
    if raw.get("snapshot_dir") is not None:
        raw["snapshot_dir"] = resolve_path(base, raw["snapshot_dir"])

    environ = os.environ if env is None else env
    EtcdSettings.layer(raw, base=base, env=environ)
    if environ.get(ENV_LISTEN):
        raw["host"], raw["port"] = parse_listen(environ[ENV_LISTEN])
    if environ.get(ENV_ANCHOR):
        raw["anchor_files"] = split_list(environ[ENV_ANCHOR])
    if environ.get(ENV_BUNDLE):
        raw["anchor_bundle"] = resolve_path(Path.cwd(), environ[ENV_BUNDLE])
    if environ.get(ENV_ZONE):
        raw["zone"] = environ[ENV_ZONE]
    apply_overrides(raw, overrides)
    return validate_config(ResolverConfig, raw, source=source, what="resolver config")
