"""Configuration of a regional / industry registry (``cpi registry serve``).

Three layers, later ones winning: a JSON file, then the environment, then command-line
flags.  The result is a frozen :class:`RegistryConfig`; every field is documented in
``docs/registry.md``.

Environment variables:

* ``CPI_ETCD_ENDPOINTS``: comma-separated etcd endpoints (replaces ``etcd.endpoints``);
* ``CPI_ETCD_PASSWORD``: etcd password (so it need not sit in the file);
* ``CPI_ETCD_USER``, ``CPI_ETCD_PASSWORD_FILE``: etcd user, and a file (0600) whose
  first line is its password (replace ``etcd.user`` and ``etcd.password_file``);
* ``CPI_REGISTRY_LISTEN``: ``host:port`` to listen on (``[::1]:8470`` for IPv6).

Relative paths in the file (key files, the anchor, TLS material) are resolved against
the directory of the file.  The etcd password is a :class:`pydantic.SecretStr`: it
prints as ``**********`` and is never logged.
"""

from __future__ import annotations

import copy
import math
import os
import re
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from registry.index import ENV_ETCD_ENDPOINTS, ENV_ETCD_PASSWORD, EtcdSettings
from schemas._settings import (
    apply_overrides,
    config_object,
    parse_listen,
    resolve_path,
    validate_config,
)
from schemas.cpid import parse_namespace
from schemas.errors import ConfigError, InvalidCPIDError

__all__ = [
    "ENV_ETCD_ENDPOINTS",
    "ENV_ETCD_PASSWORD",
    "ENV_LISTEN",
    "ConfigError",
    "EtcdSettings",
    "NamespaceKey",
    "RegistryConfig",
    "load_config",
    "parse_listen",
]

ENV_LISTEN = "CPI_REGISTRY_LISTEN"

_PATH_FIELDS = ("anchor_file", "tls_cert", "tls_key", "tls_client_ca")


def _namespace(value: str) -> str:
    try:
        return parse_namespace(value)
    except InvalidCPIDError as exc:
        raise ValueError(str(exc)) from exc


def _sha256_hex(value: str) -> str:
    if not re.fullmatch(r"[0-9a-f]{64}", value):
        raise ValueError("must be the SHA-256 of the admin token as 64 lower-case hex digits")
    return value


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class NamespaceKey(_Model):
    """A namespace this registry serves and the key its certificate certifies."""

    namespace: Annotated[str, AfterValidator(_namespace)]
    key_file: Path


