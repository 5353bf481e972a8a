"""Federation: one resolver over two roots, each with its own etcd (resolver/federation.py).

``CN`` lives in the session etcd (``index``), ``SG`` in a private etcd of its own.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from cpi.etcdproc import EtcdProcess
from registry import ca
from registry.index import Index, Keys, Op
from resolver.config import EtcdSettings
from resolver.discovery import LatencyTable, Query
from resolver.errors import ConfigError, NotReadyError, QueryError
from resolver.federation import (
    Federation,
    MemberSpec,
    endorse_key,
    format_fed_cursor,
    load_bundle,
    parse_fed_cursor,
    parse_roots,
)
from resolver.http import create_app
from schemas import keys
from schemas.chain import TrustAnchors, endorsed_anchors, verify_record
from schemas.dsse import Envelope
from schemas.endorsement import Endorsement
from schemas.errors import NotFoundError
from schemas.keys import Ed25519PrivateKey
from schemas.models import Anchor, Cert
from tests.resolver.kit import FAST, LATENCY, SSE, Node, Pki, put_record, resolver_config, signed
from tests.until import until

Client = TestClient[Any, Any]


@dataclass
class RootPki:
    """A root ``root`` with one issuing namespace ``<root>.01``."""

    root: str
    key: Ed25519PrivateKey = field(default_factory=keys.generate)
    ns_key: Ed25519PrivateKey = field(default_factory=keys.generate)

    @property
    def ns(self) -> str:
        return f"{self.root}.01"

    @property
    def anchor(self) -> Anchor:
        return ca.make_anchor(self.root, self.key)

    def cert(self) -> Envelope:
        return ca.issue_cert(
            issuer_key=self.key,
            issuer_subject=self.root,
            subject=self.ns,
            public_key=self.ns_key,
            scopes=["issue"],
        )

    async def publish(self, index: Index) -> None:
        kid = keys.kid_of(self.ns_key)
        await index.txn(
            success=[
                Op.put(Keys.cert(kid), self.cert().to_json()),
                Op.put(Keys.ns(self.ns), json.dumps({"kid": kid, "endpoints": []})),
            ]
        )

    async def put(self, index: Index, node: Node) -> None:
        rec = node.record()
        await index.put(Keys.rec(node.cpid), ca.sign_document(rec, self.ns_key).to_json())


def endorsement(
    by: Pki | RootPki,
    sg: RootPki,
    *,
    permitted: list[str] | None = None,
    not_before: int | None = None,
    not_after: int | None = None,
) -> Envelope:
    now = int(time.time())
    doc = Endorsement(
        issuer="CN",
        subject=sg.root,
        public_key=keys.public_to_b64url(sg.key),
        permitted=permitted or [sg.root],
        serial="e1",
        not_before=now - 10 if not_before is None else not_before,
        not_after=now + 3600 if not_after is None else not_after,
    )
    return ca.sign_document(doc, by.root if isinstance(by, Pki) else by.key)


def spec(name: str, root: str, endpoint: str, anchor: Anchor | None, **kw: Any) -> MemberSpec:
    return MemberSpec(
        name=name,
        root=root,
        prefixes=tuple(kw.pop("prefixes", (root,))),
        etcd=EtcdSettings(endpoints=[endpoint], timeout_s=2.0),
        anchor=anchor,
        endorsed_by=kw.pop("endorsed_by", None),
    )


@pytest.fixture
def sg() -> RootPki:
    return RootPki("SG")


@pytest.fixture
async def sg_index(etcd_private: EtcdProcess) -> AsyncIterator[Index]:
    async with Index(endpoints=[etcd_private.endpoint], timeout=3.0) as idx:
        yield idx


def served(f: Federation, cpid: str) -> bool:
    try:
        return f.get(cpid) is not None
    except NotReadyError:
        return False


def federation(specs: list[MemberSpec]) -> Federation:
    return Federation(
        specs, latency=LatencyTable.from_file(LATENCY), settings=FAST, endorsement_retry_s=0.1
    )


@pytest.fixture
async def fed(
    index: Index,
    pki: Pki,
    sg: RootPki,
    sg_index: Index,
    etcd_server: EtcdProcess,
    etcd_private: EtcdProcess,
) -> AsyncIterator[Federation]:
    await pki.publish(index)
    await sg.publish(sg_index)
    f = federation(
        [
            spec("CN", "CN", etcd_server.endpoint, pki.anchor),
            spec("SG", "SG", etcd_private.endpoint, sg.anchor),
        ]
    )
    async with f:
        async with asyncio.timeout(10):
            await f.wait_ready()
        yield f


async def test_two_roots_resolved_and_discovered(
    fed: Federation, index: Index, pki: Pki, sg: RootPki, sg_index: Index
) -> None:
    cn_node, sg_node = Node(), Node(namespace="SG.01", region="44")
    await put_record(index, pki, cn_node)
    await sg.put(sg_index, sg_node)
    await until(lambda: fed.get(cn_node.cpid) and fed.get(sg_node.cpid), what="both roots")
    assert fed.resolve(sg_node.cpid).cpid == sg_node.cpid
    assert fed.resolve(cn_node.cpid.lower()).cpid == cn_node.cpid
    both = {m.cpid for m in fed.discover(Query(kind="GPU")).results}
    assert both == {cn_node.cpid, sg_node.cpid}
    assert [m.cpid for m in fed.discover(Query(within="SG")).results] == [sg_node.cpid]
    assert [m.cpid for m in fed.discover(Query(), frozenset({"CN"})).results] == [cn_node.cpid]
    assert fed.discover(Query(within="SG"), frozenset({"CN"})).results == []
    # merged by the ranking: score descending, then CPID
    ranked = fed.discover(Query(near="31")).results
    assert [(-m.score, m.cpid) for m in ranked] == sorted((-m.score, m.cpid) for m in ranked)
    with pytest.raises(NotFoundError, match="root JP is not a root of this resolver"):
        fed.resolve(Node(namespace="JP.01").cpid)


async def test_a_chosen_order_holds_across_roots(
    fed: Federation, index: Index, pki: Pki, sg: RootPki, sg_index: Index
) -> None:
    """sort=price over two roots: the merged answer is cheapest first, whichever root each
    result comes from, and says which order it is in."""
    prices = {"CN": [30.0, 10.0], "SG": [20.0, 5.0]}
    nodes: dict[str, float] = {}
    for root, figures in prices.items():
        for price in figures:
            node = Node(namespace=f"{root}.01" if root == "SG" else "CN.31.CMCC")
            rec = node.record(
                attributes=node.record().attributes.model_copy(
                    update={"price_cny_per_unit_hour": price}
                )
            )
            if root == "SG":
                await sg_index.put(Keys.rec(node.cpid), ca.sign_document(rec, sg.ns_key).to_json())
            else:
                await index.put(Keys.rec(node.cpid), signed(pki, rec).to_json())
            nodes[node.cpid] = price
    await until(lambda: all(served(fed, c) for c in nodes), what="every record")
    got = fed.discover(Query(sort="price"))
    assert [nodes[m.cpid] for m in got.results] == [5.0, 10.0, 20.0, 30.0]
    assert got.ranking is not None and got.ranking["sort"] == "price"
    keys_shown = [m.rank["keys"][0]["value"] for m in got.results if m.rank]
    assert keys_shown == [5.0, 10.0, 20.0, 30.0]
    assert [nodes[m.cpid] for m in fed.discover(Query(sort="price", limit=2)).results] == [
        5.0,
        10.0,
    ]


async def test_http_roots_filter_and_readyz(
    fed: Federation,
    index: Index,
    pki: Pki,
    sg: RootPki,
    sg_index: Index,
    aiohttp_client: Any,
    anchor_file: Path,
) -> None:
    cn_node, sg_node = Node(), Node(namespace="SG.01")
    await put_record(index, pki, cn_node)
    await sg.put(sg_index, sg_node)
    config = resolver_config("127.0.0.1:1", anchor_file)
    client: Client = await aiohttp_client(create_app(config, resolver=fed))
    await until(lambda: fed.get(cn_node.cpid) and fed.get(sg_node.cpid), what="both roots")

    async def cpids(q: str) -> list[str]:
        resp = await client.get(f"/v1/discover?{q}")
        assert resp.status == 200, await resp.text()
        return [r["cpid"] for r in (await resp.json())["results"]]

    assert sorted(await cpids("kind=GPU")) == sorted([cn_node.cpid, sg_node.cpid])
    assert await cpids("within=SG") == [sg_node.cpid]
    assert await cpids("roots=SG") == [sg_node.cpid]
    assert sorted(await cpids("roots=cn,SG")) == sorted([cn_node.cpid, sg_node.cpid])
    for bad in ("roots=", "roots=CN,CN", "roots=CN.31", "roots=C1", "roots=CN&roots=SG"):
        resp = await client.get(f"/v1/discover?{bad}")
        assert resp.status == 400, bad
        assert (await resp.json())["error"]["code"] == "invalid_query"
    assert (await client.get(f"/v1/resources/{sg_node.cpid}")).status == 200
    ready = await client.get("/readyz")
    body = await ready.json()
    assert ready.status == 200, body
    assert set(body["roots"]) == {"CN", "SG"} and body["served"] == 2


async def test_watch_across_roots_resumes_per_root(
    fed: Federation,
    index: Index,
    pki: Pki,
    sg: RootPki,
    sg_index: Index,
    aiohttp_client: Any,
    anchor_file: Path,
) -> None:
    config = resolver_config("127.0.0.1:1", anchor_file)
    client: Client = await aiohttp_client(create_app(config, resolver=fed))
    resp = await client.get("/v1/watch")
    assert resp.status == 200
    sse = SSE(resp)
    cn_node, sg_node = Node(), Node(namespace="SG.01")
    await put_record(index, pki, cn_node)
    first = await sse.next()
    assert first["event"] == "put" and first["data"]["cpid"] == cn_node.cpid
    assert first["data"]["root"] == "CN"
    await sg.put(sg_index, sg_node)
    second = await sse.next()
    assert second["data"]["cpid"] == sg_node.cpid and second["data"]["root"] == "SG"
    resume = second["id"]
    assert resume is not None and set(parse_fed_cursor(resume)) == {"CN", "SG"}
    resp.close()
    # two more changes while disconnected, one per root; resuming replays exactly them
    cn2, sg2 = Node(), Node(namespace="SG.01")
    await put_record(index, pki, cn2)
    await sg.put(sg_index, sg2)
    await until(lambda: fed.get(cn2.cpid) and fed.get(sg2.cpid), what="both new records")
    resp = await client.get("/v1/watch", headers={"Last-Event-ID": resume})
    sse = SSE(resp)
    got = {(await sse.next())["data"]["cpid"] for _ in range(2)}
    assert got == {cn2.cpid, sg2.cpid}
    resp.close()
    # roots= restricts the stream; a malformed id is a 400
    resp = await client.get("/v1/watch", headers={"Last-Event-ID": "CN:1,CN:2"})
    assert resp.status == 400
    resp = await client.get("/v1/watch?roots=SG", headers={"Last-Event-ID": resume})
    sse = SSE(resp)
    assert (await sse.next())["data"]["cpid"] == sg2.cpid
    resp.close()


def test_cursor_text_round_trip() -> None:
    c = {"SG": (7, 2), "CN": (12, 0)}
    assert format_fed_cursor(c) == "CN:12,SG:7.2"
    assert parse_fed_cursor("CN:12,SG:7.2") == c
    for bad in ("12", "CN:x", "CN:1,CN:2", ":1", "C N:1", "CN:-1"):
        with pytest.raises(QueryError):
            parse_fed_cursor(bad)
    assert parse_roots("cn,SG") == frozenset({"CN", "SG"})


async def test_cross_root_forgery_is_refused(
    fed: Federation, index: Index, pki: Pki, sg: RootPki, sg_index: Index
) -> None:
    # 1. SG's genuine chain and record, planted in CN's index: CN trusts only CN's anchor
    planted = Node(namespace="SG.01")
    await sg.publish(index)
    await sg.put(index, planted)
    # 2. CN's root "delegating" SG.02 (a cert outside its own root) and a record under it
    forged_key = keys.generate()
    cert = Cert(
        subject="SG.02",
        issuer="CN",
        public_key=keys.public_to_b64url(forged_key),
        scopes=["issue"],
        serial="forged",
        not_before=int(time.time()) - 60,
        not_after=int(time.time()) + 3600,
    )
    kid = keys.kid_of(forged_key)
    await index.put(Keys.cert(kid), ca.sign_document(cert, pki.root).to_json())
    forged = Node(namespace="SG.02")
    await index.put(Keys.rec(forged.cpid), ca.sign_document(forged.record(), forged_key).to_json())
    # 3. the same forged record in SG's own index, with CN's cert: no SG anchor signs it
    await sg_index.put(Keys.cert(kid), ca.sign_document(cert, pki.root).to_json())
    await sg_index.put(
        Keys.rec(forged.cpid), ca.sign_document(forged.record(), forged_key).to_json()
    )
    marker = Node()
    await put_record(index, pki, marker)  # after the forgeries: once it is served, they were seen
    genuine = Node(namespace="SG.01")
    await sg.put(sg_index, genuine)
    await until(lambda: fed.get(marker.cpid) and fed.get(genuine.cpid), what="the markers")
    for node in (planted, forged):
        assert fed.get(node.cpid) is None
        with pytest.raises(NotFoundError):
            fed.resolve(node.cpid)
    found = {m.cpid for m in fed.discover(Query(limit=100)).results}
    assert found == {marker.cpid, genuine.cpid}
    cn = fed.members[0].resolver
    assert cn is not None and cn.health()["records"] >= 3  # CN's replica holds and refuses them
    assert cn.health()["rejected"], cn.health()


async def test_endorsement_added_and_revoked_live(
    index: Index,
    pki: Pki,
    sg: RootPki,
    sg_index: Index,
    etcd_server: EtcdProcess,
    etcd_private: EtcdProcess,
    aiohttp_client: Any,
    anchor_file: Path,
) -> None:
    await pki.publish(index)
    await sg.publish(sg_index)
    sg_node = Node(namespace="SG.01")
    await sg.put(sg_index, sg_node)
    f = federation(
        [
            spec("CN", "CN", etcd_server.endpoint, pki.anchor),
            spec("SG", "SG", etcd_private.endpoint, None, endorsed_by="CN"),
        ]
    )
    config = resolver_config("127.0.0.1:1", anchor_file)
    client: Client = await aiohttp_client(create_app(config, resolver=f))
    await until(lambda: f.home.ready, what="CN listed")
    url = f"/v1/resources/{sg_node.cpid}"
    resp = await client.get(url)
    assert resp.status == 404
    assert "not trusted now" in (await resp.json())["error"]["message"]
    # a client holding only CN's anchor learns SG's key from CN's index, live
    await index.put(endorse_key("SG"), endorsement(pki, sg).to_json())

    async def served() -> bool:
        return (await client.get(url)).status == 200

    await until(served, what="SG served once endorsed")
    assert (await client.get("/readyz")).status == 200
    # what the resolver serves lets a client holding only CN's anchor verify SG's record
    listed = (await (await client.get("/v1/endorsements")).json())["endorsements"]
    assert [(e["root"], e["endorsed_by"]) for e in listed] == [("SG", "CN")]
    body = await (await client.get(url)).json()
    anchors = endorsed_anchors(
        TrustAnchors([pki.anchor]), [Envelope.from_dict(listed[0]["envelope"])]
    )
    result = verify_record(
        Envelope.from_dict(body["record"]),
        [Envelope.from_dict(c) for c in body["chain"]],
        anchors=anchors,
    )
    assert result.ok, result.reason
    # revoke: delete the endorsement; time from the delete to the last 200 served
    last_ok = 0.0
    stop = asyncio.Event()

    async def hammer() -> None:
        nonlocal last_ok
        while not stop.is_set():
            r = await client.get(url)
            if r.status == 200:
                last_ok = time.monotonic()
            await r.read()

    task = asyncio.create_task(hammer())
    await asyncio.sleep(0.2)
    revoked_at = time.monotonic()
    await index.delete(endorse_key("SG"))
    await until(lambda: not f.members[1].active(time.time()), within=5, what="SG gated")
    await asyncio.sleep(0.3)
    stop.set()
    await task
    gap = last_ok - revoked_at
    print(f"\nrevocation to last served SG record: {gap * 1000:.1f} ms")
    assert gap < 1.0
    resp = await client.get(url)
    assert resp.status == 404
    assert (await (await client.get("/v1/endorsements")).json())["endorsements"] == []
    disc = await (await client.get("/v1/discover?within=SG")).json()
    assert disc["results"] == []
    ready = await (await client.get("/readyz")).json()
    assert ready["roots"]["SG"]["trusted"] is False
    assert "no endorsement" in ready["roots"]["SG"]["endorsement_error"]
    # endorsed again: served again, without a restart
    await index.put(endorse_key("SG"), endorsement(pki, sg).to_json())
    await until(served, what="SG served again")


async def test_endorsement_expired_forged_or_constrained(
    index: Index,
    pki: Pki,
    sg: RootPki,
    sg_index: Index,
    etcd_server: EtcdProcess,
    etcd_private: EtcdProcess,
) -> None:
    await pki.publish(index)
    await sg.publish(sg_index)
    node = Node(namespace="SG.01")
    await sg.put(sg_index, node)
    f = federation(
        [
            spec("CN", "CN", etcd_server.endpoint, pki.anchor),
            spec("SG", "SG", etcd_private.endpoint, None, endorsed_by="CN"),
        ]
    )
    sg_member = f.members[1]
    async with f:
        now = int(time.time())
        expired = endorsement(pki, sg, not_before=now - 7200, not_after=now - 3600)
        await index.put(endorse_key("SG"), expired.to_json())
        await until(
            lambda: (
                "expired" in sg_member.endorsement_error
                or "valid from" in sg_member.endorsement_error
            ),
            what="expired endorsement refused",
        )
        assert f.get(node.cpid) is None
        # signed by SG itself, not by CN: refused
        await index.put(endorse_key("SG"), endorsement(sg, sg).to_json())
        await until(lambda: "not a root anchor" in sg_member.endorsement_error, what="forged")
        assert sg_member.resolver is None
        # valid, but SG may speak only for SG.02: SG.01's record is not served
        await index.put(endorse_key("SG"), endorsement(pki, sg, permitted=["SG.02"]).to_json())
        await until(
            lambda: sg_member.resolver is not None and sg_member.resolver.ready, what="SG listed"
        )
        await asyncio.sleep(0.3)
        assert f.get(node.cpid) is None
        assert f.discover(Query(within="SG")).results == []
        # widened to SG: served
        await index.put(endorse_key("SG"), endorsement(pki, sg).to_json())
        await until(lambda: f.get(node.cpid) is not None, what="SG.01 served")


async def test_one_root_down_the_other_serves(
    fed: Federation,
    index: Index,
    pki: Pki,
    sg: RootPki,
    sg_index: Index,
    etcd_private: EtcdProcess,
    aiohttp_client: Any,
    anchor_file: Path,
) -> None:
    cn_node, sg_node = Node(), Node(namespace="SG.01")
    await put_record(index, pki, cn_node)
    await sg.put(sg_index, sg_node)
    config = resolver_config("127.0.0.1:1", anchor_file)
    client: Client = await aiohttp_client(create_app(config, resolver=fed))
    await until(lambda: fed.get(cn_node.cpid) and fed.get(sg_node.cpid), what="both roots")
    etcd_private.stop()

    async def sg_not_ready() -> bool:
        resp = await client.get("/readyz")
        body = await resp.json()
        return resp.status == 503 and body.get("not_ready") == ["SG"]

    await until(sg_not_ready, within=15, what="/readyz naming SG")
    body = await (await client.get("/readyz")).json()
    assert body["roots"]["CN"]["ready"] is True and body["roots"]["SG"]["stale"] is True
    assert "SG" in body["error"]["message"]
    assert (await client.get(f"/v1/resources/{cn_node.cpid}")).status == 200
    stale = await client.get(f"/v1/resources/{sg_node.cpid}")  # last known state, marked
    assert stale.status == 200 and stale.headers.get("X-CPI-Stale") == "1"
    cn2 = Node()
    await put_record(index, pki, cn2)  # CN keeps following its index
    await until(lambda: fed.get(cn2.cpid), what="CN still live")


async def test_sharding_one_root_over_two_clusters(
    index: Index, pki: Pki, sg_index: Index, etcd_server: EtcdProcess, etcd_private: EtcdProcess
) -> None:
    """CN.31 in one etcd, CN.32 in another; each cluster speaks only for its prefixes."""
    await pki.publish(index)
    await pki.publish(sg_index)
    a, b = Node(namespace="CN.31.CMCC"), Node(namespace="CN.32", region="32")
    stray = Node(namespace="CN.32", region="32")
    await put_record(index, pki, a)
    await put_record(index, pki, stray)  # CN.32 in the CN.31 cluster: not its prefix
    await put_record(sg_index, pki, b)
    f = federation(
        [
            spec("cn-a", "CN", etcd_server.endpoint, pki.anchor, prefixes=("CN.31", "CN")),
            spec("cn-b", "CN", etcd_private.endpoint, pki.anchor, prefixes=("CN.32",)),
        ]
    )
    async with f:
        await until(lambda: f.ready, what="both clusters listed")
        await until(lambda: f.get(a.cpid) and f.get(b.cpid), what="both shards")
        assert f.get(stray.cpid) is None
        assert {m.cpid for m in f.discover(Query(limit=50)).results} == {a.cpid, b.cpid}
        assert [m.cpid for m in f.discover(Query(within="CN.32")).results] == [b.cpid]


# -- the bundle ------------------------------------------------------------------------


def _bundle(tmp_path: Path, roots: list[dict[str, Any]]) -> Path:
    p = tmp_path / "bundle.json"
    p.write_text(json.dumps({"type": "anchor-bundle.v1", "roots": roots}))
    return p


def _root(name: str, anchor: Anchor | None, **kw: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"root": name, "indexes": [{"etcd": {"endpoints": ["127.0.0.1:1"]}}]}
    if anchor is not None:
        out["anchor"] = json.loads(anchor.to_json())
    out.update(kw)
    return out


def test_bundle_loads(tmp_path: Path, pki: Pki, sg: RootPki) -> None:
    (tmp_path / "sg.json").write_bytes(sg.anchor.to_json())
    path = _bundle(
        tmp_path,
        [
            _root(
                "CN",
                pki.anchor,
                indexes=[
                    {"etcd": {"endpoints": ["a:2379"]}, "prefixes": ["CN.31", "CN"]},
                    {
                        "name": "cn-south",
                        "etcd": {"endpoints": ["b:2379"], "password_file": "pw"},
                        "prefixes": ["cn.44"],
                    },
                ],
            ),
            _root("SG", None, anchor_file="sg.json"),
            _root("JP", None, endorsed_by="cn"),
        ],
    )
    specs = load_bundle(path)
    assert [(s.name, s.root, s.prefixes) for s in specs] == [
        ("CN", "CN", ("CN.31", "CN")),
        ("cn-south", "CN", ("CN.44",)),
        ("SG", "SG", ("SG",)),
        ("JP", "JP", ("JP",)),
    ]
    assert specs[1].etcd.password_file == tmp_path / "pw"
    assert specs[2].anchor == sg.anchor and specs[3].endorsed_by == "CN"


@pytest.mark.parametrize(
    ("roots", "message"),
    [
        ([], "roots"),
        ([{"root": "CN"}], "indexes"),
        ("anchor-of-SG-for-CN", "a root's anchor must have the root itself as subject"),
        ("twice", "root CN is listed twice"),
        ("no-anchor", "give exactly one of anchor, anchor_file, endorsed_by"),
        ("endorser-unknown", "endorsed_by 'FR' must name another root"),
        ("prefix-outside", "prefix SG.1 is outside its root CN"),
        ("prefix-twice", "prefix CN.31 is served by two index clusters"),
        ("password", "no secrets in a bundle"),
        ("not-a-root", "is a namespace below a root"),
        ("only-endorsed", "endorsed_by 'SG' must name another root"),
    ],
)
def test_bad_bundle_is_a_clear_config_error(
    tmp_path: Path, pki: Pki, sg: RootPki, roots: Any, message: str
) -> None:
    cn = _root("CN", pki.anchor)
    cases: dict[str, list[dict[str, Any]]] = {
        "anchor-of-SG-for-CN": [_root("CN", sg.anchor)],
        "twice": [cn, _root("cn", pki.anchor)],
        "no-anchor": [_root("CN", None)],
        "endorser-unknown": [cn, _root("SG", None, endorsed_by="FR")],
        "prefix-outside": [_root("CN", pki.anchor, indexes=[{"etcd": {}, "prefixes": ["SG.1"]}])],
        "prefix-twice": [
            _root(
                "CN",
                pki.anchor,
                indexes=[
                    {"etcd": {}, "prefixes": ["CN.31"]},
                    {"etcd": {}, "prefixes": ["CN.31"]},
                ],
            )
        ],
        "password": [_root("CN", pki.anchor, indexes=[{"etcd": {"password": "hunter2"}}])],
        "not-a-root": [_root("CN.31", pki.anchor)],
        "only-endorsed": [_root("SG", None, endorsed_by="SG")],
    }
    path = _bundle(tmp_path, cases[roots] if isinstance(roots, str) else roots)
    with pytest.raises(ConfigError, match=message) as info:
        load_bundle(path)
    assert str(info.value).startswith(f"anchor bundle {path}")
    assert "hunter2" not in str(info.value)


def test_bundle_not_json_or_missing(tmp_path: Path) -> None:
    bad = tmp_path / "b.json"
    bad.write_text("{")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_bundle(bad)
    with pytest.raises(ConfigError, match="No such file"):
        load_bundle(tmp_path / "absent.json")


def test_config_takes_a_bundle_or_anchors(tmp_path: Path, pki: Pki) -> None:
    from resolver.config import load_config

    path = _bundle(tmp_path, [_root("CN", pki.anchor)])
    config = load_config(data={"anchor_bundle": str(path)})
    assert config.federated and config.load_anchors().subjects == ["CN"]
    with pytest.raises(ConfigError, match="exclude each other"):
        load_config(data={"anchor_bundle": str(path), "anchor_files": [str(path)]})
    with pytest.raises(ConfigError, match="anchor_files"):
        load_config(data={})


async def test_cpi_endorse_sign_publish_withdraw(
    index: Index,
    pki: Pki,
    sg: RootPki,
    sg_index: Index,
    etcd_server: EtcdProcess,
    etcd_private: EtcdProcess,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The CLI path an operator takes: sign offline, publish, withdraw; the resolver follows."""
    from cpi.main import main
    from registry import keyfile

    await pki.publish(index)
    await sg.publish(sg_index)
    node = Node(namespace="SG.01")
    await sg.put(sg_index, node)
    cn_key = tmp_path / "cn.key"
    keyfile.write_private(cn_key, pki.root)
    (tmp_path / "cn.json").write_bytes(pki.anchor.to_json())
    (tmp_path / "sg.json").write_bytes(sg.anchor.to_json())
    argv = ["endorse", "sign", "--key", str(cn_key), "--issuer", "CN"]
    assert main([*argv, "--subject-anchor", str(tmp_path / "sg.json"), "--days", "7"]) == 0
    signed = tmp_path / "endorse.json"
    signed.write_text(capsys.readouterr().out)
    # an endorsement that does not verify against the given anchor is not published
    etcd = ["--etcd", etcd_server.endpoint]
    assert main(["endorse", "publish", str(signed), "--anchor", str(tmp_path / "sg.json"), *etcd])
    assert await index.get(endorse_key("SG")) is None
    capsys.readouterr()
    f = federation(
        [
            spec("CN", "CN", etcd_server.endpoint, pki.anchor),
            spec("SG", "SG", etcd_private.endpoint, None, endorsed_by="CN"),
        ]
    )
    async with f:
        await until(lambda: f.home.ready, what="CN listed")
        publish = ["endorse", "publish", str(signed), "--anchor", str(tmp_path / "cn.json")]
        assert await asyncio.to_thread(main, [*publish, *etcd]) == 0
        assert json.loads(capsys.readouterr().out)["subject"] == "SG"
        await until(lambda: served(f, node.cpid), what="SG served")
        assert await asyncio.to_thread(main, ["endorse", "withdraw", "SG", *etcd]) == 0
        await until(lambda: not f.members[1].active(time.time()), within=2, what="withdrawn")
        with pytest.raises(NotFoundError, match="not trusted now"):
            f.resolve(node.cpid)


