"""TLS material on disk: server contexts for the HTTP services, client contexts (with
an optional client certificate) for the node agent and the ``cpi`` commands.

Private key files are refused when the group or others can access them (like the
signing keys of :mod:`registry.keyfile`).  No secret is ever logged.
"""

from __future__ import annotations

import logging
import os
import ssl
from pathlib import Path

from schemas import keys
from schemas.errors import ConfigError, KeyFileError
from schemas.tls import client_context

__all__ = [
    "check_key_file",
    "load_client_context",
    "load_server_context",
    "read_ca",
    "serving_context",
    "warn_insecure",
]

_log = logging.getLogger("registry.tls")

StrPath = str | os.PathLike[str]


def check_key_file(path: StrPath) -> Path:
    """``path`` if it is a private key file only its owner can access; else ConfigError."""
    p = Path(path)
    try:
        st = p.stat()
    except OSError as exc:
        raise ConfigError(f"TLS key {p}: {exc.strerror}") from exc
    try:
        keys.check_private_mode(st.st_mode, source=str(p))
    except KeyFileError as exc:
        raise ConfigError(str(exc)) from exc
    return p


def read_ca(path: StrPath) -> bytes:
    """The PEM bytes of a CA file; ConfigError naming the file when unreadable."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"CA certificate {path}: {exc.strerror}") from exc
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise ConfigError(f"CA certificate {path}: no PEM certificate in it")
    return data


def load_server_context(
    cert: StrPath, key: StrPath, *, client_ca: StrPath | None = None
) -> ssl.SSLContext:
    """A server context for ``cert`` (PEM chain) and ``key`` (0600).

    With ``client_ca``, clients must present a certificate signed by that CA (mutual TLS).
    """
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(str(cert), str(check_key_file(key)))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"TLS certificate {cert} / key {key}: {exc}") from exc
    if client_ca is not None:
        ctx.load_verify_locations(cadata=read_ca(client_ca).decode("ascii"))
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def load_client_context(
    cacert: StrPath | None = None, cert: StrPath | None = None, key: StrPath | None = None
) -> ssl.SSLContext:
    """A client context trusting ``cacert`` (else the system roots), presenting
    ``cert``/``key`` when given (both or neither)."""
    if (cert is None) != (key is None):
        raise ConfigError("a client certificate needs both --cert and --key")
    ctx = client_context(read_ca(cacert) if cacert is not None else None)
    if cert is not None and key is not None:
        try:
            ctx.load_cert_chain(str(cert), str(check_key_file(key)))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"client certificate {cert} / key {key}: {exc}") from exc
    return ctx


def warn_insecure(what: str) -> None:
    """The WARNING every ``--insecure`` use logs."""
    _log.warning("--insecure: %s over plain HTTP, without TLS; use only for tests", what)


def serving_context(
    *,
    cert: StrPath | None,
    key: StrPath | None,
    client_ca: StrPath | None = None,
    insecure: bool,
    what: str,
) -> ssl.SSLContext | None:
    """The server context of a serve command, or ``None`` to serve plain HTTP.

    Without TLS material a service refuses to start unless ``insecure`` is set (then a
    WARNING is logged); the error says how to fix it.
    """
    if cert is not None and key is not None:
        return load_server_context(cert, key, client_ca=client_ca)
    if cert is not None or key is not None:
        raise ConfigError(
            f"{what}: TLS needs both a certificate (--tls-cert) and a key (--tls-key)"
        )
    if client_ca is not None:
        raise ConfigError(f"{what}: --tls-client-ca needs --tls-cert and --tls-key")
    if insecure:
        warn_insecure(f"{what} serving")
        return None
    raise ConfigError(
        f"{what}: no TLS certificate; give --tls-cert FILE --tls-key FILE (or tls_cert and "
        "tls_key in the config; `cpi up` issues them under DATA_DIR/tls/), or --insecure "
        "to serve plain HTTP (tests only)"
    )
