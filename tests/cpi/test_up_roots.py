"""``cpi up --demo --roots 2``: two roots (CN, SG), each with its own etcd, registry and log
signer, and one resolver over both through an anchor bundle."""

from __future__ import annotations

import json
import os
import signal
import ssl
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cpi.test_up import _free_base, _procs_mentioning


class _Stack:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.proc: subprocess.Popen[str] | None = None
        self.ctx: ssl.SSLContext | None = None

    def start(self, *extra: str) -> dict[str, Any]:
        base = _free_base()
        while not all(_free(base + off) for off in (100, 101, 102)):
            base = _free_base()
        up_json = self.data_dir / "up.json"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cpi", "up", "--data-dir", str(self.data_dir),
             "--base-port", str(base), *extra],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        deadline = time.time() + 150
        while time.time() < deadline:
            if self.proc.poll() is not None:
                out = self.proc.stdout.read() if self.proc.stdout else ""
                raise AssertionError(f"cpi up exited early:\n{out}")
            if up_json.exists():
                up = json.loads(up_json.read_text())
                if up.get("tokens") and up.get("roots") and up.get("resolvers"):
                    self.ctx = ssl.create_default_context(cafile=up["tls"]["ca"])
                    return up
            time.sleep(0.2)
        raise AssertionError("cpi up --roots 2 did not write up.json in 150 s")

    def get(self, url: str) -> tuple[int, Any]:
        try:
            with urllib.request.urlopen(url, timeout=5, context=self.ctx) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"{}")


def _free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[_Stack]:
    st = _Stack(tmp_path / "state")
    yield st
    if st.proc is not None and st.proc.poll() is None:
        st.proc.send_signal(signal.SIGINT)
        try:
            st.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            st.proc.kill()
            st.proc.wait()
    for pid in _procs_mentioning(str(st.data_dir)):
        os.kill(pid, signal.SIGKILL)


@pytest.mark.timeout(300)
def test_up_two_roots_one_resolver(stack: _Stack) -> None:
    up = stack.start("--demo", "--nodes", "40", "--roots", "2")
    assert set(up["roots"]) == {"CN", "SG"}
    cn, sg = up["roots"]["CN"], up["roots"]["SG"]
    assert cn["etcd"] != sg["etcd"] and cn["anchor"] != sg["anchor"]
    assert {"SG.01", "SG.02.STARHUB"} <= set(sg["registries"]) <= set(up["registries"])
    assert set(up["tokens"]) == set(up["registries"])
    bundle = json.loads(Path(up["bundle"]).read_text())
    assert [r["root"] for r in bundle["roots"]] == ["CN", "SG"]
    assert stat.S_IMODE(Path(up["bundle"]).stat().st_mode) == 0o600
    assert all("password" not in ix["etcd"] for r in bundle["roots"] for ix in r["indexes"])
    resolver = up["resolver"]["http"]
    deadline = time.time() + 120
    found: dict[str, list[str]] = {}
    while time.time() < deadline:
        status, body = stack.get(f"{resolver}/v1/discover?limit=100")
        if status == 200:
            roots = {r["cpid"][:2] for r in body["results"]}
            if roots == {"CN", "SG"}:
                found = {
                    root: [r["cpid"] for r in body["results"] if r["cpid"].startswith(root)]
                    for root in ("CN", "SG")
                }
                break
        time.sleep(0.5)
    assert found, "the demo nodes of both roots were not discovered through one resolver"
    status, body = stack.get(f"{resolver}/v1/discover?within=SG&limit=100")
    assert status == 200 and {r["cpid"][:2] for r in body["results"]} == {"SG"}
    status, body = stack.get(f"{resolver}/v1/discover?roots=CN&limit=100")
    assert status == 200 and {r["cpid"][:2] for r in body["results"]} == {"CN"}
    status, body = stack.get(f"{resolver}/v1/resources/{found['SG'][0]}")
    assert status == 200 and body["record"]
    status, ready = stack.get(f"{resolver}/readyz")
    assert status == 200 and set(ready["roots"]) == {"CN", "SG"}, ready
    # each root signs its own log
    assert (Path(sg["data_dir"]) / "national" / "log.key").exists()
