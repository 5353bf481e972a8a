"""A claim's query chooses the order its candidates are tried in (``sort``/``weights``,
as for discovery): "cheapest first" for a single claim and for a gang's parts."""

from __future__ import annotations

from typing import Any

from registry.index import Keys
from resolver.claims.client import query_to_json
from resolver.claims.http import parse_query, parse_query_roots
from resolver.discovery import Query
from tests.resolver.claims.test_claims import Stack, stack, units_at
from tests.resolver.kit import Node, put_record, put_status
from tests.until import until

__all__ = ["stack"]  # the fixture, imported for these tests


async def priced(stack: Stack, prices: list[float]) -> dict[float, str]:
    """One 8-card server in Shanghai per price; price -> CPID, once all are served."""
    out: dict[float, str] = {}
    for price in prices:
        node = Node(count=8, region="31")
        attributes = node.record().attributes.model_copy(update={"price_cny_per_unit_hour": price})
        await put_record(stack.index, stack.pki, node, attributes=attributes)
        await put_status(stack.index, node, free=8)
        out[price] = node.cpid

    def served() -> bool:
        entries = [stack.resolver.get(c) for c in out.values()]
        return all(e is not None and e.status is not None for e in entries)

    await until(served, what="every priced server")
    return out


async def test_a_gang_takes_the_cheapest_servers_first(stack: Stack) -> None:
    by_price = await priced(stack, [40.0, 10.0, 30.0, 20.0])
    token = await stack.token("trainer")
    body: dict[str, Any] = {
        "query": {"kind": "GPU", "within": "CN.31", "sort": "price"},
        "units": 16,
        "gang": {"per_resource": 8},
        "ttl_s": 60,
    }
    status, made = await stack.post(token, body)
    assert status == 201, made
    assert {p["cpid"] for p in made["parts"]} == {by_price[10.0], by_price[20.0]}
    for price, cpid in by_price.items():
        assert await units_at(stack.index, Keys.alloc(cpid)) == (8 if price < 25 else 0)


async def test_a_single_claim_by_query_takes_the_cheapest(stack: Stack) -> None:
    by_price = await priced(stack, [30.0, 12.0, 50.0])
    token = await stack.token("buyer")
    body = {"query": {"kind": "GPU", "sort": "price"}, "units": 2, "ttl_s": 60}
    status, made = await stack.post(token, body)
    assert status == 201, made
    assert made["cpid"] == by_price[12.0]


async def test_a_bad_order_is_refused_and_writes_nothing(stack: Stack) -> None:
    await priced(stack, [10.0])
    token = await stack.token("buyer")
    for query, says in [
        ({"sort": "cheapest"}, "expected one of"),
        ({"sort": 3}, "must be str"),
        ({"weights": "price:1e-9"}, "weights must be"),
        ({"sort": "latency"}, "needs near"),
    ]:
        status, answer = await stack.post(token, {"query": query, "units": 1, "ttl_s": 60})
        assert status == 400, answer
        assert says in answer["error"]["message"], answer
    assert await units_at(stack.index, Keys.holder("buyer")) == 0


def test_the_client_sends_the_order_the_server_parses() -> None:
    q = Query(kind="GPU", near="31", weights=(("cost", 2.0), ("communication", 1.0)))
    body = query_to_json(q)
    assert body["weights"] == "communication:1,cost:2" or body["weights"].count(":") == 2
    back = parse_query(body, default_limit=20)
    assert back.order == "score" and dict(back.weights) == dict(q.weights)
    assert parse_query(query_to_json(Query(sort="price")), default_limit=20).order == "price"
    assert "sort" not in query_to_json(Query()) and "weights" not in query_to_json(Query())


def test_the_client_sends_roots_the_server_routes_by() -> None:
    body = query_to_json(Query(kind="GPU"), ["SG", "CN"])
    assert body["roots"] == "SG,CN"
    assert parse_query_roots(body) == frozenset({"CN", "SG"})
    assert "roots" not in query_to_json(Query(kind="GPU"))
    assert parse_query_roots(query_to_json(Query(kind="GPU"))) is None
