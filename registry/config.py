"""Configuration of a regional / industry registry (``cpi registry serve``).

Three layers, later ones winning: a JSON file, then the environment, then command-line
flags.  The result is a frozen :class:`RegistryConfig`; every field is documented in
``docs/registry.md``.

Environment variables:

* ``CPI_ETCD_ENDPOINTS``: comma-separated etcd endpoints (replaces ``etcd.endpoints``);
* ``CPI_ETCD_PASSWORD``: etcd password (so it need not sit in the file);
* ``CPI_REGISTRY_LISTEN``: ``host:port`` to listen on (``[::1]:8470`` for IPv6).

Relative paths in the file (key files, the anchor, TLS material) are resolved against
the directory of the file.  The etcd password is a :class:`pydantic.SecretStr`: it
prints as ``**********`` and is never logged.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, SecretStr, ValidationError

from registry.index import Index
from schemas.cpid import parse_namespace
from schemas.errors import InvalidCPIDError, InvalidDataError

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

ENV_ETCD_ENDPOINTS = "CPI_ETCD_ENDPOINTS"
ENV_ETCD_PASSWORD = "CPI_ETCD_PASSWORD"
ENV_LISTEN = "CPI_REGISTRY_LISTEN"

_PATH_FIELDS = ("anchor_file",)
_ETCD_PATH_FIELDS = ("ca_cert", "cert_key", "cert_chain")


class ConfigError(InvalidDataError):
    """The configuration is missing, unreadable or invalid."""

    code = "invalid_config"


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


class EtcdSettings(_Model):
    """How to reach the national index."""

    endpoints: list[str] = Field(default_factory=lambda: ["127.0.0.1:2379"], min_length=1)
    timeout_s: Annotated[float, Field(gt=0)] = 5.0
    ca_cert: Path | None = None
    cert_key: Path | None = None
    cert_chain: Path | None = None
    user: str | None = None
    password: SecretStr | None = None

    def open_index(self) -> Index:
        """An unconnected :class:`Index` for these settings (use ``async with``)."""
        try:
            return Index(
                endpoints=self.endpoints,
                timeout=self.timeout_s,
                ca_cert=self.ca_cert,
                cert_key=self.cert_key,
                cert_chain=self.cert_chain,
                user=self.user,
                password=self.password.get_secret_value() if self.password else None,
            )
        except ValueError as exc:
            raise ConfigError(f"etcd settings: {exc}") from exc


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
    registrations_per_s: Annotated[float, Field(gt=0)] = 50.0
    registration_burst: Annotated[int, Field(ge=1)] = 100
    max_body_bytes: Annotated[int, Field(ge=1024, le=1024 * 1024)] = 64 * 1024
    admin_token_hash: Annotated[str, AfterValidator(_sha256_hex)] | None = None

    @property
    def url(self) -> str:
        """``public_url``, or ``http://host:port`` when it is not set."""
        if self.public_url:
            return self.public_url.rstrip("/")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

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

    def summary(self) -> str:
        """One line for the log (no secrets)."""
        names = ", ".join(n.namespace for n in self.namespaces)
        return (
            f"registry {self.instance_id} serving {names} at {self.url} "
            f"(etcd {','.join(self.etcd.endpoints)}, heartbeat {self.heartbeat_s:g} s)"
        )


def parse_listen(text: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` -> ``(host, port)``."""
    m = re.fullmatch(r"\[([^\]]+)\]:(\d+)|([^:\[\]]+):(\d+)", text.strip())
    if not m:
        raise ConfigError(f"listen address {text!r}: expected host:port (or [v6-address]:port)")
    host = m.group(1) or m.group(3)
    port = int(m.group(2) or m.group(4))
    if port > 65535:
        raise ConfigError(f"listen address {text!r}: port {port} is above 65535")
    return host, port


def _resolve(base: Path, value: Any) -> Any:
    if isinstance(value, str | os.PathLike) and os.fspath(value):
        p = Path(value)
        return str(p if p.is_absolute() else base / p)
    return value


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    node = data
    *parents, last = dotted.split(".")
    for part in parents:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[last] = value


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:8]:
        where = ".".join(str(p) for p in err["loc"]) or "config"
        msg = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
        parts.append(f"{where}: {msg.removeprefix('Value error, ')}")
    return "; ".join(parts)


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
    source = "config"
    raw: dict[str, Any] = {}
    base = Path.cwd()
    if path is not None:
        p = Path(path)
        source = str(p)
        try:
            loaded = json.loads(p.read_text())
        except OSError as exc:
            raise ConfigError(f"{p}: cannot read config file: {exc.strerror}") from exc
        except ValueError as exc:
            raise ConfigError(f"{p}: not valid JSON: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: expected a JSON object, got {type(loaded).__name__}")
        raw = loaded
        base = p.resolve().parent
    if data is not None:
        raw = {**raw, **copy.deepcopy(dict(data))}
    for name in _PATH_FIELDS:
        if name in raw:
            raw[name] = _resolve(base, raw[name])
    if isinstance(raw.get("namespaces"), list):
        raw["namespaces"] = [
            {**n, "key_file": _resolve(base, n["key_file"])}
            if isinstance(n, dict) and "key_file" in n
            else n
            for n in raw["namespaces"]
        ]
    if isinstance(raw.get("etcd"), dict):
        raw["etcd"] = dict(raw["etcd"])
        for name in _ETCD_PATH_FIELDS:
            if name in raw["etcd"]:
                raw["etcd"][name] = _resolve(base, raw["etcd"][name])

    environ = os.environ if env is None else env
    if environ.get(ENV_ETCD_ENDPOINTS):
        endpoints = [e for e in re.split(r"[,\s]+", environ[ENV_ETCD_ENDPOINTS]) if e]
        _set_dotted(raw, "etcd.endpoints", endpoints)
    if environ.get(ENV_ETCD_PASSWORD):
        _set_dotted(raw, "etcd.password", environ[ENV_ETCD_PASSWORD])
    if environ.get(ENV_LISTEN):
        raw["host"], raw["port"] = parse_listen(environ[ENV_LISTEN])

    for dotted, value in (overrides or {}).items():
        if value is not None:
            _set_dotted(raw, dotted, value)
    try:
        return RegistryConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{source}: invalid registry config: {_describe(exc)}") from exc
