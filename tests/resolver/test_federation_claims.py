"""Claims through a federated resolver: each root's index cluster (its own etcd) holds
its own claims, totals and tokens (resolver/claims/http.py, ClaimRouter).

``CN`` lives in the session etcd (``index``), ``SG`` in a private etcd of its own
(the fixtures of tests/resolver/test_federation.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient

from registry.index import Index, Keys, Prefix
from resolver.claims import tokens as claim_tokens
from resolver.federation import Federation
from resolver.http import create_app
from tests.resolver.kit import Node, Pki, put_record, put_status, resolver_config
from tests.resolver.test_federation import RootPki, fed, sg, sg_index
from tests.until import until

__all__ = ["fed", "sg", "sg_index"]  # the fixtures, imported for these tests

Client = TestClient[Any, Any]


async def units_at(index: Index, key: str) -> int:
    kv = await index.get(key)
    return 0 if kv is None else int(json.loads(kv.value)["units"])


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def sg_live(f: Federation, sg: RootPki, sg_index: Index, *, free: int = 8) -> Node:
    n = Node(namespace="SG.01", region="44")
    await sg.put(sg_index, n)
    await put_status(sg_index, n, free=free)

    def seen() -> bool:
        e = f.get(n.cpid)
        return e is not None and e.status is not None

    await until(seen, what=f"the federation to serve {n.cpid} live")
    return n


async def cn_live(f: Federation, pki: Pki, index: Index, *, free: int = 8) -> Node:
    n = Node()
    await put_record(index, pki, n)
    await put_status(index, n, free=free)

    def seen() -> bool:
        e = f.get(n.cpid)
        return e is not None and e.status is not None

    await until(seen, what=f"the federation to serve {n.cpid} live")
    return n


async def app(fed: Federation, aiohttp_client: Any, anchor_file: Path) -> Client:
    config = resolver_config("127.0.0.1:1", anchor_file)
    client: Client = await aiohttp_client(create_app(config, resolver=fed))
    return client


async def test_a_claim_on_an_sg_resource_lands_in_sgs_etcd_and_routes_back(
    fed: Federation,
    index: Index,
    pki: Pki,
    sg: RootPki,
    sg_index: Index,
    aiohttp_client: Any,
    anchor_file: Path,
) -> None:
    client = await app(fed, aiohttp_client, anchor_file)
    node = await sg_live(fed, sg, sg_index)
    sg_token = await claim_tokens.create_token(sg_index, holder="alice", ttl_s=600)
    cn_token = await claim_tokens.create_token(index, holder="alice", ttl_s=600)
    # a token is valid at the cluster that stores it only
    resp = await client.post(
        "/v1/claims", json={"cpid": node.cpid, "units": 3}, headers=bearer(cn_token)
    )
    assert resp.status == 401, await resp.text()
    assert (await resp.json())["error"]["code"] == "invalid_token"
    resp = await client.post(
        "/v1/claims", json={"cpid": node.cpid, "units": 3}, headers=bearer(sg_token)
    )
    made = await resp.json()
    assert resp.status == 201, made
    assert await units_at(sg_index, Keys.alloc(node.cpid)) == 3
    assert await units_at(sg_index, Keys.holder("alice")) == 3
    assert (await index.get_prefix(Prefix.ALLOC))[0] == []  # nothing in CN's etcd
    assert (await index.get_prefix(Prefix.CLAIM))[0] == []
    # the list names the root; a CN token lists CN's claims only (none)
    listed = await (await client.get("/v1/claims", headers=bearer(sg_token))).json()
    assert [(c["claim_id"], c["root"]) for c in listed["claims"]] == [(made["claim_id"], "SG")]
    assert (await (await client.get("/v1/claims", headers=bearer(cn_token))).json())["claims"] == []
    # renewal and release find SG's cluster from the claim id
    resp = await client.patch(
        f"/v1/claims/{made['claim_id']}", json={"ttl_s": 900}, headers=bearer(sg_token)
    )
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["expires_at"] >= made["expires_at"]
    resp = await client.delete(f"/v1/claims/{made['claim_id']}", headers=bearer(cn_token))
    assert resp.status == 401  # CN's cluster does not know the token
    resp = await client.delete(f"/v1/claims/{made['claim_id']}", headers=bearer(sg_token))
    assert resp.status == 204, await resp.text()
    assert await units_at(sg_index, Keys.alloc(node.cpid)) == 0
    assert (await sg_index.get_prefix(Prefix.CLAIM))[0] == []


async def test_claims_by_query_and_gangs_stay_within_one_cluster(
    fed: Federation,
    index: Index,
    pki: Pki,
    sg: RootPki,
    sg_index: Index,
    aiohttp_client: Any,
    anchor_file: Path,
) -> None:
    client = await app(fed, aiohttp_client, anchor_file)
    sg_nodes = [await sg_live(fed, sg, sg_index, free=4) for _ in range(2)]
    cn_node = await cn_live(fed, pki, index, free=8)
    sg_token = await claim_tokens.create_token(sg_index, holder="bob", ttl_s=600)
    cn_token = await claim_tokens.create_token(index, holder="bob", ttl_s=600)
    # a gang within SG: 8 units over both SG servers, all in SG's etcd
    gang = {"query": {"kind": "GPU", "within": "SG"}, "units": 8, "gang": {"per_resource": 4}}
    resp = await client.post("/v1/claims", json=gang, headers=bearer(sg_token))
    made = await resp.json()
    assert resp.status == 201, made
    assert sorted(p["cpid"] for p in made["parts"]) == sorted(n.cpid for n in sg_nodes)
    for n in sg_nodes:
        assert await units_at(sg_index, Keys.alloc(n.cpid)) == 4
    assert (await index.get_prefix(Prefix.ALLOC))[0] == []
    # the same gang by a CN token: within=SG concerns SG's cluster only, which does
    # not know the token
    resp = await client.post("/v1/claims", json=gang, headers=bearer(cn_token))
    assert resp.status == 401, await resp.text()
    # a query over every root with a CN token goes to CN (the only cluster knowing it)
    resp = await client.post(
        "/v1/claims", json={"query": {"kind": "GPU"}, "units": 2}, headers=bearer(cn_token)
    )
    one = await resp.json()
    assert resp.status == 201 and one["cpid"] == cn_node.cpid, one
    assert await units_at(index, Keys.alloc(cn_node.cpid)) == 2
    # roots= in the query restricts it: SG's servers are full, so SG refuses
    resp = await client.post(
        "/v1/claims",
        json={"query": {"kind": "GPU", "roots": ["SG"]}, "units": 1},
        headers=bearer(sg_token),
    )
    assert resp.status == 409, await resp.text()
    for bad in ({"roots": "CN,CN"}, {"roots": 7}, {"roots": ["C1"]}):
        resp = await client.post(
            "/v1/claims", json={"query": bad, "units": 1}, headers=bearer(sg_token)
        )
        assert resp.status == 400, (bad, await resp.text())
    # a gang that spans roots is never made: SG has 0 free, CN 6, the gang wants 10
    resp = await client.post(
        "/v1/claims",
        json={"query": {"kind": "GPU"}, "units": 10, "gang": {"per_resource": {"max": 8}}},
        headers=bearer(cn_token),
    )
    assert resp.status == 409, await resp.text()
    # the gang's release routes to SG by its claim id
    resp = await client.delete(f"/v1/claims/{made['claim_id']}", headers=bearer(sg_token))
    assert resp.status == 204
    assert all([await units_at(sg_index, Keys.alloc(n.cpid)) == 0 for n in sg_nodes])


async def test_a_query_spanning_roots_tries_clusters_in_rank_order(
    fed: Federation,
    index: Index,
    pki: Pki,
    sg: RootPki,
    sg_index: Index,
    aiohttp_client: Any,
    anchor_file: Path,
) -> None:
    """One token stored in both clusters (the same hash): a claim over both roots goes
    to the cluster of the best-ranked candidate that fits, the other when it is full."""
    client = await app(fed, aiohttp_client, anchor_file)
    sg_node = await sg_live(fed, sg, sg_index, free=8)
    cn_node = await cn_live(fed, pki, index, free=2)
    token = await claim_tokens.create_token(index, holder="carol", ttl_s=600)
    kv = await index.get(Keys.claim_token(claim_tokens.hash_token(token)))
    assert kv is not None
    await sg_index.put(kv.key, kv.value)
    body = {"query": {"kind": "GPU", "sort": "free"}, "units": 2}
    resp = await client.post("/v1/claims", json=body, headers=bearer(token))
    first = await resp.json()
    assert resp.status == 201 and first["cpid"] == sg_node.cpid, first  # most free: SG
    body = {"query": {"kind": "GPU"}, "units": 7}
    resp = await client.post("/v1/claims", json=body, headers=bearer(token))
    assert resp.status == 409, await resp.text()  # neither cluster has 7 free
    body["units"] = 2
    resp = await client.post(
        "/v1/claims", json={**body, "query": {"within": "CN"}}, headers=bearer(token)
    )
    assert resp.status == 201 and (await resp.json())["cpid"] == cn_node.cpid
    listed = await (await client.get("/v1/claims", headers=bearer(token))).json()
    assert sorted(c["root"] for c in listed["claims"]) == ["CN", "SG"]
    assert listed["units"] == 4
    only = await (await client.get("/v1/claims?roots=SG", headers=bearer(token))).json()
    assert [c["root"] for c in only["claims"]] == ["SG"]


async def test_unknown_roots_and_bad_claim_ids(
    fed: Federation, sg_index: Index, aiohttp_client: Any, anchor_file: Path
) -> None:
    client = await app(fed, aiohttp_client, anchor_file)
    token = await claim_tokens.create_token(sg_index, holder="dave", ttl_s=600)
    jp = Node(namespace="JP.01").cpid
    resp = await client.post("/v1/claims", json={"cpid": jp, "units": 1}, headers=bearer(token))
    assert resp.status == 404, await resp.text()
    assert "root JP is not a root of this resolver" in (await resp.json())["error"]["message"]
    claim_id = jp.replace("/", "~") + "~" + "A" * 16
    resp = await client.delete(f"/v1/claims/{claim_id}", headers=bearer(token))
    assert resp.status == 404, await resp.text()
    resp = await client.delete("/v1/claims/not-a-claim", headers=bearer(token))
    assert resp.status == 400
    resp = await client.post("/v1/claims", json={"cpid": "nope", "units": 1}, headers=bearer(token))
    assert resp.status == 400
    resp = await client.get("/v1/claims?roots=C1", headers=bearer(token))
    assert resp.status == 400
