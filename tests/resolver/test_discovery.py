"""Discovery: filters, indexes and ranking (on the I/O-free replica state), and query parsing."""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest

from registry.index import Index, Keys
from resolver.core import DiscoveryResult, Resolver
from resolver.discovery import (
    LatencyTable,
    Query,
    free_score,
    latency_score,
)
from resolver.errors import QueryError
from resolver.state import Change, ReplicaState
from resolver.verify import Context, Job, Outcome, run_jobs
from schemas import dsse
from tests.resolver.kit import LATENCY, Node, Pki, put_record, put_status, signed
from tests.until import until


async def inline(ctx: Context, jobs: Sequence[Job]) -> AsyncIterator[list[Outcome]]:
    yield run_jobs(ctx, jobs)


class World:
    """A replica state fed directly, one revision per write (no etcd)."""

    def __init__(self, pki: Pki) -> None:
        self.pki = pki
        self.state = ReplicaState(anchors=pki.anchors, latency=LatencyTable.from_file(LATENCY))
        self.rev = 1

    async def put(self, key: str, value: bytes) -> None:
        self.rev += 1
        await self.state.apply([Change("put", key, value, self.rev)], self.rev, check=inline)

    async def publish(self) -> None:
        for ns, cert in self.pki.certs.items():
            await self.put(Keys.cert(self.pki.kid(ns)), cert.to_json())

    async def node(self, free: int | None = 8, claimed: int = 0, **kw: Any) -> Node:
        node = Node(**kw)
        await self.put(Keys.rec(node.cpid), signed(self.pki, node.record()).to_json())
        if free is not None:
            await self.put(Keys.live(node.cpid), node.status(free=free).to_json())
        if claimed:
            await self.put(Keys.alloc(node.cpid), str(claimed).encode())
        return node

    def find(self, **kw: Any) -> list[str]:
        return [m.cpid for m in self.state.discovery.search(Query(**kw))]


@pytest.fixture
async def world(pki: Pki) -> World:
    w = World(pki)
    await w.publish()
    return w


async def test_within_is_segment_wise(world: World) -> None:
    n3 = await world.node(namespace="CN.3")
    n31 = await world.node(namespace="CN.31")
    cmcc = await world.node(namespace="CN.31.CMCC")
    assert world.find(within="CN.3") == [n3.cpid]
    assert sorted(world.find(within="CN.31")) == sorted([n31.cpid, cmcc.cpid])
    assert world.find(within="cn.31.cmcc") == [cmcc.cpid]
    assert len(world.find(within="CN")) == 3
    assert world.find(within="CN.32") == []


async def test_filters_combine(world: World) -> None:
    h100 = await world.node(model="H100", labels={"tier": "gold", "zone": "a"})
    a800 = await world.node(model="A800", labels={"tier": "gold", "zone": "b"})
    cpu = await world.node(kind="CPU", count=0, labels={"tier": "silver"})
    down = await world.node(model="h100", free=None, labels={"tier": "bronze"})
    assert sorted(world.find(accelerator="h100")) == sorted([h100.cpid, down.cpid])
    assert world.find(accelerator="H100", live=True) == [h100.cpid]
    assert world.find(accelerator="H100", live=False) == [down.cpid]
    assert world.find(kind="CPU") == [cpu.cpid]
    assert sorted(world.find(labels=(("tier", "gold"),))) == sorted([h100.cpid, a800.cpid])
    assert world.find(labels=(("tier", "gold"), ("zone", "b"))) == [a800.cpid]
    assert world.find(labels=(("tier", "gold"), ("zone", "c"))) == []
    assert world.find(kind="GPU", accelerator="A800", within="CN.31") == [a800.cpid]
    assert world.find(kind="NPU") == []


async def test_min_free_counts_claims_from_alloc(world: World) -> None:
    roomy = await world.node(free=8)
    claimed = await world.node(free=8, claimed=6)
    draining = await world.node(free=8)
    await world.put(Keys.live(draining.cpid), draining.status(free=8, state="draining").to_json())
    assert world.find(min_free=4) == [roomy.cpid]
    assert world.state.served[claimed.cpid].free == 2
    assert world.state.served[draining.cpid].free == 0
    assert world.find(min_free=2) == [roomy.cpid, claimed.cpid]
    await world.put(Keys.alloc(claimed.cpid), b'{"units": 1}')
    assert sorted(world.find(min_free=4)) == sorted([roomy.cpid, claimed.cpid])
    await world.put(Keys.alloc(roomy.cpid), b"gibberish")  # unreadable: nothing counts as free
    assert world.find(min_free=1) == [claimed.cpid]


