"""The lookup's fast path (``GET``/``HEAD /v1/resources/{cpid}``): its prefix match
answers exactly as aiohttp's pattern route of the same template would, and what it sends
is byte for byte what the route promises (found, stale, not found, bad CPID, HEAD,
request ids, counts per status, 405), through aiohttp's test server against real etcd."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, make_mocked_request
from prometheus_client.parser import text_string_to_metric_families

from cpi.etcdproc import EtcdProcess
from registry.index import Index
from resolver.core import Resolver
from resolver.http import RESOLVER, _LookupResource
from tests.resolver.kit import Node, Pki, put_record, ready_app_client, resolver_config
from tests.until import until

Client = TestClient

TEMPLATE = "/v1/resources/{cpid:(?s:.+)}"
ROUTE = "/v1/resources/{cpid}"


async def _noop(request: web.Request) -> web.Response:
    return web.Response()


def _routers() -> tuple[web.UrlDispatcher, web.UrlDispatcher]:
    """(aiohttp's pattern route, the fast path), each with GET and HEAD."""
    slow = web.UrlDispatcher()
    slow.add_get(TEMPLATE, _noop, name="resource")
    fast = web.UrlDispatcher()
    lookup = _LookupResource(name="resource")
    fast.register_resource(lookup)
    lookup.add_route("HEAD", _noop)
    lookup.add_route("GET", _noop)
    return slow, fast


@pytest.mark.parametrize(
    "path",
    [
        "/v1/resources/CN.31.CMCC/GPU.4K7Q9M2XH3PT-Z",
        "/v1/resources/cn.31.cmcc/gpu.4k7q9m2xh3pt-z",
        "/v1/resources/CN.31.CMCC%2FGPU.4K7Q9M2XH3PT-Z",  # an escaped "/" in the CPID
        "/v1/resources/CN.31.CMCC%252FGPU",  # an escaped "%"
        "/v1/resources/a%0Ab",  # a newline
        "/v1/resources/%0A",
        "/v1/resources/caf%C3%A9",
        "/v1/resources/%FF%FE",  # not UTF-8
        "/v1/resources/x",
        "/v1/resources//x",
        "/v1/resources/a/b/c/",
        "/v1/resources/ ",
        "/v1/resources/",  # no CPID: no match
        "/v1/resources",
        "/v1/resources%2Fx",  # the route's own "/" escaped: not this route
        "/v1/resource%73/x",  # an escaped letter of the prefix: decoded, so this route
        "/v1/resourcesx/y",
        "/V1/resources/x",
        "/v1/discover",
        "/",
    ],
)
@pytest.mark.parametrize("method", ["GET", "HEAD", "POST", "DELETE"])
async def test_the_prefix_match_is_the_pattern_match(path: str, method: str) -> None:
    slow, fast = _routers()
    request = make_mocked_request(method, path)
    want = await slow.resolve(request)
    got = await fast.resolve(request)
    assert type(got) is type(want)
    assert dict(got) == dict(want)
    if want.http_exception is None:
        assert got.http_exception is None
        assert got.route.method == want.route.method == method
    else:  # no match: the same error (404, or 405 with the same Allow)
        assert got.http_exception is not None
        assert got.http_exception.status == want.http_exception.status
        assert sorted(got.http_exception.headers.items()) == sorted(
            want.http_exception.headers.items()
        )


def test_the_fast_route_keeps_the_template() -> None:
    """What the OpenAPI generator, the route labels and ``url_for`` read is unchanged."""
    slow, fast = _routers()
    want, got = slow["resource"], fast["resource"]
    assert got.canonical == want.canonical == ROUTE
    assert isinstance(got, web.DynamicResource)
    assert str(got.url_for(cpid="CN.31/GPU.X")) == str(want.url_for(cpid="CN.31/GPU.X"))
    assert sorted(r.method for r in got) == sorted(r.method for r in want) == ["GET", "HEAD"]


# -- on the wire, against real etcd ------------------------------------------------------


@pytest.fixture
async def client(
    index: Index, pki: Pki, anchor_file: Path, etcd_server: EtcdProcess, aiohttp_client: Any
) -> AsyncIterator[Client]:
    await pki.publish(index)
    yield await ready_app_client(aiohttp_client, resolver_config(etcd_server.endpoint, anchor_file))


def _headers(resp: Any) -> list[tuple[str, str]]:
    """The answer's headers in order, names in lower case (the client spells some of them
    its own way), without the two that change with the clock and the version."""
    return [(k.lower(), v) for k, v in resp.headers.items() if k not in ("Date", "Server")]


_ID = re.compile(r"[0-9a-f]{16}")


def _error(code: str, message: str) -> bytes:
    return json.dumps({"error": {"code": code, "message": message}}).encode()


async def _served(client: Client, index: Index, pki: Pki) -> Node:
    node = Node()
    await put_record(index, pki, node)
    await until(lambda: client.app[RESOLVER].get(node.cpid) is not None, what="served")
    return node


async def test_found_and_head_send_the_rendered_body_and_these_headers(
    index: Index, pki: Pki, client: Client
) -> None:
    node = await _served(client, index, pki)
    body = client.app[RESOLVER].resolve(node.cpid).body()
    path = f"/v1/resources/{node.cpid}"
    for method in ("GET", "HEAD"):
        resp = await client.request(method, path, headers={"X-Request-Id": "trace-1.a_B"})
        assert resp.status == 200
        assert _headers(resp) == [
            ("content-type", "application/json"),
            ("x-request-id", "trace-1.a_B"),
            ("content-length", str(len(body))),
        ]
        assert await resp.read() == (body if method == "GET" else b"")
    # no id, or one that is not ours to echo: a new one, 16 hex digits, each different
    ids = set()
    for given in ({}, {"X-Request-Id": "bad id;"}, {"X-Request-Id": "x" * 65}):
        resp = await client.get(path, headers=given)
        assert await resp.read() == body
        assert _ID.fullmatch(resp.headers["X-Request-Id"])
        ids.add(resp.headers["X-Request-Id"])
    assert len(ids) == 3
    # another spelling of the CPID: the same bytes
    assert await (await client.get(path.lower())).read() == body


async def test_stale_answers_carry_the_flag_in_header_and_body(
    index: Index, pki: Pki, client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = await _served(client, index, pki)
    entry = client.app[RESOLVER].resolve(node.cpid)
    monkeypatch.setattr(Resolver, "stale", property(lambda self: True))
    for method in ("GET", "HEAD"):
        resp = await client.request(
            method, f"/v1/resources/{node.cpid}", headers={"X-Request-Id": "s"}
        )
        assert resp.status == 200
        stale = entry.body(stale=True)
        assert _headers(resp) == [
            ("content-type", "application/json"),
            ("x-cpi-stale", "1"),
            ("x-request-id", "s"),
            ("content-length", str(len(stale))),
        ]
        assert await resp.read() == (stale if method == "GET" else b"")
    assert json.loads(stale)["stale"] is True


@pytest.mark.parametrize(
    ("cpid", "status", "body"),
    [
        (
            "CN.31.CMCC/GPU.4K7Q9M2XH3PT-Z",
            404,
            _error("not_found", "CN.31.CMCC/GPU.4K7Q9M2XH3PT-Z is not in the index"),
        ),
        (
            "cn.31.cmcc/gpu.4k7q9m2xh3pt-z",
            404,
            _error("not_found", "CN.31.CMCC/GPU.4K7Q9M2XH3PT-Z is not in the index"),
        ),
        (
            "not-a-cpid",
            400,
            _error(
                "invalid_cpid",
                "invalid CPID 'not-a-cpid': must contain exactly one '/' between prefix and suffix",
            ),
        ),
    ],
)
async def test_errors_send_json_with_the_request_id(
    client: Client, cpid: str, status: int, body: bytes
) -> None:
    for method in ("GET", "HEAD"):
        resp = await client.request(method, f"/v1/resources/{cpid}", headers={"X-Request-Id": "e"})
        assert resp.status == status
        assert _headers(resp) == [
            ("content-type", "application/json"),
            ("x-request-id", "e"),
            ("content-length", str(len(body))),
        ]
        assert await resp.read() == (body if method == "GET" else b"")


async def test_other_methods_are_405_with_allow(client: Client) -> None:
    resp = await client.post("/v1/resources/CN.31.CMCC/GPU.4K7Q9M2XH3PT-Z")
    assert resp.status == 405
    assert set(resp.headers["Allow"].split(",")) == {"GET", "HEAD"}
    assert (await resp.json())["error"]["code"] == "method_not_allowed"
    assert _ID.fullmatch(resp.headers["X-Request-Id"])


async def test_counts_per_method_and_status(index: Index, pki: Pki, client: Client) -> None:
    node = await _served(client, index, pki)
    before = await _counts(client)
    for path, times in (
        (f"/v1/resources/{node.cpid}", 3),
        ("/v1/resources/CN.31.CMCC/GPU.4K7Q9M2XH3PT-Z", 2),
        ("/v1/resources/nope", 1),
    ):
        for _ in range(times):
            await (await client.get(path)).read()
        await (await client.head(path)).read()
    after = await _counts(client)
    grew = {k: after[k] - before.get(k, 0.0) for k in after if after[k] != before.get(k, 0.0)}
    assert grew == {
        (ROUTE, "GET", "200"): 3,
        (ROUTE, "GET", "404"): 2,
        (ROUTE, "GET", "400"): 1,
        (ROUTE, "HEAD", "200"): 1,
        (ROUTE, "HEAD", "404"): 1,
        (ROUTE, "HEAD", "400"): 1,
    }


async def _counts(client: Client) -> dict[tuple[str, str, str], float]:
    text = await (await client.get("/metrics")).text()
    out: dict[tuple[str, str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "cpi_http_requests_total" and s.labels["route"] == ROUTE:
                out[(s.labels["route"], s.labels["method"], s.labels["status"])] = s.value
    return out
