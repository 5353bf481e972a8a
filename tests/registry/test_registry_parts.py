"""Audit stream, join tokens, rate limit, config, start-up checks and the CLI."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from cpi.etcdproc import EtcdProcess
from cpi.main import main
from registry import ca, changes, tokens
from registry.config import ConfigError, load_config, parse_listen
from registry.errors import (
    RateLimitedError,
    StartupError,
    TokenExpiredError,
    TokenScopeError,
    TokenUsedUpError,
    UnknownTokenError,
)
from registry.index import Cmp, Index, Keys, Op
from registry.ratelimit import TokenBucket
from registry.service import create_app
from registry.signers import load_signers
from schemas import dsse, keys
from schemas.chain import TrustAnchors
from schemas.errors import InvalidDataError, OutsideNamespaceError
from tests.registry.service_kit import World

# -- audit --------------------------------------------------------------------------------


_KEY = keys.private_from_seed(bytes(32))


def _env(i: int) -> dsse.Envelope:
    return dsse.sign("application/vnd.cpi.test+json", f'{{"i":{i}}}'.encode(), _KEY)


async def test_concurrent_appenders_never_fork_or_skip(index: Index) -> None:
    streams = [changes.AuditStream(index) for _ in range(4)]

    async def append(stream: changes.AuditStream, i: int) -> None:
        res = await stream.commit(
            success=[Op.put(Keys.rec(f"CN.31/GPU.{i:012d}-X"), b"r")],
            op="register",
            envelope=_env(i),
            cpid=f"CN.31/GPU.{i:012d}-X",
        )
        assert res.succeeded

    await asyncio.gather(*(append(streams[i % 4], i) for i in range(40)))
    entries = await changes.read_entries(index)
    assert [e.seq for e in entries] == list(range(1, 41))
    assert len({e.cpid for e in entries}) == 40
    assert sum(s.races for s in streams) > 0  # they did race, and recovered
    assert await changes.find_head(index) == 40
    assert await changes.find_head(index, hint=7) == 40


async def test_pipelined_batches_keep_the_stream_gapless_under_failures_and_races(
    index: Index,
) -> None:
    """Two batches in flight per stream, callers whose own compare fails mixed in, and a
    second stream taking the head meanwhile: every success has exactly one entry, the
    sequence has no gap or fork, every failure wrote nothing."""
    fast, other = changes.AuditStream(index, pipeline=2), changes.AuditStream(index)
    await index.put(Keys.ns("CN.99"), b"taken")

    async def append(stream: changes.AuditStream, i: int) -> bool:
        doomed = i % 7 == 3  # its compare fails: must be told, must write nothing
        res = await stream.commit(
            compare=[Cmp.absent(Keys.ns("CN.99"))] if doomed else [],
            success=[Op.put(Keys.rec(f"CN.31/GPU.{i:012d}-X"), b"r")],
            failure=[Op.get(Keys.ns("CN.99"))] if doomed else [],
            op="register",
            envelope=_env(i),
            cpid=f"CN.31/GPU.{i:012d}-X",
        )
        assert res.succeeded != doomed
        if doomed:
            assert res.responses[0].kvs[0].value == b"taken"
        return res.succeeded

    results = await asyncio.gather(
        *(append(fast, i) for i in range(120)), *(append(other, 1000 + i) for i in range(20))
    )
    entries = await changes.read_entries(index)
    assert [e.seq for e in entries] == list(range(1, sum(results) + 1))
    ok = {i for i in (*range(120), *range(1000, 1020)) if i % 7 != 3}
    assert {e.cpid for e in entries} == {f"CN.31/GPU.{i:012d}-X" for i in ok}
    kvs, _ = await index.get_prefix("/cpi/v1/rec/")
    assert len(kvs) == len(ok)


async def test_commit_reports_the_callers_failed_compare(index: Index) -> None:
    stream = changes.AuditStream(index)
    await index.put("/cpi/v1/ns/CN.31", b"x")
    res = await stream.commit(
        compare=[Cmp.absent(Keys.ns("CN.31"))],
        success=[Op.put(Keys.ns("CN.31"), b"y")],
        failure=[Op.get(Keys.ns("CN.31"))],
        op="revoke",
        envelope=_env(1),
        subject="CN.31",
    )
    assert not res.succeeded
    assert res.responses[0].kvs[0].value == b"x"
    assert await changes.read_entries(index) == []


def test_entry_ops_validate() -> None:
    with pytest.raises(ValueError, match="exactly one of cpid or subject"):
        changes.entry_ops(1, op="register", envelope=_env(1))
    with pytest.raises(ValueError, match="start at 1"):
        changes.entry_ops(0, op="register", envelope=_env(1), cpid="x/y")
    cmps, ops = changes.entry_ops(3, op="revoke", envelope=_env(1), subject="CN.31", now=5)
    assert [c.key for c in cmps] == [Keys.audit(3), Keys.audit(2)]
    entry = json.loads(ops[0].value)
    assert entry == {
        "seq": 3,
        "op": "revoke",
        "subject": "CN.31",
        "digest": changes.digest(_env(1)),
        "time": 5,
    }
    assert len(entry["digest"]) == 64 and entry["digest"] != changes.digest(_env(2))


# -- tokens -------------------------------------------------------------------------------


async def test_token_life(index: Index) -> None:
    tok = await tokens.create_token(
        index, namespace="cn.31", kind="gpu", uses=1, ttl_s=60, within=["CN.31"]
    )
    assert tok.startswith(tokens.TOKEN_PREFIX)
    kvs, _ = await index.get_prefix("/cpi/v1/tokens/")
    assert [kv.key for kv in kvs] == [Keys.token(hashlib.sha256(tok.encode()).hexdigest())]
    assert tok.encode() not in kvs[0].value  # only the hash is stored
    stored = json.loads(kvs[0].value)
    assert stored["namespace"] == "CN.31" and stored["kind"] == "GPU" and stored["uses_left"] == 1
    t = await tokens.lookup(index, tok)
    t.check_valid(now=stored["created_at"])
    t.check_scope(namespace="CN.31.CMCC", kind="GPU")
    with pytest.raises(TokenScopeError, match=r"namespace CN\.31"):
        t.check_scope(namespace="CN.310", kind="GPU")
    with pytest.raises(TokenScopeError, match="kind GPU"):
        t.check_scope(namespace="CN.31", kind="CPU")
    with pytest.raises(TokenExpiredError):
        t.check_valid(now=stored["expires_at"])
    _, ops = tokens.consume_ops(t, consume=True)
    await index.txn(success=ops)
    with pytest.raises(TokenUsedUpError):
        (await tokens.lookup(index, tok)).check_uses()
    with pytest.raises(UnknownTokenError, match="no join token"):
        await tokens.lookup(index, None)
    with pytest.raises(UnknownTokenError, match="unknown join token"):
        await tokens.lookup(index, "cpi_jt_nope")
    assert await tokens.prune(index, now=stored["expires_at"] + 10, grace_s=100) == 0
    assert await tokens.prune(index, now=stored["expires_at"] + 200, grace_s=100) == 1


async def test_token_namespace_must_be_within_the_registry(index: Index) -> None:
    with pytest.raises(OutsideNamespaceError, match=r"CN\.3 is outside .*CN\.31"):
        await tokens.create_token(index, namespace="CN.3", ttl_s=60, within=["CN.31"])
    with pytest.raises(InvalidDataError, match="unknown kind"):
        await tokens.create_token(index, namespace="CN.31", kind="XPU", ttl_s=60)
    assert (await index.get_prefix("/cpi/v1/tokens/"))[0] == []


@pytest.mark.parametrize(
    ("text", "seconds"), [("90", 90), ("90s", 90), ("10m", 600), ("24h", 86400), ("7d", 604800)]
)
def test_parse_duration(text: str, seconds: int) -> None:
    assert tokens.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "0", "-5m", "1y", "abc", "nanh", "inf"])
def test_parse_duration_refuses(text: str) -> None:
    with pytest.raises(InvalidDataError, match="duration"):
        tokens.parse_duration(text)


# -- rate limit -----------------------------------------------------------------------------


def test_token_bucket() -> None:
    now = [0.0]
    bucket = TokenBucket(rate=2, burst=3, clock=lambda: now[0])
    for _ in range(3):
        bucket.take()
    with pytest.raises(RateLimitedError, match=r"2/s, burst 3\); retry after 1 s") as info:
        bucket.take()
    assert info.value.retry_after == 1
    now[0] += 0.5
    bucket.take()
    assert bucket.try_take() == pytest.approx(0.5)
    now[0] += 100
    assert bucket.tokens == 3


# -- config -------------------------------------------------------------------------------


def test_config_layers_file_env_flags(tmp_path: Path) -> None:
    path = tmp_path / "conf" / "registry.json"
    path.parent.mkdir()
    path.write_text(
        json.dumps(
            {
                "port": 9000,
                "etcd": {"endpoints": ["a:1"], "password": "s3cret", "user": "reg"},
                "namespaces": [{"namespace": "cn.31", "key_file": "keys/cn31.key"}],
                "anchor_file": "/abs/anchor.json",
            }
        )
    )
    env = {"CPI_ETCD_ENDPOINTS": "b:2, c:3", "CPI_REGISTRY_LISTEN": "0.0.0.0:9100"}
    cfg = load_config(path, env=env)
    assert (cfg.host, cfg.port, cfg.etcd.endpoints) == ("0.0.0.0", 9100, ["b:2", "c:3"])
    assert cfg.namespaces[0].namespace == "CN.31"
    assert cfg.namespaces[0].key_file == path.parent / "keys" / "cn31.key"
    assert str(cfg.anchor_file) == "/abs/anchor.json"
    assert (cfg.heartbeat_s, cfg.expire_after_heartbeats, cfg.live_refresh_s) == (10, 3, 240)
    assert cfg.effective_lease_ttl_s == 30
    cfg2 = load_config(
        path, env=env, overrides={"port": 9200, "etcd.endpoints": ["d:4"], "host": None}
    )
    assert (cfg2.host, cfg2.port, cfg2.etcd.endpoints) == ("0.0.0.0", 9200, ["d:4"])
    assert cfg2.url == "http://0.0.0.0:9200"
    for text in (repr(cfg), str(cfg), cfg.summary(), cfg.model_dump_json()):
        assert "s3cret" not in text
    assert cfg.etcd.password is not None and cfg.etcd.password.get_secret_value() == "s3cret"


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"anchor_file": "a"}, "namespaces: Field required"),
        ({"anchor_file": "a", "namespaces": [], "colour": 1}, "colour: unknown field"),
        (
            {"anchor_file": "a", "namespaces": [{"namespace": "CN.3x!", "key_file": "k"}]},
            "namespaces.0.namespace: invalid CPID",
        ),
        (
            {
                "anchor_file": "a",
                "namespaces": [{"namespace": "CN", "key_file": "k"}],
                "admin_token_hash": "x",
            },
            "admin_token_hash: must be the SHA-256",
        ),
        (
            {
                "anchor_file": "a",
                "namespaces": [{"namespace": "CN", "key_file": "k"}],
                "heartbeat_s": 0,
            },
            "heartbeat_s: Input should be greater than 0",
        ),
    ],
)
def test_config_errors_name_the_field(data: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config(data=data, env={})


def test_config_file_problems(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.json", env={})
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(tmp_path / "bad.json", env={})
    assert parse_listen("[::1]:80") == ("::1", 80)
    with pytest.raises(ConfigError, match="expected host:port"):
        parse_listen("nohost")


# -- start-up checks ----------------------------------------------------------------------------


async def test_startup_refuses_missing_wrong_or_unverifiable_certs(
    index: Index, tmp_path: Path, etcd_server: EtcdProcess
) -> None:
    world = World(tmp_path)
    config = world.config(etcd_server.endpoint)
    anchors = TrustAnchors([world.anchor])
    with pytest.raises(StartupError, match=r"namespace CN\.31: no certificate for its key"):
        await load_signers(index, config.namespaces, anchors)

    await world.publish(index)
    assert [s.namespace for s in await load_signers(index, config.namespaces, anchors)] == [
        "CN.31.CMCC",
        "CN.31",
    ]
    other_root = TrustAnchors([ca.make_anchor("CN", keys.generate())])
    with pytest.raises(StartupError, match="does not verify against the anchor"):
        await load_signers(index, config.namespaces, other_root)

    no_issue = ca.issue_cert(
        issuer_key=world.root,
        issuer_subject="CN",
        subject="CN.31",
        public_key=world.r31,
        scopes=["delegate"],
    )
    await index.put(Keys.cert(keys.kid_of(world.r31)), no_issue.to_json())
    with pytest.raises(
        StartupError, match="scopes \\['delegate'\\], but a registry needs scope 'issue'"
    ):
        await load_signers(index, config.namespaces, anchors)

    await world.publish(index)
    revocation = ca.revoke(
        issuer_key=world.root, subject="CN.31", kid=keys.kid_of(world.r31), reason="key compromise"
    )
    await index.put(Keys.revoked(keys.kid_of(world.r31)), revocation.to_json())
    with pytest.raises(StartupError, match="revoked"):
        await load_signers(index, config.namespaces, anchors)

    # through the app: start-up fails with the same message
    from aiohttp.test_utils import TestServer

    server = TestServer(create_app(config))
    with pytest.raises(StartupError, match="revoked"):
        await server.start_server()
    await server.close()


# -- the command line ---------------------------------------------------------------------------


async def test_cli_token_create(
    index: Index, tmp_path: Path, etcd_server: EtcdProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    world = World(tmp_path)
    await world.publish(index)
    args = [
        "registry",
        "token",
        "create",
        "--namespace",
        "CN.31.CMCC",
        "--uses",
        "2",
        "--ttl",
        "1h",
    ]
    code = await asyncio.to_thread(main, [*args, "--etcd", etcd_server.url])
    out, err = capsys.readouterr()
    assert code == 0, err
    token = out.strip()
    assert "shown only this once" in err and token not in err
    t = await tokens.lookup(index, token)
    assert (t.info.namespace, t.info.uses_left) == ("CN.31.CMCC", 2)

    world.config(etcd_server.endpoint)
    config_path = tmp_path / "registry.json"
    code = await asyncio.to_thread(
        main,
        [
            "registry",
            "token",
            "create",
            "--namespace",
            "CN.32",
            "--ttl",
            "1h",
            "--config",
            str(config_path),
            "--json",
        ],
    )
    _, err = capsys.readouterr()
    assert code == 4 and "CN.32 is outside the registry's namespaces (CN.31, CN.31.CMCC)" in err


def test_cli_serve_runs_and_stops_on_sigterm(tmp_path: Path, etcd_server: EtcdProcess) -> None:
    world = World(tmp_path)

    async def publish() -> None:
        async with Index(endpoints=[etcd_server.endpoint]) as idx:
            await world.publish(idx)

    asyncio.run(publish())
    world.config(etcd_server.endpoint)  # writes registry.json
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cpi",
            "registry",
            "serve",
            "--config",
            str(tmp_path / "registry.json"),
            "--insecure",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "CPI_ETCD_PASSWORD": ""},
        text=True,
    )
    try:
        assert proc.stdout is not None
        url = None
        deadline = time.monotonic() + 20
        lines = []
        while url is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "serving CN.31, CN.31.CMCC at http://" in line:
                url = line.split(" at ")[1].split()[0]
        assert url is not None, "".join(lines)
        with urllib.request.urlopen(f"{url}/readyz", timeout=5) as resp:
            assert json.loads(resp.read())["ready"] is True
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        rest = proc.stdout.read()
        assert "stopping" in rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