class RegistryConfig(_Model):
    """Everything ``cpi registry serve`` needs; see ``docs/registry.md`` for each field."""

    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 8470
    public_url: str | None = None
    instance_id: str = Field(
        default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}", min_length=1
    )
    etcd: EtcdSettings = Field(default_factory=EtcdSettings)
    namespaces: list[NamespaceKey] = Field(min_length=1)
    anchor_file: Path
    heartbeat_s: Annotated[float, Field(gt=0)] = 10.0
    expire_after_heartbeats: Annotated[int, Field(ge=1)] = 3
    live_refresh_s: Annotated[float, Field(gt=0)] = 240.0
    lease_ttl_s: Annotated[int, Field(ge=2)] | None = None
    record_ttl_days: Annotated[float, Field(gt=0)] = 30.0
    self_preservation_threshold: Annotated[float, Field(gt=0, le=1)] = 0.5
    self_preservation_min_nodes: Annotated[int, Field(ge=1)] = 3
    # rate limits (docs/registry.md "Limits"): per join token and per client address for
    # requests with a valid token; a small per-address bucket for the rest
    registrations_per_s: Annotated[float, Field(gt=0)] = 50.0
    registration_burst: Annotated[int, Field(ge=1)] = 100
    address_registrations_per_s: Annotated[float, Field(gt=0)] | None = None  # None: as per token
    address_registration_burst: Annotated[int, Field(ge=1)] | None = None
    unauthenticated_per_s: Annotated[float, Field(gt=0)] = 1.0
    unauthenticated_burst: Annotated[int, Field(ge=1)] = 10
    rate_limit_keys: Annotated[int, Field(ge=16)] = 10_000
    max_body_bytes: Annotated[int, Field(ge=1024, le=1024 * 1024)] = 64 * 1024
    # HTTP serving (docs/registry.md "Limits")
    body_timeout_s: Annotated[float, Field(gt=0)] = 10.0
    header_timeout_s: Annotated[float, Field(gt=0)] = 10.0
    keepalive_timeout_s: Annotated[float, Field(gt=0)] = 30.0
    max_connections: Annotated[int, Field(ge=1)] = 10_000
    max_connections_per_address: Annotated[int, Field(ge=1)] = 256
    admin_token_hash: Annotated[str, AfterValidator(_sha256_hex)] | None = None
    # TLS (docs/registry.md): the server certificate chain and its key (0600); with
    # tls_client_ca, agents must present a certificate signed by that CA (mutual TLS)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    insecure: bool = False  # serve plain HTTP (tests only); needed when there is no TLS
    # processes on one port (SO_REUSEPORT), each an instance of its own (docs/registry.md)
    workers: Annotated[int, Field(ge=1, le=64)] = 1

    @property
    def tls(self) -> bool:
        """Whether the registry serves TLS (``tls_cert`` and ``tls_key`` given)."""
        return self.tls_cert is not None and self.tls_key is not None

    @property
    def url(self) -> str:
        """``public_url``, or ``https://host:port`` (``http://`` without TLS) when it is not set."""
        if self.public_url:
            return self.public_url.rstrip("/")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}"

    @property
    def expire_after_s(self) -> float:
        """Silence after which a node goes not-live: ``heartbeat_s * expire_after_heartbeats``."""
        return self.heartbeat_s * self.expire_after_heartbeats

    @property
    def effective_lease_ttl_s(self) -> int:
        """The instance lease TTL: ``lease_ttl_s``, else the expiry time (at least 5 s)."""
        if self.lease_ttl_s is not None:
            return self.lease_ttl_s
        return max(5, math.ceil(self.expire_after_s))

    def one_of(self, number: int) -> RegistryConfig:
        """The config of process ``number`` of ``workers`` (``--workers N``): an instance
        of its own (``<instance_id>-<number>``) with its share of the limits, so that the
        processes together admit what the config says (rates, bursts and connection
        caps divided by ``workers``, rounded up; each process keeps its own buckets)."""
        n = self.workers

        def rate(value: float | None) -> float | None:
            return None if value is None else value / n

        def count(value: int | None) -> int | None:
            return None if value is None else max(1, math.ceil(value / n))

        return self.model_copy(
            update={
                "instance_id": f"{self.instance_id}-{number}",
                "registrations_per_s": rate(self.registrations_per_s),
                "registration_burst": count(self.registration_burst),
                "address_registrations_per_s": rate(self.address_registrations_per_s),
                "address_registration_burst": count(self.address_registration_burst),
                "unauthenticated_per_s": rate(self.unauthenticated_per_s),
                "unauthenticated_burst": count(self.unauthenticated_burst),
                "max_connections": count(self.max_connections),
                "max_connections_per_address": count(self.max_connections_per_address),
            }
        )

    def summary(self) -> str:
        """One line for the log (no secrets)."""
        names = ", ".join(n.namespace for n in self.namespaces)
        return (
            f"registry {self.instance_id} serving {names} at {self.url} "
            f"(etcd {','.join(self.etcd.endpoints)}, heartbeat {self.heartbeat_s:g} s)"
        )


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    data: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> RegistryConfig:
    """Build a config from a JSON file (or ``data``), the environment and ``overrides``.

    ``overrides`` are the command-line flags, keyed by field name with dots for nested
    fields (``{"port": 9000, "etcd.endpoints": [...]}``); ``None`` values are ignored.
    ``env`` defaults to ``os.environ``.  Raises :class:`ConfigError` naming the file and
    every bad field.
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
    for name in _PATH_FIELDS:
        if name in raw:
            raw[name] = resolve_path(base, raw[name])
    if isinstance(raw.get("namespaces"), list):
        raw["namespaces"] = [
            {**n, "key_file": resolve_path(base, n["key_file"])}
            if isinstance(n, dict) and "key_file" in n
            else n
            for n in raw["namespaces"]
        ]

    environ = os.environ if env is None else env
    EtcdSettings.layer(raw, base=base, env=environ)
    if environ.get(ENV_LISTEN):
        raw["host"], raw["port"] = parse_listen(environ[ENV_LISTEN])
    apply_overrides(raw, overrides)
    return validate_config(RegistryConfig, raw, source=source, what="registry config")
