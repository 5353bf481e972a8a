"""``cpi up`` end to end: separate processes, up.json, a node registers, clean stop, reuse."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
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

from registry import keyfile
from registry.index import Index, IndexAccessDeniedError, Keys
from schemas.errors import RetrievalError


def _free_base() -> int:
    """A base port whose +0..+80 neighbours used by cpi up are free.

    Chosen below Linux's ephemeral range (32768+), so outgoing connections of other
    processes cannot take one of them between this check and cpi up binding it.
    """
    rng = random.Random()
    for _ in range(100):
        base = rng.randrange(10_000, 32_000 - 100)
        ok = True
        for off in (0, 1, 2, 53, 79, 80):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", base + off))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    raise RuntimeError("no free port range")


def _procs_mentioning(text: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmd:
            pids.append(int(entry.name))
    return pids


_CONTEXT: list[ssl.SSLContext] = []


def _get(url: str) -> tuple[int, bytes]:
    """GET with the stack's CA (set by :meth:`Up.start`)."""
    with urllib.request.urlopen(url, timeout=5, context=_CONTEXT[-1]) as resp:
        return resp.status, resp.read()


class Up:
    def __init__(self, data_dir: Path, base: int) -> None:
        self.data_dir = data_dir
        self.base = base
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> dict[str, Any]:
        up_json = self.data_dir / "up.json"
        started = time.time()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "cpi",
                "up",
                "--data-dir",
                str(self.data_dir),
                "--base-port",
                str(self.base),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        deadline = time.time() + 90
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"cpi up exited early:\n{self.proc.stdout.read() if self.proc.stdout else ''}"
                )
            if up_json.exists() and up_json.stat().st_mtime >= started - 1:
                up = json.loads(up_json.read_text())
                if up.get("tokens"):
                    _CONTEXT.append(ssl.create_default_context(cafile=up["tls"]["ca"]))
                    return up
            time.sleep(0.2)
        raise AssertionError("cpi up did not write up.json in 90 s")

    def stop(self) -> str:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGINT)
        out, _ = self.proc.communicate(timeout=60)
        return out


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Up]:
    up = Up(tmp_path / "state", _free_base())
    yield up
    if up.proc is not None and up.proc.poll() is None:
        up.proc.kill()
        up.proc.wait()
    for pid in _procs_mentioning(str(up.data_dir)):
        os.kill(pid, signal.SIGKILL)


