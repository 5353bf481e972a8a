"""Issue 10, "trust holds under attack": each attack against a real registry and etcd."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from registry import ca, keyfile, national
from registry.index import Index, Keys
from schemas import keys
from tests.registry.service_kit import ADMIN_TOKEN, Node, World, bearer, dump, sign_raw
from tests.registry.test_service import Start, register, start, state, world
from tests.until import until

__all__ = ["start", "world"]  # fixtures


async def put_status(client: TestClient, node: Node, body: bytes) -> tuple[int, dict[str, Any]]:  # type: ignore[type-arg]
    resp = await client.put(f"/v1/resources/{node.cpid}/status", data=body)
    return resp.status, ({} if resp.status == 204 else await resp.json())


def code(answer: tuple[int, dict[str, Any]]) -> tuple[int, str]:
    status, body = answer
    return status, body.get("error", {}).get("code", "")


# -- 1. a status replayed to another registry -------------------------------------------


async def test_a_status_is_accepted_only_by_the_registry_that_signed_the_record(
    start: Start, index: Index, world: World
) -> None:
    client = await start()
    token = await world.token(index)
    node = Node()
    assert (await register(client, node, token))[0] == 201
    up = node.status(free=8, seq=10)
    assert (await put_status(client, node, up))[0] == 204
    live = await index.get(Keys.live(node.cpid))
    assert live is not None

    # another registry certified for CN.31.CMCC with another key (e.g. a rotated one)
    other = keys.generate()
    keyfile.write_private(world.tmp / "other.key", other, overwrite=True)
    cert = ca.issue_cert(
        issuer_key=world.r31,
        issuer_subject="CN.31",
        subject="CN.31.CMCC",
        public_key=other,
        scopes=["issue"],
    )
    await index.put(Keys.cert(keys.kid_of(other)), cert.to_json())
    stranger = await start(
        instance_id="other",
        namespaces=[{"namespace": "CN.31.CMCC", "key_file": "other.key"}],
    )
    regional = await start(
        instance_id="regional", namespaces=[{"namespace": "CN.31", "key_file": "cn31.key"}]
    )
    down = node.status(free=8, state="down", seq=20)
    for registry in (stranger, regional):
        for body in (up, down):
            status, answer = await put_status(registry, node, body)
            assert (status, answer["error"]["code"]) == (403, "outside_namespace"), answer
            assert "CN.31.CMCC" in answer["error"]["message"]
    assert await index.get(Keys.live(node.cpid)) == live


# -- 2. freshness lives in the index ----------------------------------------------------


async def _node_with_statuses(
    client: TestClient,  # type: ignore[type-arg]
    index: Index,
    world: World,
) -> tuple[Node, bytes]:
    token = await world.token(index)
    node = Node()
    assert (await register(client, node, token))[0] == 201
    assert (await put_status(client, node, node.status(seq=10)))[0] == 204
    down = node.status(seq=11, state="down")
    assert (await put_status(client, node, down))[0] == 204
    assert (await put_status(client, node, node.status(seq=12)))[0] == 204
    return node, down


async def test_an_old_status_is_refused_after_a_registry_restart(
    start: Start, index: Index, world: World
) -> None:
    client = await start()
    node, down = await _node_with_statuses(client, index, world)
    before = await index.get(Keys.live(node.cpid))
    await client.close()
    client = await start()
    assert code(await put_status(client, node, down)) == (409, "stale_seq")
    assert await index.get(Keys.live(node.cpid)) == before
    # and by a second instance running beside the first
    twin = await start(instance_id="twin")
    assert code(await put_status(twin, node, down)) == (409, "stale_seq")
    assert (await put_status(twin, node, node.status(seq=13)))[0] == 204


async def test_an_old_status_is_refused_after_reregistration_and_expiry(
    start: Start, index: Index, world: World
) -> None:
    client = await start()
    node, down = await _node_with_statuses(client, index, world)
    token = await world.token(index)
    assert (await register(client, node, token))[0] == 200
    assert code(await put_status(client, node, down)) == (409, "stale_seq")
    # the node went silent and expired: its live key is gone, the registry forgot it
    state(client).liveness.forget(node.cpid)
    await index.delete(Keys.live(node.cpid))
    assert code(await put_status(client, node, down)) == (409, "stale_seq")
    assert await index.get(Keys.live(node.cpid)) is None
    assert (await put_status(client, node, node.status(seq=13)))[0] == 204


async def test_a_huge_seq_is_refused_and_does_not_lock_the_node_out(
    start: Start, index: Index, world: World
) -> None:
    client = await start()
    node, _ = await _node_with_statuses(client, index, world)
    huge = {
        "cpid": node.cpid,
        "seq": 2**70,
        "observed_at": int(time.time() * 1000),
        "state": "up",
        "capacity": {"accelerators_free": 8},
    }
    status, answer = await put_status(client, node, sign_raw(huge, "status.v1", node.key))
    assert 400 <= status < 500, answer
    assert (await put_status(client, node, node.status(seq=13)))[0] == 204
    top = node.status(seq=2**53 - 1)
    assert (await put_status(client, node, top))[0] == 204
    assert code(await put_status(client, node, top)) == (409, "stale_seq")


async def test_deregistration_deletes_the_seq_key(start: Start, index: Index, world: World) -> None:
    client = await start()
    node, _ = await _node_with_statuses(client, index, world)
    stored = await index.get(Keys.seq(node.cpid))
    assert stored is not None and json.loads(stored.value)["seq"] == 12
    resp = await client.delete(f"/v1/resources/{node.cpid}", data=node.deregister())
    assert resp.status == 204
    assert await index.get(Keys.seq(node.cpid)) is None


# -- 3. revocation at the write side ----------------------------------------------------


async def _refused_as_revoked(answer: tuple[int, dict[str, Any]]) -> bool:
    return code(answer) == (403, "revoked")


async def test_a_revoked_namespace_cert_stops_signing(
    start: Start, index: Index, world: World
) -> None:
    client = await start()
    token = await world.token(index)
    node = Node()
    assert (await register(client, node, token))[0] == 201
    serial = json.loads(world.cert_cmcc.payload)["serial"]
    await national.revoke(
        index,
        issuer_key=world.r31,
        subject="CN.31.CMCC",
        serial=serial,
        reason="key compromise",
        now=int(time.time()) - 5,
    )

    async def refused() -> bool:
        return code(await register(client, Node(), token)) == (403, "revoked")

    await until(refused, what="registration refused under a revoked cert")
    before = await dump(index)
    assert code(await register(client, node, token)) == (403, "revoked")
    assert code(await put_status(client, node, node.status())) == (403, "revoked")
    assert await dump(index) == before
    resp = await client.get("/readyz")
    body = await resp.json()
    assert resp.status == 503, body
    assert "CN.31.CMCC" in body["error"]["message"] and "revoked" in body["error"]["message"]
    # CN.31 itself is not revoked: it still signs its own records
    t31 = await world.token(index, namespace="CN.31")
    assert (await register(client, Node(namespace="CN.31"), t31))[0] == 201


async def test_revoking_a_cert_above_the_signer_stops_it_too(
    start: Start, index: Index, world: World
) -> None:
    client = await start()
    token = await world.token(index)
    await national.revoke(
        index,
        issuer_key=world.root,
        subject="CN.31",
        kid=keys.kid_of(world.r31),
        reason="superseded",
        now=int(time.time()) - 5,
    )

    async def refused() -> bool:
        return code(await register(client, Node(), token)) == (403, "revoked")

    await until(refused, what="registration refused under a revoked parent cert")
    t31 = await world.token(index, namespace="CN.31")
    assert code(await register(client, Node(namespace="CN.31"), t31)) == (403, "revoked")


async def test_a_revoked_node_key_can_do_nothing(start: Start, index: Index, world: World) -> None:
    client = await start()
    token = await world.token(index)
    node = Node()
    assert (await register(client, node, token))[0] == 201
    assert (await put_status(client, node, node.status()))[0] == 204
    await national.revoke(
        index,
        issuer_key=world.cmcc,
        subject="CN.31.CMCC",
        kid=keys.kid_of(node.key),
        reason="stolen node",
        now=int(time.time()) - 5,
    )

    async def refused() -> bool:
        return code(await put_status(client, node, node.status())) == (403, "revoked")

    await until(refused, what="status refused from a revoked node key")
    before = await dump(index)
    assert code(await register(client, node, token, labels={"x": "y"})) == (403, "revoked")
    assert code(await register(client, node, token)) == (403, "revoked")
    resp = await client.delete(f"/v1/resources/{node.cpid}", data=node.deregister())
    assert (resp.status, (await resp.json())["error"]["code"]) == (403, "revoked")
    assert await dump(index) == before
    # a revocation signed by a key that is not above the node carries no weight
    other = Node()
    assert (await register(client, other, token))[0] == 201
    await national.revoke(
        index,
        issuer_key=keys.generate(),
        subject="CN.31.CMCC",
        kid=keys.kid_of(other.key),
        reason="forged",
        now=int(time.time()) - 5,
    )
    assert (await put_status(client, other, other.status()))[0] == 204
    assert (await client.get("/readyz")).status == 200


# -- 4. namespaces ----------------------------------------------------------------------


async def test_a_parent_token_does_not_register_into_a_delegated_namespace(
    start: Start, index: Index, world: World
) -> None:
    client = await start()
    before = await dump(index)
    t31 = await world.token(index, namespace="CN.31")
    before = await dump(index)
    status, body = await register(client, Node(), t31)
    assert (status, body["error"]["code"]) == (403, "token_scope"), body
    assert "CN.31.CMCC" in body["error"]["message"]
    assert await dump(index) == before


async def test_an_unpublished_namespace_gets_no_records(
    start: Start, index: Index, world: World
) -> None:
    evil = keys.generate()
    keyfile.write_private(world.tmp / "evil.key", evil, overwrite=True)
    cert = ca.issue_cert(
        issuer_key=world.r31,
        issuer_subject="CN.31",
        subject="CN.31.CMCC.EVIL",
        public_key=evil,
        scopes=["issue"],
    )
    await index.put(Keys.cert(keys.kid_of(evil)), cert.to_json())
    namespaces = [
        {"namespace": "CN.31.CMCC", "key_file": "cmcc.key"},
        {"namespace": "CN.31.CMCC.EVIL", "key_file": "evil.key"},
    ]
    client = await start(namespaces=namespaces)
    for scope in ("CN.31.CMCC", "CN.31.CMCC.EVIL"):
        token = await world.token(index, namespace=scope)
        before = await dump(index)
        status, body = await register(client, Node(namespace="CN.31.CMCC.EVIL"), token)
        assert 400 <= status < 500 and status != 401, body
        assert body["error"]["code"] in ("token_scope", "unpublished_namespace"), body
        assert "CN.31.CMCC.EVIL" in body["error"]["message"]
        assert await dump(index) == before
    # published under another key: this registry does not hold the namespace
    await index.put(
        Keys.ns("CN.31.CMCC.EVIL"), json.dumps({"kid": keys.kid_of(world.cmcc), "endpoints": []})
    )
    token = await world.token(index, namespace="CN.31.CMCC.EVIL")
    before = await dump(index)
    status, body = await register(client, Node(namespace="CN.31.CMCC.EVIL"), token)
    assert (status, body["error"]["code"]) == (403, "outside_namespace"), body
    assert await dump(index) == before


# -- 5. bodies --------------------------------------------------------------------------


async def test_deeply_nested_bodies_are_400(start: Start, index: Index, world: World) -> None:
    client = await start()
    token = await world.token(index)
    deep = b"[" * 8000 + b"]" * 8000
    resp = await client.post("/v1/registrations", data=deep, headers=bearer(token))
    assert resp.status == 400, await resp.text()
    node = Node()
    assert (await register(client, node, token))[0] == 201
    resp = await client.put(f"/v1/resources/{node.cpid}/status", data=deep)
    assert resp.status == 400, await resp.text()
    resp = await client.post(
        "/v1/admin/self-preservation",
        data=b'{"enabled": ' + deep + b"}",
        headers=bearer(ADMIN_TOKEN),
    )
    assert resp.status == 400, await resp.text()


async def test_unchanged_heartbeats_cost_no_etcd_call_even_with_revocations(
    start: Start, index: Index, world: World
) -> None:
    client = await start()
    token = await world.token(index)
    node = Node()
    assert (await register(client, node, token))[0] == 201
    await national.revoke(
        index,
        issuer_key=world.cmcc,
        subject="CN.31.CMCC",
        kid=keys.kid_of(keys.generate()),
        reason="another node",
        now=int(time.time()) - 5,
    )
    revocations = state(client).revocations
    assert revocations is not None
    await until(lambda: bool(revocations.envelopes), what="the revocation seen")
    assert (await put_status(client, node, node.status()))[0] == 204
    calls: list[str] = []
    idx = state(client).index
    for name in ("get", "txn", "put"):
        real = getattr(idx, name)

        def spy(*args: Any, _real: Any = real, _name: str = name, **kw: Any) -> Any:
            calls.append(_name)
            return _real(*args, **kw)

        setattr(idx, name, spy)
    for _ in range(5):
        assert (await put_status(client, node, node.status()))[0] == 204
    assert calls == []


async def test_a_registry_makes_no_tokens_for_namespaces_below_its_own(index: Index) -> None:
    from registry import tokens
    from schemas.errors import OutsideNamespaceError

    before = await dump(index)
    with pytest.raises(OutsideNamespaceError, match=r"CN\.31\.CMCC is delegated"):
        await tokens.create_token(index, namespace="CN.31.CMCC", ttl_s=60, within=["CN.31"])
    assert await dump(index) == before
    assert await tokens.create_token(index, namespace="CN.31", ttl_s=60, within=["CN.31"])


async def test_an_instance_behind_another_refuses_an_older_status_on_its_compare(
    start: Start, index: Index, world: World
) -> None:
    a = await start()
    b = await start(instance_id="twin")
    token = await world.token(index)
    node = Node()
    assert (await register(a, node, token))[0] == 201
    assert (await put_status(a, node, node.status(seq=10)))[0] == 204
    newer = node.status(seq=15, free=4)
    assert (await put_status(b, node, newer))[0] == 204  # b read 10, wrote 15
    older = node.status(seq=13, state="down")  # a remembers 10: only the compare knows
    assert code(await put_status(a, node, older)) == (409, "stale_seq")
    kv = await index.get(Keys.live(node.cpid))
    assert kv is not None and kv.value == newer
    assert (await put_status(a, node, node.status(seq=16, state="down")))[0] == 204


# -- 0. small-order keys forge ------------------------------------------------------------


@pytest.mark.parametrize(
    "raw_key",
    [
        b"\x01" + b"\x00" * 31,  # the identity point
        (2**255 - 19 + 1).to_bytes(32, "little"),  # the identity, non-canonically (y = p + 1)
        b"\xec" + b"\xff" * 30 + b"\x7f",  # the point of order 2 (y = -1)
    ],
    ids=["identity", "identity-y=p+1", "order-2"],
)
async def test_a_small_order_key_cannot_register_with_a_forged_signature(
    start: Start, index: Index, world: World, raw_key: bytes
) -> None:
    # R = identity, S = 0 satisfies the bare cofactorless equation under these keys for
    # every message: OpenSSL accepted it, the contract's one verdict (libsodium) does not
    client = await start()
    token = await world.token(index)
    payload = {
        "type": "register.v1",
        "namespace": "CN.31.CMCC",
        "kind": "GPU",
        "public_key": keys.b64url_encode(raw_key),
        "nonce": "n" * 22,
        "timestamp": int(time.time()),
        "endpoints": [],
        "location": {"region": "31"},
        "attributes": {},
        "labels": {},
    }
    forged = {
        "payloadType": "application/vnd.cpi.register.v1+json",
        "payload": base64.b64encode(json.dumps(payload).encode()).decode(),
        "signatures": [
            {
                "keyid": keys.kid(raw_key),
                "sig": base64.b64encode(b"\x01" + b"\x00" * 63).decode(),
            }
        ],
    }
    before = await dump(index)
    resp = await client.post(
        "/v1/registrations", data=json.dumps(forged).encode(), headers=bearer(token)
    )
    answer = await resp.json()
    assert resp.status == 400, answer
    assert answer["error"]["code"] == "invalid_envelope", answer
    assert "public key" in answer["error"]["message"], answer
    assert await dump(index) == before