async def test_watch_says_relist_when_a_root_is_withdrawn(
    index: Index,
    pki: Pki,
    sg: RootPki,
    sg_index: Index,
    etcd_server: EtcdProcess,
    etcd_private: EtcdProcess,
) -> None:
    await pki.publish(index)
    await sg.publish(sg_index)
    await index.put(endorse_key("SG"), endorsement(pki, sg).to_json())
    f = federation(
        [
            spec("CN", "CN", etcd_server.endpoint, pki.anchor),
            spec("SG", "SG", etcd_private.endpoint, None, endorsed_by="CN"),
        ]
    )
    async with f:
        await until(lambda: f.ready and f.members[1].active(time.time()), what="both ready")
        events = aiter(f.watch(heartbeat=0.2))
        seen: list[Any] = []

        async def until_event(pred: Any) -> Any:
            async with asyncio.timeout(10):
                while True:
                    ev = await anext(events)
                    seen.append(ev)
                    if pred(ev):
                        return ev

        # the stream starts now: once both members have said where they are
        await until_event(lambda e: e.type == "progress" and len(parse_fed_cursor(e.id)) == 2)
        node = Node(namespace="SG.01")
        await sg.put(sg_index, node)
        put = await until_event(lambda e: e.type == "put")
        assert put.cpid == node.cpid and put.to_dict()["root"] == "SG"
        assert set(parse_fed_cursor(put.id)) == {"CN", "SG"}
        await index.delete(endorse_key("SG"))
        relist = await until_event(lambda e: e.type == "relist")
        assert "trusted roots changed" in relist.reason
        assert set(parse_fed_cursor(relist.id)) == {"CN"}
        await events.aclose()  # type: ignore[attr-defined]


