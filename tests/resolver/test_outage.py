"""Stale serving while etcd is down, recovery, and re-listing after compaction."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from cpi.etcdproc import EtcdProcess
from registry.index import Index, Keys
from resolver.http import RESOLVER, create_app
from tests.resolver.kit import (
    Node,
    Pki,
    make_resolver,
    put_record,
    put_status,
    resolver_config,
)
from tests.until import until


@pytest.fixture
async def private_index(etcd_private: EtcdProcess) -> AsyncIterator[Index]:
    async with Index(endpoints=[etcd_private.endpoint], timeout=3.0) as idx:
        yield idx


async def test_serves_stale_answers_while_etcd_is_down_and_recovers(
    etcd_private: EtcdProcess,
    private_index: Index,
    pki: Pki,
    anchor_file: Path,
    aiohttp_client: Any,
) -> None:
    await pki.publish(private_index)
    node = Node()
    await put_record(private_index, pki, node)
    await put_status(private_index, node, free=6)
    client: TestClient = await aiohttp_client(  # type: ignore[type-arg]
        create_app(resolver_config(etcd_private.endpoint, anchor_file))
    )

    async def ready() -> bool:
        return (await client.get("/readyz")).status == 200

    await until(ready, what="ready")
    path = f"/v1/resources/{node.cpid}"
    fresh = await client.get(path)
    assert fresh.status == 200 and "X-CPI-Stale" not in fresh.headers
    assert "stale" not in await fresh.json()

    await asyncio.get_running_loop().run_in_executor(None, etcd_private.stop)
    resolver = client.app[RESOLVER]
    await until(lambda: resolver.stale, what="the resolver to notice")
    resp = await client.get(path)
    assert resp.status == 200 and resp.headers["X-CPI-Stale"] == "1"
    body = await resp.json()
    assert body["stale"] is True and body["live"] is True
    found = await client.get("/v1/discover?kind=GPU")
    assert found.headers["X-CPI-Stale"] == "1"
    assert [r["cpid"] for r in (await found.json())["results"]] == [node.cpid]
    not_ready = await client.get("/readyz")
    assert not_ready.status == 503
    report = await not_ready.json()
    assert report["stale"] is True and report["error"]["code"] == "not_ready"
    assert "etcd_error" in report
    assert "cpi_resolver_stale 1.0" in await (await client.get("/metrics")).text()

    await asyncio.get_running_loop().run_in_executor(None, etcd_private.restart)
    await until(ready, within=15, what="recovery")
    newer = Node()
    await put_record(private_index, pki, newer)
    await put_status(private_index, node, free=1)
    await until(lambda: resolver.get(newer.cpid) is not None, what="a write after recovery")
    await until(lambda: resolver.resolve(node.cpid).free == 1, what="a status after recovery")
    assert "stale" not in await (await client.get(path)).json()


class Proxy:
    """A TCP proxy to etcd that can cut every connection and refuse new ones."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.open = True
        self._conns: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        return f"127.0.0.1:{port}"

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.open:
            writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._conns |= {writer, up_writer}
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        self._conns -= {writer, up_writer}

    def cut(self) -> None:
        self.open = False
        for w in list(self._conns):
            w.close()

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()


async def test_relists_after_compaction_while_the_watch_was_cut_off(
    etcd_private: EtcdProcess, private_index: Index, pki: Pki
) -> None:
    await pki.publish(private_index)
    keep, gone, changed = Node(), Node(), Node()
    for n in (keep, gone, changed):
        await put_record(private_index, pki, n)
        await put_status(private_index, n, free=5)
    proxy = Proxy(etcd_private.client_port)
    endpoint = await proxy.start()
    try:
        via_proxy = Index(endpoints=[endpoint], timeout=2.0, watch_backoff_max=0.3)
        async with via_proxy, make_resolver(via_proxy, pki) as r:
            async with asyncio.timeout(10):
                await r.wait_ready()
            assert len(list(r.entries())) == 3
            events: list[Any] = []
            r.add_listener(events.append)

            proxy.cut()
            await until(lambda: r.stale, what="the resolver to lose etcd")
            added = Node()
            await put_record(private_index, pki, added)
            await private_index.delete(Keys.rec(gone.cpid))
            await private_index.delete(Keys.live(gone.cpid))
            await put_status(private_index, changed, free=1)
            last = await put_status(private_index, keep, free=5)
            await private_index.compact(last)

            proxy.open = True
            await until(lambda: r._replica.relists["compacted"] == 1, what="a re-list")
            await until(lambda: r.revision >= last and not r.stale, what="catching up")
            assert r.get(gone.cpid) is None
            assert r.get(added.cpid) is not None
            assert r.resolve(changed.cpid).free == 1
            assert sorted((e.type, e.cpid) for e in events) == sorted(
                [
                    ("put", added.cpid),
                    ("delete", gone.cpid),
                    ("put", changed.cpid),
                    ("put", keep.cpid),
                ]
            )
            assert {e.revision for e in events} == {events[0].revision} and events[
                0
            ].revision >= last
            # and the watch runs again from there
            later = Node()
            await put_record(private_index, pki, later)
            await until(lambda: r.get(later.cpid) is not None, what="a write after the re-list")
    finally:
        await proxy.close()
