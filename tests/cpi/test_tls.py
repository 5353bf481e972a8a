"""TLS by default: the local CA of ``cpi up``, serve commands that refuse to run without
TLS material (or ``--insecure``), a registry and a resolver started the real way that
answer over https, mutual TLS between agent and registry, clients that verify."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import ssl
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from cpi import tls
from cpi.etcdproc import EtcdProcess
from cpi.main import main
from registry.index import Index
from registry.tls import check_key_file, load_client_context
from schemas.errors import ConfigError
from tests.registry.service_kit import World


def _ca(tmp_path: Path) -> tls.LocalCA:
    return tls.ensure_ca(tmp_path / "tls")


# -- the local CA -------------------------------------------------------------------------


def test_local_ca_issues_p256_certs_0600_keys_reused_and_renewed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ca = _ca(tmp_path)
    assert stat.S_IMODE(ca.dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((ca.dir / "ca.key").stat().st_mode) == 0o600
    cert_path, key_path = ca.issue("cpi-resolver")
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    cert.verify_directly_issued_by(ca.cert)

    # a second run: the same CA and certificate
    again = tls.ensure_ca(tmp_path / "tls")
    assert again.cert == ca.cert
    assert again.issue("cpi-resolver") == (cert_path, key_path)
    assert cert_path.read_bytes() == cert.public_bytes(serialization.Encoding.PEM)
    # a missing key: issued again
    key_path.unlink()
    again.issue("cpi-resolver")
    assert x509.load_pem_x509_certificate(cert_path.read_bytes()) != cert
    # expiring (within the renewal margin): issued again
    before = cert_path.read_bytes()
    monkeypatch.setattr(tls, "RENEW_BEFORE", dt.timedelta(days=tls.CERT_DAYS + 1))
    again.issue("cpi-resolver")
    assert cert_path.read_bytes() != before


def test_group_readable_key_files_are_refused(tmp_path: Path) -> None:
    ca = _ca(tmp_path)
    cert, key = ca.issue("x")
    os.chmod(key, 0o640)
    with pytest.raises(ConfigError, match="chmod 600"):
        check_key_file(key)
    with pytest.raises(ConfigError, match="chmod 600"):
        load_client_context(ca.cert_file, cert, key)


# -- serve commands refuse plain HTTP unless told --------------------------------------


def test_serve_commands_refuse_to_start_without_tls_or_insecure(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    world = World(tmp_path)
    world.config("127.0.0.1:1")
    assert main(["registry", "serve", "--config", str(tmp_path / "registry.json")]) == 1
    err = capsys.readouterr().err
    assert "no TLS certificate" in err and "--tls-cert" in err and "--insecure" in err
    argv = ["resolver", "serve", "--anchor", str(world.anchor_file), "--port", "0"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "no TLS certificate" in err and "--tls-key" in err and "--insecure" in err


def test_clients_refuse_plain_http_without_insecure(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["discover", "--resolver", "http://127.0.0.1:9"]) == 1
    assert "--insecure" in capsys.readouterr().err


# -- the real processes ---------------------------------------------------------------------


@contextmanager
def _serve(argv: list[str], marker: str, log: Path) -> Iterator[tuple[str, str]]:
    """Run ``cpi ARGV``; yield (the URL its log line names after ``marker``, the log)."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cpi", *argv],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "CPI_ETCD_PASSWORD": ""},
        )
    try:
        deadline = time.monotonic() + 30
        url = None
        while url is None:
            text = log.read_text(errors="replace")
            for line in text.splitlines():
                if marker in line:
                    url = line.split(marker, 1)[1].split()[0].rstrip(",;")
            assert proc.poll() is None, text
            assert time.monotonic() < deadline, text
            time.sleep(0.1)
        yield url, text
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _get(url: str, context: ssl.SSLContext | None) -> int:
    with urllib.request.urlopen(url, timeout=5, context=context) as resp:
        return int(resp.status)


