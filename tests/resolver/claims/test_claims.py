"""Claims against the real etcd: atomicity under contention, release, expiry, crashes,
etcd restarts, bad input, liveness and draining, queries, quotas (docs/claims.md)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from cpi.etcdproc import EtcdProcess
from registry.index import Index, Keys, Prefix
from resolver.claims import tokens as claim_tokens
from resolver.claims.http import CLAIMS, add_claim_routes
from resolver.claims.service import (
    Claim,
    ClaimService,
    ClaimsSettings,
    DrainingError,
    InsufficientCapacityError,
    NotLiveError,
    new_claim_id,
)
from resolver.core import DiscoveryResult, Resolver
from resolver.discovery import Query
from tests.registry.service_kit import dump
from tests.resolver.kit import Node, Pki, make_resolver, put_record, put_status
from tests.until import until

ROOT = Path(__file__).resolve().parents[3]
FAST_CLAIMS = ClaimsSettings(reconcile_delay_s=0.05, reconcile_interval_s=5.0)
UNKNOWN_CPID = "CN.31.CMCC/GPU.AAAAAAAAAAAA-A"

ClientFactory = Any


# -- helpers ------------------------------------------------------------------------------


async def units_at(index: Index, key: str) -> int:
    kv = await index.get(key)
    return 0 if kv is None else int(json.loads(kv.value)["units"])


async def claim_keys(index: Index, cpid: str | None = None) -> list[Claim]:
    kvs, _ = await index.get_prefix(Keys.claims(cpid) if cpid else Prefix.CLAIM)
    return [Claim.from_kv(kv) for kv in kvs]


async def live_node(
    index: Index,
    pki: Pki,
    resolver: Resolver,
    *,
    free: int = 10,
    count: int = 16,
    state: str = "up",
    **node: Any,
) -> Node:
    """A node with a signed record and status, once the resolver serves both."""
    n = Node(count=count, **node)
    await put_record(index, pki, n)
    await put_status(index, n, free=free, state=state)

    def seen() -> bool:
        e = resolver.get(n.cpid)
        return e is not None and e.status is not None and e.status.state == state

    await until(seen, what=f"the resolver to serve {n.cpid}")
    return n


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@dataclass
class Stack:
    client: TestClient[Any, Any]
    index: Index
    resolver: Resolver
    pki: Pki

    @property
    def service(self) -> ClaimService:
        return self.client.app[CLAIMS]

    async def token(self, holder: str = "alice", **kw: Any) -> str:
        return await claim_tokens.create_token(self.index, holder=holder, ttl_s=600, **kw)

    async def post(self, token: str | None, body: Any) -> tuple[int, dict[str, Any]]:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        headers = {"Content-Type": "application/json", **(bearer(token) if token else {})}
        async with self.client.post("/v1/claims", data=raw, headers=headers) as resp:
            return resp.status, await resp.json()


@pytest.fixture
async def stack(
    index: Index, pki: Pki, resolver: Resolver, aiohttp_client: ClientFactory
) -> AsyncIterator[Stack]:
    app = web.Application()
    add_claim_routes(app, resolver=resolver, settings=FAST_CLAIMS)
    client = await aiohttp_client(app)
    yield Stack(client, index, resolver, pki)


# -- atomicity -----------------------------------------------------------------------------


async def test_200_concurrent_claims_on_10_free_units(stack: Stack) -> None:
    node = await live_node(stack.index, stack.pki, stack.resolver, free=10)
    token = await stack.token()
    body = {"cpid": node.cpid, "units": 1, "ttl_s": 60}
    results = await asyncio.gather(*(stack.post(token, body) for _ in range(200)))
    created = [b for s, b in results if s == 201]
    refused = [b for s, b in results if s == 409]
    assert len(created) == 10 and len(refused) == 190, sorted({s for s, _ in results})
    assert {b["error"]["code"] for b in refused} == {"insufficient_capacity"}
    assert all(b["error"]["free"] == 0 and b["error"]["requested"] == 1 for b in refused)
    assert {c["cpid"] for c in created} == {node.cpid}
    assert all(set(c) == {"claim_id", "cpid", "units", "expires_at"} for c in created)
    assert await units_at(stack.index, Keys.alloc(node.cpid)) == 10
    assert await units_at(stack.index, Keys.holder("alice")) == 10
    assert len(await claim_keys(stack.index, node.cpid)) == 10

    # claims show up in the replica (and so in watches and discovery)
    await until(lambda: stack.resolver.resolve(node.cpid).claimed == 10, what="alloc in replica")
    assert stack.resolver.resolve(node.cpid).free == 0

    for c in created:
        async with stack.client.delete(f"/v1/claims/{c['claim_id']}", headers=bearer(token)) as r:
            assert r.status == 204, await r.text()
    assert await units_at(stack.index, Keys.alloc(node.cpid)) == 0
    assert await units_at(stack.index, Keys.holder("alice")) == 0
    assert await claim_keys(stack.index) == []
    async with stack.client.delete(
        f"/v1/claims/{created[0]['claim_id']}", headers=bearer(token)
    ) as r:
        assert r.status == 404 and (await r.json())["error"]["code"] == "claim_not_found"


async def test_a_status_change_between_read_and_write_fails_the_compare(stack: Stack) -> None:
    node = await live_node(stack.index, stack.pki, stack.resolver, free=10)
    claims = stack.service
    await claims.claim(node.cpid, units=1, holder="alice")  # the keys are now remembered
    retries = "cpi_resolver_claim_retries_total"
    before = claims.metrics.registry.get_sample_value(retries) or 0.0
    await put_status(stack.index, node, free=10, state="draining")  # the node starts draining
    with pytest.raises(DrainingError, match="draining"):
        await claims.claim(node.cpid, units=1, holder="alice")
    assert claims.metrics.registry.get_sample_value(retries) == before + 1
    assert await units_at(stack.index, Keys.alloc(node.cpid)) == 1


async def test_lease_expiry_returns_the_units(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "resolver.claims")
    node = await live_node(stack.index, stack.pki, stack.resolver, free=10)
    token = await stack.token("bob")
    status, body = await stack.post(token, {"cpid": node.cpid, "units": 3, "ttl_s": 2})
    assert status == 201 and body["expires_at"] - time.time() <= 3
    assert await units_at(stack.index, Keys.alloc(node.cpid)) == 3
    async with stack.client.get("/v1/claims", headers=bearer(token)) as r:
        listed = await r.json()
    assert listed["holder"] == "bob" and listed["units"] == 3
    assert [c["claim_id"] for c in listed["claims"]] == [body["claim_id"]]

    async def released() -> bool:
        return (
            await units_at(stack.index, Keys.alloc(node.cpid)) == 0
            and await units_at(stack.index, Keys.holder("bob")) == 0
        )

    await until(released, within=10, what="the reconciler to return expired units")
    assert await claim_keys(stack.index) == []
    assert "claims reconciler: /cpi/v1/alloc/" in caplog.text and "corrected" in caplog.text


async def test_reconciler_fixes_drift_only_where_there_is_some(
    index: Index, pki: Pki, resolver: Resolver
) -> None:
    node = await live_node(index, pki, resolver, free=10)
    claims = ClaimService(index=index, resolver=resolver)  # not started: no background passes
    await claims.claim(node.cpid, units=2, holder="carol")
    await index.put(Keys.alloc(node.cpid), '{"units":7}')  # drift
    await index.put(Keys.holder("carol"), "garbage")  # unreadable
    await index.put(Keys.alloc(UNKNOWN_CPID), "5")  # no claims at all
    report = await claims.reconcile()
    assert sorted(report.fixed) == sorted(
        [
            f"/cpi/v1/alloc/{UNKNOWN_CPID}: 5 -> 0",
            f"/cpi/v1/alloc/{node.cpid}: 7 -> 2",
            "/cpi/v1/holders/carol: unreadable -> 2",
        ]
    )
    assert report.claims == 1 and report.lost == 0
    assert (await claims.reconcile()).fixed == []
    # the claim path works on the corrected totals
    await claims.claim(node.cpid, units=8, holder="carol")
    assert await units_at(index, Keys.alloc(node.cpid)) == 10


# -- liveness and draining ------------------------------------------------------------------


async def test_draining_down_and_not_live_nodes_cannot_be_claimed(stack: Stack) -> None:
    claims = stack.service
    draining = await live_node(stack.index, stack.pki, stack.resolver, state="draining")
    down = await live_node(stack.index, stack.pki, stack.resolver, state="down")
    silent = Node(count=16)
    await put_record(stack.index, stack.pki, silent)
    await until(lambda: stack.resolver.get(silent.cpid) is not None, what="silent node")
    forged = Node(count=16)
    await put_record(stack.index, stack.pki, forged)
    other = Node(count=16)  # signs a status for the forged node's CPID with the wrong key
    await stack.index.put(Keys.live(forged.cpid), other.status(free=10, cpid=forged.cpid).to_json())
    await until(lambda: stack.resolver.get(forged.cpid) is not None, what="forged node")

    token = await stack.token()
    before = await dump(stack.index)
    with pytest.raises(DrainingError, match="'draining'"):
        await claims.claim(draining.cpid, units=1, holder="alice")
    with pytest.raises(NotLiveError, match="'down'"):
        await claims.claim(down.cpid, units=1, holder="alice")
    with pytest.raises(NotLiveError, match="no live status"):
        await claims.claim(silent.cpid, units=1, holder="alice")
    with pytest.raises(NotLiveError, match="does not verify"):
        await claims.claim(forged.cpid, units=1, holder="alice")
    status, body = await stack.post(token, {"cpid": draining.cpid, "units": 1})
    assert status == 409 and body["error"]["code"] == "draining"
    assert await dump(stack.index) == before

    await put_status(stack.index, draining, free=10)  # back up: claimable again
    claim = await claims.claim(draining.cpid, units=4, holder="alice")
    assert claim.units == 4


# -- queries and quotas ---------------------------------------------------------------------


async def test_query_claims_the_best_resource_that_holds_every_unit(stack: Stack) -> None:
    idx, pki, r = stack.index, stack.pki, stack.resolver
    small = await live_node(idx, pki, r, free=4, region="31")
    big = await live_node(idx, pki, r, free=16, region="31")
    far = await live_node(idx, pki, r, free=16, region="62", namespace="CN.32")
    other_model = await live_node(idx, pki, r, free=16, region="31", model="A800")
    token = await stack.token()
    query = {"kind": "GPU", "accelerator": "h100", "near": "31"}

    got = [await stack.post(token, {"query": query, "units": 8}) for _ in range(3)]
    assert [s for s, _ in got] == [201, 201, 201]
    assert [b["cpid"] for _, b in got] == [big.cpid, big.cpid, far.cpid]

    await until(lambda: r.resolve(far.cpid).claimed == 8, what="the replica to see far's claim")
    before = await dump(idx)
    status, body = await stack.post(token, {"query": query, "units": 9})  # no partial claims
    assert status == 409 and body["error"]["code"] == "insufficient_capacity"
    assert body["error"]["free"] == 0 and "no live resource" in body["error"]["message"]
    assert await dump(idx) == before

    status, body = await stack.post(token, {"query": {**query, "within": "CN.31"}, "units": 4})
    assert status == 201 and body["cpid"] == small.cpid
    assert await units_at(idx, Keys.alloc(other_model.cpid)) == 0


async def test_query_tries_the_next_candidate_when_one_is_refused(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    idx, pki, r = stack.index, stack.pki, stack.resolver
    first = await live_node(idx, pki, r, free=16, region="31")
    second = await live_node(idx, pki, r, free=8, region="62")
    await put_status(idx, first, free=16, state="draining")  # the replica may not know yet
    real = r.discover

    def stale(q: Query) -> DiscoveryResult:
        found = real(dataclass_replace(q, min_free=None, live=None))
        order = {first.cpid: 0, second.cpid: 1}
        results = sorted((m for m in found.results if m.cpid in order), key=lambda m: order[m.cpid])
        return DiscoveryResult(results, found.revision, False)

    monkeypatch.setattr(r, "discover", stale)
    claim = await stack.service.claim_query(Query(kind="GPU"), units=8, holder="alice")
    assert claim.cpid == second.cpid
    with pytest.raises(InsufficientCapacityError, match=r"none of the 2 resources.*draining"):
        await stack.service.claim_query(Query(kind="GPU"), units=1, holder="alice")


def dataclass_replace(q: Query, **changes: Any) -> Query:
    import dataclasses

    return dataclasses.replace(q, **changes)


async def test_quota_counts_units_held_over_all_resources(stack: Stack) -> None:
    a = await live_node(stack.index, stack.pki, stack.resolver, free=10)
    b = await live_node(stack.index, stack.pki, stack.resolver, free=10)
    token = await stack.token("dave", max_units=5)
    s1, c1 = await stack.post(token, {"cpid": a.cpid, "units": 3})
    assert s1 == 201
    before = await dump(stack.index)
    s2, e2 = await stack.post(token, {"cpid": b.cpid, "units": 3})
    assert s2 == 429 and e2["error"]["code"] == "quota_exceeded"
    assert e2["error"]["held"] == 3 and e2["error"]["max_units"] == 5
    assert "dave holds 3 units and may hold at most 5" in e2["error"]["message"]
    assert await dump(stack.index) == before
    s3, _ = await stack.post(token, {"cpid": b.cpid, "units": 2})
    assert s3 == 201
    async with stack.client.delete(f"/v1/claims/{c1['claim_id']}", headers=bearer(token)) as r:
        assert r.status == 204
    s4, _ = await stack.post(token, {"cpid": b.cpid, "units": 3})
    assert s4 == 201
    assert await units_at(stack.index, Keys.holder("dave")) == 5

    # concurrent claims of one holder (committed in batches) respect the quota together
    gina = await stack.token("gina", max_units=4)
    got = await asyncio.gather(*(stack.post(gina, {"cpid": a.cpid, "units": 1}) for _ in range(12)))
    assert sorted(s for s, _ in got) == [201] * 4 + [429] * 8
    assert await units_at(stack.index, Keys.holder("gina")) == 4
    assert await units_at(stack.index, Keys.alloc(a.cpid)) == 4


# -- bad input ------------------------------------------------------------------------------


async def test_bad_input_is_refused_and_changes_nothing(stack: Stack) -> None:
    node = await live_node(stack.index, stack.pki, stack.resolver, free=10)
    alice = await stack.token("alice")
    bob = await stack.token("bob")
    quota = await stack.token("erin", max_units=2)
    scoped = await stack.token("frank", within="CN.32")
    expired = await claim_tokens.create_token(
        stack.index, holder="gone", ttl_s=10, now=int(time.time()) - 100
    )
    s, bobs = await stack.post(bob, {"cpid": node.cpid, "units": 1})
    assert s == 201
    unknown_claim = new_claim_id(node.cpid)
    cpid = node.cpid
    bad_check = cpid[:-1] + ("R" if cpid.endswith("Q") else "Q")  # a wrong check character
    big = json.dumps({"cpid": cpid, "units": 1, "pad": "x" * 20_000}).encode()

    cases: list[tuple[str, str, str, str | None, Any, int, str]] = [
        ("zero units", "POST", "/v1/claims", alice, {"cpid": cpid, "units": 0}, 400, "invalid_claim"),
        ("negative units", "POST", "/v1/claims", alice, {"cpid": cpid, "units": -2}, 400, "invalid_claim"),
        ("units as text", "POST", "/v1/claims", alice, {"cpid": cpid, "units": "2"}, 400, "invalid_claim"),
        ("units as bool", "POST", "/v1/claims", alice, {"cpid": cpid, "units": True}, 400, "invalid_claim"),
        ("no units", "POST", "/v1/claims", alice, {"cpid": cpid}, 400, "invalid_claim"),
        ("ttl over bound", "POST", "/v1/claims", alice, {"cpid": cpid, "units": 1, "ttl_s": 86_401}, 400, "invalid_claim"),
        ("ttl zero", "POST", "/v1/claims", alice, {"cpid": cpid, "units": 1, "ttl_s": 0}, 400, "invalid_claim"),
        ("ttl as float", "POST", "/v1/claims", alice, {"cpid": cpid, "units": 1, "ttl_s": 1.5}, 400, "invalid_claim"),
        ("unknown cpid", "POST", "/v1/claims", alice, {"cpid": UNKNOWN_CPID, "units": 1}, 404, "not_found"),
        ("invalid cpid", "POST", "/v1/claims", alice, {"cpid": bad_check, "units": 1}, 400, "invalid_cpid"),
        ("cpid not text", "POST", "/v1/claims", alice, {"cpid": 7, "units": 1}, 400, "invalid_claim"),
        ("query kind", "POST", "/v1/claims", alice, {"query": {"kind": "GPX"}, "units": 1}, 400, "invalid_query"),
        ("query field", "POST", "/v1/claims", alice, {"query": {"colour": "red"}, "units": 1}, 400, "invalid_query"),
        ("query type", "POST", "/v1/claims", alice, {"query": {"min_free": "4"}, "units": 1}, 400, "invalid_query"),
        ("query latency", "POST", "/v1/claims", alice, {"query": {"max_latency_ms": 5}, "units": 1}, 400, "invalid_query"),
        ("query region", "POST", "/v1/claims", alice, {"query": {"near": "Shanghai"}, "units": 1}, 400, "invalid_query"),
        ("query label", "POST", "/v1/claims", alice, {"query": {"label": "tier"}, "units": 1}, 400, "invalid_query"),
        ("query text", "POST", "/v1/claims", alice, {"query": "kind=GPU", "units": 1}, 400, "invalid_query"),
        ("query live", "POST", "/v1/claims", alice, {"query": {"live": True}, "units": 1}, 400, "invalid_query"),
        ("unknown field", "POST", "/v1/claims", alice, {"cpid": cpid, "units": 1, "x": 1}, 400, "invalid_claim"),
        ("cpid and query", "POST", "/v1/claims", alice, {"cpid": cpid, "query": {}, "units": 1}, 400, "invalid_claim"),
        ("neither", "POST", "/v1/claims", alice, {"units": 1}, 400, "invalid_claim"),
        ("malformed JSON", "POST", "/v1/claims", alice, b'{"cpid": ', 400, "invalid_claim"),
        ("duplicate names", "POST", "/v1/claims", alice, b'{"units": 1, "units": 5}', 400, "invalid_claim"),
        ("not an object", "POST", "/v1/claims", alice, b"[1]", 400, "invalid_claim"),
        ("8000 nested arrays", "POST", "/v1/claims", alice, b"[" * 8000, 400, "invalid_claim"),
        ("nested in a field", "POST", "/v1/claims", alice, b'{"cpid": ' + b"[" * 8000, 400, "invalid_claim"),
        ("too large", "POST", "/v1/claims", alice, big, 413, "body_too_large"),
        ("capacity short", "POST", "/v1/claims", alice, {"cpid": cpid, "units": 10}, 409, "insufficient_capacity"),
        ("no token", "POST", "/v1/claims", None, {"cpid": cpid, "units": 1}, 401, "invalid_token"),
        ("unknown token", "POST", "/v1/claims", "cpi_ct_nope", {"cpid": cpid, "units": 1}, 401, "invalid_token"),
        ("expired token", "POST", "/v1/claims", expired, {"cpid": cpid, "units": 1}, 403, "token_expired"),
        ("outside scope", "POST", "/v1/claims", scoped, {"cpid": cpid, "units": 1}, 403, "token_scope"),
        ("query outside scope", "POST", "/v1/claims", scoped, {"query": {"within": "CN.31"}, "units": 1}, 403, "token_scope"),
        ("over quota", "POST", "/v1/claims", quota, {"cpid": cpid, "units": 3}, 429, "quota_exceeded"),
        ("another holder's claim", "DELETE", f"/v1/claims/{bobs['claim_id']}", alice, None, 403, "forbidden"),
        ("unknown claim", "DELETE", f"/v1/claims/{unknown_claim}", alice, None, 404, "claim_not_found"),
        ("malformed claim id", "DELETE", "/v1/claims/nonsense", alice, None, 400, "invalid_claim"),
        ("release without token", "DELETE", f"/v1/claims/{bobs['claim_id']}", None, None, 401, "invalid_token"),
        ("list another holder", "GET", "/v1/claims?holder=bob", alice, None, 403, "forbidden"),
        ("list with unknown parameter", "GET", "/v1/claims?cpid=x", alice, None, 400, "invalid_claim"),
    ]  # fmt: skip
    failures = []
    for name, method, path, token, body, want_status, want_code in cases:
        before = await dump(stack.index)
        headers = {"Content-Type": "application/json", **(bearer(token) if token else {})}
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        async with stack.client.request(method, path, data=data, headers=headers) as resp:
            got = await resp.json()
            status = resp.status
        err = got.get("error", {})
        if (status, err.get("code")) != (want_status, want_code) or not err.get("message"):
            failures.append(f"{name}: got {status} {got}, expected {want_status} {want_code}")
        if await dump(stack.index) != before:
            failures.append(f"{name}: the index changed")
        if status == 401 and "WWW-Authenticate" not in resp.headers:
            failures.append(f"{name}: 401 without WWW-Authenticate")
    assert not failures, "\n".join(failures)

    async with stack.client.post(
        "/v1/claims", json={"cpid": cpid, "units": 10}, headers=bearer(alice)
    ) as resp:
        err = (await resp.json())["error"]
    assert err["free"] == 9 and err["requested"] == 10 and err["cpid"] == cpid
    assert f"{cpid} has 9 units free (1 claimed), 10 requested" == err["message"]


# -- watches --------------------------------------------------------------------------------


async def test_claims_show_up_in_watches(stack: Stack) -> None:
    node = await live_node(stack.index, stack.pki, stack.resolver, free=10)
    events = stack.resolver.watch(Query(kind="GPU", min_free=8))
    first = await anext(events)
    assert first.type == "progress"
    claim = await stack.service.claim(node.cpid, units=3, holder="alice")
    async with asyncio.timeout(10):
        ev = await anext(events)
    # the entry no longer has 8 free units: it leaves the watch's result set
    assert ev.type == "delete" and ev.cpid == node.cpid and ev.reason == "query"
    await stack.service.release(claim.claim_id, holder="alice")
    async with asyncio.timeout(10):
        ev = await anext(events)
    assert ev.type == "put" and ev.entry is not None and ev.entry.claimed == 0
    await events.aclose()  # type: ignore[attr-defined]


# -- crashes and restarts -------------------------------------------------------------------


async def test_nothing_leaks_when_a_claims_server_is_killed_mid_burst(
    index: Index, pki: Pki, resolver: Resolver, anchor_file: Path, etcd_server: EtcdProcess
) -> None:
    node = await live_node(index, pki, resolver, free=10_000, count=10_000)
    token = await claim_tokens.create_token(index, holder="crashy", ttl_s=600)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.resolver.claims.claims_server",
        etcd_server.endpoint,
        str(anchor_file),
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        url = f"http://127.0.0.1:{int(line.split()[-1])}/v1/claims"
        ok: list[dict[str, Any]] = []
        async with aiohttp.ClientSession() as session:

            async def client() -> None:  # claims one after another until the server dies
                body = {"cpid": node.cpid, "units": 1, "ttl_s": 5}  # none expires before the checks
                while True:
                    async with session.post(url, json=body, headers=bearer(token)) as resp:
                        assert resp.status == 201, await resp.text()
                        ok.append(await resp.json())

            tasks = [asyncio.create_task(client()) for _ in range(16)]
            await until(lambda: len(ok) >= 30, what="the first claims")
            proc.send_signal(signal.SIGKILL)  # mid-burst: requests are in flight
            outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
    assert all(isinstance(o, aiohttp.ClientError) for o in outcomes), outcomes

    # transactions are atomic: right after the crash the total is the sum of the claims
    held = await claim_keys(index, node.cpid)
    alloc = await units_at(index, Keys.alloc(node.cpid))
    assert alloc == sum(c.units for c in held) >= len(ok) >= 30, (alloc, len(held), len(ok))
    assert await units_at(index, Keys.holder("crashy")) == alloc

    async def expired() -> bool:
        return await claim_keys(index) == []

    await until(expired, within=15, what="the claims' leases to expire")
    assert await units_at(index, Keys.alloc(node.cpid)) == alloc  # nobody reconciled yet

    async with ClaimService(index=index, resolver=resolver, settings=FAST_CLAIMS) as fresh:

        async def reconciled() -> bool:
            return (
                await units_at(index, Keys.alloc(node.cpid)) == 0
                and await units_at(index, Keys.holder("crashy")) == 0
            )

        await until(reconciled, within=10, what="a fresh instance to reconcile")
        claim = await fresh.claim(node.cpid, units=10_000, holder="crashy")  # all free again
        assert claim.units == 10_000


async def test_claims_survive_an_etcd_restart_and_expire_after_it(
    etcd_private: EtcdProcess, pki: Pki
) -> None:
    async with Index(endpoints=[etcd_private.endpoint], timeout=3.0) as index:
        await pki.publish(index)
        async with make_resolver(index, pki) as resolver:
            async with asyncio.timeout(10):
                await resolver.wait_ready()
            node = await live_node(index, pki, resolver, free=10)
            async with ClaimService(index=index, resolver=resolver, settings=FAST_CLAIMS) as claims:
                await claims.claim(node.cpid, units=4, ttl_s=3, holder="h")
                await asyncio.to_thread(etcd_private.restart)
                assert await units_at(index, Keys.alloc(node.cpid)) == 4
                assert len(await claim_keys(index)) == 1  # still held after the restart

                async def released() -> bool:
                    return (
                        await claim_keys(index) == []
                        and await units_at(index, Keys.alloc(node.cpid)) == 0
                        and await units_at(index, Keys.holder("h")) == 0
                    )

                await until(released, within=20, what="expiry and reconciliation after restart")
                again = await claims.claim(node.cpid, units=10, ttl_s=60, holder="h")
                assert again.units == 10
