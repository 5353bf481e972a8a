"""The ``etcd`` section of the service configs (:class:`EtcdSettings`) and the
environment that overrides it."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, Final

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from registry.index.client import Index
from schemas._settings import resolve_path, set_dotted, split_list
from schemas.errors import ConfigError, KeyFileError
from schemas.keys import check_private_mode

__all__ = [
    "ENV_ETCD_CACERT",
    "ENV_ETCD_CERT",
    "ENV_ETCD_ENDPOINTS",
    "ENV_ETCD_ENDPOINTS_ALIAS",
    "ENV_ETCD_KEY",
    "ENV_ETCD_PASSWORD",
    "ENV_ETCD_PASSWORD_FILE",
    "ENV_ETCD_USER",
    "EtcdSettings",
    "endpoints_from_env",
]

ENV_ETCD_ENDPOINTS: Final = "CPI_ETCD_ENDPOINTS"
"""Comma-separated etcd endpoints; replaces ``etcd.endpoints`` of a service config."""
ENV_ETCD_ENDPOINTS_ALIAS: Final = "CPI_ETCD"
"""Another name of :data:`ENV_ETCD_ENDPOINTS`, read when that is unset or empty."""
ENV_ETCD_PASSWORD: Final = "CPI_ETCD_PASSWORD"
"""The etcd password, so that it need not sit in a config file."""
ENV_ETCD_PASSWORD_FILE: Final = "CPI_ETCD_PASSWORD_FILE"
"""A file holding the etcd password (its first line); replaces ``etcd.password_file``."""
ENV_ETCD_USER: Final = "CPI_ETCD_USER"
"""The etcd user; replaces ``etcd.user``."""
ENV_ETCD_CACERT: Final = "CPI_ETCD_CACERT"
"""CA certificate (PEM) etcd's server certificate must chain to; replaces ``etcd.ca_cert``."""
ENV_ETCD_CERT: Final = "CPI_ETCD_CERT"
"""Client certificate (PEM) for mutual TLS with etcd; replaces ``etcd.cert_chain``."""
ENV_ETCD_KEY: Final = "CPI_ETCD_KEY"
"""Its private key (PEM, mode 0600); replaces ``etcd.cert_key``."""

_TLS_ENV: Final = (
    (ENV_ETCD_CACERT, "ca_cert"),
    (ENV_ETCD_CERT, "cert_chain"),
    (ENV_ETCD_KEY, "cert_key"),
)


def endpoints_from_env(env: Mapping[str, str]) -> str | None:
    """The etcd endpoints the environment names: ``$CPI_ETCD_ENDPOINTS``, else
    ``$CPI_ETCD`` (the same setting under the name the command line used first), else
    ``None``.  The text is a comma- or space-separated list."""
    return env.get(ENV_ETCD_ENDPOINTS) or env.get(ENV_ETCD_ENDPOINTS_ALIAS) or None


class EtcdSettings(BaseModel):
    """How a service reaches the national index: the ``etcd`` section of its config.

    The password is a :class:`pydantic.SecretStr`: it prints as ``**********`` and is
    never logged.  Instead of ``password``, ``password_file`` may name a file (mode
    0600) whose first line is the password; it is read when the index is opened.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    PATH_FIELDS: ClassVar[tuple[str, ...]] = ("ca_cert", "cert_key", "cert_chain", "password_file")
    """Fields holding file paths, resolved against the directory of the config file."""

    endpoints: list[str] = Field(default_factory=lambda: ["127.0.0.1:2379"], min_length=1)
    timeout_s: Annotated[float, Field(gt=0)] = 5.0
    ca_cert: Path | None = None
    cert_key: Path | None = None
    cert_chain: Path | None = None
    tls_server_name: str | None = None
    user: str | None = None
    password: SecretStr | None = None
    password_file: Path | None = None

    def password_value(self) -> str | None:
        """The password: ``password``, else the first line of ``password_file``, else ``None``.

        An unreadable or empty password file raises :class:`~schemas.errors.ConfigError`.
        """
        if self.password is not None:
            return self.password.get_secret_value()
        if self.password_file is None:
            return None
        try:
            lines = self.password_file.read_text().splitlines()
        except OSError as exc:
            raise ConfigError(
                f"etcd settings: cannot read password_file {self.password_file}: {exc.strerror}"
            ) from exc
        if not lines or not lines[0]:
            raise ConfigError(f"etcd settings: password_file {self.password_file} is empty")
        return lines[0]

    def open_index(self, **options: Any) -> Index:
        """An unconnected :class:`Index` for these settings (use as ``async with``).

        *options* are further keyword arguments of the :class:`Index` constructor.
        Settings that do not fit together, and a ``cert_key`` file the group or others
        can read, raise :class:`~schemas.errors.ConfigError`.
        """
        if self.cert_key is not None:
            try:
                check_private_mode(self.cert_key.stat().st_mode, source=str(self.cert_key))
            except OSError as exc:
                raise ConfigError(
                    f"etcd settings: cert_key {self.cert_key}: {exc.strerror}"
                ) from exc
            except KeyFileError as exc:
                raise ConfigError(f"etcd settings: {exc}") from exc
        try:
            return Index(
                endpoints=self.endpoints,
                timeout=self.timeout_s,
                ca_cert=self.ca_cert,
                cert_key=self.cert_key,
                cert_chain=self.cert_chain,
                tls_server_name=self.tls_server_name,
                user=self.user,
                password=self.password_value(),
                **options,
            )
        except ValueError as exc:
            raise ConfigError(f"etcd settings: {exc}") from exc

    @classmethod
    def layer(cls, raw: dict[str, Any], *, base: Path, env: Mapping[str, str]) -> None:
        """Prepare the ``etcd`` section of a config's raw data, in place.

        Relative paths in it are resolved against *base* (the config file's directory);
        then the endpoints from *env* (:func:`endpoints_from_env`), the TLS files
        (:data:`ENV_ETCD_CACERT`, :data:`ENV_ETCD_CERT`, :data:`ENV_ETCD_KEY`), :data:`ENV_ETCD_USER`,
        :data:`ENV_ETCD_PASSWORD` and :data:`ENV_ETCD_PASSWORD_FILE` replace what the
        file says (a password from the environment wins over any password file).
        """
        if isinstance(raw.get("etcd"), dict):
            raw["etcd"] = dict(raw["etcd"])
            for name in cls.PATH_FIELDS:
                if name in raw["etcd"]:
                    raw["etcd"][name] = resolve_path(base, raw["etcd"][name])
        endpoints = endpoints_from_env(env)
        if endpoints:
            set_dotted(raw, "etcd.endpoints", split_list(endpoints))
        for var, name in _TLS_ENV:
            if env.get(var):
                set_dotted(raw, f"etcd.{name}", resolve_path(Path.cwd(), env[var]))
        if env.get(ENV_ETCD_USER):
            set_dotted(raw, "etcd.user", env[ENV_ETCD_USER])
        if env.get(ENV_ETCD_PASSWORD_FILE):
            set_dotted(
                raw, "etcd.password_file", resolve_path(Path.cwd(), env[ENV_ETCD_PASSWORD_FILE])
            )
            raw["etcd"].pop("password", None)
        if env.get(ENV_ETCD_PASSWORD):
            set_dotted(raw, "etcd.password", env[ENV_ETCD_PASSWORD])