def _wait_ready(url: str, context: ssl.SSLContext) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            if _get(url, context) == 200:
                return
        except urllib.error.HTTPError:
            pass
        assert time.monotonic() < deadline, f"{url} not ready"
        time.sleep(0.2)


def _untrusted_refused(url: str) -> None:
    """A client that does not trust the CA (the system roots) fails verification."""
    with pytest.raises(urllib.error.URLError) as info:
        _get(url, ssl.create_default_context())
    assert isinstance(info.value.reason, ssl.SSLCertVerificationError)


def _agent(
    world_url: str, tmp_path: Path, token: str, *extra: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable, "-m", "cpi", "agent", "run", "--once", "--register-attempts", "1",
            "--registry", world_url, "--namespace", "CN.31.CMCC", "--kind", "GPU",
            "--key", str(tmp_path / "node.key"), *extra,
        ],
        env={**os.environ, "CPI_JOIN_TOKEN": token, "CPI_CACERT": ""},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def _publish(world: World, etcd: EtcdProcess) -> str:
    async def go() -> str:
        async with Index(endpoints=[etcd.endpoint]) as idx:
            await world.publish(idx)
            return await world.token(idx, ttl_s=600)

    return asyncio.run(go())


@pytest.mark.timeout(180)
def test_registry_serves_tls_and_requires_client_certs_with_mtls(
    tmp_path: Path, etcd_server: EtcdProcess
) -> None:
    world = World(tmp_path)
    token = _publish(world, etcd_server)
    ca = _ca(tmp_path)
    cert, key = ca.issue("registry")
    agent_cert, agent_key = ca.issue("agent")
    world.config(etcd_server.endpoint)
    argv = [
        "registry", "serve", "--config", str(tmp_path / "registry.json"),
        "--tls-cert", str(cert), "--tls-key", str(key), "--tls-client-ca", str(ca.cert_file),
    ]  # fmt: skip
    with _serve(argv, " at ", tmp_path / "registry.log") as (url, _):
        assert url.startswith("https://127.0.0.1:")
        with_cert = load_client_context(ca.cert_file, agent_cert, agent_key)
        _wait_ready(f"{url}/readyz", with_cert)
        _untrusted_refused(f"{url}/readyz")
        # plain HTTP on the TLS port gets no answer
        with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
            _get(f"{url.replace('https://', 'http://')}/readyz", None)
        # mutual TLS: an agent without a client certificate is refused ...
        refused = _agent(url, tmp_path, token, "--cacert", str(ca.cert_file))
        assert refused.returncode != 0
        assert token not in refused.stderr
        # ... and one with a certificate from the CA registers
        ok = _agent(
            url, tmp_path, token, "--cacert", str(ca.cert_file),
            "--client-cert", str(agent_cert), "--client-key", str(agent_key),
        )  # fmt: skip
        assert ok.returncode == 0, ok.stderr
        assert ok.stdout.strip().splitlines()[-1].startswith("CN.31.CMCC/GPU.")
        # an agent that does not trust the CA fails verification
        untrusting = _agent(
            url, tmp_path, token,
            "--client-cert", str(agent_cert), "--client-key", str(agent_key),
        )  # fmt: skip
        assert untrusting.returncode != 0
        assert "CERTIFICATE_VERIFY_FAILED" in untrusting.stderr or "certificate" in (
            untrusting.stderr.lower()
        )


@pytest.mark.timeout(120)
def test_insecure_registry_warns_and_agent_needs_insecure_for_http(
    tmp_path: Path, etcd_server: EtcdProcess
) -> None:
    world = World(tmp_path)
    token = _publish(world, etcd_server)
    world.config(etcd_server.endpoint)
    argv = ["registry", "serve", "--config", str(tmp_path / "registry.json"), "--insecure"]
    with _serve(argv, " at ", tmp_path / "registry.log") as (url, text):
        assert url.startswith("http://")
        assert "WARNING" in text and "--insecure" in text
        plain = _agent(url, tmp_path, token)
        assert plain.returncode == 1 and "--insecure" in plain.stderr
        ok = _agent(url, tmp_path, token, "--insecure")
        assert ok.returncode == 0, ok.stderr
        assert "WARNING" in ok.stderr


