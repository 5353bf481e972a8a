"""The resolver's request ids and per-route HTTP metrics, through aiohttp's test server
against real etcd: every route, the lookup's own path included."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families

from cpi.etcdproc import EtcdProcess
from registry.index import Index
from tests.resolver.kit import Node, Pki, put_record, ready_app_client, resolver_config
from tests.until import until

Client = TestClient  # type: ignore[type-arg]


@pytest.fixture
async def client(
    index: Index, pki: Pki, anchor_file: Path, etcd_server: EtcdProcess, aiohttp_client: Any
) -> AsyncIterator[Client]:
    await pki.publish(index)
    yield await ready_app_client(aiohttp_client, resolver_config(etcd_server.endpoint, anchor_file))


def requests_total(text: str) -> dict[tuple[str, str, str], float]:
    out: dict[tuple[str, str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "cpi_http_requests_total":
                assert s.labels["service"] == "resolver"
                out[(s.labels["route"], s.labels["method"], s.labels["status"])] = s.value
    return out


async def test_every_answer_carries_a_request_id(index: Index, pki: Pki, client: Client) -> None:
    node = Node()
    await put_record(index, pki, node)

    async def served() -> bool:
        return (await client.get(f"/v1/resources/{node.cpid}")).status == 200

    await until(served, what="the record to be served")
    paths = [
        (f"/v1/resources/{node.cpid}", 200),
        ("/v1/resources/CN.31.CMCC/GPU.XXXXXXXXXXXX-L", 404),
        ("/v1/resources/not-a-cpid", 400),
        ("/v1/discover?kind=GPU", 200),
        ("/v1/discover?limit=nope", 400),
        ("/v1/log/checkpoint", None),
        ("/v1/claims", 401),
        ("/healthz", 200),
        ("/readyz", 200),
        ("/openapi.json", 200),
        ("/ui/", 200),
        ("/no/such/path", 404),
    ]
    for path, status in paths:
        resp = await client.get(path, headers={"X-Request-Id": "rid-42"})
        if status is not None:
            assert resp.status == status, (path, await resp.text())
        assert resp.headers["X-Request-Id"] == "rid-42", path
        made = (await client.get(path)).headers["X-Request-Id"]
        assert len(made) == 16 and made != "rid-42", path
        bad = (await client.get(path, headers={"X-Request-Id": "a b"})).headers["X-Request-Id"]
        assert bad != "a b" and len(bad) == 16, path
    resp = await client.post("/healthz", headers={"X-Request-Id": "rid-405"})
    assert resp.status == 405 and resp.headers["X-Request-Id"] == "rid-405"
    resp = await client.get("/ui", headers={"X-Request-Id": "rid-301"}, allow_redirects=False)
    assert resp.status in (301, 302, 307, 308) and resp.headers["X-Request-Id"] == "rid-301"
    # the watch stream prepares its own answer
    async with client.get("/v1/watch", headers={"X-Request-Id": "rid-sse"}) as resp:
        assert resp.status == 200 and resp.headers["X-Request-Id"] == "rid-sse"


async def test_requests_counted_by_route_template(index: Index, pki: Pki, client: Client) -> None:
    node = Node()
    await put_record(index, pki, node)

    async def served() -> bool:
        return (await client.get(f"/v1/resources/{node.cpid}")).status == 200

    await until(served, what="the record to be served")
    before = requests_total(await (await client.get("/metrics")).text())
    for _ in range(3):
        await client.get(f"/v1/resources/{node.cpid}")
    await client.get("/v1/resources/CN.31.CMCC/GPU.XXXXXXXXXXXX-L")
    head = await client.head(f"/v1/resources/{node.cpid}", headers={"X-Request-Id": "h"})
    assert head.status == 200 and head.headers["X-Request-Id"] == "h"
    await client.get("/v1/discover?kind=GPU")
    await client.get("/no/such/1")
    await client.get("/no/such/2")
    await client.delete("/v1/claims/abc")
    async with client.get("/v1/watch") as resp:
        assert resp.status == 200
        resp.close()

    async def watch_ended() -> bool:  # counted when the handler returns (client gone)
        got = requests_total(await (await client.get("/metrics")).text())
        return sum(got.get(("/v1/watch", "GET", s), 0) for s in ("200", "499")) == 1

    await until(watch_ended, what="the watch to be counted")
    text = await (await client.get("/metrics")).text()
    after = requests_total(text)

    def delta(route: str, method: str, status: str) -> float:
        key = (route, method, status)
        return after.get(key, 0) - before.get(key, 0)

    assert delta("/v1/resources/{cpid}", "GET", "200") == 3
    assert delta("/v1/resources/{cpid}", "GET", "404") == 1
    assert delta("/v1/resources/{cpid}", "HEAD", "200") == 1  # once, not wrapped twice
    assert delta("/v1/discover", "GET", "200") == 1
    assert delta("other", "GET", "404") == 2
    assert delta("/v1/claims/{claim_id}", "DELETE", "401") == 1
    # 499: the handler was cancelled when the client went away (nginx's code)
    assert delta("/v1/watch", "GET", "200") + delta("/v1/watch", "GET", "499") == 1
    routes = {k[0] for k in after}
    assert not any(node.cpid in r or "/no/such" in r for r in routes), routes
    assert (
        'cpi_http_request_duration_seconds_count{method="GET",'
        'route="/v1/resources/{cpid}",service="resolver"}' in text
    )
    assert "process_cpu_seconds_total" in text or "python_info" in text
