"""The HTTP service against the real etcd, through aiohttp's test server."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from cpi.etcdproc import EtcdProcess
from registry.index import Index, Keys, Op
from resolver.http import RESOLVER, create_app
from schemas import chain, dsse, keys
from tests.resolver.kit import (
    SSE,
    Node,
    Pki,
    put_record,
    put_status,
    resolver_config,
    signed,
)
from tests.until import until

Client = TestClient  # type: ignore[type-arg]


@pytest.fixture
async def client(
    index: Index, pki: Pki, anchor_file: Path, etcd_server: EtcdProcess, aiohttp_client: Any
) -> AsyncIterator[Client]:
    await pki.publish(index)
    config = resolver_config(etcd_server.endpoint, anchor_file)
    c: Client = await aiohttp_client(create_app(config))

    async def ready() -> bool:
        return (await c.get("/readyz")).status == 200

    await until(ready, what="the resolver to be ready")
    yield c


async def get_json(client: Client, path: str, status: int = 200) -> Any:
    resp = await client.get(path)
    assert resp.status == status, await resp.text()
    assert resp.content_type == "application/json"
    return await resp.json()


async def test_resolve_serves_a_verifiable_bundle(index: Index, pki: Pki, client: Client) -> None:
    node = Node()
    await put_record(index, pki, node)

    async def served() -> bool:
        return (await client.get(f"/v1/resources/{node.cpid}")).status == 200

    await until(served, what="the record to be served")
    body = await get_json(client, f"/v1/resources/{node.cpid}")
    assert set(body) == {"record", "chain", "status", "live", "revision"}
    assert body["status"] is None and body["live"] is False
    # an auditor holding only the anchor can verify what was served
    result = chain.verify_record(
        dsse.Envelope.from_dict(body["record"]),
        [dsse.Envelope.from_dict(c) for c in body["chain"]],
        anchors=pki.anchors,
    )
    assert result.ok, result.reason
    # any case resolves to the same prepared bytes
    lower = await client.get(f"/v1/resources/{node.cpid.lower()}")
    assert await lower.read() == await (await client.get(f"/v1/resources/{node.cpid}")).read()

    rev = await put_status(index, node, free=3)

    async def live() -> bool:
        return (await get_json(client, f"/v1/resources/{node.cpid}"))["live"] is True

    await until(live, what="the status to be served")
    body = await get_json(client, f"/v1/resources/{node.cpid}")
    assert body["revision"] == rev
    assert dsse.Envelope.from_dict(body["status"]).keyid == keys.kid_of(node.key)


@pytest.mark.parametrize(
    ("path", "status", "code", "match"),
    [
        ("/v1/resources/CN.31.CMCC/GPU.4K7Q9M2XH3PT-Y", 400, "invalid_cpid", "expected 'Z'"),
        ("/v1/resources/not-a-cpid", 400, "invalid_cpid", "exactly one '/'"),
        ("/v1/resources/CN.31.CMCC/GPU.4K7Q9M2XH3PT-Z", 404, "not_found", "not in the index"),
        ("/v1/discover?kind=GPX", 400, "invalid_query", "expected one of"),
        ("/v1/discover?within=CN..3", 400, "invalid_query", "segment 2 is empty"),
        ("/v1/discover?min_free=many", 400, "invalid_query", "expected an integer"),
        ("/v1/discover?max_latency_ms=5", 400, "invalid_query", "needs near"),
        ("/v1/discover?limit=100000", 400, "invalid_query", "between 1 and 500"),
        ("/v1/discover?colour=red", 400, "invalid_query", "unknown query parameter"),
        ("/v1/discover?sort=cheap", 400, "invalid_query", "expected one of default, latency"),
        ("/v1/discover?sort=latency", 400, "invalid_query", "sort=latency needs near"),
        ("/v1/discover?weights=speed:2", 400, "invalid_query", "names from"),
        ("/v1/discover?weights=price:1e400", 400, "invalid_query", "between 0.001 and 100"),
        ("/v1/discover?sort=free&weights=price:1", 400, "invalid_query", "sort=score only"),
        ("/v1/watch?sort=price", 400, "invalid_query", "a watch has no order"),
        ("/v1/watch?since=abc", 400, "invalid_query", "event id"),
        ("/v1/nothing", 404, "not_found", "Not Found"),
    ],
)
async def test_errors_are_json(
    client: Client, path: str, status: int, code: str, match: str
) -> None:
    body = await get_json(client, path, status)
    assert body["error"]["code"] == code
    assert match in body["error"]["message"]


async def test_discover_over_http(index: Index, pki: Pki, client: Client) -> None:
    near = Node(region="31", model="H100")
    far = Node(region="62", model="h100")
    other = Node(region="31", model="A800")
    for n in (near, far, other):
        await put_record(index, pki, n)
        await put_status(index, n, free=8)
    await until(
        lambda: (
            client.app[RESOLVER].revision >= 0 and len(list(client.app[RESOLVER].entries())) == 3
        ),
        what="three entries",
    )
    await until(lambda: all(e.live for e in client.app[RESOLVER].entries()), what="live")
    body = await get_json(client, "/v1/discover?accelerator=H100&near=31&label=tier:gold")
    assert [r["cpid"] for r in body["results"]] == [near.cpid, far.cpid]
    first = body["results"][0]
    assert set(first) >= {"cpid", "score", "free", "latency_ms", "record"}
    assert first["free"] == 8 and first["latency_ms"] == 2.0
    assert first["record"]["location"]["region"] == "31"
    assert body["results"][1]["latency_ms"] > 20
    assert body["revision"] == client.app[RESOLVER].revision
    assert (await get_json(client, "/v1/discover?accelerator=H100&limit=1"))["results"][0][
        "cpid"
    ] in {near.cpid, far.cpid}
    # every answer names its order and scoring function; every result explains itself
    assert body["ranking"] == {
        "sort": "default",
        "function": "cpi-cats-v1",
        "weights": {"compute": 1.0, "communication": 1.0, "cost": 1.0, "energy": 1.0},
    }
    assert first["rank"]["sort"] == "default"
    assert first["rank"]["keys"][0] == {"name": "score", "value": first["score"], "order": "desc"}
    assert 0 <= first["rank"]["score"]["l2"] <= 10
    body = await get_json(client, "/v1/discover?near=31&sort=latency&limit=3")
    assert [r["latency_ms"] for r in body["results"]] == sorted(
        r["latency_ms"] for r in body["results"]
    )
    assert body["ranking"]["sort"] == "latency"
    body = await get_json(client, "/v1/discover?near=31&weights=latency:3,free:1")
    assert body["ranking"] == {
        "sort": "score",
        "function": "cpi-cats-v1",
        "weights": {"compute": 1.0, "communication": 3.0},
    }
    assert [r["rank"]["keys"][0]["name"] for r in body["results"]] == ["l2"] * 3


async def test_watch_streams_register_status_deregister_and_resumes_without_gap(
    index: Index, pki: Pki, client: Client
) -> None:
    a, b = Node(), Node(model="A800")
    resp = await client.get("/v1/watch?within=CN.31")
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "text/event-stream"
    stream = SSE(resp)
    start = await stream.next(skip_progress=False)
    assert start["event"] == "progress"
    start_rev = int(start["id"])

    r1 = await put_record(index, pki, a)
    ev = await stream.next()
    assert (ev["event"], ev["data"]["cpid"], ev["id"]) == ("put", a.cpid, str(r1))
    assert ev["data"]["live"] is False and ev["data"]["reason"] == "record"
    r2 = await put_status(index, a, free=2)
    ev = await stream.next()
    assert (ev["event"], ev["data"]["cpid"], ev["id"]) == ("put", a.cpid, str(r2))
    assert ev["data"]["live"] is True and ev["data"]["free"] == 2
    assert ev["data"]["reason"] == "status"
    assert r2 > r1 > start_rev
    resp.close()  # the client goes away ...

    # ... and misses these
    r3 = await put_record(index, pki, b)
    r4 = await put_status(index, a, free=1)
    r5 = (
        await index.txn(success=[Op.delete(Keys.rec(a.cpid)), Op.delete(Keys.live(a.cpid))])
    ).revision
    r6 = await put_record(index, pki, Node(namespace="CN.32"))  # outside the filter

    resp = await client.get(
        "/v1/watch?within=CN.31", headers={"Last-Event-ID": stream.last_id or ""}
    )
    stream = SSE(resp)
    got = [await stream.next() for _ in range(3)]
    assert [(e["event"], e["data"]["cpid"], e["id"]) for e in got] == [
        ("put", b.cpid, str(r3)),
        ("put", a.cpid, str(r4)),
        ("delete", a.cpid, str(r5)),
    ]
    assert got[2]["data"]["reason"] == "deleted"
    r7 = await put_record(index, pki, Node())
    ev = await stream.next()
    assert int(ev["id"]) == r7 > r6
    resp.close()


async def test_watch_from_a_forgotten_revision_says_relist(
    index: Index, pki: Pki, client: Client
) -> None:
    resp = await client.get("/v1/watch", headers={"Last-Event-ID": "1"})
    stream = SSE(resp)
    ev = await stream.next()
    assert ev["event"] == "relist"
    assert int(ev["id"]) == client.app[RESOLVER].revision
    node = Node()
    rev = await put_record(index, pki, node)
    ev = await stream.next()
    assert (ev["event"], ev["id"]) == ("put", str(rev))
    resp.close()


async def test_health_ready_and_metrics(index: Index, pki: Pki, client: Client) -> None:
    assert await get_json(client, "/healthz") == {"status": "ok"}
    ready = await get_json(client, "/readyz")
    assert ready["ready"] is True and ready["stale"] is False and ready["mass_expiry"] == []
    assert ready["statuses_pending"] == 0  # a small index: verified before ready
    node = Node()
    await put_record(index, pki, node)
    forged = Node()
    await index.put(Keys.rec(forged.cpid), signed(pki, forged.record(), "CN.32").to_json())
    await until(lambda: client.app[RESOLVER].get(node.cpid) is not None, what="served")
    await until(lambda: client.app[RESOLVER].health()["rejected"], what="a rejection")
    await get_json(client, f"/v1/resources/{node.cpid}")
    resp = await client.get("/metrics")
    assert resp.status == 200
    text = await resp.text()
    for line in (
        "cpi_resolver_records_served_total 1.0",
        'cpi_resolver_verification_failures_total{reason="outside_namespace"} 1.0',
        'cpi_resolver_rejected_records{reason="outside_namespace"} 1.0',
        'cpi_resolver_replica_size{what="served"} 1.0',
        "cpi_resolver_stale 0.0",
        "cpi_resolver_ready 1.0",
        "cpi_resolver_statuses_pending 0.0",
        "cpi_resolver_mass_expiry_active 0.0",
    ):
        assert line in text, line
    assert "cpi_resolver_watch_lag_revisions" in text