async def test_ranking_by_latency_and_free_units(world: World) -> None:
    sh = await world.node(region="31", free=1)
    sh_roomy = await world.node(region="31", free=8)
    suzhou = await world.node(region="3205", free=8)
    gansu = await world.node(region="62", free=16)
    nowhere = await world.node(region="44", free=16)  # Guangdong: not in the table
    results = world.state.discovery.search(Query(near="31", limit=10))
    assert [m.cpid for m in results] == [
        sh_roomy.cpid,  # 0.6 * 1/1.2 + 0.4 * 8/16
        suzhou.cpid,  # a few ms away, 8 free
        sh.cpid,  # nearest, but 1 free
        gansu.cpid,  # far, 16 free
        nowhere.cpid,  # unknown latency counts as 50 ms
    ]
    by = {m.cpid: m for m in results}
    assert by[sh_roomy.cpid].latency_ms == 2.0
    assert by[nowhere.cpid].latency_ms is None
    expected = 0.6 * latency_score(2.0) + 0.4 * free_score(8)
    assert math.isclose(by[sh_roomy.cpid].score, expected)
    # without `near`, free units alone decide, ties broken by CPID
    no_near = [m.cpid for m in world.state.discovery.search(Query(limit=10))]
    assert no_near[:2] == sorted([gansu.cpid, nowhere.cpid])
    assert no_near[-1] == sh.cpid
    # max_latency_ms excludes the far and the unknown
    assert sorted(world.find(near="31", max_latency_ms=10)) == sorted(
        [sh.cpid, sh_roomy.cpid, suzhou.cpid]
    )
    assert world.find(near="31", limit=2) == [sh_roomy.cpid, suzhou.cpid]


async def test_a_region_below_the_table_falls_back_to_its_province(world: World) -> None:
    district = await world.node(region="310115")  # Pudong: only "31" is in the table
    match = world.state.discovery.search(Query(near="32"))[0]
    assert match.cpid == district.cpid
    assert match.latency_ms == LatencyTable.from_file(LATENCY).rtt("32", "31")


async def test_indexes_follow_changes(world: World) -> None:
    node = await world.node(model="H100", free=8)
    await world.put(
        Keys.rec(node.cpid),
        signed(world.pki, node.record(version=2, labels={"tier": "x"})).to_json(),
    )
    assert world.find(labels=(("tier", "gold"),)) == []
    assert world.find(labels=(("tier", "x"),)) == [node.cpid]
    await world.put(Keys.live(node.cpid), node.status(free=1).to_json())
    assert world.find(min_free=2) == []
    world.rev += 1
    await world.state.apply(
        [Change("delete", Keys.rec(node.cpid), revision=world.rev)], world.rev, check=inline
    )
    assert world.find() == []
    assert world.state.discovery.groups == 0


async def test_discover_against_etcd(index: Index, pki: Pki, resolver: Resolver) -> None:
    a, b = Node(), Node(region="62")
    for n in (a, b):
        await put_record(index, pki, n)
        await put_status(index, n, free=8)
    await index.put(Keys.alloc(a.cpid), b"7")
    await until(lambda: len(resolver.discover(Query(near="31")).results) == 2, what="both")
    await until(lambda: resolver.resolve(a.cpid).free == 1, what="the claim")
    d = resolver.discover(Query(near="31", min_free=2))
    assert [m.cpid for m in d.results] == [b.cpid]
    assert d.revision == resolver.revision and d.stale is False


# -- query parsing ------------------------------------------------------------------------------


def test_query_round_trips_through_url_parameters() -> None:
    q = Query.from_params(
        [
            ("kind", "gpu"),
            ("within", "cn.31"),
            ("accelerator", "H100"),
            ("min_free", "4"),
            ("near", "31"),
            ("max_latency_ms", "12.5"),
            ("label", "tier:gold"),
            ("label", "zone:a:b"),
            ("live", "true"),
            ("limit", "5"),
        ]
    )
    assert q == Query(
        kind="GPU",
        within="CN.31",
        accelerator="h100",
        min_free=4,
        near="31",
        max_latency_ms=12.5,
        labels=(("tier", "gold"), ("zone", "a:b")),
        live=True,
        limit=5,
    )
    assert Query.from_params(q.to_params()) == q
    assert Query.from_params({}).limit == 20


@pytest.mark.parametrize("ms", [12.345678901, 0.1 + 0.2, 1e-7, 123456789.125, 2.0])
def test_max_latency_keeps_every_digit_through_url_parameters(ms: float) -> None:
    q = Query(near="31", max_latency_ms=ms)
    sent = dict(q.to_params())["max_latency_ms"]
    assert float(sent) == ms
    assert Query.from_params(q.to_params()).max_latency_ms == ms


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ([("kind", "TPU")], "expected one of CPU, GPU"),
        ([("within", "CN.3-1")], "character outside"),
        ([("min_free", "-1")], "0 or more"),
        ([("near", "Shanghai")], "GB/T 2260"),
        ([("near", "31"), ("max_latency_ms", "0")], "positive"),
        ([("near", "31"), ("max_latency_ms", "nan")], "positive"),
        ([("label", "Tier:gold")], "key must match"),
        ([("label", "nocolon")], "expected key:value"),
        ([("kind", "GPU"), ("kind", "CPU")], "more than once"),
        ([("limit", "0")], "between 1 and 500"),
        ([("live", "maybe")], "true or false"),
        ([("accelerator", " ")], "1 to 256"),
    ],
)
def test_bad_queries_say_what_is_wrong(params: list[tuple[str, str]], match: str) -> None:
    with pytest.raises(QueryError, match=match):
        Query.from_params(params)


