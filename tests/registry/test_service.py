"""The registry service through aiohttp's real test server on localhost, against real etcd."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from cpi.etcdproc import EtcdProcess
from registry import changes
from registry.index import Index, Keys, Prefix
from registry.service import STATE, RegistryState, create_app
from registry.tokens import TokenInfo, hash_token
from schemas import dsse, keys
from schemas.chain import TrustAnchors, verify_record
from schemas.models import Attributes, Location, Record, Status, parse_payload
from tests.registry.service_kit import ADMIN_TOKEN, Node, World, bearer, dump, sign_raw
from tests.until import until

Start = Callable[..., Awaitable[TestClient]]  # type: ignore[type-arg]


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path)


@pytest.fixture
async def start(index: Index, world: World, etcd_server: EtcdProcess, aiohttp_client: Any) -> Start:
    """Start a registry app (config changes as keyword arguments) and return its client."""
    await world.publish(index)

    async def _start(**changes: Any) -> TestClient:  # type: ignore[type-arg]
        client: TestClient = await aiohttp_client(  # type: ignore[type-arg]
            create_app(world.config(etcd_server.endpoint, **changes))
        )
        return client

    return _start


def state(client: TestClient) -> RegistryState:  # type: ignore[type-arg]
    return client.server.app[STATE]


async def register(
    client: TestClient,  # type: ignore[type-arg]
    node: Node,
    token: str,
    **changes: Any,
) -> tuple[int, dict[str, Any]]:
    resp = await client.post(
        "/v1/registrations", data=node.register(**changes), headers=bearer(token)
    )
    return resp.status, await resp.json()


def record_of(body: dict[str, Any]) -> Record:
    env = dsse.Envelope.from_dict(body["record"])
    return parse_payload(env.payload_type, env.payload, Record)


# -- registration -----------------------------------------------------------------------


async def test_full_registration_verifies_from_the_anchor(
    start: Start, index: Index, world: World
) -> None:
    client = await start()
    token = await world.token(index, uses=5)
    node = Node()
    status, body = await register(client, node, token)
    assert status == 201, body
    assert set(body) == {"cpid", "record", "chain", "heartbeat_s"}
    assert body["cpid"] == node.cpid
    assert body["heartbeat_s"] == 10

    env = dsse.Envelope.from_dict(body["record"])
    chain = [dsse.Envelope.from_dict(c) for c in body["chain"]]
    result = verify_record(env, chain, anchors=TrustAnchors([world.anchor]))
    assert result.ok, result.reason
    rec = result.record
    assert rec is not None
    assert (rec.cpid, rec.issuer, rec.version, rec.public_key) == (
        node.cpid,
        "CN.31.CMCC",
        1,
        node.public_key,
    )
    assert env.keyid == keys.kid_of(world.cmcc)  # the most specific namespace signs
    assert len(chain) == 2

    kv = await index.get(Keys.rec(node.cpid))
    assert kv is not None and kv.value == env.to_json()
    tok = await index.get(Keys.token(hash_token(token)))
    assert tok is not None and TokenInfo.from_json(tok.value).uses_left == 4
    entries = await changes.read_entries(index)
    assert [(e.seq, e.op, e.cpid) for e in entries] == [(1, "register", node.cpid)]
    assert entries[0].digest == changes.digest(env)


async def test_price_and_site_energy_figures_are_carried_into_the_record(
    start: Start, index: Index, world: World
) -> None:
    """register.v1 -> record.v1 keeps the operator's price, PUE and grid intensity
    (docs/protocol.md §4); figures out of bounds are refused and change nothing."""
    client = await start()
    token = await world.token(index, uses=5)
    node = Node()
    loc = Location(region="31", site="LG01", pue=1.25, grid_gco2_per_kwh=560.0)
    attrs = Attributes(price_cny_per_unit_hour=18.5)
    status, body = await register(client, node, token, location=loc, attributes=attrs)
    assert status == 201, body
    rec = record_of(body)
    assert rec.location == loc and rec.attributes.price_cny_per_unit_hour == 18.5
    bad = Node()
    payload = bad.register_doc().model_dump(mode="json", exclude_none=True)
    payload["location"]["pue"] = 0.5
    resp = await client.post(
        "/v1/registrations", data=sign_raw(payload, "register.v1", bad.key), headers=bearer(token)
    )
    assert resp.status == 400 and "pue" in (await resp.json())["error"]["message"]
    assert await index.get(Keys.rec(bad.cpid)) is None


async def test_registration_answer_is_assembled_from_the_stored_record(
    start: Start, index: Index, world: World
) -> None:
    # the answer is assembled from parts (the chain's serialised once per chain, the
    # record's JSON the very bytes written to etcd): valid JSON with the fields in order,
    # for every answer, also a re-registration that changes nothing (200)
    client = await start()
    token = await world.token(index, uses=5)
    first = Node()
    for node, status in ((first, 201), (Node(), 201), (first, 200)):
        resp = await client.post("/v1/registrations", data=node.register(), headers=bearer(token))
        assert resp.status == status, await resp.text()
        assert resp.content_type == "application/json" and resp.charset == "utf-8"
        raw = await resp.read()
        body = json.loads(raw)
        assert list(body) == ["cpid", "record", "chain", "heartbeat_s"]
        assert body["cpid"] == node.cpid and len(body["chain"]) == 2
        assert body["heartbeat_s"] == 10.0
        stored = await index.get(Keys.rec(node.cpid))
        assert stored is not None and b'"record": ' + stored.value + b', "chain": ' in raw
        assert dsse.Envelope.from_json(stored.value).to_dict() == body["record"]
        assert all(set(c) == {"payloadType", "payload", "signatures"} for c in body["chain"])


async def test_a_parent_namespace_does_not_sign_below_itself(
    start: Start, index: Index, world: World
) -> None:
    """docs/verification.md: a record is signed by its own namespace's key.  The registry
    holds CN.31 and CN.31.CMCC; a node in CN.31.CUCC is refused, not signed by CN.31."""
    client = await start()
    token = await world.token(index, namespace="CN.31")
    node = Node(namespace="CN.31.CUCC", kind="CPU")
    status, body = await register(client, node, token)
    assert status == 403, body
    assert body["error"]["code"] == "outside_namespace"
    assert "CN.31.CUCC is outside this registry's certified namespaces" in body["error"]["message"]


async def test_reregistration_is_idempotent_and_versions_changes(
    start: Start, index: Index, world: World
) -> None:
    client = await start()
    token = await world.token(index, uses=1)
    node = Node()
    status, first = await register(client, node, token)
    assert status == 201
    before = await dump(index)

    # same key, nothing changed: 200, same CPID and record, no token use consumed
    status, again = await register(client, node, token)
    assert status == 200, again
    assert again["cpid"] == first["cpid"]
    assert again["record"] == first["record"]
    assert record_of(again).version == 1
    after = await dump(index)
    changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    assert all(k.startswith(Prefix.NONCE) for k in changed), changed  # only the nonce

    # changed labels: 200, version 2, audited as an update
    status, updated = await register(client, node, token, labels={"tier": "gold"})
    assert status == 200, updated
    rec = record_of(updated)
    assert (rec.cpid, rec.version, rec.labels) == (node.cpid, 2, {"tier": "gold"})
    assert [e.op for e in await changes.read_entries(index)] == ["register", "update"]
    assert state(client).registrar.metrics.registrations.labels("unchanged")._value.get() == 1


async def test_registry_restart_keeps_records(start: Start, index: Index, world: World) -> None:
    client = await start()
    token = await world.token(index)
    node = Node()
    status, first = await register(client, node, token)
    assert status == 201
    await client.close()

    client2 = await start()
    status, again = await register(client2, node, token)
    assert status == 200, again
    assert again["cpid"] == first["cpid"] == node.cpid
    assert record_of(again).version == 1


async def test_last_token_use_goes_to_exactly_one_of_two_racing_nodes(
    start: Start, index: Index, world: World
) -> None:
    client = await start()
    token = await world.token(index, uses=1)
    results = await asyncio.gather(*(register(client, Node(), token) for _ in range(2)))
    assert sorted(s for s, _ in results) == [201, 403]
    refused = next(b for s, b in results if s == 403)
    assert refused["error"]["code"] == "token_used_up"
    recs, _ = await index.get_prefix(Prefix.REC)
    assert len(recs) == 1


# -- refusals: precise 4xx and the index unchanged -----------------------------------------


async def _refusal_case(
    case: str, index: Index, world: World, client: TestClient
) -> tuple[bytes, dict[str, str]]:  # type: ignore[type-arg]
    """Prepare the index for ``case`` and return the request body and headers."""
    node = Node()
    if case == "missing token":
        return node.register(), {}
    if case == "unknown token":
        return node.register(), bearer("cpi_jt_never-issued")
    if case == "expired token":
        tok = await world.token(index, ttl_s=10, now=int(time.time()) - 100)
        return node.register(), bearer(tok)
    if case == "used-up token":
        tok = await world.token(index, uses=1)
        status, _ = await register(client, Node(), tok)
        assert status == 201
        return node.register(), bearer(tok)
    if case == "token for another namespace":
        tok = await world.token(index, namespace="CN.31.CUCC")
        return node.register(), bearer(tok)
    if case == "token for another kind":
        tok = await world.token(index, kind="NPU")
        return node.register(), bearer(tok)
    if case == "namespace outside the registry":
        tok = await world.token(index, namespace="CN.32")
        return Node(namespace="CN.32").register(), bearer(tok)
    if case == "prefix trap CN.3 vs CN.31":
        tok = await world.token(index, namespace="CN.3")
        return Node(namespace="CN.3").register(), bearer(tok)
    tok = await world.token(index)
    if case == "bad signature":
        other = keys.generate()
        doc = node.register_doc()
        from registry.ca import sign_document

        return sign_document(doc, other).to_json(), bearer(tok)
    if case == "tampered payload":
        env = dsse.Envelope.from_json(node.register())
        forged = dsse.Envelope(
            env.payload_type, env.payload.replace(b'"test"', b'"gold"'), env.signatures
        )
        return forged.to_json(), bearer(tok)
    if case == "replayed nonce":
        body = node.register()
        resp = await client.post("/v1/registrations", data=body, headers=bearer(tok))
        assert resp.status == 201
        return body, bearer(tok)
    if case == "stale timestamp":
        return node.register(timestamp=int(time.time()) - 120), bearer(tok)
    if case == "future timestamp":
        return node.register(timestamp=int(time.time()) + 120), bearer(tok)
    if case == "oversized body":
        return b'{"payload": "' + b"A" * (70 * 1024) + b'"}', bearer(tok)
    if case == "unknown payload field":
        payload = node.register_doc().model_dump(mode="json", exclude_none=True)
        payload["colour"] = "red"
        return sign_raw(payload, "register.v1", node.key), bearer(tok)
    if case == "unknown envelope field":
        env = dsse.Envelope.from_json(node.register()).to_dict()
        env["extra"] = 1
        import json

        return json.dumps(env).encode(), bearer(tok)
    if case == "malformed JSON":
        return b'{"payloadType": "application/vnd.cpi.register.v1+json", "payload": ', bearer(tok)
    if case == "wrong document type":
        return node.status(), bearer(tok)
    if case == "serial collision":
        # another key's record sits at this node's CPID (as if sha256 collided)
        other = Node()
        rec = Record(
            cpid=node.cpid,
            kind="GPU",
            public_key=other.public_key,
            issuer="CN.31.CMCC",
            version=1,
            issued_at=int(time.time()),
            expires_at=int(time.time()) + 86400,
            location=node.register_doc().location,
        )
        from registry.ca import sign_document

        await index.put(Keys.rec(node.cpid), sign_document(rec, world.cmcc).to_json())
        return node.register(), bearer(tok)
    raise AssertionError(case)


REFUSALS = [
    ("missing token", 401, "invalid_token", "no join token"),
    ("unknown token", 401, "invalid_token", "unknown join token"),
    ("expired token", 403, "token_expired", "join token expired at"),
    ("used-up token", 403, "token_used_up", "no uses left"),
    ("token for another namespace", 403, "token_scope", "namespace CN.31.CUCC"),
    ("token for another kind", 403, "token_scope", "kind NPU"),
    ("namespace outside the registry", 403, "outside_namespace", "CN.32 is outside"),
    ("prefix trap CN.3 vs CN.31", 403, "outside_namespace", "CN.3 is outside"),
    ("bad signature", 400, "bad_signature", "signatures verify"),
    ("tampered payload", 400, "bad_signature", "signatures verify"),
    ("replayed nonce", 409, "replayed_nonce", "already used"),
    ("stale timestamp", 400, "stale_timestamp", r"-1\d\d s from the registry's clock"),
    ("future timestamp", 400, "stale_timestamp", r"\+1\d\d s from the registry's clock"),
    ("oversized body", 413, "body_too_large", "at most 65536 allowed"),
    ("unknown payload field", 400, "invalid_payload", "colour: unknown field"),
    ("unknown envelope field", 400, "invalid_envelope", "unknown fields: extra"),
    ("malformed JSON", 400, "invalid_envelope", "not valid JSON"),
    ("wrong document type", 400, "invalid_payload", "expected 'application/vnd.cpi.register.v1"),
    ("serial collision", 409, "conflict", "serial collision"),
]


@pytest.mark.parametrize(
    ("case", "status", "code", "message"), REFUSALS, ids=[r[0] for r in REFUSALS]
)
async def test_refusals_are_precise_and_change_nothing(
    start: Start,
    index: Index,
    world: World,
    case: str,
    status: int,
    code: str,
    message: str,
) -> None:
    client = await start()
    body, headers = await _refusal_case(case, index, world, client)
    before = await dump(index)
    resp = await client.post("/v1/registrations", data=body, headers=headers)
    answer = await resp.json()
    assert resp.status == status, answer
    assert set(answer) == {"error"} and set(answer["error"]) == {"code", "message"}
    assert answer["error"]["code"] == code
    import re

    assert re.search(message, answer["error"]["message"]), answer["error"]["message"]
    if status == 401:
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    assert await dump(index) == before
    metrics = await (await client.get("/metrics")).text()
    assert f'cpi_registry_rejections_total{{endpoint="register",reason="{code}"}} 1.0' in metrics


@pytest.mark.parametrize("size", [65536, 65537, 200_000])
async def test_a_chunked_body_without_length_is_bounded_too(
    start: Start, index: Index, world: World, size: int
) -> None:
    # no Content-Length: the limit is applied to what arrived, whether the body is
    # taken at once (all of it there) or read in pieces
    client = await start()
    token = await world.token(index)

    async def chunks() -> AsyncIterator[bytes]:
        body = b'{"payloadType": "x", "payload": "' + b"A" * size + b'"}'
        for i in range(0, len(body), 16384):
            yield body[i : i + 16384]

    before = await dump(index)
    resp = await client.post("/v1/registrations", data=chunks(), headers=bearer(token))
    answer = await resp.json()
    assert resp.status == 413, answer
    assert answer["error"]["code"] == "body_too_large"
    assert await dump(index) == before


async def test_rate_limit_answers_429_with_retry_after(
    start: Start, index: Index, world: World
) -> None:
    client = await start(registrations_per_s=0.2, registration_burst=2)
    token = await world.token(index)
    for _ in range(2):
        status, _ = await register(client, Node(), token)
        assert status == 201
    before = await dump(index)
    resp = await client.post("/v1/registrations", data=Node().register(), headers=bearer(token))
    body = await resp.json()
    assert resp.status == 429, body
    assert body["error"]["code"] == "rate_limited"
    assert "rate limit exceeded (0.2/s, burst 2)" in body["error"]["message"]
    assert 1 <= int(resp.headers["Retry-After"]) <= 5
    assert await dump(index) == before


# -- status -----------------------------------------------------------------------------


async def test_status_writes_the_live_key_only_on_change(
    start: Start, index: Index, world: World
) -> None:
    client = await start()
    token = await world.token(index)
    node = Node()
    assert (await register(client, node, token))[0] == 201
    live = state(client).liveness
    url = f"/v1/resources/{node.cpid}/status"

    first = node.status(free=8)
    resp = await client.put(url, data=first)
    assert resp.status == 204, await resp.text()
    kv = await index.get(Keys.live(node.cpid))
    assert kv is not None and kv.value == first
    assert kv.lease == live.lease.id if live.lease else False
    assert live.counters.writes == 1

    for _ in range(5):  # same state and capacity: heartbeats stay in memory
        assert (await client.put(url, data=node.status(free=8))).status == 204
    assert live.counters.writes == 1
    assert (await index.get(Keys.live(node.cpid))) == kv

    changed = node.status(free=6)  # capacity changed: written
    assert (await client.put(url, data=changed)).status == 204
    assert live.counters.writes == 2
    kv2 = await index.get(Keys.live(node.cpid))
    assert kv2 is not None and kv2.value == changed
    st = parse_payload(*_pt(kv2.value), Status)
    assert st.capacity.accelerators_free == 6

    draining = node.status(free=6, state="draining")  # state changed: written
    assert (await client.put(url, data=draining)).status == 204
    assert live.counters.writes == 3
    assert live.counters.heartbeats == 8


def _pt(value: bytes) -> tuple[str, bytes]:
    env = dsse.Envelope.from_json(value)
    return env.payload_type, env.payload


async def test_status_refusals(start: Start, index: Index, world: World) -> None:
    client = await start()
    token = await world.token(index)
    node, stranger = Node(), Node()
    assert (await register(client, node, token))[0] == 201
    url = f"/v1/resources/{node.cpid}/status"
    assert (await client.put(url, data=node.status(seq=10))).status == 204
    before = await dump(index)

    async def refused(path: str, body: bytes, status: int, code: str, text: str) -> None:
        resp = await client.put(path, data=body)
        answer = await resp.json()
        assert (resp.status, answer["error"]["code"]) == (status, code), answer
        assert text in answer["error"]["message"]

    await refused(url, node.status(seq=10), 409, "stale_seq", "not above the last accepted seq 10")
    await refused(url, stranger.status(seq=11, cpid=node.cpid), 400, "bad_signature", "verify")
    await refused(
        url,
        node.status(seq=12, observed_at=int(time.time() * 1000) - 300_000),
        400,
        "stale_timestamp",
        "observed_at",
    )
    await refused(url, Node().status(), 400, "bad_signature", "verify")  # another node's status
    await refused(
        f"/v1/resources/{stranger.cpid}/status", stranger.status(), 404, "not_found", "register"
    )
    await refused(
        "/v1/resources/CN.31.CMCC/GPU.0000000000000-Z/status",
        node.status(),
        400,
        "invalid_cpid",
        "serial must be 12",
    )
    cpid32 = Node(namespace="CN.32").cpid
    await refused(
        f"/v1/resources/{cpid32}/status",
        node.status(),
        403,
        "outside_namespace",
        "outside this registry",
    )
    await refused(url, b"{", 400, "invalid_envelope", "not valid JSON")
    assert await dump(index) == before


async def test_status_for_a_deleted_record_is_404_so_the_agent_registers_again(
    start: Start, index: Index, world: World
) -> None:
    client = await start()
    token = await world.token(index)
    node = Node()
    assert (await register(client, node, token))[0] == 201
    await index.delete(Keys.rec(node.cpid))  # e.g. revoked by the national node
    resp = await client.put(f"/v1/resources/{node.cpid}/status", data=node.status())
    assert resp.status == 404
    assert (await resp.json())["error"]["code"] == "not_found"
    assert await index.get(Keys.live(node.cpid)) is None
    assert (await register(client, node, token))[0] == 201
    assert (await client.put(f"/v1/resources/{node.cpid}/status", data=node.status())).status == 204


# -- deregistration ---------------------------------------------------------------------


async def test_deregistration_removes_record_and_live_key(
    start: Start, index: Index, world: World
) -> None:
    client = await start()
    token = await world.token(index)
    node = Node()
    assert (await register(client, node, token))[0] == 201
    assert (await client.put(f"/v1/resources/{node.cpid}/status", data=node.status())).status == 204
    assert await index.get(Keys.live(node.cpid)) is not None

    url = f"/v1/resources/{node.cpid}"
    before = await dump(index)
    for bad, code in (
        (node.deregister(key=keys.generate()), "bad_signature"),
        (node.deregister(timestamp=int(time.time()) - 600), "stale_timestamp"),
    ):
        resp = await client.delete(url, data=bad)
        assert (resp.status, (await resp.json())["error"]["code"]) == (400, code)
    assert await dump(index) == before

    dereg = node.deregister()
    resp = await client.delete(url, data=dereg)
    assert resp.status == 204, await resp.text()
    assert await index.get(Keys.rec(node.cpid)) is None
    assert await index.get(Keys.live(node.cpid)) is None
    assert state(client).liveness.get(node.cpid) is None

    resp = await client.delete(url, data=dereg)
    assert resp.status == 404

    entries = await changes.read_entries(index)
    assert [(e.seq, e.op) for e in entries] == [(1, "register"), (2, "deregister")]
    assert entries[1].digest == changes.digest(dsse.Envelope.from_json(dereg))


async def test_audit_stream_has_one_entry_per_change_with_consecutive_seq(
    start: Start, index: Index, world: World
) -> None:
    client = await start()
    token = await world.token(index)
    nodes = [Node() for _ in range(3)]
    for n in nodes:
        assert (await register(client, n, token))[0] == 201
    assert (await register(client, nodes[0], token))[0] == 200  # unchanged: no entry
    assert (await register(client, nodes[1], token, labels={"x": "1"}))[0] == 200
    assert (
        await client.delete(f"/v1/resources/{nodes[2].cpid}", data=nodes[2].deregister())
    ).status == 204
    entries = await changes.read_entries(index)
    assert [e.seq for e in entries] == [1, 2, 3, 4, 5]
    assert [e.op for e in entries] == ["register"] * 3 + ["update", "deregister"]
    assert [e.version for e in entries] == [1, 1, 1, 2, None]
    assert [e.cpid for e in entries] == [n.cpid for n in nodes] + [nodes[1].cpid, nodes[2].cpid]


# -- liveness ---------------------------------------------------------------------------


async def test_a_silent_node_goes_not_live_and_comes_back(
    start: Start, index: Index, world: World
) -> None:
    client = await start(heartbeat_s=0.2)
    token = await world.token(index)
    node = Node()
    assert (await register(client, node, token))[0] == 201
    url = f"/v1/resources/{node.cpid}/status"
    assert (await client.put(url, data=node.status())).status == 204
    assert await index.get(Keys.live(node.cpid)) is not None

    async def gone() -> bool:
        return await index.get(Keys.live(node.cpid)) is None

    t0 = time.monotonic()
    await until(gone, 3.0, "the live key to expire")
    assert time.monotonic() - t0 >= 0.5  # not before 3 missed heartbeats (0.6 s)
    assert await index.get(Keys.rec(node.cpid)) is not None  # the record stays
    assert (await client.put(url, data=node.status())).status == 204
    assert await index.get(Keys.live(node.cpid)) is not None


async def test_self_preservation_holds_when_many_go_silent_until_overridden(
    start: Start, index: Index, world: World
) -> None:
    client = await start(heartbeat_s=0.3)
    token = await world.token(index)
    nodes = [Node() for _ in range(6)]
    for n in nodes:
        assert (await register(client, n, token))[0] == 201

    async def beat(group: list[Node], seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            for n in group:
                resp = await client.put(f"/v1/resources/{n.cpid}/status", data=n.status())
                assert resp.status == 204
            await asyncio.sleep(0.1)

    async def live() -> int:
        return len((await index.get_prefix(Prefix.LIVE))[0])

    async def gauge() -> str:
        text = await (await client.get("/metrics")).text()
        line = next(
            ln
            for ln in text.splitlines()
            if ln.startswith('cpi_registry_self_preservation{namespace="CN.31.CMCC"}')
        )
        return line.split()[-1]

    await beat(nodes, 0.5)
    assert await live() == 6
    # all six go silent at once: nothing expires, the gauge says why
    await asyncio.sleep(1.6)
    assert await live() == 6
    assert await gauge() == "1.0"
    admin = bearer(ADMIN_TOKEN)
    view = await (await client.get("/v1/admin/self-preservation", headers=admin)).json()
    assert view == {"enabled": True, "protecting": ["CN.31.CMCC"]}

    # four come back: protection ends and the two really silent ones expire
    await beat(nodes[:4], 1.5)
    assert await live() == 4
    assert await gauge() == "0.0"

    # the four go silent too (4 of 4 > 50 %): protected again, until the operator says no
    await asyncio.sleep(1.6)
    assert await live() == 4
    assert await gauge() == "1.0"
    resp = await client.post("/v1/admin/self-preservation", json={"enabled": False})
    assert resp.status == 401
    resp = await client.post(
        "/v1/admin/self-preservation", json={"enabled": False}, headers=bearer("wrong")
    )
    assert resp.status == 401
    resp = await client.post("/v1/admin/self-preservation", json={"enabled": False}, headers=admin)
    assert resp.status == 200
    assert (await resp.json())["enabled"] is False

    async def none_live() -> bool:
        return await live() == 0

    await until(none_live, 2.0, "the silent nodes to expire after the override")
    assert await gauge() == "0.0"


async def test_lost_lease_is_regranted_and_live_keys_rewritten(
    start: Start, index: Index, world: World
) -> None:
    client = await start(heartbeat_s=2, lease_ttl_s=3)
    token = await world.token(index)
    nodes = [Node() for _ in range(3)]
    for n in nodes:
        assert (await register(client, n, token))[0] == 201
        assert (await client.put(f"/v1/resources/{n.cpid}/status", data=n.status())).status == 204
    liveness = state(client).liveness
    assert liveness.lease is not None
    old = liveness.lease.id
    await index.revoke_lease(old)  # behind the registry's back: the live keys vanish

    async def rewritten() -> bool:
        kvs, _ = await index.get_prefix(Prefix.LIVE)
        return len(kvs) == 3 and all(kv.lease not in (0, old) for kv in kvs)

    await until(rewritten, 6.0, "the live keys to be rewritten on a new lease")
    assert liveness.lease is not None and liveness.lease.id != old
    assert (await client.get("/readyz")).status == 200


# -- health, readiness, metrics -----------------------------------------------------------


async def test_health_ready_and_metrics(start: Start, index: Index, world: World) -> None:
    client = await start()
    assert (await client.get("/healthz")).status == 200
    resp = await client.get("/readyz")
    body = await resp.json()
    assert resp.status == 200 and body["ready"] is True
    assert body["namespaces"] == ["CN.31", "CN.31.CMCC"]
    token = await world.token(index)
    assert (await register(client, Node(), token))[0] == 201
    resp = await client.get("/metrics")
    text = await resp.text()
    assert resp.headers["Content-Type"].startswith("text/plain")
    for metric in (
        'cpi_registry_registrations_total{outcome="created"} 1.0',
        "cpi_registry_etcd_seconds_bucket",
        "cpi_registry_heartbeat_lag_seconds",
        "cpi_registry_self_preservation_enabled 1.0",
    ):
        assert metric in text
    resp = await client.get("/v1/nothing-here")
    assert resp.status == 404 and (await resp.json())["error"]["code"] == "not_found"


async def test_readyz_is_503_when_the_lease_is_lost(start: Start) -> None:
    client = await start()
    liveness = state(client).liveness
    assert liveness.lease is not None
    await liveness.stop()  # no watcher: the loss is not repaired
    liveness.lease.lost.set()
    resp = await client.get("/readyz")
    assert resp.status == 503
    assert "lease" in (await resp.json())["error"]["message"]