async def test_dns_answers_for_both_roots(
    fed: Federation, index: Index, pki: Pki, sg: RootPki, sg_index: Index
) -> None:
    import dns.message
    import dns.rcode

    from resolver.dns.answerer import DnsAnswerer
    from schemas.cpid import parse as parse_cpid

    cn_node, sg_node = Node(), Node(namespace="SG.01")
    await put_record(index, pki, cn_node)
    await sg.put(sg_index, sg_node)
    await until(lambda: fed.get(cn_node.cpid) and fed.get(sg_node.cpid), what="both roots")
    answerer = DnsAnswerer(fed, zone="cpi.")
    try:
        for node in (cn_node, sg_node):
            q = dns.message.make_query(parse_cpid(node.cpid).to_dns("cpi."), "TXT")
            resp = dns.message.from_wire(answerer.answer(q.to_wire()) or b"")
            assert resp.rcode() == dns.rcode.NOERROR and resp.answer, node.cpid
        forged = Node(namespace="SG.01")  # an SG record only in CN's index: not answered
        await sg.put(index, forged)
        q = dns.message.make_query(parse_cpid(forged.cpid).to_dns("cpi."), "TXT")
        resp = dns.message.from_wire(answerer.answer(q.to_wire()) or b"")
        assert not resp.answer
    finally:
        answerer.close()


