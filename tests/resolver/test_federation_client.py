"""``roots=`` from the clients of a federated resolver: the Python client
(resolver/client.py) and ``cpi discover --roots``."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from cpi.main import main
from registry.index import Index
from resolver.client import ResolverClient
from resolver.federation import Federation
from resolver.http import create_app
from tests.resolver.kit import Node, Pki, put_record, resolver_config
from tests.resolver.test_federation import RootPki, fed, sg, sg_index
from tests.until import until

__all__ = ["fed", "sg", "sg_index"]  # the fixtures, imported for these tests

Client = TestClient[Any, Any]


async def test_client_and_cli_restrict_roots(
    fed: Federation,
    index: Index,
    pki: Pki,
    sg: RootPki,
    sg_index: Index,
    aiohttp_client: Any,
    anchor_file: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    cn_node, sg_node = Node(), Node(namespace="SG.01")
    await put_record(index, pki, cn_node)
    await sg.put(sg_index, sg_node)
    client: Client = await aiohttp_client(
        create_app(resolver_config("127.0.0.1:1", anchor_file), resolver=fed)
    )
    await until(lambda: fed.get(cn_node.cpid) and fed.get(sg_node.cpid), what="both roots")
    url = str(client.make_url("")).rstrip("/")
    async with ResolverClient(url) as rc:
        assert {r.cpid for r in (await rc.find()).hits} == {cn_node.cpid, sg_node.cpid}
        assert [r.cpid for r in (await rc.find(roots=["SG"])).hits] == [sg_node.cpid]
        assert [r.cpid for r in (await rc.find(roots="CN", kind="GPU")).hits] == [cn_node.cpid]
        got = await rc.discover(None, roots=("CN", "SG"))
        assert len(got["results"]) == 2
    # per-root figures on /metrics
    text = await (await client.get("/metrics")).text()
    for root in ("CN", "SG"):
        assert f'cpi_resolver_federation_records{{member="{root}",root="{root}"}} 1.0' in text
        assert f'cpi_resolver_federation_ready{{member="{root}",root="{root}"}} 1.0' in text
    capsys.readouterr()
    base = ["discover", "--resolver", url, "--insecure", "-o", "json"]
    assert await asyncio.to_thread(main, [*base, "--roots", "SG"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["cpid"] for r in out["results"]] == [sg_node.cpid]
    assert await asyncio.to_thread(main, [*base, "--roots", "CN,SG"]) == 0
    assert len(json.loads(capsys.readouterr().out)["results"]) == 2
    assert await asyncio.to_thread(main, [*base, "--roots", "CN,CN"]) != 0
