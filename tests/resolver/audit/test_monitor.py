"""The log monitor (resolver/audit/monitor.py, ``cpi audit monitor``) against a real etcd:
a record planted under a watched namespace is reported within seconds."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from cpi.main import main
from registry.index import Index
from registry.logsigner import LATEST_KEY, LogSigner, init_log_key, vkey_path_for
from resolver.audit.logcheck import CheckpointPolicy
from resolver.audit.monitor import CompactRange, Finding, Monitor, MonitorAlarm
from schemas import keys
from schemas.checkpoint import Checkpoint, sign_checkpoint
from schemas.merkle import MerkleTree, leaf_hash
from tests.resolver.audit.audit_kit import Kit, resolver_app
from tests.resolver.audit.test_log import ORIGIN, register_some


@pytest.fixture
def kit(tmp_path: Path) -> Kit:
    return Kit(tmp_path)


def test_compact_range_root_equals_the_tree_root() -> None:
    tree = MerkleTree()
    rng = CompactRange()
    assert rng.root() == tree.root()
    for i in range(70):
        tree.append(b"leaf %d" % i)
        rng.append(leaf_hash(b"leaf %d" % i))
        assert rng.root() == tree.root(), i
        assert len(rng.hashes) == bin(i + 1).count("1")
    again = CompactRange.from_json(json.loads(json.dumps(rng.to_json())))
    assert again.root() == tree.root() and again.size == 70


async def test_monitor_reports_a_planted_record_within_seconds(
    index: Index, kit: Kit, tmp_path: Path, aiohttp_client: Any
) -> None:
    key, _, _ = init_log_key(tmp_path / "log.key", origin=ORIGIN)
    await kit.publish(index)
    ours = await register_some(index, kit, 3)
    other_cpid, other_env, _ = kit.record(namespace="CN.44.GDTEL")
    await kit.register(index, other_cpid, other_env)  # outside the watched namespace
    signer = LogSigner(index, key, origin=ORIGIN)
    stop = asyncio.Event()
    signer_task = asyncio.create_task(signer.run(interval=0.1, stop=stop))
    client = await aiohttp_client(resolver_app(index, kit))
    url = str(client.make_url("")).rstrip("/")
    found: list[tuple[float, Finding]] = []
    cmcc_kid = keys.kid_of(kit.cmcc)
    async with aiohttp.ClientSession() as http:
        monitor = Monitor(
            http,
            url,
            CheckpointPolicy(signer.verifier),
            ["cn.31.cmcc"],
            expect_signers=[cmcc_kid],
        )

        async def follow() -> None:
            while True:
                with contextlib.suppress(Exception):
                    for f in await monitor.poll():
                        found.append((time.monotonic(), f))
                await asyncio.sleep(0.1)

        task = asyncio.create_task(follow())
        try:
            for _ in range(100):
                if len(found) >= 3:
                    break
                await asyncio.sleep(0.05)
            assert [f.target for _, f in found] == ours
            assert all(f.signer == cmcc_kid and not f.unexpected for _, f in found)
            # plant a record under the watched namespace, signed by a key nobody certified,
            # the way a rogue registry would write it (record and audit entry together)
            rogue = keys.generate()
            planted, env, _ = kit.record(signer=rogue, namespace="CN.31.CMCC.LG01")
            t0 = time.monotonic()
            await kit.register(index, planted, env)
            for _ in range(200):
                if any(f.target == planted for _, f in found):
                    break
                await asyncio.sleep(0.05)
            (at, finding) = next((t, f) for t, f in found if f.target == planted)
            assert at - t0 < 5.0, f"reported after {at - t0:.2f} s"
            assert finding.op == "register" and finding.namespace == "CN.31.CMCC"
            assert finding.unexpected and finding.signer == keys.kid_of(rogue)
            assert all(f.target != other_cpid for _, f in found)
        finally:
            task.cancel()
            stop.set()
            await signer_task
            with contextlib.suppress(asyncio.CancelledError):
                await task
    print(f"planted record reported after {at - t0:.2f} s (signer and monitor every 0.1 s)")


async def test_cli_monitor_resumes_and_alarms_on_a_fork(
    index: Index,
    kit: Kit,
    tmp_path: Path,
    aiohttp_client: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    key, _, _ = init_log_key(tmp_path / "log.key", origin=ORIGIN)
    (tmp_path / "log.vkey").write_text(vkey_path_for(tmp_path / "log.key").read_text())
    await kit.publish(index)
    first = await register_some(index, kit, 2)
    signer = LogSigner(index, key, origin=ORIGIN)
    await signer.load()
    await signer.sign()
    client = await aiohttp_client(resolver_app(index, kit))
    url = str(client.make_url("")).rstrip("/")
    state = tmp_path / "monitor.json"
    argv = ["audit", "monitor", "--resolver", url, "--anchor", str(kit.anchor_path),
            "--insecure", "--namespace", "CN.31", "--state", str(state), "--once", "-o", "json"]  # fmt: skip

    async def cli() -> tuple[int, list[dict[str, Any]], str]:
        await asyncio.sleep(0.2)
        code = await asyncio.to_thread(main, argv)
        out = capsys.readouterr()
        return code, [json.loads(line) for line in out.out.splitlines()], out.err

    code, lines, _ = await cli()
    assert code == 0 and [d["target"] for d in lines] == first
    more = await register_some(index, kit, 2)
    await signer.load()
    await signer.sign()
    code, lines, _ = await cli()  # resumes: only the new entries
    assert code == 0 and [(d["target"], d["index"]) for d in lines] == [(more[0], 2), (more[1], 3)]
    code, lines, _ = await cli()
    assert code == 0 and lines == []
    # the log signs another root for size 4: alarm with both notes, state kept
    kept = state.read_bytes()
    fork = Checkpoint.create(origin=ORIGIN, size=4, root_hash=leaf_hash(b"x"), timestamp=kit.now)
    await index.put(LATEST_KEY, sign_checkpoint(fork, key))
    code, lines, err = await cli()
    assert code == 1 and "SPLIT VIEW" in err and "evidence (stored)" in err
    assert "evidence (served)" in err and state.read_bytes() == kept


async def test_entries_that_do_not_match_the_root_are_an_alarm(
    index: Index, kit: Kit, tmp_path: Path, aiohttp_client: Any
) -> None:
    key, _, _ = init_log_key(tmp_path / "log.key", origin=ORIGIN)
    await register_some(index, kit, 3)
    signer = LogSigner(index, key, origin=ORIGIN)
    await signer.load()
    await signer.sign()
    # a checkpoint over other leaves, validly signed: the served entries do not match it
    bad = Checkpoint.create(origin=ORIGIN, size=3, root_hash=leaf_hash(b"y"), timestamp=kit.now)
    await index.put(LATEST_KEY, sign_checkpoint(bad, key))
    client = await aiohttp_client(resolver_app(index, kit))
    await asyncio.sleep(0.2)
    async with aiohttp.ClientSession() as http:
        m = Monitor(http, str(client.make_url("")), CheckpointPolicy(signer.verifier), ["CN"])
        with pytest.raises(MonitorAlarm) as err:
            await m.poll()
    assert err.value.kind == "bad_entries" and m.size == 0


async def test_a_record_the_resolver_does_not_serve_is_said_so(
    index: Index, kit: Kit, tmp_path: Path, aiohttp_client: Any
) -> None:
    """A real resolver serves only records that verify: the monitor says why it could not
    check a record's signer instead of staying silent."""
    from registry.index import Keys

    key, _, _ = init_log_key(tmp_path / "log.key", origin=ORIGIN)
    await kit.publish(index)
    (cpid,) = await register_some(index, kit, 1)
    await index.delete(Keys.rec(cpid))  # what a resolver that refused it looks like
    signer = LogSigner(index, key, origin=ORIGIN)
    await signer.load()
    await signer.sign()
    client = await aiohttp_client(resolver_app(index, kit))
    await asyncio.sleep(0.2)
    async with aiohttp.ClientSession() as http:
        m = Monitor(
            http,
            str(client.make_url("")),
            CheckpointPolicy(signer.verifier),
            ["CN.31.CMCC"],
            expect_signers=[keys.kid_of(kit.cmcc)],
        )
        (f,) = await m.poll()
    assert f.target == cpid and f.signer is None and not f.unexpected
    assert "does not serve this record" in f.detail