@pytest.mark.timeout(180)
def test_resolver_serves_tls_and_cli_verifies(tmp_path: Path, etcd_server: EtcdProcess) -> None:
    world = World(tmp_path)
    _publish(world, etcd_server)
    ca = _ca(tmp_path)
    cert, key = ca.issue("resolver")
    argv = [
        "resolver", "serve", "--etcd", etcd_server.endpoint, "--anchor", str(world.anchor_file),
        "--port", "0", "--tls-cert", str(cert), "--tls-key", str(key),
    ]  # fmt: skip
    with _serve(argv, "serving at ", tmp_path / "resolver.log") as (url, _):
        assert url.startswith("https://127.0.0.1:")
        trusting = load_client_context(ca.cert_file)
        _wait_ready(f"{url}/readyz", trusting)
        _untrusted_refused(f"{url}/readyz")
        env = {**os.environ, "CPI_CACERT": ""}
        run = [sys.executable, "-m", "cpi", "discover", "--resolver", url, "--json"]
        found = subprocess.run(
            [*run, "--cacert", str(ca.cert_file)], env=env, capture_output=True, text=True
        )
        assert found.returncode == 0, found.stderr
        assert json.loads(found.stdout)["results"] == []
        via_env = subprocess.run(
            run, env={**env, "CPI_CACERT": str(ca.cert_file)}, capture_output=True, text=True
        )
        assert via_env.returncode == 0, via_env.stderr
        untrusted = subprocess.run(run, env=env, capture_output=True, text=True)
        assert untrusted.returncode != 0


# -- etcd TLS options -------------------------------------------------------------------------


def test_etcd_tls_from_the_environment_and_etcdctl_flags(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import argparse

    from cpi.commands import _etcd
    from registry.config import load_config

    ca = _ca(tmp_path)
    cert, key = ca.issue("registry")
    world = World(tmp_path)
    world.config("https://127.0.0.1:2379")
    env = {
        "CPI_ETCD_CACERT": str(ca.cert_file),
        "CPI_ETCD_CERT": str(cert),
        "CPI_ETCD_KEY": str(key),
    }
    config = load_config(tmp_path / "registry.json", env=env)
    assert (config.etcd.ca_cert, config.etcd.cert_chain, config.etcd.cert_key) == (
        ca.cert_file,
        cert,
        key,
    )
    config.etcd.open_index()  # builds (no connection yet)
    os.chmod(key, 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        config.etcd.open_index()
    os.chmod(key, 0o600)

    # etcdctl's spelling where it is free, --etcd-* everywhere
    parser = argparse.ArgumentParser()
    _etcd.etcd_argument(parser)
    args = parser.parse_args(
        ["--etcd", "https://127.0.0.1:1", "--cacert", str(ca.cert_file), "--cert", str(cert),
         "--key", str(key)]
    )  # fmt: skip
    assert _etcd.tls_files(args) == {
        "ca_cert": str(ca.cert_file),
        "cert_chain": str(cert),
        "cert_key": str(key),
    }
    signer = argparse.ArgumentParser()
    signer.add_argument("--key")  # `cpi log sign --key` is the log key
    _etcd.etcd_argument(signer)
    args = signer.parse_args(["--etcd", "x:1", "--key", "log.key", "--etcd-key", str(key)])
    assert args.key == "log.key" and args.etcd_key == str(key)
    # from the environment; a client certificate needs its key
    monkeypatch.setenv("CPI_ETCD_CERT", str(cert))
    with pytest.raises(Exception, match="both --cert and --key"):
        _etcd.tls_files(argparse.Namespace())
