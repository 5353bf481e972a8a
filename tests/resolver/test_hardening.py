"""The resolver under hostile clients: leaked watch slots, slow or half requests, too many
connections from one address, odd numbers in parameters, ids from the future.

Everything runs on loopback: the resolver is served by :class:`cpi.serving.Serving` (as
``cpi resolver serve`` does) and most clients are raw sockets, so that a test controls
exactly which bytes are sent and when a connection closes.  127.0.0.x (any x) reaches
the server from a distinct source address on Linux.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from cpi.etcdproc import EtcdProcess
from cpi.serving import ServerLimits, Serving
from registry.index import Index
from resolver.http import RESOLVER, create_app
from tests.resolver.kit import SSE, Node, Pki, put_record, resolver_config
from tests.until import until

Start = Callable[..., Awaitable[Serving]]


@pytest.fixture
async def start(
    index: Index, pki: Pki, anchor_file: Path, etcd_server: EtcdProcess
) -> AsyncIterator[Start]:
    """Serve a resolver (config changes as keyword arguments, ``limits=`` for the server)."""
    await pki.publish(index)
    servings: list[Serving] = []

    async def _start(limits: ServerLimits | None = None, **changes: Any) -> Serving:
        config = resolver_config(etcd_server.endpoint, anchor_file, **changes)
        serving = Serving(create_app(config), "127.0.0.1", 0, limits or ServerLimits.of(config))
        await serving.setup()
        await serving.start()
        servings.append(serving)
        async with asyncio.timeout(20):
            await serving.app[RESOLVER].wait_ready()
        return serving

    yield _start
    for s in servings:
        await s.close()


def _port(serving: Serving) -> int:
    return int(serving.addresses[0][1])


async def _connect(
    serving: Serving, source: str = "127.0.0.1"
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", _port(serving), local_addr=(source, 0))


async def _head(reader: asyncio.StreamReader, within: float = 10.0) -> tuple[int, bytes]:
    """The status of an answer and the rest of its head."""
    async with asyncio.timeout(within):
        head = await reader.readuntil(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), head


async def _answer(reader: asyncio.StreamReader, within: float = 10.0) -> tuple[int, Any]:
    """Status and JSON body of a whole (Content-Length) answer."""
    status, head = await _head(reader, within)
    length = 0
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    async with asyncio.timeout(within):
        body = await reader.readexactly(length)
    return status, json.loads(body) if body else None


def _get(path: str, *extra: str) -> bytes:
    lines = [f"GET {path} HTTP/1.1", "Host: resolver", *extra, "", ""]
    return "\r\n".join(lines).encode()


async def _open_watch(
    serving: Serving, source: str, path: str = "/v1/watch?accelerator=NOSUCH"
) -> tuple[int, Any, asyncio.StreamWriter]:
    reader, writer = await _connect(serving, source)
    writer.write(_get(path))
    status, head = await _head(reader)
    body = None
    if status != 200:
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        body = json.loads(await reader.readexactly(length))
    return status, body, writer


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close with a reset (SO_LINGER 0), as a crashed client or a dropped NAT entry does."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    writer.close()


# -- watch slots --------------------------------------------------------------------------


async def test_closed_watches_free_their_slots_within_seconds(start: Start) -> None:
    """1,024 watches matching nothing (the default max_watchers), from 16 addresses (64
    each, the default per address), all closed: every slot is free again within
    seconds, although no event matched them and the heartbeat is a minute away."""
    serving = await start(watch_heartbeat_s=60.0)
    streams_gauge = serving.app[RESOLVER].metrics.watchers
    sources = [f"127.0.0.{i}" for i in range(1, 17)]
    opened = await asyncio.gather(*(_open_watch(serving, s) for s in sources for _ in range(64)))
    assert [status for status, _, _ in opened] == [200] * 1024
    # over both limits now: one address (429), and the whole resolver (503)
    status, body, w = await _open_watch(serving, "127.0.0.1")
    assert status == 429 and body["error"]["code"] == "too_many_watches", body
    w.close()
    status, body, w = await _open_watch(serving, "127.0.0.99")
    assert status == 503 and body["error"]["code"] == "watch_capacity", body
    w.close()
    for i, (_, _, writer) in enumerate(opened):
        if i % 2:
            writer.close()  # an orderly close (FIN)
        else:
            _abort(writer)  # a reset
    closed_at = time.monotonic()
    await until(lambda: streams_gauge._value.get() == 0, within=5.0, what="every slot freed")
    freed_s = time.monotonic() - closed_at
    print(f"\n1,024 watches closed: all 1,024 slots free after {freed_s:.2f} s")
    status, _, w = await _open_watch(serving, "127.0.0.1")
    assert status == 200
    w.close()


async def test_a_silent_watch_gets_pings(start: Start) -> None:
    serving = await start(watch_heartbeat_s=60.0, watch_ping_s=0.3)
    reader, writer = await _connect(serving)
    writer.write(_get("/v1/watch?accelerator=NOSUCH"))
    status, _ = await _head(reader)
    assert status == 200
    seen = b""
    async with asyncio.timeout(5):
        while seen.count(b": ping\n\n") < 2:
            seen += await reader.read(1024)
    writer.close()


async def test_last_event_id_from_the_future_gets_a_relist(
    start: Start, index: Index, pki: Pki
) -> None:
    serving = await start()
    await put_record(index, pki, Node())
    current = serving.app[RESOLVER]._log.last
    ahead = f"{current[0] + 1_000_000}"
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{serving.url}/v1/watch", headers={"Last-Event-ID": ahead}) as resp,
    ):
        assert resp.status == 200
        event = await SSE(resp).next(within=5)
    assert event["event"] == "relist", event
    assert "ahead of this resolver" in event["data"]["reason"]
    assert int(event["id"].split(".")[0]) <= current[0] + 1


# -- slow and half requests, connections per address ---------------------------------------


async def test_half_a_header_is_closed_after_the_header_timeout(start: Start) -> None:
    serving = await start(limits=ServerLimits(header_timeout_s=1.0, keepalive_timeout_s=30))
    reader, writer = await _connect(serving)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: resolver\r\nX-Slow: ")
    t0 = time.monotonic()
    status, body = await _answer(reader, within=5)
    assert status == 408 and body["error"]["code"] == "request_timeout", body
    async with asyncio.timeout(3):
        assert await reader.read() == b""  # closed
    assert time.monotonic() - t0 < 3
    writer.close()


async def test_an_idle_connection_is_closed_after_the_keepalive_timeout(start: Start) -> None:
    serving = await start(limits=ServerLimits(header_timeout_s=5.0, keepalive_timeout_s=1.0))
    reader, writer = await _connect(serving)
    writer.write(_get("/healthz"))
    status, _ = await _answer(reader)
    assert status == 200
    writer.write(b"GET /healthz HTTP/1.1\r\n")  # the next request never completes
    async with asyncio.timeout(4):
        assert await reader.read() == b""
    writer.close()


async def test_connections_per_address_are_limited(start: Start) -> None:
    serving = await start(limits=ServerLimits(header_timeout_s=10.0, max_connections_per_address=4))
    idle = [await _connect(serving, "127.0.0.1") for _ in range(4)]
    await until(lambda: serving.connections == 4, what="4 connections counted")
    reader, writer = await _connect(serving, "127.0.0.1")
    writer.write(_get("/healthz"))
    status, body = await _answer(reader)
    assert status == 429 and body["error"]["code"] == "too_many_connections", body
    async with asyncio.timeout(3):
        assert await reader.read() == b""
    writer.close()
    reader, writer = await _connect(serving, "127.0.0.2")  # another address is served
    writer.write(_get("/healthz"))
    status, body = await _answer(reader)
    assert status == 200, body
    writer.close()
    for _, w in idle:
        w.close()
    await until(lambda: serving.connections == 0, what="connections released")
    reader, writer = await _connect(serving, "127.0.0.1")  # and the first one again
    writer.write(_get("/healthz"))
    status, _ = await _answer(reader)
    assert status == 200
    writer.close()


# -- numbers in parameters ----------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "/v1/log/entries?start=%C2%B2",  # superscript two: str.isdigit() says yes
        "/v1/log/entries?start=%D9%A3",  # Arabic-Indic three: int() says 3
        "/v1/log/proof/consistency?first=5_0",
        "/v1/log/proof/consistency?first=%2B5",
        "/v1/discover?limit=5_0",
        "/v1/discover?limit=%D9%A3",
        "/v1/discover?limit=%C2%B2",
        "/v1/discover?limit=+5",
        "/v1/discover?min_free=%EF%BC%91",  # fullwidth one
        "/v1/discover?near=31&max_latency_ms=1_0",
        "/v1/discover?near=31&max_latency_ms=inf",
        "/v1/discover?near=31&max_latency_ms=%D9%A3",
        "/v1/watch?since=%D9%A1%D9%A2",
        "/v1/watch?since=1_2",
    ],
)
async def test_numbers_are_ascii_digits_only(start: Start, path: str) -> None:
    serving = await start()
    async with aiohttp.ClientSession() as session, session.get(serving.url + path) as resp:
        body = await resp.json()
    assert resp.status == 400, body
    assert body["error"]["code"] == "invalid_query"
    assert "ASCII digits" in body["error"]["message"]


async def test_ascii_numbers_still_work(start: Start) -> None:
    serving = await start()
    async with aiohttp.ClientSession() as session:
        for path in ("/v1/discover?limit=5&min_free=1", "/v1/discover?near=31&max_latency_ms=12.5"):
            async with session.get(serving.url + path) as resp:
                assert resp.status == 200, await resp.text()


# -- claims bodies ----------------------------------------------------------------------------


async def test_claim_bodies_are_utf8_and_arrive_in_time(start: Start, index: Index) -> None:
    from resolver.claims import tokens as claim_tokens

    serving = await start(body_timeout_s=1.0)
    token = await claim_tokens.create_token(index, holder="hardening", ttl_s=600)
    doc = json.dumps({"cpid": Node().cpid, "units": 1})
    auth = {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession() as session:
        for data, why in (
            (doc.encode("utf-16"), "UTF-16"),
            (b"\xef\xbb\xbf" + doc.encode(), "BOM"),
        ):
            async with session.post(f"{serving.url}/v1/claims", data=data, headers=auth) as resp:
                body = await resp.json()
            assert resp.status == 400, body
            assert body["error"]["code"] == "invalid_claim"
            assert "must be UTF-8" in body["error"]["message"], (why, body)
    reader, writer = await _connect(serving)
    writer.write(
        b"POST /v1/claims HTTP/1.1\r\nHost: resolver\r\n"
        + f"Authorization: Bearer {token}\r\nContent-Length: {len(doc) + 50}\r\n\r\n".encode()
        + doc.encode()
    )
    status, body = await _answer(reader, within=5)
    assert status == 408 and body["error"]["code"] == "request_timeout", body
    async with asyncio.timeout(3):
        assert await reader.read() == b""
    writer.close()
