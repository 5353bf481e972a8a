"""The client's typed results (async and synchronous) against a resolver on a real port,
and ``examples/client_quickstart.py`` run as a subprocess against it (docs/client.md)."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from cpi.etcdproc import EtcdProcess
from registry.index import Index
from resolver.claims import tokens as claim_tokens
from resolver.claims.client import ClaimsClient, ClaimsNotFoundError
from resolver.client import (
    Claim,
    Discovery,
    DiscoveryHit,
    Holdings,
    Query,
    Resolved,
    ResolverAPIError,
    ResolverClient,
    SyncResolverClient,
)
from resolver.config import load_anchor_files
from resolver.errors import ResolverUnavailableError
from resolver.http import RESOLVER, create_app
from schemas.errors import InvalidDataError, NotFoundError
from tests.resolver.kit import Node, Pki, put_record, put_status, resolver_config
from tests.until import until

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "examples" / "client_quickstart.py"


@pytest.fixture
async def url(
    index: Index, pki: Pki, anchor_file: Path, etcd_server: EtcdProcess, aiohttp_server: Any
) -> AsyncIterator[str]:
    await pki.publish(index)
    server = await aiohttp_server(create_app(resolver_config(etcd_server.endpoint, anchor_file)))
    await until(lambda: server.app[RESOLVER].ready, what="ready")
    yield str(server.make_url("")).rstrip("/")


async def live_nodes(index: Index, pki: Pki, url: str, *nodes: Node) -> None:
    for i, node in enumerate(nodes):
        await put_record(index, pki, node)
        await put_status(index, node, free=3 + i)

    async def all_live() -> bool:
        async with ResolverClient(url) as client:
            found = await client.find(kind="GPU", live=True)
        return len(found) == len(nodes)

    await until(all_live, what="the nodes live at the resolver")


async def test_async_typed_results(index: Index, pki: Pki, url: str, anchor_file: Path) -> None:
    a, b = Node(), Node(model="H200", labels={"tier": "silver"})
    await live_nodes(index, pki, url, a, b)
    async with ResolverClient(url) as client:
        found = await client.lookup(a.cpid.lower())
        assert isinstance(found, Resolved)
        assert (found.cpid, found.kind, found.issuer, found.version) == (
            a.cpid,
            "GPU",
            "CN.31.CMCC",
            1,
        )
        assert found.live and found.free == 3 and found.state == "up" and found.revision > 0
        assert found.record["location"]["region"] == "31" and not found.stale
        assert found.verify(load_anchor_files([anchor_file])).ok
        with pytest.raises(dataclasses.FrozenInstanceError):
            found.live = False  # type: ignore[misc]
        # the dict methods keep their shape for existing callers (cpi resolve|discover)
        assert (await client.resolve(a.cpid))["revision"] == found.revision

        hits = await client.find(kind="GPU", accelerator="h200")
        assert isinstance(hits, Discovery) and [h.cpid for h in hits] == [b.cpid]
        hit = hits.hits[0]
        assert isinstance(hit, DiscoveryHit)
        assert hit.free == 4 and hit.live and hit.kind == "GPU"
        assert hit.accelerators == (("H200", 8),) and hit.version == 1
        by_query = await client.find(Query(kind="GPU", labels=(("tier", "gold"),)))
        by_dict = await client.find(kind="GPU", labels={"tier": "gold"})
        assert [h.cpid for h in by_query] == [h.cpid for h in by_dict] == [a.cpid]
        assert not await client.find(kind="NPU")
        assert (await client.discover(Query(kind="GPU")))["results"]

        with pytest.raises(NotFoundError):
            await client.lookup(Node().cpid)
        with pytest.raises(ResolverAPIError) as bad:
            await client.lookup("not-a-cpid")
        assert bad.value.status == 400
        with pytest.raises(InvalidDataError, match="not both"):
            await client.find(Query(kind="GPU"), kind="GPU")


async def test_async_claims_are_typed(index: Index, pki: Pki, url: str) -> None:
    node = Node()
    await live_nodes(index, pki, url, node)
    token = await claim_tokens.create_token(index, holder="typed-test", ttl_s=600)
    async with ClaimsClient(url, token=token) as claims:
        made = await claims.acquire(query=Query(kind="GPU", near="31"), units=2, ttl_s=60)
        assert isinstance(made, Claim) and (made.cpid, made.units) == (node.cpid, 2)
        held = await claims.holdings()
        assert isinstance(held, Holdings) and held.holder == "typed-test" and held.units == 2
        assert [c.claim_id for c in held] == [made.claim_id]
        assert held.claims[0].holder == "typed-test" and held.claims[0].created_at
        await claims.release(made.claim_id)
        assert len(await claims.holdings()) == 0
        with pytest.raises(ClaimsNotFoundError):
            await claims.release(made.claim_id)


async def test_sync_client(index: Index, pki: Pki, url: str, anchor_file: Path) -> None:
    a, b = Node(), Node(labels={"tier": "silver"})
    await live_nodes(index, pki, url, a, b)
    token = await claim_tokens.create_token(index, holder="sync-test", ttl_s=600)

    def script() -> None:  # what a script does, in a thread: the test's loop serves HTTP
        with SyncResolverClient(url, claims_token=token) as client:
            assert client.ready()["ready"] is True
            hits = client.find(kind="GPU", limit=5)
            assert {h.cpid for h in hits} == {a.cpid, b.cpid}
            found = client.lookup(a.cpid)
            assert found.cpid == a.cpid and found.verify(load_anchor_files([anchor_file])).ok
            claim = client.claim(kind="GPU", labels={"tier": "silver"}, units=1)
            assert claim.cpid == b.cpid
            assert client.holdings().units == 1
            client.release(claim)
            assert client.holdings().units == 0
            with pytest.raises(NotFoundError):
                client.lookup(Node().cpid)
            events = client.watch(kind="GPU", since="0")
            first = next(events)
            assert first.type in ("put", "relist")
            events.close()
        with pytest.raises(RuntimeError, match="closed"):
            client.lookup(a.cpid)
        client.close()  # idempotent

    await asyncio.to_thread(script)


async def test_sync_client_inside_a_running_loop_and_without_token(url: str) -> None:
    # called from a coroutine (as in a notebook): the client runs its own loop thread
    with SyncResolverClient(url, claims_token="") as client:
        saved = os.environ.pop("CPI_CLAIMS_TOKEN", None)
        try:
            with pytest.raises(InvalidDataError, match="no claims token"):
                client.holdings()
        finally:
            if saved is not None:
                os.environ["CPI_CLAIMS_TOKEN"] = saved


def test_sync_client_unreachable() -> None:
    with (
        SyncResolverClient("http://127.0.0.1:9", timeout=2.0) as client,
        pytest.raises(ResolverUnavailableError),
    ):
        client.find(kind="GPU")


async def test_quickstart_example_runs(index: Index, pki: Pki, url: str, anchor_file: Path) -> None:
    node = Node()
    await live_nodes(index, pki, url, node)
    token = await claim_tokens.create_token(index, holder="quickstart", ttl_s=600)
    env = {**os.environ, "CPI_RESOLVER": url, "CPI_CLAIMS_TOKEN": token}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(QUICKSTART),
        "--anchor",
        str(anchor_file),
        "--claim",
        "2",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    text = out.decode()
    assert proc.returncode == 0, text + err.decode()
    assert f"{node.cpid}  score" in text and "offline verification: OK" in text
    assert "claimed 2 units" in text and "released" in text

    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(QUICKSTART),
        "--kind",
        "NPU",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 1 and "0 live NPU resources" in out.decode()
