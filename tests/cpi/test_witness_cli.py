"""``cpi witness init|serve`` as a separate process: TLS, key files, a cosignature, a clean stop."""

from __future__ import annotations

import json
import signal
import socket
import ssl
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from cpi.main import main
from cpi.tls import ensure_ca
from registry.logsigner import init_log_key
from schemas.checkpoint import Checkpoint, sign_checkpoint
from schemas.cosignature import (
    CosignerVerifier,
    add_signatures,
    format_add_checkpoint,
    open_cosigned_checkpoint,
    parse_signature_lines,
)
from schemas.merkle import MerkleTree


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_init_writes_a_0600_key_and_its_vkey(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = tmp_path / "w.key"
    assert main(["witness", "init", "--key", str(key), "--name", "w.test/1", "-o", "json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["created"] and stat.S_IMODE(key.stat().st_mode) == 0o600
    v = CosignerVerifier.from_vkey((tmp_path / "w.vkey").read_text())
    assert v.name == "w.test/1" and info["verifier_key"] == v.to_vkey()
    assert main(["witness", "init", "--key", str(key), "--name", "w.test/1", "-o", "json"]) == 0
    assert not json.loads(capsys.readouterr().out)["created"]


def test_serve_refuses_to_run_without_tls(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, _, _ = init_log_key(tmp_path / "log.key", origin="t.cpi/log")
    argv = ["witness", "serve", "--key", str(tmp_path / "w.key"), "--state", str(tmp_path / "s"),
            "--log", str(tmp_path / "log.vkey"), "--listen", f"127.0.0.1:{free_port()}"]  # fmt: skip
    assert main(argv) == 1  # a configuration error: no certificate, no --insecure
    assert "no TLS certificate" in capsys.readouterr().err
    assert not (tmp_path / "w.key").exists() and not (tmp_path / "s").exists()


@pytest.mark.timeout(60)
def test_serve_cosigns_over_tls_and_stops_cleanly(tmp_path: Path) -> None:
    log_key, log_verifier, _ = init_log_key(tmp_path / "log.key", origin="t.cpi/log")
    ca = ensure_ca(tmp_path / "tls")
    cert, key = ca.issue("witness")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "cpi", "witness", "serve", "--key", str(tmp_path / "w.key"),
         "--name", "w.test/1", "--state", str(tmp_path / "state"),
         "--log", f"t.cpi/log={tmp_path / 'log.vkey'}", "--listen", f"127.0.0.1:{port}",
         "--tls-cert", str(cert), "--tls-key", str(key)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    ctx = ssl.create_default_context(cafile=str(ca.cert_file))
    url = f"https://127.0.0.1:{port}"
    try:
        deadline = time.time() + 30
        while True:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            try:
                with urllib.request.urlopen(f"{url}/readyz", context=ctx, timeout=2):
                    break
            except OSError:
                assert time.time() < deadline
                time.sleep(0.2)
        tree = MerkleTree.from_leaves([b"a", b"b", b"c"])
        cp = Checkpoint.create(origin="t.cpi/log", size=3, root_hash=tree.root())
        note = sign_checkpoint(cp, log_key)
        req = urllib.request.Request(
            f"{url}/add-checkpoint", data=format_add_checkpoint(0, [], note), method="POST"
        )
        with urllib.request.urlopen(req, context=ctx, timeout=5) as resp:
            lines = parse_signature_lines(resp.read())
        wv = CosignerVerifier.from_vkey((tmp_path / "w.vkey").read_text())
        cosigned = add_signatures(note, lines)
        assert open_cosigned_checkpoint(cosigned, log_verifier, [wv], quorum=1)[0].size == 3
        # a second root for size 3: 409
        other = sign_checkpoint(
            Checkpoint.create(origin="t.cpi/log", size=3, root_hash=MerkleTree.from_leaves(
                [b"x", b"y", b"z"]).root()), log_key)  # fmt: skip
        req = urllib.request.Request(
            f"{url}/add-checkpoint", data=format_add_checkpoint(3, [], other), method="POST"
        )
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, context=ctx, timeout=5)
        assert err.value.code == 409 and err.value.read() == b"3\n"
        assert stat.S_IMODE((tmp_path / "w.key").stat().st_mode) == 0o600
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0, out
    assert "Traceback" not in out