@pytest.mark.timeout(240)
def test_up_runs_stack_registers_node_and_reuses_state(stack: Up, tmp_path: Path) -> None:
    up = stack.start()
    # up.json holds join tokens: owner-only
    assert stat.S_IMODE((stack.data_dir / "up.json").stat().st_mode) == 0o600
    assert set(up) >= {"etcd", "registries", "resolver", "anchor", "tokens"}
    assert {"CN.31", "CN.31.CMCC", "CN.13.1307", "CN.52.HWCLOUD"} <= set(up["registries"])
    assert set(up["tokens"]) == set(up["registries"])
    for url in set(up["registries"].values()):
        assert _get(f"{url}/readyz")[0] == 200
    _check_tls(up, stack.data_dir)
    assert stat.S_IMODE((stack.data_dir / "national" / "root.key").stat().st_mode) == 0o600

    # each component is its own process
    assert len(_procs_mentioning(str(stack.data_dir))) >= 3

    # etcd has auth on: passwords are in 0600 files named by up.json, never in it
    _check_etcd_auth(up, stack.data_dir)

    # a node registers through the real registry process with the token from up.json
    node_key = tmp_path / "node.key"
    agent = subprocess.run(
        [
            sys.executable, "-m", "cpi", "agent", "run", "--once",
            "--registry", up["registries"]["CN.31.CMCC"], "--namespace", "CN.31.CMCC",
            "--kind", "GPU", "--key", str(node_key), "--anchor", up["anchor"],
            "--cacert", up["tls"]["ca"],
        ],
        env={**os.environ, "CPI_JOIN_TOKEN": up["tokens"]["CN.31.CMCC"]},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert agent.returncode == 0, agent.stderr
    cpid = agent.stdout.strip().splitlines()[-1]
    assert cpid.startswith("CN.31.CMCC/GPU.")
    assert keyfile.load_private(node_key)  # created 0600 and loadable

    # the resolver serves it (verified) and it can be claimed with the demo claims token
    resolver = up["resolver"]["http"]
    for _ in range(100):
        try:
            status, body = _get(f"{resolver}/v1/resources/{cpid}")
        except urllib.error.HTTPError:
            time.sleep(0.1)
            continue
        break
    assert status == 200 and json.loads(body)["record"]
    claim = urllib.request.Request(
        f"{resolver}/v1/claims",
        data=json.dumps({"cpid": cpid, "units": 1, "ttl_s": 60}).encode(),
        headers={"Authorization": f"Bearer {up['claims']['token']}"},
        method="POST",
    )
    with urllib.request.urlopen(claim, timeout=5, context=_CONTEXT[-1]) as resp:
        assert resp.status == 201
        assert json.loads(resp.read())["cpid"] == cpid

    out = stack.stop()
    assert stack.proc is not None and stack.proc.returncode == 0, out
    assert "stopped" in out
    time.sleep(0.5)
    assert _procs_mentioning(str(stack.data_dir)) == []
    # the resolver left its replica snapshot (0600 key beside it) for a warm restart
    snap = stack.data_dir / "resolver" / "r0"
    assert (snap / "replica.snap").is_file()
    assert stat.S_IMODE((snap / "snapshot.key").stat().st_mode) == 0o600

    # second run: same ports, same anchor, same tokens; the record is still in the index
    anchor_before = Path(up["anchor"]).read_bytes()
    up2 = stack.start()
    assert up2["registries"] == up["registries"]
    assert up2["tokens"] == up["tokens"]
    assert up2["claims"] == up["claims"]
    assert Path(up2["anchor"]).read_bytes() == anchor_before
    again = subprocess.run(
        [
            sys.executable, "-m", "cpi", "agent", "run", "--once",
            "--registry", up2["registries"]["CN.31.CMCC"], "--namespace", "CN.31.CMCC",
            "--kind", "GPU", "--key", str(node_key),
        ],
        # the CA from the environment this time
        env={
            **os.environ,
            "CPI_JOIN_TOKEN": up2["tokens"]["CN.31.CMCC"],
            "CPI_CACERT": up2["tls"]["ca"],
        },
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip().splitlines()[-1] == cpid
    assert up2["etcd_auth"] == up["etcd_auth"]
    _check_etcd_auth(up2, stack.data_dir)
    # a cpi command on the running stack, as root through its password file
    ns = subprocess.run(
        [
            sys.executable, "-m", "cpi", "ns", "list", "--etcd", up2["etcd"][0],
            "--user", "root", "--password-file", up2["etcd_auth"]["users"]["root"],
            "--cacert", up2["tls"]["ca"], "--cert", up2["tls"]["etcd_client"]["cert"],
            "--key", up2["tls"]["etcd_client"]["key"],
        ],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert ns.returncode == 0, ns.stderr
    assert "CN.31.CMCC" in ns.stdout
    stack.stop()


def _check_etcd_auth(up: dict[str, Any], data_dir: Path) -> None:
    auth = up["etcd_auth"]
    users = auth["users"]
    assert set(users) >= {"root", "cpi-resolver", "cpi-logsigner", "cpi-registry-regional"}
    assert stat.S_IMODE(Path(auth["dir"]).stat().st_mode) == 0o700
    passwords = []
    for path in users.values():
        assert stat.S_IMODE(Path(path).stat().st_mode) == 0o600
        passwords.append(Path(path).read_text().strip())
    text = (data_dir / "up.json").read_text()
    for cfg in (data_dir / "registries").glob("*.json"):
        text += cfg.read_text()
    for log in (data_dir / "logs").glob("*.log"):
        logged = log.read_text(errors="replace")
        if log.name != "etcd.log":  # etcd logs the refusals this test provokes
            assert "permission denied" not in logged.lower(), f"{log}: {logged[-2000:]}"
        text += logged
    assert not any(pw in text for pw in passwords)

    def password(user: str) -> str:
        return Path(users[user]).read_text().strip()

    tls = {
        "ca_cert": up["tls"]["ca"],
        "cert_chain": up["tls"]["etcd_client"]["cert"],
        "cert_key": up["tls"]["etcd_client"]["key"],
    }

    async def probe() -> None:
        ep = up["etcd"]
        # TLS with a client certificate from the CA, but no password: no rights
        async with Index(endpoints=ep, timeout=3.0, **tls) as anonymous:
            with pytest.raises(IndexAccessDeniedError):
                await anonymous.put(Keys.token("00" * 32), b"{}")
            with pytest.raises(IndexAccessDeniedError):
                await anonymous.get(Keys.alloc("CN.31.CMCC/GPU.X"))
        resolver = Index(
            endpoints=ep,
            timeout=3.0,
            user="cpi-resolver",
            password=password("cpi-resolver"),
            **tls,
        )
        async with resolver:
            with pytest.raises(IndexAccessDeniedError, match="permission denied"):
                await resolver.put(Keys.token("00" * 32), b"{}")
        registry = Index(
            endpoints=ep,
            timeout=3.0,
            user="cpi-registry-regional",
            password=password("cpi-registry-regional"),
            **tls,
        )
        async with registry:
            with pytest.raises(IndexAccessDeniedError, match="permission denied"):
                await registry.put(Keys.alloc("CN.31.CMCC/GPU.X"), b'{"units":1}')

    asyncio.run(probe())


def _check_tls(up: dict[str, Any], data_dir: Path) -> None:
    """Every service speaks https with certificates of the local CA; plain HTTP and
    clients that do not trust the CA are refused; etcd wants a client certificate."""
    ca = Path(up["tls"]["ca"])
    assert ca == data_dir / "tls" / "ca.pem"
    assert stat.S_IMODE((data_dir / "tls" / "ca.key").stat().st_mode) == 0o600
    for key in (data_dir / "tls").glob("*.key"):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    urls = [up["resolver"]["http"], *up["registries"].values(), *up["etcd"]]
    assert all(u.startswith("https://127.0.0.1:") for u in urls), urls
    resolver = up["resolver"]["http"]
    assert _get(f"{resolver}/readyz")[0] == 200
    # the console is served, and can verify checkpoints: the log's verifier key is published
    assert _get(f"{resolver}/ui/")[0] == 200
    served = json.loads(_get(f"{resolver}/v1/anchor")[1])
    vkey = (data_dir / "national" / "log.vkey").read_text().strip()
    assert served["log_vkeys"] == [vkey]
    # not trusting the CA (the system roots): verification fails
    with pytest.raises(urllib.error.URLError) as info:
        urllib.request.urlopen(
            f"{resolver}/readyz", timeout=5, context=ssl.create_default_context()
        )
    assert isinstance(info.value.reason, ssl.SSLCertVerificationError)
    # plain HTTP to the resolver's port: no answer
    with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
        urllib.request.urlopen(resolver.replace("https://", "http://") + "/readyz", timeout=5)

    async def etcd() -> None:
        # neither trusting etcd's certificate nor presenting one: refused
        async with Index(endpoints=up["etcd"], timeout=2.0) as untrusted:
            with pytest.raises(RetrievalError):
                await untrusted.get("/cpi/v1/")
        # trusting the CA but without a client certificate: refused as well
        async with Index(endpoints=up["etcd"], timeout=2.0, ca_cert=str(ca)) as no_cert:
            with pytest.raises(RetrievalError):
                await no_cert.get("/cpi/v1/")

    asyncio.run(etcd())
