"""The transparency-log routes of a federated resolver serve each root's own log
(``/v1/log/...?root=SG``), read from that root's index; without ``root=``, the home
root's (resolver/audit/log.py, resolver/http.py)."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient

from cpi.main import main
from registry.index import Index
from registry.logsigner import LogSigner, init_log_key, vkey_path_for
from resolver.federation import Federation
from resolver.http import create_app
from schemas.checkpoint import open_checkpoint
from tests.resolver.audit.audit_kit import Kit
from tests.resolver.kit import resolver_config
from tests.resolver.test_federation import fed, sg, sg_index

__all__ = ["fed", "sg", "sg_index"]  # the fixtures, imported for these tests

Client = TestClient[Any, Any]


async def signed_log(index: Index, kit: Kit, tmp_path: Path, origin: str, n: int) -> LogSigner:
    for _ in range(n):
        cpid, env, _ = kit.record()
        await kit.register(index, cpid, env)
    key, _, _ = init_log_key(tmp_path / f"{origin.split('.')[0]}.key", origin=origin)
    signer = LogSigner(index, key, origin=origin)
    await signer.load()
    assert await signer.sign() is not None
    return signer


async def test_each_roots_log_is_served_from_its_own_index(
    fed: Federation,
    index: Index,
    sg_index: Index,
    aiohttp_client: Any,
    anchor_file: Path,
    tmp_path: Path,
) -> None:
    kit = Kit(tmp_path)
    cn = await signed_log(index, kit, tmp_path, "cn.test/log", 3)
    sg_signer = await signed_log(sg_index, kit, tmp_path, "sg.test/log", 2)
    config = resolver_config("127.0.0.1:1", anchor_file)
    client: Client = await aiohttp_client(create_app(config, resolver=fed))

    async def checkpoint(query: str) -> tuple[int, str]:
        resp = await client.get(f"/v1/log/checkpoint{query}")
        text = await resp.text()
        assert resp.status == 200, text
        return resp.status, text

    _, home = await checkpoint("")
    assert open_checkpoint(home.encode(), cn.verifier, origin="cn.test/log").size == 3
    assert (await checkpoint("?root=CN"))[1] == home
    _, sg_text = await checkpoint("?root=sg")
    cp = open_checkpoint(sg_text.encode(), sg_signer.verifier, origin="sg.test/log")
    assert cp.size == 2
    resp = await client.get("/v1/log/entries?start=0&root=SG")
    entries = (await resp.json())["entries"]
    assert resp.status == 200 and len(entries) == 2
    kvs, _ = await sg_index.get_prefix("/cpi/v1/audit/")
    assert [base64.b64decode(e["leaf"]) for e in entries] == [kv.value for kv in kvs]
    resp = await client.get("/v1/log/proof/consistency?first=1&root=SG")
    assert resp.status == 200 and (await resp.json())["second"] == 2
    for bad, status in (("root=JP", 404), ("root=S-G", 400), ("root=", 400)):
        resp = await client.get(f"/v1/log/checkpoint?{bad}")
        assert resp.status == status, (bad, await resp.text())

    # the auditor follows SG's log with --root SG (and SG's log key)
    state = tmp_path / "sg.state"
    argv = [
        "audit", "log", "--resolver", str(client.make_url("")).rstrip("/"), "--root", "SG",
        "--anchor", str(anchor_file), "--log-key", str(vkey_path_for(tmp_path / "sg.key")),
        "--state", str(state), "--insecure",
    ]  # fmt: skip
    assert await asyncio.to_thread(main, argv) == 0
    assert state.read_text() == sg_text
    argv[argv.index("SG")] = "CN"  # CN's log does not verify under SG's key
    assert await asyncio.to_thread(main, argv) != 0
