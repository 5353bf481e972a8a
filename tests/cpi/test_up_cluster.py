"""``cpi up --etcd-members 3 --registries 2 --resolvers 2``: the stack on a 3-member etcd
cluster; it keeps answering when a member dies; then faults under load (bench/chaos.py).
Everything is https: the clients here trust up.json's CA and present root's etcd client
certificate (every member requires one).

One stack for the module (starting it costs ~15 s on a small machine); the tests run in
order: the plain checks first, the chaos run last.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.chaos import Stack, member_pid, run_chaos
from registry.index import Keys

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = Stack(tmp_path_factory.mktemp("up-cluster") / "state")
    try:
        s.start()
        yield s
    finally:
        s.stop()


_CONTEXT: list[ssl.SSLContext] = []


def _get(url: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=5, context=_CONTEXT[0]) as resp:
        return resp.status, resp.read()


def _resolve(resolver: str, cpid: str, timeout: float = 20.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        try:
            status, body = _get(f"{resolver}/v1/resources/{cpid}")
            if status == 200:
                return dict(json.loads(body))
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"{resolver} does not serve {cpid} after {timeout:.0f} s")
        time.sleep(0.2)


def _register(up: dict[str, Any], registry: str, key: Path) -> str:
    agent = subprocess.run(
        [
            sys.executable, "-m", "cpi", "agent", "run", "--once",
            "--registry", registry, "--namespace", "CN.31.CMCC",
            "--kind", "GPU", "--key", str(key), "--anchor", up["anchor"],
            "--cacert", up["tls"]["ca"],
        ],
        env={**os.environ, "CPI_JOIN_TOKEN": up["tokens"]["CN.31.CMCC"]},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert agent.returncode == 0, agent.stderr
    return agent.stdout.strip().splitlines()[-1]


@pytest.mark.timeout(180)
def test_up_json_lists_the_cluster_and_the_stack_survives_a_dead_member(
    stack: Stack, tmp_path: Path
) -> None:
    up = stack.up()
    _CONTEXT[:] = [stack.ssl_context()]
    # every URL is https; each member has its own certificate from the local CA
    assert all(u.startswith("https://127.0.0.1:") for u in up["etcd"])
    assert all(m["peer"].startswith("https://127.0.0.1:") for m in up["etcd_members"])
    for urls in up["registry_instances"].values():
        assert all(u.startswith("https://127.0.0.1:") for u in urls)
    assert all(r["http"].startswith("https://127.0.0.1:") for r in up["resolvers"])
    tls_dir = stack.data_dir / "tls"
    assert all((tls_dir / f"etcd-{m['name']}.pem").is_file() for m in up["etcd_members"])
    # a member refuses a client without a certificate (mutual TLS)
    with pytest.raises((urllib.error.URLError, ssl.SSLError, OSError)):
        no_cert = ssl.create_default_context(cafile=up["tls"]["ca"])
        urllib.request.urlopen(f"{up['etcd'][0]}/health", timeout=5, context=no_cert)
    # etcd: every member's client URL; the old keys keep their meaning
    assert len(up["etcd"]) == 3 and len(set(up["etcd"])) == 3
    assert [m["client"] for m in up["etcd_members"]] == up["etcd"]
    assert len(up["resolvers"]) == 2 and up["resolver"] == up["resolvers"][0]
    for ns, url in up["registries"].items():
        assert up["registry_instances"][ns][0] == url
        assert len(up["registry_instances"][ns]) == 2
    for urls in up["registry_instances"].values():
        for url in urls:
            assert _get(f"{url}/readyz")[0] == 200
    for r in up["resolvers"]:
        assert _get(f"{r['http']}/readyz")[0] == 200
    # every component was given every member
    for cfg in (stack.data_dir / "registries").glob("*.json"):
        endpoints = json.loads(cfg.read_text())["etcd"]["endpoints"]
        assert sorted(endpoints) == sorted(up["etcd"])

    async def members() -> list[str]:
        async with stack.index(timeout=5.0) as index:
            return sorted(m.name for m in await index.member_list())

    assert asyncio.run(members()) == ["m0", "m1", "m2"]

    # register through the second registry instance, resolve on both resolvers
    cpid = _register(up, up["registry_instances"]["CN.31.CMCC"][1], tmp_path / "a.key")
    for r in up["resolvers"]:
        assert _resolve(r["http"], cpid)["record"]

    # one member dies (SIGKILL, not restarted until cpi up notices): the stack still answers
    victim = up["etcd_members"][0]
    pid = member_pid(up, victim["client"])
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    time.sleep(0.5)
    cpid2 = _register(up, up["registries"]["CN.31.CMCC"], tmp_path / "b.key")
    for r in up["resolvers"]:
        assert _resolve(r["http"], cpid2)["record"]
        assert _resolve(r["http"], cpid)["record"]

    async def present() -> bool:
        async with stack.index(up["etcd"][1:], timeout=5.0) as index:
            return all([await index.get(Keys.rec(c)) is not None for c in (cpid, cpid2)])

    assert asyncio.run(present())
    # cpi up restarts the member, and it answers again
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if _get(f"{victim['client']}/health")[0] == 200:
                break
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    else:
        raise AssertionError(f"etcd member {victim['name']} not back after 30 s")


@pytest.mark.timeout(240)
def test_faults_under_load_lose_nothing_and_never_double_allocate(stack: Stack) -> None:
    report = asyncio.run(run_chaos(stack, duration=25.0, agents=24, claimers=16, hot=3))
    report.print()
    assert report.acknowledged_registrations == 24
    assert report.ops["claim"].get("ok", 0) >= 50, report.ops
    assert report.lost == []
    assert report.not_served == []
    assert report.double_allocated_history == []
    assert report.double_allocated_etcd == []
    assert report.alloc_mismatch == []
    assert report.converged, report.resolver_revisions
    assert len(report.faults) >= 5, report.faults  # every fault was injected
