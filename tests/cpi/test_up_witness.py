"""``cpi up --witnesses 1``: the log's checkpoints are published with a witness's cosignature."""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from registry.logsigner import load_verifier
from schemas.cosignature import CosignerVerifier, open_cosigned_checkpoint
from tests.cpi.test_up import _free_base, _procs_mentioning


@pytest.mark.timeout(180)
def test_up_with_a_witness(tmp_path: Path) -> None:
    data = tmp_path / "state"
    base = _free_base()
    proc = subprocess.Popen(
        [sys.executable, "-m", "cpi", "up", "--data-dir", str(data), "--base-port", str(base),
         "--witnesses", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        up: dict[str, object] = {}
        deadline = time.time() + 120
        while time.time() < deadline:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            path = data / "up.json"
            if path.exists():
                up = json.loads(path.read_text())
                if up.get("tokens") and up.get("witnesses"):
                    break
            time.sleep(0.3)
        (w,) = up["witnesses"]  # type: ignore[misc]
        assert w["url"] == f"https://127.0.0.1:{base + 40}"
        verifier = CosignerVerifier.from_vkey(w["vkey"])
        assert Path(w["vkey_file"]).read_text().strip() == w["vkey"]
        key_file = data / "witness" / "w0" / "witness.key"
        assert oct(key_file.stat().st_mode & 0o777) == "0o600"
        ctx = ssl.create_default_context(cafile=up["tls"]["ca"])  # type: ignore[index]
        log = load_verifier(data / "national" / "log.vkey")
        resolver = up["resolver"]["http"]  # type: ignore[index]
        note = b""
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"{resolver}/v1/log/checkpoint", context=ctx) as r:
                    note = r.read()
                # the resolver requires the witness's cosignature: never served without it
                assert verifier.name.encode() in note, note
                break
            except OSError:  # 404 until a cosigned checkpoint exists
                pass
            time.sleep(0.5)
        cp, cosigs = open_cosigned_checkpoint(note, log, [verifier], quorum=1)
        assert [c.witness for c in cosigs] == ["cpi.local/witness0"]
        # the witness itself serves what it cosigned
        with urllib.request.urlopen(f"{w['url']}/v1/witness", context=ctx) as r:
            info = json.loads(r.read())
        assert info["logs"][0]["origin"] == cp.origin and info["logs"][0]["size"] >= cp.size
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for pid in _procs_mentioning(str(data)):
            os.kill(pid, signal.SIGKILL)
