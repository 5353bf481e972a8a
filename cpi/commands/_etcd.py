"""The ``--etcd`` option shared by commands that read or write the index, and the etcd
credentials that go with it (``--user``, ``--password-file``, and etcdctl's TLS options
``--cacert``, ``--cert``, ``--key``)."""

from __future__ import annotations

import argparse
import os
import socket

from cpi.errors import UsageError
from registry.index import (
    ENV_ETCD_CACERT,
    ENV_ETCD_CERT,
    ENV_ETCD_ENDPOINTS,
    ENV_ETCD_ENDPOINTS_ALIAS,
    ENV_ETCD_KEY,
    ENV_ETCD_PASSWORD,
    ENV_ETCD_PASSWORD_FILE,
    ENV_ETCD_USER,
    Index,
    endpoints_from_env,
)
from registry.tls import check_key_file
from schemas.errors import ConfigError, IndexUnavailableError, InvalidDataError

ETCD_ENV = ENV_ETCD_ENDPOINTS
"""Environment variable read when ``--etcd`` is not given (``$CPI_ETCD`` also works)."""


def etcd_argument(parser: argparse.ArgumentParser) -> None:
    """Add ``--etcd URL[,URL...]``, defaulting to ``$CPI_ETCD_ENDPOINTS`` (or its other
    name ``$CPI_ETCD``); required when both are unset.  Also adds the credentials
    (:func:`credential_arguments`)."""
    default = endpoints_from_env(os.environ)
    parser.add_argument(
        "--etcd",
        default=default,
        required=default is None,
        help=(
            "etcd endpoints, comma-separated "
            f"(default: ${ENV_ETCD_ENDPOINTS} or ${ENV_ETCD_ENDPOINTS_ALIAS})"
        ),
    )
    credential_arguments(parser)


def credential_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--user`` (default ``$CPI_ETCD_USER``) and ``--password-file`` (default
    ``$CPI_ETCD_PASSWORD_FILE``); without a file the password is ``$CPI_ETCD_PASSWORD``.
    The password itself is never a flag (it would show in the process list)."""
    parser.add_argument(
        "--user",
        default=os.environ.get(ENV_ETCD_USER) or None,
        help=f"etcd user when etcd has auth on (default: ${ENV_ETCD_USER}); `cpi up` "
        "writes the users' password files under DATA_DIR/etcd-auth/",
    )
    parser.add_argument(
        "--password-file",
        default=os.environ.get(ENV_ETCD_PASSWORD_FILE) or None,
        metavar="FILE",
        help=f"file whose first line is the etcd password (default: ${ENV_ETCD_PASSWORD_FILE}; "
        f"else the password is ${ENV_ETCD_PASSWORD})",
    )
    tls_arguments(parser)


def _tls_option(parser: argparse.ArgumentParser, name: str, env: str, help: str) -> None:
    """``--etcd-NAME``, and etcdctl's ``--NAME`` too when the command has no such flag."""
    flags = [f"--etcd-{name}"]
    if f"--{name}" not in parser._option_string_actions:
        flags.insert(0, f"--{name}")
    parser.add_argument(
        *flags,
        dest=f"etcd_{name}",
        default=os.environ.get(env) or None,
        metavar="FILE",
        help=f"{help} (default: ${env})",
    )


def tls_arguments(parser: argparse.ArgumentParser) -> None:
    """etcdctl's TLS options: ``--cacert``, ``--cert``, ``--key`` (each also spelled
    ``--etcd-cacert`` ..., the only spelling where the command uses the short name for
    something else), defaulting to ``$CPI_ETCD_CACERT``, ``$CPI_ETCD_CERT``, ``$CPI_ETCD_KEY``."""
    _tls_option(
        parser, "cacert", ENV_ETCD_CACERT, "CA certificate (PEM) of etcd's server certificate"
    )
    _tls_option(parser, "cert", ENV_ETCD_CERT, "client certificate (PEM) for mutual TLS with etcd")
    _tls_option(parser, "key", ENV_ETCD_KEY, "its private key (PEM, mode 0600)")