async def test_bundle_file_changes_apply_live(
    index: Index,
    pki: Pki,
    sg: RootPki,
    sg_index: Index,
    etcd_server: EtcdProcess,
    etcd_private: EtcdProcess,
    tmp_path: Path,
) -> None:
    """Roots added to and removed from the bundle file are served / dropped, no restart;
    a broken file changes nothing and says why."""
    await pki.publish(index)
    await sg.publish(sg_index)
    cn_node, sg_node = Node(), Node(namespace="SG.01")
    await put_record(index, pki, cn_node)
    await sg.put(sg_index, sg_node)

    def root(name: str, anchor: Anchor, endpoint: str) -> dict[str, Any]:
        return {
            "root": name,
            "anchor": json.loads(anchor.to_json()),
            "indexes": [{"etcd": {"endpoints": [endpoint], "timeout_s": 2.0}}],
        }

    cn = root("CN", pki.anchor, etcd_server.endpoint)
    path = _bundle(tmp_path, [cn])
    f = Federation.from_bundle(path, latency=LatencyTable.from_file(LATENCY), settings=FAST)
    f._bundle_poll = 0.05
    async with f:
        await until(lambda: served(f, cn_node.cpid), what="CN")
        assert not served(f, sg_node.cpid)
        _bundle(tmp_path, [cn, root("SG", sg.anchor, etcd_private.endpoint)])
        await until(lambda: served(f, sg_node.cpid), what="SG added live")
        assert served(f, cn_node.cpid) and f.members[0].resolver is f.home
        path.write_text("{")
        await until(lambda: "not valid JSON" in f.bundle_error, what="broken bundle refused")
        assert served(f, sg_node.cpid) and f.health()["bundle_error"]
        other = ca.make_anchor("CN", keys.generate())
        _bundle(tmp_path, [root("CN", other, etcd_server.endpoint)])  # the home root changed
        await until(lambda: "must stay unchanged" in f.bundle_error, what="home change refused")
        _bundle(tmp_path, [cn])
        await until(lambda: not served(f, sg_node.cpid), what="SG removed live")
        assert f.bundle_error == "" and [m.name for m in f.members] == ["CN"]
        assert served(f, cn_node.cpid)
