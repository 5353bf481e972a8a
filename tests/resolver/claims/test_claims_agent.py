"""Claims and the node agent, end to end: registry (X-CPI-Claimed) -> agent status ->
resolver -> claims; draining refuses new claims; the claims CLI."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from cpi.etcdproc import EtcdProcess
from cpi.main import main
from registry import keyfile, national, tokens
from registry.agent import Agent, Backoff
from registry.agent.probe import GpuReading, Probe
from registry.config import load_config
from registry.index import Index, Keys
from registry.service import create_app
from resolver.claims import tokens as claim_tokens
from resolver.claims.http import add_claim_routes
from resolver.claims.service import ClaimService, DrainingError, InsufficientCapacityError
from resolver.core import Resolver
from schemas import chain, dsse, keys
from schemas.cpid import derive
from schemas.models import CpuInfo, Status
from tests.resolver.kit import FAST
from tests.until import until

NS = "CN.31.CMCC"
SEEDS = {
    "root": {"prefix": "CN"},
    "regions": [{"prefix": "CN.31", "code": "31"}],
    "industry": [{"prefix": NS}],
}

ServerFactory = Callable[..., Awaitable[Any]]


def hardware(cards: int = 8, busy: int = 1) -> Probe:
    return Probe(
        cpu=CpuInfo(model="Xeon", cores=112),
        memory_gib=2048.0,
        storage_tib=15.0,
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


async def fixed_probe() -> Probe:
    return hardware()


@dataclass
class World:
    registry_url: str
    join_token: str
    index: Index
    resolver: Resolver
    anchor_file: Path

    def agent(self, **kw: Any) -> Agent:
        opts: dict[str, Any] = {
            "registry": self.registry_url,
            "token": self.join_token,
            "namespace": NS,
            "kind": "GPU",
            "key": keys.generate(),
            "prober": fixed_probe,
            "backoff": Backoff(base=0.01, cap=0.05),
            "rng": random.Random(3),
        }
        opts.update(kw)
        return Agent(**opts)

    async def live_status(self, cpid: str, public_key: str) -> Status | None:
        kv = await self.index.get(Keys.live(cpid))
        if kv is None:
            return None
        env = dsse.Envelope.from_json(kv.value)
        return chain.open_signed(env, public_key=public_key, expected=Status)


@pytest.fixture
async def world(
    index: Index, etcd_server: EtcdProcess, tmp_path: Path, aiohttp_server: ServerFactory
) -> AsyncIterator[World]:
    root, anchor = national.init_root(tmp_path / "root", "CN")
    seeds = tmp_path / "seeds.json"
    seeds.write_text(json.dumps(SEEDS))
    paths = await national.bootstrap_tree(
        index, seeds_path=seeds, data_dir=tmp_path, root_key=root, endpoints_by_ns={}
    )
    anchor_file = tmp_path / "root" / national.ANCHOR_FILE
    config = load_config(
        data={
            "namespaces": [{"namespace": NS, "key_file": str(paths[NS])}],
            "anchor_file": str(anchor_file),
            "etcd": {"endpoints": [etcd_server.endpoint]},
            "heartbeat_s": 5,
            "live_refresh_s": 60,
        },
        env={},
    )
    server = await aiohttp_server(create_app(config))
    join = await tokens.create_token(index, namespace=NS, ttl_s=600)
    resolver = Resolver(index=index, anchors=chain.TrustAnchors([anchor]), settings=FAST)
    async with resolver:
        async with asyncio.timeout(10):
            await resolver.wait_ready()
        yield World(str(server.make_url("")).rstrip("/"), join, index, resolver, anchor_file)


async def test_claimed_units_reach_the_agent_and_its_status(world: World) -> None:
    claims = ClaimService(index=world.index, resolver=world.resolver)
    async with world.agent() as agent:
        await agent.register()
        await agent.heartbeat()
        assert agent.claimed_units == 0  # the registry answered X-CPI-Claimed: 0
        cpid, pub = agent.cpid, agent.public_key
        await until(lambda: world.resolver.get(cpid) is not None, what="the node in the replica")
        await until(lambda: world.resolver.resolve(cpid).status is not None, what="its status")

        claim = await claims.claim(cpid, units=3, holder="lab")

        async def told() -> bool:
            await agent.heartbeat()
            return agent.claimed_units == 3

        await until(told, what="the registry to tell the agent about the claim")
        await agent.heartbeat()  # reports what the registry told it
        status = await world.live_status(cpid, pub)
        assert status is not None
        assert status.capacity.accelerators_free == 7 - 3  # 8 cards, 1 busy, 3 claimed
        assert status.metrics["claimed_units"] == 3

        # what a claim may take counts the claimed units once, not twice
        await claims.claim(cpid, units=4, holder="lab")
        with pytest.raises(InsufficientCapacityError, match="0 units free"):
            await claims.claim(cpid, units=1, holder="lab")

        await claims.release(claim.claim_id, holder="lab")
        await until(told_units(agent, 4), what="the release to reach the agent")


def told_units(agent: Agent, units: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        await agent.heartbeat()
        return agent.claimed_units == units

    return check


async def test_a_draining_agent_refuses_new_claims_at_once(world: World) -> None:
    claims = ClaimService(index=world.index, resolver=world.resolver)
    stop = asyncio.Event()
    async with world.agent() as agent:
        run = asyncio.create_task(agent.run(stop))
        try:
            await until(lambda: world.resolver.get(agent.cpid) is not None, what="registration")
            await until(
                lambda: world.resolver.resolve(agent.cpid).status is not None, what="status"
            )
            await claims.claim(agent.cpid, units=2, holder="lab")
            agent.set_state("draining")  # what SIGUSR1 does; the next heartbeat is >= 4.25 s away

            async def draining() -> bool:
                st = await world.live_status(agent.cpid, agent.public_key)
                return st is not None and st.state == "draining"

            await until(draining, within=3, what="the draining status, sent at once")
            with pytest.raises(DrainingError, match="'draining'"):
                await claims.claim(agent.cpid, units=1, holder="lab")

            agent.set_state("up")  # SIGUSR2
            await until(
                lambda: (
                    (e := world.resolver.get(agent.cpid)) is not None
                    and e.status is not None
                    and e.status.state == "up"
                ),
                within=3,
                what="up again",
            )
            assert (await claims.claim(agent.cpid, units=1, holder="lab")).units == 1
        finally:
            stop.set()
            await run
    assert await world.index.get(Keys.rec(agent.cpid)) is None  # deregistered on stop


async def test_agent_cli_drain_flag(world: World, tmp_path: Path) -> None:
    key_file = tmp_path / "node.key"
    token_file = tmp_path / "join"
    token_file.write_text(world.join_token)
    argv = ["agent", "run", "--registry", world.registry_url, "--namespace", NS, "--kind",
            "CPU", "--key", str(key_file), "--token-file", str(token_file), "--once", "--drain", "--insecure"]  # fmt: skip
    assert await asyncio.to_thread(main, argv) == 0
    key = keyfile.load_private(key_file)
    cpid = derive(NS, "CPU", keys.public_raw(key)).to_text()
    status = await world.live_status(cpid, keys.public_to_b64url(key))
    assert status is not None and status.state == "draining"
    assert status.metrics["claimed_units"] == 0


async def test_claims_cli(
    world: World,
    aiohttp_server: ServerFactory,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    app = web.Application()
    add_claim_routes(app, resolver=world.resolver)
    server = await aiohttp_server(app)
    url = str(server.make_url("")).rstrip("/")
    async with world.agent() as agent:
        await agent.register()
        await agent.heartbeat()
        cpid = agent.cpid
    await until(
        lambda: (e := world.resolver.get(cpid)) is not None and e.status is not None,
        what="the node in the replica",
    )
    etcd = ",".join(world.index.endpoints)

    rc = await asyncio.to_thread(
        main, ["claims", "token", "create", "--holder", "lab-7", "--max-units", "6", "--ttl", "1h",
               "--etcd", etcd],
    )  # fmt: skip
    token = capsys.readouterr().out.strip()
    assert rc == 0 and token.startswith(claim_tokens.TOKEN_PREFIX)
    kvs, _ = await world.index.get_prefix("/cpi/v1/claimtokens/")
    assert [kv.key for kv in kvs] == [Keys.claim_token(claim_tokens.hash_token(token))]
    assert token.encode() not in kvs[0].value  # only the hash is stored
    token_file = tmp_path / "claims-token"
    token_file.write_text(token + "\n")
    monkeypatch.setenv("CPI_RESOLVER", url)

    common = ["--token-file", str(token_file), "--insecure"]  # the test server is plain HTTP
    rc = await asyncio.to_thread(
        main, ["claim", "--kind", "GPU", "--accelerator", "h100", "--near", "31", "--units", "4",
               "--ttl", "10m", *common],
    )  # fmt: skip
    claim_id = capsys.readouterr().out.strip()
    assert rc == 0 and claim_id.startswith(cpid.replace("/", "~") + "~")

    monkeypatch.setenv("CPI_CLAIMS_TOKEN", token)
    rc = await asyncio.to_thread(
        main, ["claim", "--cpid", cpid, "--units", "3", "--json", "--insecure"]
    )
    out = capsys.readouterr()
    assert rc == 4 and "quota" in out.err  # 4 + 3 > 6

    rc = await asyncio.to_thread(main, ["claim", "list", "--json", "--insecure"])
    listed = json.loads(capsys.readouterr().out)
    assert rc == 0 and listed["units"] == 4 and listed["claims"][0]["claim_id"] == claim_id

    rc = await asyncio.to_thread(
        main, ["claim", "--resolver", url, "release", claim_id, "--insecure"]
    )
    assert rc == 0 and await world.index.get(Keys.claim(cpid, claim_id)) is None
    rc = await asyncio.to_thread(main, ["claim", "release", claim_id, "--insecure"])
    assert rc == 3 and "claim_not_found" in capsys.readouterr().err
    rc = await asyncio.to_thread(main, ["claim", "--cpid", cpid, "--query", "kind=GPU", "--units", "1", "--insecure"])  # fmt: skip
    assert rc == 2 and "not both" in capsys.readouterr().err