def tls_files(args: argparse.Namespace) -> dict[str, str | None]:
    """The :class:`Index` TLS keyword arguments (file paths) from the parsed options and
    the environment; a key file others can read is refused."""
    cacert = getattr(args, "etcd_cacert", None) or os.environ.get(ENV_ETCD_CACERT) or None
    cert = getattr(args, "etcd_cert", None) or os.environ.get(ENV_ETCD_CERT) or None
    key = getattr(args, "etcd_key", None) or os.environ.get(ENV_ETCD_KEY) or None
    if (cert is None) != (key is None):
        raise UsageError("a client certificate for etcd needs both --cert and --key")
    if key is not None:
        try:
            check_key_file(key)
        except ConfigError as exc:
            raise InvalidDataError(str(exc)) from exc
    return {"ca_cert": cacert, "cert_chain": cert, "cert_key": key}


def credentials(args: argparse.Namespace) -> tuple[str | None, str | None]:
    """``(user, password)`` from the parsed ``--user``/``--password-file`` and the
    environment; ``(None, None)`` without a user."""
    user = getattr(args, "user", None) or os.environ.get(ENV_ETCD_USER) or None
    if user is None:
        return None, None
    path = getattr(args, "password_file", None) or os.environ.get(ENV_ETCD_PASSWORD_FILE)
    if path:
        try:
            with open(path) as f:
                password = f.readline().rstrip("\r\n")
        except OSError as exc:
            raise InvalidDataError(f"--password-file {path}: {exc.strerror}") from exc
        if not password:
            raise InvalidDataError(f"--password-file {path} is empty")
        return user, password
    from_env = os.environ.get(ENV_ETCD_PASSWORD)
    if not from_env:
        raise InvalidDataError(
            f"etcd user {user!r} needs a password: give --password-file or set "
            f"${ENV_ETCD_PASSWORD_FILE} or ${ENV_ETCD_PASSWORD}"
        )
    return user, from_env


_last_endpoints: list[str] = []


def last_endpoints() -> str | None:
    """The endpoints the last :func:`open_index` was given (for error messages)."""
    return _last_endpoints[-1] if _last_endpoints else None


def open_index(
    urls: str, *, timeout: float | None = None, args: argparse.Namespace | None = None
) -> Index:
    """An :class:`Index` on the comma-separated ``urls``; use as ``async with``.

    With *args*, the credentials of :func:`credentials` are used; without, those of the
    environment (``$CPI_ETCD_USER`` and its password), if any.  Every call is bounded by
    *timeout*, else ``--timeout`` of *args* (default 5 s).
    """
    ns = args if args is not None else argparse.Namespace()
    user, password = credentials(ns)
    if timeout is None:
        timeout = float(getattr(args, "timeout", None) or 5.0)
    _last_endpoints.append(urls)
    try:
        index = Index.from_url_list(
            urls, timeout=timeout, user=user, password=password, **tls_files(ns)
        )
    except ValueError as exc:
        raise UsageError(f"--etcd {urls!r}: {exc}") from exc
    _probe(index.endpoints, min(timeout, 3.0))
    return index


def _probe(endpoints: tuple[str, ...], timeout: float) -> None:
    """Fail at once when no endpoint accepts a TCP connection (a dead etcd would
    otherwise cost the whole ``--timeout`` of every call, and say less)."""
    reasons = []
    for ep in endpoints:
        host, _, port = ep.rpartition(":")
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
                return
        except (OSError, ValueError) as exc:
            reasons.append(
                "timed out"
                if isinstance(exc, TimeoutError)
                else (getattr(exc, "strerror", None) or str(exc))
            )
    if reasons:
        reason = (
            reasons[0]
            if len(set(reasons)) == 1
            else "; ".join(f"{ep}: {r}" for ep, r in zip(endpoints, reasons, strict=True))
        )
        raise IndexUnavailableError(f"cannot connect to {','.join(endpoints)} ({reason})")
