"""``cpi resolve|discover|watch`` against a resolver served on a real port, and the config."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from cpi.etcdproc import EtcdProcess, free_port
from cpi.main import main
from registry.index import Index, Keys
from resolver.config import load_config
from resolver.errors import ConfigError
from resolver.http import RESOLVER, create_app
from tests.resolver.kit import Node, Pki, put_record, put_status, resolver_config
from tests.until import until


@pytest.fixture
async def url(
    index: Index, pki: Pki, anchor_file: Path, etcd_server: EtcdProcess, aiohttp_server: Any
) -> AsyncIterator[str]:
    await pki.publish(index)
    server = await aiohttp_server(create_app(resolver_config(etcd_server.endpoint, anchor_file)))
    await until(lambda: server.app[RESOLVER].ready, what="ready")
    yield str(server.make_url("")).rstrip("/")


async def cpi(*argv: str) -> int:
    """``cpi ARGV``; the in-process test resolver serves plain HTTP, hence ``--insecure``."""
    extra = ["--insecure"] if argv and argv[0] in ("resolve", "discover", "watch") else []
    return await asyncio.to_thread(main, [*argv, *extra])


async def test_resolve_table_json_and_offline_verification(
    index: Index, pki: Pki, url: str, anchor_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    node = Node()
    await put_record(index, pki, node)
    await put_status(index, node, free=3)

    async def live() -> bool:
        code = await cpi("resolve", node.cpid, "--resolver", url, "--json")
        out = capsys.readouterr().out
        return code == 0 and json.loads(out)["live"] is True

    await until(live, what="the record and its status")
    assert (
        await cpi("resolve", node.cpid.lower(), "--resolver", url, "--anchor", str(anchor_file))
        == 0
    )
    out = capsys.readouterr().out
    assert node.cpid in out and "chain" in out and "CN.31.CMCC <- CN.31 <- anchor" in out
    assert "3 accelerators free" in out and "offline: OK" in out
    assert (
        await cpi("resolve", node.cpid, "--resolver", url, "--json", "--anchor", str(anchor_file))
        == 0
    )
    body = json.loads(capsys.readouterr().out)
    assert body["offline_verification"]["ok"] is True


async def test_errors_exit_with_the_right_code(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await cpi("resolve", "CN.31.CMCC/GPU.4K7Q9M2XH3PT-Y", "--resolver", url) == 1
    assert "expected 'Z'" in capsys.readouterr().err
    assert await cpi("resolve", "CN.31.CMCC/GPU.4K7Q9M2XH3PT-Z", "--resolver", url) == 3
    assert "not in the index" in capsys.readouterr().err
    dead = f"http://127.0.0.1:{free_port()}"
    assert await cpi("discover", "--resolver", dead) == 5
    assert "cannot reach the resolver" in capsys.readouterr().err


async def test_discover_and_watch(
    index: Index, pki: Pki, url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = Node(model="H100"), Node(model="910B", kind="NPU", region="62")
    for n in (a, b):
        await put_record(index, pki, n)
        await put_status(index, n, free=4)

    async def both() -> bool:
        await cpi("discover", "--resolver", url, "--json", "--min-free", "1")
        return len(json.loads(capsys.readouterr().out)["results"]) == 2

    await until(both, what="both nodes")
    assert await cpi("discover", "--resolver", url, "--near", "31", "--label", "tier:gold") == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert lines[0].split() == [
        "SCORE", "L2", "CPID", "FREE", "LAT_MS", "REGION", "ACCELERATORS", "LIVE", "CNY/H"
    ]  # fmt: skip
    assert a.cpid in lines[1] and b.cpid in lines[2] and "4x 910B" not in lines[1]
    assert "2 result(s)" in err and "sort=default (cpi-cats-v1)" in err
    # another order: latency from Gansu puts the node in 62 first, and says so
    assert await cpi("discover", "--resolver", url, "--near", "62", "--sort", "latency") == 0
    out, err = capsys.readouterr()
    assert b.cpid in out.splitlines()[1] and "sort=latency (cpi-cats-v1)" in err
    assert await cpi("discover", "--resolver", url, "--weights", "price:1,latency:2") == 1
    assert "need near" in capsys.readouterr().err
    assert await cpi("discover", "--resolver", url, "--weights", "speed:1") == 1
    assert "names from" in capsys.readouterr().err
    with pytest.raises(SystemExit) as usage:  # a choice argparse knows: a usage error
        await cpi("discover", "--resolver", url, "--sort", "cheapest")
    assert usage.value.code == 2
    capsys.readouterr()
    assert (
        await cpi("discover", "--resolver", url, "--near", "31", "--weights", "latency:1", "--json")
        == 0
    )
    body = json.loads(capsys.readouterr().out)
    assert body["ranking"]["sort"] == "score" and body["ranking"]["weights"] == {
        "communication": 1.0
    }
    assert all(r["rank"]["score"]["function"] == "cpi-cats-v1" for r in body["results"])

    watcher = asyncio.create_task(
        cpi(
            "watch",
            "--resolver",
            url,
            "--within",
            "CN.31",
            "--kind",
            "GPU",
            "--count",
            "2",
            "--json",
        )
    )
    await asyncio.sleep(0.5)
    r1 = await put_status(index, a, free=1)
    r2 = await index.delete(Keys.rec(a.cpid)) and await index.revision()
    assert await asyncio.wait_for(watcher, 10) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(e["type"], e["cpid"], e["id"]) for e in events] == [
        ("put", a.cpid, str(r1)),
        ("delete", a.cpid, str(r2)),
    ]


def test_config_layers(tmp_path: Path) -> None:
    (tmp_path / "anchor.json").write_text("{}")
    path = tmp_path / "resolver.json"
    path.write_text(
        json.dumps({"anchor_files": ["anchor.json"], "port": 9000, "etcd": {"endpoints": ["a:1"]}})
    )
    config = load_config(path, env={})
    assert config.anchor_files == [tmp_path / "anchor.json"] and config.port == 9000
    config = load_config(
        path,
        env={
            "CPI_ETCD_ENDPOINTS": "b:2, c:3",
            "CPI_RESOLVER_LISTEN": "[::1]:8701",
            "CPI_RESOLVER_ZONE": "x.",
        },
        overrides={"port": 9100, "zone": None},
    )
    assert config.etcd.endpoints == ["b:2", "c:3"]
    assert (config.host, config.port, config.zone) == ("::1", 9100, "x.")
    assert config.url == "http://[::1]:9100"


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({}, "anchor_files: give at least one anchor file"),
        ({"anchor_files": []}, r"anchor_files: give at least one anchor file \(or anchor_bundle"),
        ({"anchor_files": ["a"], "colour": 1}, "colour: unknown field"),
        ({"anchor_files": ["a"], "mass_expiry_threshold": 2}, "mass_expiry_threshold"),
        ({"anchor_files": ["a"], "port": 70000}, "port"),
    ],
)
def test_bad_configs_are_refused(data: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config(data=data, env={})


def test_anchor_files_must_hold_anchors(tmp_path: Path) -> None:
    bad = tmp_path / "anchor.json"
    bad.write_text('{"type": "anchor.v1"}')
    config = load_config(data={"anchor_files": [str(bad)]}, env={})
    with pytest.raises(ConfigError, match="invalid anchor"):
        config.load_anchors()
    with pytest.raises(ConfigError, match=r"anchor file .*missing\.json"):
        load_config(data={"anchor_files": [str(tmp_path / "missing.json")]}, env={}).load_anchors()


@pytest.mark.parametrize("stop", ["SIGTERM", "SIGKILL"])
async def test_serve_with_two_processes_on_one_port(
    index: Index,
    pki: Pki,
    anchor_file: Path,
    etcd_server: EtcdProcess,
    tmp_path: Path,
    stop: str,
) -> None:
    """``cpi resolver serve --workers 2``: two resolvers share the port, each with its
    own replica; SIGTERM stops both and the command exits 0; if the command is killed,
    the two stop by themselves."""
    await pki.publish(index)
    node = Node()
    await put_record(index, pki, node)
    port = free_port()
    log = tmp_path / "serve.log"

    def spawn() -> subprocess.Popen[bytes]:
        with open(log, "wb") as out:
            return subprocess.Popen(
                [sys.executable, "-m", "cpi", "resolver", "serve", "--workers", "2",
                 "--listen", f"127.0.0.1:{port}", "--etcd", etcd_server.endpoint,
                 "--anchor", str(anchor_file), "--insecure"],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip

    proc = await asyncio.to_thread(spawn)
    try:

        def listed() -> bool:
            text = log.read_text()
            return all(f"resolver.replica[{i}]: listed the index" in text for i in (0, 1))

        await until(listed, within=30, what="both processes to list the index")
        url = f"http://127.0.0.1:{port}/v1/resources/{node.cpid}"
        connector = aiohttp.TCPConnector(force_close=True)  # a new connection each time
        async with aiohttp.ClientSession(connector=connector) as s:
            for _ in range(20):
                async with s.get(url) as r:
                    assert r.status == 200
                    assert (await r.json())["record"]["signatures"]
        proc.send_signal(getattr(signal, stop))
        code = await asyncio.to_thread(proc.wait, 30)
        assert code == (0 if stop == "SIGTERM" else -signal.SIGKILL)

        def stopped() -> bool:
            text = log.read_text()
            return all(f"cpi.resolver[{i}]: resolver stopping" in text for i in (0, 1))

        await until(stopped, within=30, what="both processes to stop")
        if stop == "SIGKILL":
            assert "the parent process is gone" in log.read_text()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the command and every process it started
        proc.wait()


def test_serve_with_several_processes_needs_a_fixed_port(
    anchor_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["resolver", "serve", "--workers", "2", "--port", "0", "--anchor", str(anchor_file)]
    assert main(argv) == 1
    assert "needs a fixed port" in capsys.readouterr().err
