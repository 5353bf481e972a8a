"""``cpi registry serve --workers 2``: two registry processes on one port, each an
instance of its own (lease, liveness, audit stream writer), against real etcd.

Registrations sent to both at once keep every rule that crosses processes: the audit
stream stays gap-free with one entry per acknowledged registration, every acknowledged
record is in etcd, a token's uses are not exceeded, and a nonce is accepted once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cpi.etcdproc import EtcdProcess, free_port
from cpi.main import main
from registry import changes, tokens
from registry.index import Index, Keys, Prefix
from tests.registry.service_kit import Node, World, bearer
from tests.until import until

ROOT = Path(__file__).resolve().parents[2]


def _spawn(config: Path, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "cpi", "registry", "serve", "--config", str(config),
             "--workers", "2", "--insecure"],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )  # fmt: skip


async def test_two_workers_register_concurrently_without_gaps_or_excess(
    index: Index, etcd_server: EtcdProcess, tmp_path: Path
) -> None:
    world = World(tmp_path)
    await world.publish(index)
    port = free_port()
    config = tmp_path / "registry.json"
    config.write_text(json.dumps(world.config_data(etcd_server.endpoint, port=port)))
    log = tmp_path / "serve.log"
    proc = await asyncio.to_thread(_spawn, config, log)
    base = f"http://127.0.0.1:{port}"
    try:
        connector = aiohttp.TCPConnector(force_close=True)  # a new connection each time
        async with aiohttp.ClientSession(connector=connector) as s:

            async def ready() -> bool:
                try:
                    async with s.get(f"{base}/readyz") as r:
                        return r.status == 200
                except aiohttp.ClientError:
                    return False

            await until(ready, within=30, what="the registry to be ready")
            # both processes answer on the port: each has its own instance lease
            leases: set[str] = set()

            async def both() -> bool:
                async with s.get(f"{base}/readyz") as r:
                    if r.status == 200:
                        leases.add((await r.json())["lease"])
                return len(leases) == 2

            await until(both, within=30, what="both processes to answer /readyz")

            async def register(token: str, body: bytes) -> tuple[int, dict[str, object]]:
                async with s.post(
                    f"{base}/v1/registrations", data=body, headers=bearer(token)
                ) as r:
                    return r.status, await r.json()

            # an unlimited token: every registration is acknowledged
            token = await world.token(index)
            nodes = [Node() for _ in range(60)]
            answers = await asyncio.gather(*(register(token, n.register()) for n in nodes))
            assert Counter(status for status, _ in answers) == {201: 60}, answers
            acknowledged = {str(body["cpid"]) for _, body in answers}

            # a token with 10 uses, 30 new nodes at once: concurrent uses of one token
            # race (409 conflict, "retry"; retried here as an agent does); exactly 10
            # are created, whichever process took them
            limited = await world.token(index, uses=10)
            pending = [Node() for _ in range(30)]
            created = refused = 0
            for _ in range(60):
                if not pending:
                    break
                answers = await asyncio.gather(*(register(limited, n.register()) for n in pending))
                retry = []
                for node, (status, body) in zip(pending, answers, strict=True):
                    code = body.get("error", {}).get("code")  # type: ignore[attr-defined]
                    if status == 201:
                        created += 1
                        acknowledged.add(str(body["cpid"]))
                    elif status == 403 and code == "token_used_up":
                        refused += 1
                    else:
                        assert (status, code) == (409, "conflict"), body
                        retry.append(node)
                pending = retry
            assert not pending and (created, refused) == (10, 20)
            limited_kv = await index.get(Keys.token(tokens.hash_token(limited)))
            assert limited_kv is not None and json.loads(limited_kv.value)["uses_left"] == 0

            # one body sent to both processes at once: its nonce is accepted once
            again = nodes[0].register()
            replays = await asyncio.gather(*(register(token, again) for _ in range(6)))
            # (the node is registered: the one accepted is a 200, "unchanged")
            assert sorted(status for status, _ in replays) == [200] + [409] * 5, replays
            assert all(
                body["error"]["code"] == "replayed_nonce"  # type: ignore[index]
                for status, body in replays
                if status == 409
            )

            # both processes took some: their counters of created records add up
            seen: set[float] = set()
            for _ in range(40):
                async with s.get(f"{base}/metrics") as r:
                    for fam in text_string_to_metric_families(await r.text()):
                        for sample in fam.samples:
                            if (
                                sample.name == "cpi_registry_registrations_total"
                                and sample.labels.get("outcome") == "created"
                            ):
                                seen.add(sample.value)
                if len(seen) == 2:
                    break
            total = len(acknowledged)
            assert sum(seen) == total or seen == {total / 2}, seen
            assert 0 not in seen

        records, _ = await index.get_prefix(Prefix.REC)
        stored = {kv.key.removeprefix(Prefix.REC) for kv in records}
        assert stored == acknowledged
        entries = await changes.read_entries(index)
        assert [e.seq for e in entries] == list(range(1, len(entries) + 1))
        registered = [str(e.cpid) for e in entries if e.op == "register"]
        assert sorted(registered) == sorted(acknowledged)  # one entry each, none extra

        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 30) == 0
        text = log.read_text()
        assert "registry test-registry-0 stopping" in text
        assert "registry test-registry-1 stopping" in text
        assert token not in text and limited not in text
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the command and every process it started
        proc.wait()


def test_workers_need_a_fixed_port(
    tmp_path: Path, etcd_server: EtcdProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    world = World(tmp_path)
    config = tmp_path / "registry.json"
    config.write_text(json.dumps(world.config_data(etcd_server.endpoint, port=0)))
    argv = ["registry", "serve", "--config", str(config), "--workers", "2", "--insecure"]
    assert main(argv) == 1
    assert "needs a fixed port" in capsys.readouterr().err


def test_each_process_gets_its_share_of_the_limits(tmp_path: Path) -> None:
    world = World(tmp_path)
    config = world.config(
        "127.0.0.1:2379",
        workers=3,
        registrations_per_s=50,
        registration_burst=100,
        address_registration_burst=7,
        unauthenticated_per_s=1,
        unauthenticated_burst=10,
        max_connections=10_000,
        max_connections_per_address=256,
    )
    one = config.one_of(2)
    assert one.instance_id == "test-registry-2"
    assert one.registrations_per_s == pytest.approx(50 / 3)
    assert one.registration_burst == 34  # rounded up: the three admit at least the burst
    assert one.address_registrations_per_s is None  # still "as per token"
    assert one.address_registration_burst == 3
    assert one.unauthenticated_per_s == pytest.approx(1 / 3)
    assert one.unauthenticated_burst == 4
    assert (one.max_connections, one.max_connections_per_address) == (3334, 86)
    assert one.namespaces == config.namespaces and one.etcd == config.etcd
    # a single process keeps the limits as configured
    single = world.config("127.0.0.1:2379", registration_burst=5).one_of(0)
    assert single.registration_burst == 5 and single.registrations_per_s == 1000
