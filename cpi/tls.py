"""TLS for the ``cpi`` commands: the local certificate authority of ``cpi up`` and the
client options (``--cacert``, ``--insecure``) of the commands that talk HTTP.

The local CA lives in ``DATA_DIR/tls/``: ``ca.pem`` (the certificate clients trust)
and ``ca.key`` (0600).  Each component gets ``<name>.pem`` + ``<name>.key`` (0600),
an ECDSA P-256 certificate for ``127.0.0.1`` and ``localhost`` usable as a server and
as a client certificate (mutual TLS to etcd).  Its common name is ``cpi up: <name>``,
deliberately not an etcd user name: etcd with ``--client-cert-auth`` takes a
certificate's common name as the user when a request carries no password token, and a
certificate alone should not grant any etcd role (the password is still needed).
A second ``cpi up`` reuses them; a missing, foreign or expiring one is issued again.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import json
import logging
import os
import secrets
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from registry.tls import load_client_context, warn_insecure
from schemas.errors import ConfigError, InvalidDataError

__all__ = [
    "ENV_CACERT",
    "LocalCA",
    "add_client_arguments",
    "add_server_arguments",
    "client_ssl",
    "ensure_ca",
]

ENV_CACERT = "CPI_CACERT"
"""CA certificate (PEM) the HTTP clients of ``cpi`` trust, when ``--cacert`` is not given."""

CA_DAYS = 3650
CERT_DAYS = 397
RENEW_BEFORE = dt.timedelta(days=30)

_log = logging.getLogger("cpi.tls")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    tmp = path.with_suffix(".key.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, pem)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _load_cert(path: Path) -> x509.Certificate | None:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError):
        return None


def _fresh(cert: x509.Certificate) -> bool:
    return cert.not_valid_after_utc - RENEW_BEFORE > _now()


@dataclass(frozen=True)
class LocalCA:
    """The CA of one data dir; :meth:`issue` gives a component its certificate."""

    dir: Path
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def cert_file(self) -> Path:
        return self.dir / "ca.pem"

    def issue(self, name: str) -> tuple[Path, Path]:
        """``(cert, key)`` files of component ``name``: reused when still signed by this
        CA, matching its key and valid for more than 30 days; issued anew otherwise."""
        cert_path, key_path = self.dir / f"{name}.pem", self.dir / f"{name}.key"
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"cpi up: {name}"[:64])])
        old = _load_cert(cert_path)
        if (
            old is not None
            and old.subject == subject
            and key_path.exists()
            and _fresh(old)
            and self._signed(old, key_path)
        ):
            os.chmod(key_path, 0o600)
            return cert_path, key_path
        key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=CERT_DAYS))
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )
        _write_key(key_path, key)
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _log.info("issued TLS certificate %s (%s)", cert_path, name)
        return cert_path, key_path

    def _signed(self, cert: x509.Certificate, key_path: Path) -> bool:
        try:
            cert.verify_directly_issued_by(self.cert)
            key = serialization.load_pem_private_key(key_path.read_bytes(), None)
        except (OSError, ValueError, TypeError, Exception):  # wrong issuer, bad signature
            return False
        return bool(key.public_key() == cert.public_key())


def ensure_ca(tls_dir: Path) -> LocalCA:
    """The CA in ``tls_dir`` (created 0700), made when missing or expiring (then every
    component certificate is issued again, since the old ones chain to the old CA)."""
    tls_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(tls_dir, 0o700)
    cert_path, key_path = tls_dir / "ca.pem", tls_dir / "ca.key"
    cert = _load_cert(cert_path)
    if cert is not None and key_path.exists() and _fresh(cert):
        key = serialization.load_pem_private_key(key_path.read_bytes(), None)
        if isinstance(key, ec.EllipticCurvePrivateKey) and key.public_key() == cert.public_key():
            os.chmod(key_path, 0o600)
            return LocalCA(tls_dir, cert, key)
    key = ec.generate_private_key(ec.SECP256R1())
    # a name of its own, so that CAs of two data dirs are told apart (64 characters at most)
    name = x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, f"cpi up local CA {secrets.token_hex(4)}")]
    )
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_key(key_path, key)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _log.info("created local certificate authority %s", cert_path)
    return LocalCA(tls_dir, cert, key)


# -- server options ---------------------------------------------------------------------


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    """``--tls-cert``, ``--tls-key`` and ``--insecure`` of the serve commands."""
    parser.add_argument("--tls-cert", metavar="FILE", help="TLS certificate chain (PEM)")
    parser.add_argument("--tls-key", metavar="FILE", help="its private key (PEM, mode 0600)")
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="serve plain HTTP without TLS (tests only; logs a warning)",
    )


# -- client options ---------------------------------------------------------------------


def add_client_arguments(
    parser: argparse.ArgumentParser, *, cert: bool = False, sub: bool = False
) -> None:
    """``--cacert`` (default ``$CPI_CACERT``) and ``--insecure``; with ``cert`` also
    ``--client-cert``/``--client-key`` (mutual TLS); with ``sub`` (a sub-command of a
    command that has them too) they do not clobber what was given before it."""
    kw: dict[str, Any] = {"default": argparse.SUPPRESS} if sub else {}
    parser.add_argument(
        "--cacert",
        **(kw or {"default": os.environ.get(ENV_CACERT) or None}),
        metavar="FILE",
        help=f"CA certificate (PEM) to verify the server with (default: ${ENV_CACERT}; "
        "`cpi up` writes DATA_DIR/tls/ca.pem)",
    )
    if cert:
        parser.add_argument(
            "--client-cert", metavar="FILE", help="client certificate (PEM) for mutual TLS"
        )
        parser.add_argument("--client-key", metavar="FILE", help="its private key (PEM, mode 0600)")
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="allow plain http:// URLs (no TLS); logs a warning",
        **kw,
    )


def up_cacert(up: dict[str, Any] | str | os.PathLike[str] | None) -> str | None:
    """The CA path an ``up.json`` (parsed, or its path) names, if any."""
    if up is None:
        return None
    obj: Any = up if isinstance(up, dict) else json.loads(Path(up).read_text())
    ca = (obj.get("tls") or {}).get("ca")
    return str(ca) if ca else None


def client_ssl(args: argparse.Namespace, *urls: str, up: Any = None) -> ssl.SSLContext | None:
    """The SSL context of a client command, after checking its ``urls``.

    http:// URLs need ``--insecure`` (a WARNING is logged); the CA is ``--cacert``,
    ``$CPI_CACERT`` or the one ``up`` (an up.json) names; without one, the system roots.
    """
    insecure = bool(getattr(args, "insecure", False))
    from schemas.tls import check_url

    for url in urls:
        check_url(url, insecure=insecure)
    if insecure and any(u.lower().startswith("http://") for u in urls):
        warn_insecure("talking to " + ", ".join(u for u in urls if u.startswith("http://")))
    cacert = getattr(args, "cacert", None) or os.environ.get(ENV_CACERT) or up_cacert(up)
    try:
        return load_client_context(
            cacert, getattr(args, "client_cert", None), getattr(args, "client_key", None)
        )
    except ConfigError as exc:
        raise InvalidDataError(str(exc)) from exc