def test_latency_table_lookups(tmp_path: Any) -> None:
    t = LatencyTable.from_file(LATENCY)
    assert t.rtt("31", "31") == 2.0
    assert t.rtt("31", "62") == t.rtt("62", "31") > 20
    assert t.rtt("320500", "31") == t.rtt("3205", "31")  # prefecture of a district
    assert t.rtt("44", "4403") == 2.0  # same province, neither in the table
    assert t.rtt("44", "31") is None
    assert LatencyTable().rtt("31", "62") is None
    bad = tmp_path / "bad.json"
    bad.write_text('{"rtt_ms": [1, 2]}')
    with pytest.raises(QueryError, match="expected"):
        LatencyTable.from_file(bad)


def test_free_units_add_back_what_the_agent_already_withheld_for_claims() -> None:
    """An agent that reports free minus claimed (metric claimed_units) is not counted twice."""
    from resolver.entry import free_units
    from resolver.verify import RecordFacts, StatusFacts
    from schemas.cpid import derive
    from schemas.keys import generate, public_raw, public_to_b64url
    from schemas.models import Accelerator, Attributes, Capacity, Location, Record, Status

    node = generate()
    cpid = str(derive("CN.31", "GPU", public_raw(node)))
    rec = Record(
        cpid=cpid, kind="GPU", public_key=public_to_b64url(node), issuer="CN.31", version=1,
        issued_at=1, expires_at=2, location=Location(region="31"),
        attributes=Attributes(accelerators=[Accelerator(vendor="NVIDIA", model="H100", memory_gib=80, count=8)]),
    )  # fmt: skip
    facts = RecordFacts.of(rec)

    def status(free: int, withheld: float | None) -> StatusFacts:
        metrics = {} if withheld is None else {"claimed_units": withheld}
        return StatusFacts.of(
            Status(cpid=cpid, seq=1, observed_at=1, state="up",
                   capacity=Capacity(accelerators_free=free), metrics=metrics)
        )  # fmt: skip

    # 8 cards, 3 claimed in /alloc/: an agent that knows reports 5 free and 3 withheld
    assert free_units(facts, status(5, 3), claimed=3) == 5
    # an agent that does not know yet reports 8 free: the same answer
    assert free_units(facts, status(8, None), claimed=3) == 5
    # nonsense metrics never add units
    assert free_units(facts, status(5, -4), claimed=3) == 2


async def test_the_answer_text_is_the_answer_object_encoded(world: World) -> None:
    """``DiscoveryResult.to_json`` (what ``/v1/discover`` sends) splices in each record as
    pydantic writes it: it must read back to exactly ``to_dict()``, whatever the record
    holds (non-ASCII labels, floats, a record that leaves optional fields out)."""
    await world.node(labels={"site": '上海 "东"\\区', "tier": "gold"}, region="31")
    await world.node(free=3, model="Ascend 910B", count=4, region="62")
    await world.node(free=None, kind="CPU", count=0, labels={})
    await world.node(claimed=2, free=5, labels={"note": "\u0000 and \u2028"})
    queries = [
        Query(),
        Query(near="31", limit=2),
        Query(kind="GPU", sort="free"),
        Query(near="31", sort="score", weights=(("free", 2.0),)),
    ]
    for q in queries:
        results = world.state.discovery.search(q)
        assert results
        for stale in (False, True):
            ranking = {"sort": q.order, "function": "f", "weights": dict(q.weight_map)}
            for order in (None, ranking):
                d = DiscoveryResult(results, world.rev, stale, order)
                assert json.loads(d.to_json()) == d.to_dict()
    assert b'"record":{' in DiscoveryResult(results, 1, False).to_json()


async def test_a_canonical_payload_is_shown_as_signed_any_other_as_pydantic_writes_it(
    world: World,
) -> None:
    """Verification notes whether a record's payload is exactly what pydantic writes for
    it (as this project's registries sign it); answers then show those bytes instead of
    parsing and writing them again.  Any other spelling of a valid record is shown as
    pydantic writes it: the same text either way."""
    canonical = await world.node(labels={"site": '上海 "东"\\区'})
    odd = Node(labels={"site": "上海"})
    rec = odd.record()
    fields = rec.model_dump(mode="json", exclude_none=True)
    # the same record spelt otherwise: keys in reverse order, indented, ASCII escapes
    text = json.dumps(dict(reversed(list(fields.items()))), indent=1)
    env = dsse.sign(rec.media_type(), text.encode(), world.pki.key_of(rec.issuer))
    await world.put(Keys.rec(odd.cpid), env.to_json())
    a, b = world.state.served[canonical.cpid], world.state.served[odd.cpid]
    assert a.facts.canonical and not b.facts.canonical
    assert a.record_text().encode() == a.sealed.payload
    assert b.record_text().encode() != b.sealed.payload
    for e in (a, b):
        assert e.record_text() == e.record.model_dump_json(exclude_none=True)
        assert json.loads(e.record_text()) == e.record_dict()
