"""The node agent against a minimal §5 server that checks every signature, and against
the real registry service (registry.service) on a real etcd.

The minimal server (:class:`FakeRegistry`) exists so the agent's behaviour on answers
the real service rarely gives (429, 503, a lying registry) can be driven exactly; it
verifies each envelope with :mod:`schemas` like the real one does.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from email.utils import formatdate
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from cpi.etcdproc import EtcdProcess
from cpi.main import main
from registry import ca, keyfile, national, tokens
from registry.agent import (
    Agent,
    Backoff,
    RefusedError,
    RegistryRejectedError,
    RegistryUnavailableError,
    parse_endpoint,
    parse_label,
    region_of,
    simulate,
)
from registry.agent.agent import _retry_after, registry_urls
from registry.agent.probe import GpuReading, Probe
from registry.config import load_config
from registry.index import Index, Keys
from registry.service import create_app
from schemas import chain, cpid, dsse, keys
from schemas.errors import CPIError, InvalidDataError, PayloadError
from schemas.models import CpuInfo, Deregister, Endpoint, Record, Register, Status, parse_payload
from tests.until import until

ROOT = Path(__file__).resolve().parents[3]
TOKEN = "cpi_jt_test-token-never-to-be-logged"
NS = "CN.31.CMCC"

ServerFactory = Callable[..., Awaitable[TestServer]]


# =============================================================================
# A minimal registry that implements docs/protocol.md §8 and verifies every envelope
# =============================================================================


def _err(status: int, code: str, message: str, **headers: str) -> web.Response:
    return web.json_response(
        {"error": {"code": code, "message": message}}, status=status, headers=headers or None
    )


@dataclass
class FakeRegistry:
    heartbeat_s: float = 0.1
    tokens: dict[str, str] = field(default_factory=lambda: {TOKEN: "CN.31"})
    lie_about_cpid: bool = False
    # answers to give the next registrations instead of handling them: (status, headers)
    script: list[tuple[int, dict[str, str]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.root = keys.generate()
        self.key = keys.generate()
        self.anchors = chain.TrustAnchors([ca.make_anchor("CN", self.root)])
        self.cert = ca.issue_cert(
            issuer_key=self.root,
            issuer_subject="CN",
            subject=NS,  # a record is signed by its own namespace's key
            public_key=self.key,
            scopes=["delegate", "issue"],
        )
        self.records: dict[str, tuple[Record, dsse.Envelope]] = {}
        self.statuses: dict[str, list[Status]] = {}
        self.deregistered: list[str] = []
        self.nonces: set[str] = set()
        self.calls: list[tuple[str, str, float]] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/registrations", self.register)
        app.router.add_put("/v1/resources/{prefix}/{suffix}/status", self.status)
        app.router.add_delete("/v1/resources/{prefix}/{suffix}", self.deregister)
        return app

    def _note(self, request: web.Request) -> None:
        self.calls.append((request.method, request.path, time.monotonic()))

    def _fresh(self, nonce: str, timestamp: int) -> web.Response | None:
        if abs(timestamp - time.time()) > 60:
            return _err(400, "stale_timestamp", f"timestamp {timestamp} is not within 60 s")
        if nonce in self.nonces:
            return _err(409, "replayed_nonce", f"nonce {nonce} was used before")
        self.nonces.add(nonce)
        return None

    async def register(self, request: web.Request) -> web.Response:
        self._note(request)
        if self.script:
            status, headers = self.script.pop(0)
            return _err(status, "scripted", f"scripted {status}", **headers)
        auth = request.headers.get("Authorization", "")
        ns = self.tokens.get(auth.removeprefix("Bearer "))
        if ns is None:
            return _err(401, "invalid_token", "unknown join token")
        try:
            env = dsse.Envelope.from_json(await request.read())
            reg = chain.open_self_signed(env, expected=Register)  # proof of possession
        except CPIError as exc:
            return _err(400, exc.code, str(exc))
        if not cpid.ns_contains(ns, reg.namespace):
            return _err(403, "token_scope", f"token is for {ns}, not {reg.namespace}")
        if (bad := self._fresh(reg.nonce, reg.timestamp)) is not None:
            return bad
        c = cpid.derive(reg.namespace, reg.kind, keys.b64url_decode(reg.public_key)).to_text()
        known = self.records.get(c)
        now = int(time.time())
        rec = Record(
            cpid=c,
            kind=reg.kind,
            public_key=reg.public_key,
            issuer=NS,
            version=known[0].version + 1 if known else 1,
            issued_at=now,
            expires_at=now + 86400,
            endpoints=reg.endpoints,
            location=reg.location,
            attributes=reg.attributes,
            labels=reg.labels,
        )
        signed = ca.sign_document(rec, self.key)
        self.records[c] = (rec, signed)
        answer = "CN.31/GPU.000000000000-0" if self.lie_about_cpid else c
        return web.json_response(
            {
                "cpid": answer,
                "record": signed.to_dict(),
                "chain": [self.cert.to_dict()],
                "heartbeat_s": self.heartbeat_s,
            },
            status=200 if known else 201,
        )

    def _cpid(self, request: web.Request) -> str:
        return f"{request.match_info['prefix']}/{request.match_info['suffix']}"

    async def status(self, request: web.Request) -> web.Response:
        self._note(request)
        c = self._cpid(request)
        if c not in self.records:
            return _err(404, "not_found", f"no record for {c}")
        try:
            env = dsse.Envelope.from_json(await request.read())
            st = chain.open_signed(env, public_key=self.records[c][0].public_key, expected=Status)
        except CPIError as exc:
            return _err(400, exc.code, str(exc))
        seen = self.statuses.setdefault(c, [])
        if st.cpid != c or (seen and st.seq <= seen[-1].seq):
            return _err(409, "stale_seq", f"seq {st.seq} does not increase")
        seen.append(st)
        return web.Response(status=204)

    async def deregister(self, request: web.Request) -> web.Response:
        self._note(request)
        c = self._cpid(request)
        if c not in self.records:
            return _err(404, "not_found", f"no record for {c}")
        try:
            env = dsse.Envelope.from_json(await request.read())
            d = chain.open_signed(
                env, public_key=self.records[c][0].public_key, expected=Deregister
            )
        except CPIError as exc:
            return _err(400, exc.code, str(exc))
        if (bad := self._fresh(d.nonce, d.timestamp)) is not None:
            return bad
        del self.records[c]
        self.deregistered.append(c)
        return web.Response(status=204)

    def count(self, method: str) -> int:
        return sum(1 for m, _, _ in self.calls if m == method)


def hardware(cards: int = 8, busy: int = 0) -> Probe:
    return Probe(
        cpu=CpuInfo(model="Intel(R) Xeon(R) Platinum 8480+", cores=112),
        memory_gib=2048.0,
        storage_tib=15.36,
        gpus=tuple(
            GpuReading(
                index=i,
                vendor="NVIDIA",
                model="H100",
                memory_total_mib=81559,
                memory_used_mib=70000.0 if i < busy else 0.0,
                utilization_pct=90.0 if i < busy else 0.0,
                power_w=600.0 if i < busy else 70.0,
            )
            for i in range(cards)
        ),
    )


def fixed(reading: Probe) -> Callable[[], Awaitable[Probe]]:
    async def prober() -> Probe:
        return reading

    return prober


@pytest.fixture
async def fake(aiohttp_server: ServerFactory) -> AsyncIterator[tuple[FakeRegistry, str]]:
    reg = FakeRegistry()
    server = await aiohttp_server(reg.app())
    yield reg, str(server.make_url("")).rstrip("/")


def agent_for(url: str, *, key: keys.Ed25519PrivateKey | None = None, **kw: Any) -> Agent:
    opts: dict[str, Any] = {
        "registry": url,
        "token": TOKEN,
        "namespace": NS,
        "kind": "GPU",
        "key": key or keys.generate(),
        "prober": fixed(hardware(busy=3)),
        "backoff": Backoff(base=0.01, cap=0.05),
        "rng": random.Random(7),
    }
    opts.update(kw)
    return Agent(**opts)


# =============================================================================
# Pure helpers
# =============================================================================


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("http://10.0.0.5:8000/inference", Endpoint(proto="http", host="10.0.0.5", port=8000, purpose="inference")),
        ("ssh://[2001:db8::1]:22/ssh", Endpoint(proto="ssh", host="2001:db8::1", port=22, purpose="ssh")),
        ("grpc://node-7.example:50051", Endpoint(proto="grpc", host="node-7.example", port=50051)),
    ],
)  # fmt: skip
def test_parse_endpoint(text: str, expected: Endpoint) -> None:
    assert parse_endpoint(text) == expected


@pytest.mark.parametrize(
    "text", ["10.0.0.5:8000", "http://host/inference", "ftp://h:21/x", "http://h:70000/x"]
)
def test_parse_endpoint_refuses(text: str) -> None:
    with pytest.raises(InvalidDataError, match=r"endpoint"):
        parse_endpoint(text)


def test_parse_label_and_region() -> None:
    assert parse_label("tier=gold") == ("tier", "gold")
    assert parse_label("k8s.io/zone=a=b") == ("k8s.io/zone", "a=b")
    with pytest.raises(InvalidDataError, match=r"label 'Tier=gold' is not k=v"):
        parse_label("Tier=gold")
    assert region_of("CN.31.CMCC") == "31"
    assert region_of("cn.13.1307.aliyun") == "1307"
    assert region_of("CN.CMCC") is None


def test_backoff_full_jitter_and_retry_after() -> None:
    b = Backoff(base=0.5, cap=8.0)
    rng = random.Random(1)
    for attempt, bound in ((0, 0.5), (1, 1.0), (3, 4.0), (10, 8.0), (1000, 8.0)):
        delays = [b.delay(attempt, rng) for _ in range(200)]
        assert all(0 <= d <= bound for d in delays)
        assert max(delays) > bound * 0.8 and min(delays) < bound * 0.2  # spread over the range
    assert all(3.0 <= b.delay(2, rng, retry_after=3.0) <= 5.0 for _ in range(50))
    assert _retry_after("7") == 7.0
    assert _retry_after(formatdate(time.time() + 30, usegmt=True)) == pytest.approx(30, abs=2)
    assert _retry_after("soon") is None and _retry_after(None) is None


# =============================================================================
# Against the minimal server
# =============================================================================


async def test_register_heartbeat_deregister(fake: tuple[FakeRegistry, str]) -> None:
    reg, url = fake
    key = keys.generate()
    async with agent_for(url, key=key, anchors=reg.anchors, labels={"tier": "gold"}) as agent:
        r = await agent.register()
        assert r.created and r.cpid == cpid.derive(NS, "GPU", keys.public_raw(key)).to_text()
        assert r.heartbeat_s == reg.heartbeat_s
        rec, _ = reg.records[r.cpid]
        assert rec.labels == {"tier": "gold"} and rec.location.region == "31"
        assert [(a.model, a.count) for a in rec.attributes.accelerators] == [("H100", 8)]

        agent.claimed_units = 2
        sent = [await agent.heartbeat() for _ in range(3)]
        got = reg.statuses[r.cpid]
        assert [s.seq for s in got] == [s.seq for s in sent]
        assert got[0].seq < got[1].seq < got[2].seq
        assert got[0].capacity.accelerators_free == 8 - 3 - 2
        assert got[0].metrics["power_w"] == pytest.approx(3 * 600 + 5 * 70)
        assert abs(got[0].observed_at - time.time() * 1000) < 5000

        again = await agent.register()  # same key: same CPID, 200
        assert not again.created and again.cpid == r.cpid and again.record.version == 2

        assert await agent.deregister() is True
        assert reg.deregistered == [r.cpid] and r.cpid not in reg.records
        assert await agent.deregister() is False  # 404: already gone


def test_registry_urls_parse_lists_and_refuse_bad_ones() -> None:
    assert registry_urls("https://a:1, https://b:2/,https://a:1") == ["https://a:1", "https://b:2"]
    assert registry_urls(["http://a", "http://b"]) == ["http://a", "http://b"]
    with pytest.raises(InvalidDataError, match="no registry URL"):
        registry_urls(" , ")
    with pytest.raises(InvalidDataError, match="not http"):
        registry_urls("https://a:1,ftp://b")


async def test_failover_in_order_and_back_to_the_first(
    aiohttp_server: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    from cpi.etcdproc import free_port

    reg = FakeRegistry()  # two instances of one registry: shared state
    first = await aiohttp_server(reg.app())
    second = await aiohttp_server(reg.app())
    url_a = str(first.make_url("")).rstrip("/")
    url_b = str(second.make_url("")).rstrip("/")
    dead = f"http://127.0.0.1:{free_port()}"
    async with agent_for(f"{dead},{url_a},{url_b}", request_timeout=2.0) as agent:
        assert agent.registries == [dead, url_a, url_b] and agent.registry == dead
        r = await agent.register()  # the dead one fails, the next attempt goes to A
        assert r.created and agent.registry == url_a
        await agent.heartbeat()
        await first.close()  # A goes away: the same status goes to B at once
        sent = await agent.heartbeat()
        assert agent.registry == url_b
        assert reg.statuses[r.cpid][-1].seq == sent.seq
        # a refusal (4xx) is an answer: no failover
        reg.statuses[r.cpid].append(reg.statuses[r.cpid][-1].model_copy(update={"seq": 2**52}))
        with pytest.raises(RegistryRejectedError, match="stale_seq"):
            await agent.heartbeat()
        assert agent.registry == url_b
        # after failback_s the first URL is tried again, then the others in order
        agent.failback_s = 0.0
        reg.statuses[r.cpid].clear()
        caplog.set_level("INFO", logger="registry.agent.agent")
        await agent.heartbeat()
        assert "trying the first registry" in caplog.text
        assert agent.registry == url_b  # dead, then A (closed), then B
    assert len(reg.statuses[r.cpid]) == 1


async def test_registration_retries_503_and_honours_retry_after(
    fake: tuple[FakeRegistry, str],
) -> None:
    reg, url = fake
    reg.script = [(503, {}), (429, {"Retry-After": "1"}), (503, {})]
    async with agent_for(url) as agent:
        t0 = time.monotonic()
        r = await agent.register()
    posts = [t for m, _, t in reg.calls if m == "POST"]
    assert len(posts) == 4 and r.created
    assert posts[2] - posts[1] >= 1.0  # not before Retry-After
    assert time.monotonic() - t0 < 3


async def test_registration_gives_up_after_max_attempts(fake: tuple[FakeRegistry, str]) -> None:
    reg, url = fake
    reg.script = [(503, {})] * 5
    async with agent_for(url, register_attempts=3) as agent:
        with pytest.raises(RegistryUnavailableError, match=r"HTTP 503 scripted"):
            await agent.register()
    assert reg.count("POST") == 3


async def test_refused_token_is_not_retried_and_not_logged(
    fake: tuple[FakeRegistry, str], caplog: pytest.LogCaptureFixture
) -> None:
    reg, url = fake
    reg.tokens = {}
    async with agent_for(url) as agent:
        with pytest.raises(RefusedError, match=r"HTTP 401 invalid_token") as info:
            await agent.run()
    assert info.value.status == 401
    assert reg.count("POST") == 1
    assert "refused the join token or namespace CN.31.CMCC" in caplog.text
    assert TOKEN not in caplog.text


async def test_token_for_another_namespace_is_refused(fake: tuple[FakeRegistry, str]) -> None:
    reg, url = fake
    reg.tokens = {TOKEN: "CN.32"}
    async with agent_for(url) as agent:
        with pytest.raises(RefusedError, match=r"HTTP 403 token_scope"):
            await agent.register()


async def test_other_4xx_is_not_retried(fake: tuple[FakeRegistry, str]) -> None:
    reg, url = fake
    reg.script = [(400, {})]
    async with agent_for(url) as agent:
        with pytest.raises(RegistryRejectedError, match=r"HTTP 400"):
            await agent.register()
    assert reg.count("POST") == 1


async def test_a_registry_answering_another_cpid_is_caught(fake: tuple[FakeRegistry, str]) -> None:
    reg, url = fake
    reg.lie_about_cpid = True
    async with agent_for(url) as agent:
        with pytest.raises(
            PayloadError, match=r"registry answered CPID .* expected CN.31.CMCC/GPU"
        ):
            await agent.register()


async def test_record_from_an_untrusted_registry_is_caught(fake: tuple[FakeRegistry, str]) -> None:
    _, url = fake
    other = chain.TrustAnchors([ca.make_anchor("CN", keys.generate())])
    async with agent_for(url, anchors=other) as agent:
        with pytest.raises(InvalidDataError, match=r"rule 2 failed"):
            await agent.register()


async def test_run_reregisters_when_the_record_is_gone_and_deregisters_on_stop(
    fake: tuple[FakeRegistry, str],
) -> None:
    reg, url = fake
    stop = asyncio.Event()
    async with agent_for(url) as agent:
        task = asyncio.create_task(agent.run(stop))
        await until(lambda: len(reg.statuses.get(agent.cpid, [])) >= 2)
        reg.records.clear()  # the registry lost the record
        await until(lambda: agent.registrations == 2 and agent.cpid in reg.records)
        n = len(reg.statuses[agent.cpid])
        await until(lambda: len(reg.statuses[agent.cpid]) > n)
        stop.set()
        await asyncio.wait_for(task, 5)
    assert reg.deregistered == [agent.cpid]
    assert agent.cpid not in reg.records


async def test_run_reregisters_when_the_hardware_changes(fake: tuple[FakeRegistry, str]) -> None:
    reg, url = fake
    readings = [hardware(cards=8)] * 3 + [hardware(cards=7)] * 100  # a GPU fell off the bus

    async def prober() -> Probe:
        return readings.pop(0)

    stop = asyncio.Event()
    async with agent_for(url, prober=prober) as agent:
        task = asyncio.create_task(agent.run(stop))
        await until(lambda: agent.registrations == 2)
        rec, _ = reg.records[agent.cpid]
        assert rec.version == 2 and rec.attributes.accelerators[0].count == 7
        stop.set()
        await asyncio.wait_for(task, 5)
    assert agent.registrations == 2


async def test_stop_during_registration_retries_returns_quietly(
    fake: tuple[FakeRegistry, str],
) -> None:
    reg, url = fake
    reg.script = [(503, {})] * 1000
    stop = asyncio.Event()
    async with agent_for(url, backoff=Backoff(base=0.05, cap=0.1)) as agent:
        task = asyncio.create_task(agent.run(stop))
        await until(lambda: reg.count("POST") >= 3)
        stop.set()
        await asyncio.wait_for(task, 2)
    assert reg.count("DELETE") == 0


async def test_once_and_dry_run_through_the_cli(
    fake: tuple[FakeRegistry, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    reg, url = fake
    key_file = tmp_path / "node.key"
    base = [
        "agent",
        "run",
        "--registry",
        url,
        "--namespace",
        NS,
        "--kind",
        "GPU",
        "--key",
        str(key_file),
    ]

    # dry run: no network (the URL is never contacted), the payload and CPID on stdout
    rc = await asyncio.to_thread(
        main, [*base[:2], "--registry", "http://127.0.0.1:9", *base[4:], "--dry-run",
               "--endpoint", "http://10.0.0.5:8000/inference", "--label", "tier=gold"],
    )  # fmt: skip
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and reg.calls == []
    key = keyfile.load_private(key_file)  # created 0600 on first start
    assert (key_file.stat().st_mode & 0o777) == 0o600
    expected = cpid.derive(NS, "GPU", keys.public_raw(key)).to_text()
    assert out["cpid"] == expected
    env = dsse.Envelope.from_dict(out["envelope"])
    payload = chain.open_self_signed(env, expected=Register)
    assert payload.model_dump(mode="json", exclude_none=True) == out["payload"]
    assert payload.labels == {"tier": "gold"}
    assert payload.endpoints == [
        Endpoint(proto="http", host="10.0.0.5", port=8000, purpose="inference")
    ]
    # the operator's price and site energy figures go into register.v1
    rc = await asyncio.to_thread(
        main, [*base[:2], "--registry", "http://127.0.0.1:9", *base[4:], "--dry-run",
               "--pue", "1.2", "--grid-carbon", "430", "--price", "17.5"],
    )  # fmt: skip
    out = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert out["payload"]["location"]["pue"] == 1.2
    assert out["payload"]["location"]["grid_gco2_per_kwh"] == 430
    assert out["payload"]["attributes"]["price_cny_per_unit_hour"] == 17.5
    rc = await asyncio.to_thread(
        main, [*base[:2], "--registry", "http://127.0.0.1:9", *base[4:], "--dry-run",
               "--pue", "0.7"],
    )  # fmt: skip
    assert rc == 1 and "location.pue" in capsys.readouterr().err

    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    rc = await asyncio.to_thread(
        main, [*base, "--token-file", str(token_file), "--once", "--insecure"]
    )
    assert rc == 0
    assert capsys.readouterr().out.strip() == expected
    assert len(reg.statuses[expected]) == 1 and expected in reg.records  # the record stays


async def test_cli_exit_code_4_when_the_token_is_refused(
    fake: tuple[FakeRegistry, str],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    reg, url = fake
    monkeypatch.setenv("CPI_JOIN_TOKEN", "cpi_jt_wrong-token")
    argv = ["agent", "run", "--registry", url, "--namespace", NS, "--kind", "GPU",
            "--key", str(tmp_path / "k"), "--insecure"]  # fmt: skip
    rc = await asyncio.to_thread(main, argv)
    assert rc == 4  # refused (cpi.errors.EXIT_REFUSED)
    assert reg.count("POST") == 1
    assert "refused the join token or namespace" in caplog.text
    assert "cpi_jt_wrong-token" not in caplog.text + capsys.readouterr().err


async def test_simulated_nodes_share_a_session_and_look_plausible(
    fake: tuple[FakeRegistry, str], tmp_path: Path
) -> None:
    reg, url = fake
    target = simulate.Target(url, TOKEN, "CN.31.CMCC")
    stop = asyncio.Event()
    report = await simulate.run_simulation(
        12, targets=[target], stop=stop, seed=3, once=True, ramp_s=0, data_dir=tmp_path
    )
    assert (report.registered, report.heartbeats, report.failed) == (12, 12, 0)
    assert len(reg.records) == 12
    models = {c.model: c for c in simulate.INVENTORY}
    for c, (rec, _) in reg.records.items():
        [acc] = rec.attributes.accelerators
        assert acc.model in models and 1 <= acc.count <= 8
        assert rec.kind == models[acc.model].kind == cpid.parse(c).kind
        assert rec.location.region == "31" and rec.labels["sim"] == "true"
        assert rec.attributes.cpu is not None and rec.attributes.memory_gib
    assert len({r.attributes.accelerators[0].model for r, _ in reg.records.values()}) >= 3
    # the example site figures and prices of seeds/energy.json, varied per node
    energy = simulate.load_energy()
    for rec, _ in reg.records.values():
        base = energy["price_cny_per_unit_hour"][rec.attributes.accelerators[0].model]
        price = rec.attributes.price_cny_per_unit_hour
        assert price is not None and 0.84 * base <= price <= 1.16 * base
        assert rec.location.grid_gco2_per_kwh == energy["regions"]["31"]["grid_gco2_per_kwh"]
        assert rec.location.pue is not None and abs(rec.location.pue - 1.35) <= 0.05
    # statuses carry the L0 metrics the ranking scores
    for statuses in reg.statuses.values():
        m = statuses[-1].metrics
        assert {"gpu_util", "gpu_mem_used_mib", "gpu_mem_total_mib", "power_w"} <= set(m)
        assert 0 <= m["gpu_util"] <= 100 and m["gpu_mem_used_mib"] <= m["gpu_mem_total_mib"]
    assert len(await asyncio.to_thread(lambda: list(tmp_path.glob("sim-*.key")))) == 12

    # the same data dir gives the same CPIDs back (200, not 201)
    before = set(reg.records)
    async with aiohttp.ClientSession() as session:
        agents = simulate.build_agents(12, targets=[target], session=session, data_dir=tmp_path)
        assert {a.cpid for a in agents} == before


async def test_simulation_runs_until_stopped_then_deregisters(
    fake: tuple[FakeRegistry, str],
) -> None:
    reg, url = fake
    stop = asyncio.Event()
    task = asyncio.create_task(
        simulate.run_simulation(
            6, targets=[simulate.Target(url, TOKEN, "CN.31.CMCC")], stop=stop, seed=1, ramp_s=0.2,
            churn=1.0,
        )
    )  # fmt: skip
    await until(lambda: len(reg.statuses) == 6 and all(len(s) >= 3 for s in reg.statuses.values()))
    stop.set()
    report = await asyncio.wait_for(task, 10)
    assert report.deregistered == 6 and reg.records == {}
    # churn=1.0: a card changes state on every reading
    frees = {s.capacity.accelerators_free for s in next(iter(reg.statuses.values()))}
    assert len(frees) >= 2


async def test_simulate_through_the_cli(
    fake: tuple[FakeRegistry, str], capsys: pytest.CaptureFixture[str]
) -> None:
    reg, url = fake
    argv = ["agent", "run", "--registry", url, "--token", TOKEN, "--namespace", "CN.13.1307.ALIYUN",
            "--simulate", "4", "--kind", "NPU", "--once", "--insecure"]  # fmt: skip
    reg.tokens = {TOKEN: "CN.13"}
    assert await asyncio.to_thread(main, argv) == 0
    assert "simulated 4 nodes: 4 registered, 4 status sent" in capsys.readouterr().out
    assert {(r.kind, r.location.region) for r, _ in reg.records.values()} == {("NPU", "1307")}


# =============================================================================
# Against the real registry service
# =============================================================================


@dataclass
class Stack:
    url: str
    token: str
    anchors: chain.TrustAnchors
    anchor_file: Path
    index: Index
    data_dir: Path
    etcd: str


SMALL_SEEDS = {
    "root": {"prefix": "CN"},
    "regions": [{"prefix": "CN.31", "code": "31"}],
    "industry": [{"prefix": "CN.31.CMCC"}],
}


@pytest.fixture
async def stack(
    index: Index, etcd_server: EtcdProcess, tmp_path: Path, aiohttp_server: ServerFactory
) -> Stack:
    root, anchor = national.init_root(tmp_path / "root", "CN")
    seeds = tmp_path / "seeds.json"
    seeds.write_text(json.dumps(SMALL_SEEDS))
    paths = await national.bootstrap_tree(
        index, seeds_path=seeds, data_dir=tmp_path, root_key=root, endpoints_by_ns={}
    )
    config = load_config(
        data={
            "namespaces": [{"namespace": NS, "key_file": str(paths[NS])}],
            "anchor_file": str(tmp_path / "root" / national.ANCHOR_FILE),
            "etcd": {"endpoints": [etcd_server.endpoint]},
            "heartbeat_s": 0.2,
            "live_refresh_s": 60,
        },
        env={},
    )
    server = await aiohttp_server(create_app(config))
    token = await tokens.create_token(index, namespace=NS, ttl_s=600)
    return Stack(
        url=str(server.make_url("")).rstrip("/"),
        token=token,
        anchors=chain.TrustAnchors([anchor]),
        anchor_file=tmp_path / "root" / national.ANCHOR_FILE,
        index=index,
        data_dir=tmp_path,
        etcd=etcd_server.endpoint,
    )


async def test_service_registration_heartbeat_and_deregistration(stack: Stack) -> None:
    async with agent_for(stack.url, token=stack.token, anchors=stack.anchors) as agent:
        r = await agent.register()  # anchors given: record and chain verified by the agent
        assert r.created and r.heartbeat_s == 0.2
        kv = await stack.index.get(Keys.rec(r.cpid))
        assert kv is not None and dsse.Envelope.from_json(kv.value) == r.envelope
        await agent.heartbeat()
        live = await stack.index.get(Keys.live(r.cpid))
        assert live is not None
        st = chain.open_signed(
            dsse.Envelope.from_json(live.value), public_key=agent.public_key, expected=Status
        )
        assert st.capacity.accelerators_free == 5
        again = await agent.register()
        assert not again.created and again.cpid == r.cpid
        assert await agent.deregister() is True
    assert await stack.index.get(Keys.rec(r.cpid)) is None
    assert await stack.index.get(Keys.live(r.cpid)) is None


async def test_service_record_gone_reregisters(stack: Stack) -> None:
    hw = simulate.SimulatedHardware(random.Random(5), kind="GPU", churn=1.0)  # capacity changes
    stop = asyncio.Event()
    async with agent_for(stack.url, token=stack.token, prober=hw) as agent:
        task = asyncio.create_task(agent.run(stop))
        await until(lambda: agent.heartbeats_sent >= 2)
        assert await stack.index.delete(Keys.rec(agent.cpid))  # e.g. an operator removed it
        await until(lambda: agent.registrations == 2)
        await until(lambda: agent.heartbeats_sent >= 4)
        assert await stack.index.get(Keys.rec(agent.cpid)) is not None
        stop.set()
        await asyncio.wait_for(task, 5)
    assert await stack.index.get(Keys.rec(agent.cpid)) is None


async def test_service_refuses_a_bad_token(stack: Stack, caplog: pytest.LogCaptureFixture) -> None:
    async with agent_for(stack.url, token="cpi_jt_not-a-token") as agent:
        with pytest.raises(RefusedError, match=r"HTTP 401 invalid_token") as info:
            await agent.run()
    assert info.value.error_code == "invalid_token"
    assert "cpi_jt_not-a-token" not in caplog.text
    other = await tokens.create_token(stack.index, namespace="CN.31.CTCC", ttl_s=600)
    async with agent_for(stack.url, token=other) as agent:
        with pytest.raises(RefusedError, match=r"HTTP 403 token_scope"):
            await agent.register()


async def test_service_sigterm_deregisters_the_agent_process(stack: Stack, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(stack.token)
    key_file = tmp_path / "node.key"
    key, _ = keyfile.load_or_create(key_file)
    expected = cpid.derive(NS, "GPU", keys.public_raw(key)).to_text()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cpi", "agent", "run", "--registry", stack.url,
        "--token-file", str(token_file), "--namespace", NS, "--kind", "GPU", "--key", str(key_file),
        "--anchor", str(stack.anchor_file), "--label", "test=sigterm", "--insecure",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    try:

        async def live() -> bool:
            return await stack.index.get(Keys.live(expected)) is not None

        deadline = time.monotonic() + 20
        while not await live():
            assert proc.returncode is None, (await proc.communicate())[1].decode()
            assert time.monotonic() < deadline, "the agent never sent a status"
            await asyncio.sleep(0.05)
        rec = await stack.index.get(Keys.rec(expected))
        assert rec is not None
        record = parse_payload(*_pt(rec.value), Record)
        assert record.labels == {"test": "sigterm"}
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 15)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()
    text = err.decode()
    assert "SIGTERM received" in text and f"deregistered {expected}" in text
    assert stack.token not in text
    assert await stack.index.get(Keys.rec(expected)) is None


def _pt(value: bytes) -> tuple[str, bytes]:
    env = dsse.Envelope.from_json(value)
    return env.payload_type, env.payload


async def test_example_script_registers_and_verifies(stack: Stack, tmp_path: Path) -> None:
    up = tmp_path / "up.json"
    up.write_text(
        json.dumps(
            {
                "etcd": [f"http://{stack.etcd}"],
                "registries": {NS: stack.url},
                "resolver": {"http": "http://127.0.0.1:1", "dns": "127.0.0.1:1", "zone": "cpi."},
                "anchor": str(stack.anchor_file),
                "tokens": {NS: stack.token},
            }
        )
    )
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import register_nodes
    finally:
        sys.path.remove(str(ROOT / "examples"))
    args = ["--up", str(up), "--count", "3", "--keys", str(tmp_path / "keys"), "--insecure"]
    assert await asyncio.to_thread(register_nodes.main, args) == 0
    recs, _ = await stack.index.get_prefix(Keys.rec_prefix_for_namespace(NS))
    assert len(recs) == 3
    # again with the same keys: the same CPIDs, then deregistered
    assert await asyncio.to_thread(register_nodes.main, [*args, "--deregister"]) == 0
    recs, _ = await stack.index.get_prefix(Keys.rec_prefix_for_namespace(NS))
    assert recs == []
