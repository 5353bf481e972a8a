"""The registry's request ids, per-route HTTP metrics and log lines (text and JSON),
through aiohttp's test server against real etcd."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families

from cpi import logfmt
from cpi.etcdproc import EtcdProcess
from registry.index import Index
from registry.service import create_app
from tests.registry.service_kit import Node, World, bearer


@pytest.fixture
async def client(
    tmp_path: Path, index: Index, etcd_server: EtcdProcess, aiohttp_client: Any
) -> tuple[TestClient, World]:  # type: ignore[type-arg]
    world = World(tmp_path)
    await world.publish(index)
    c: TestClient = await aiohttp_client(create_app(world.config(etcd_server.endpoint)))  # type: ignore[type-arg]
    return c, world


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }


async def test_request_id_is_echoed_or_made(client: tuple[TestClient, World]) -> None:  # type: ignore[type-arg]
    c, _ = client
    resp = await c.get("/healthz", headers={"X-Request-Id": "abc.DEF_1-2"})
    assert resp.headers["X-Request-Id"] == "abc.DEF_1-2"
    made = (await c.get("/healthz")).headers["X-Request-Id"]
    assert len(made) == 16 and made != (await c.get("/healthz")).headers["X-Request-Id"]
    for bad in ("x" * 65, "has space", "semi;colon", ""):
        got = (await c.get("/healthz", headers={"X-Request-Id": bad})).headers["X-Request-Id"]
        assert got != bad and len(got) == 16
    assert (await c.get("/healthz", headers={"X-Request-Id": "y" * 64})).headers[
        "X-Request-Id"
    ] == "y" * 64
    # errors too: no route, wrong method, refused registration
    for resp in (
        await c.get("/no/such/path", headers={"X-Request-Id": "r1"}),
        await c.get("/v1/registrations", headers={"X-Request-Id": "r1"}),
        await c.post("/v1/registrations", data=b"{}", headers={"X-Request-Id": "r1"}),
    ):
        assert resp.status in (400, 401, 404, 405), resp.status
        assert resp.headers["X-Request-Id"] == "r1"


async def test_http_metrics_by_route_template(client: tuple[TestClient, World]) -> None:  # type: ignore[type-arg]
    c, _ = client
    await c.get("/healthz")
    await c.get("/healthz")
    await c.get("/no/such/path/1")
    await c.get("/no/such/path/2")
    node = Node()
    await c.put(f"/v1/resources/{node.cpid}/status", data=b"{}")
    await c.request("TRACE", "/healthz")
    text = await (await c.get("/metrics")).text()
    got = samples(text)

    def count(route: str, method: str, status: str) -> float:
        labels = {"service": "registry", "route": route, "method": method, "status": status}
        return got.get(("cpi_http_requests_total", tuple(sorted(labels.items()))), 0)

    assert count("/healthz", "GET", "200") == 2
    assert count("other", "GET", "404") == 2
    assert count("/v1/resources/{cpid}/status", "PUT", "400") == 1
    assert count("other", "other", "405") == 1  # no route matched: no template
    routes = {dict(k[1]).get("route") for k in got if k[0].startswith("cpi_http_")}
    assert node.cpid not in str(routes) and "/no/such/path/1" not in str(routes)
    bucket = ("cpi_http_request_duration_seconds_count",)
    hist = {
        dict(k[1])["route"]: v
        for k, v in got.items()
        if k[0] == bucket[0] and dict(k[1])["method"] == "GET"
    }
    assert hist["/healthz"] == 2 and hist["other"] == 2
    assert "process_resident_memory_bytes" in text or "python_info" in text
    assert "python_gc_objects_collected_total" in text


@pytest.fixture
def log_capture() -> Iterator[dict[str, io.StringIO]]:
    """Root-logger handlers in both formats, at DEBUG (the most that is ever logged)."""
    streams = {"text": io.StringIO(), "json": io.StringIO()}
    handlers = []
    for name, stream in streams.items():
        h = logging.StreamHandler(stream)
        h.setFormatter(logfmt.JsonFormatter() if name == "json" else logfmt.TextFormatter())
        handlers.append(h)
    root = logging.getLogger()
    old = root.level
    root.setLevel(logging.DEBUG)
    for h in handlers:
        root.addHandler(h)
    try:
        yield streams
    finally:
        for h in handlers:
            root.removeHandler(h)
        root.setLevel(old)


async def test_registration_logs_no_token_and_json_lines_carry_the_request(
    client: tuple[TestClient, World],  # type: ignore[type-arg]
    index: Index,
    log_capture: dict[str, io.StringIO],
) -> None:
    c, world = client
    token = await world.token(index, uses=5)
    node = Node()
    headers = {**bearer(token), "X-Request-Id": "reg-1"}
    resp = await c.post("/v1/registrations", data=node.register(), headers=headers)
    assert resp.status == 201, await resp.text()
    wrong = "Zz" + token[2:]  # a refused token is not logged either
    resp = await c.post("/v1/registrations", data=node.register(), headers=bearer(wrong))
    assert resp.status == 401
    admin = {"Authorization": "Bearer not-the-admin-token-xyz"}
    await c.post("/v1/admin/self-preservation", data=b'{"enabled": true}', headers=admin)
    for fmt, stream in log_capture.items():
        text = stream.getvalue()
        assert "reg-1" in text, fmt
        assert token not in text and wrong not in text, fmt
        assert token[4:20] not in text and "not-the-admin-token" not in text, fmt
    lines = [json.loads(line) for line in log_capture["json"].getvalue().splitlines()]
    assert all({"time", "level", "logger", "message"} <= set(line) for line in lines)
    mine = [
        line
        for line in lines
        if line.get("request_id") == "reg-1" and line["logger"] == "registry.service"
    ]
    assert mine, lines
    last = mine[-1]
    assert last["route"] == "/v1/registrations" and last["status"] == 201
    assert last["cpid"] == node.cpid and last["outcome"] == "created"
    # the registrar's own line, written during the request, carries its id too
    assert any(
        line.get("request_id") == "reg-1" and line["logger"] == "registry.registrar"
        for line in lines
    ), lines
    assert " request_id=reg-1 " in log_capture["text"].getvalue()


async def test_one_info_line_per_registration(
    client: tuple[TestClient, World],  # type: ignore[type-arg]
    index: Index,
    log_capture: dict[str, io.StringIO],
) -> None:
    """A registration writes one INFO line (the answer: route, status, outcome, cpid);
    the registrar's own line is DEBUG (bench/register.py: each line costs ~50 us)."""
    c, world = client
    token = await world.token(index, uses=5)
    node = Node()
    resp = await c.post(
        "/v1/registrations", data=node.register(), headers={**bearer(token), "X-Request-Id": "r-9"}
    )
    assert resp.status == 201, await resp.text()
    lines = [json.loads(line) for line in log_capture["json"].getvalue().splitlines()]
    # the registry's own lines (aiohttp's test server adds an access line of its own;
    # `cpi registry serve` runs without one, cpi/serving.py)
    mine = [
        line
        for line in lines
        if line.get("request_id") == "r-9" and line["logger"].startswith("registry.")
    ]
    info = [line for line in mine if line["level"] == "INFO"]
    assert len(info) == 1, mine
    assert info[0]["logger"] == "registry.service"
    assert info[0]["cpid"] == node.cpid and info[0]["outcome"] == "created"
    assert info[0]["status"] == 201
    debug = [line for line in mine if line["logger"] == "registry.registrar"]
    assert debug and all(line["level"] == "DEBUG" for line in debug), mine
    assert "version 1" in debug[0]["message"]
