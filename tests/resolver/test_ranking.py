"""Ranking: the cpi-cats-v1 scores (hand-computed values, bounds, monotonicity), the
sort orders of discovery with their explanations, and the sort/weights parameters."""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, cast

import pytest
from hypothesis import given
from hypothesis import strategies as st

from registry.index import Keys
from resolver import ranking
from resolver.discovery import Match, Query
from resolver.errors import QueryError
from schemas.models import Attributes, CpuInfo, Location
from tests.resolver.kit import Node, Pki, signed
from tests.resolver.test_discovery import World

if TYPE_CHECKING:
    from resolver.entry import Entry

# -- the functions, by hand -------------------------------------------------------------


def test_saturating_map_by_hand() -> None:
    assert ranking.sat(0, 10) == 10
    assert ranking.sat(10, 10) == 5
    assert ranking.sat(30, 10) == 2.5
    assert ranking.sat(-5, 10) == 10  # negative inputs count as 0


def test_compute_score_by_hand() -> None:
    # f = 8 / 16 = 0.5; idle 1 - 0.5; free memory 1 - 0.5: 10 * (0.25 + 0.15 + 0.1) / 1
    assert ranking.compute_score(8, 50, 0.5) == pytest.approx(5.0)
    # all idle, 24 free: f = 0.75 -> 10 * (0.375 + 0.3 + 0.2)
    assert ranking.compute_score(24, 0, 0) == pytest.approx(8.75)
    # nothing free, fully busy
    assert ranking.compute_score(0, 100, 1) == 0
    # without metrics only the free term counts, rescaled: 10 * 0.5 * 0.5 / 0.5
    assert ranking.compute_score(8, None, None) == pytest.approx(5.0)
    # utilisation only: 10 * (0.5 * 0.5 + 0.3 * 0.8) / 0.8
    assert ranking.compute_score(8, 20, None) == pytest.approx(10 * 0.49 / 0.8)


def test_other_categories_by_hand() -> None:
    assert ranking.communication_score(0) == 10
    assert ranking.communication_score(10) == 5
    assert ranking.communication_score(None) == pytest.approx(10 / 6)  # unknown: 50 ms
    assert ranking.cost_score(None) is None
    assert ranking.cost_score(10) == 5
    assert ranking.cost_score(30) == 2.5
    assert ranking.carbon_figure(400, 1.25) == 500
    assert ranking.carbon_figure(400, None) == 600  # PUE not stated: 1.5
    assert ranking.carbon_figure(None, 1.1) is None
    assert ranking.energy_score(500) == 5
    assert ranking.energy_score(None) is None


def test_level2_is_the_weighted_mean_of_the_present_categories() -> None:
    l1 = {"compute": 8.0, "communication": 2.0, "cost": None, "energy": 5.0}
    assert ranking.level2(l1, ranking.DEFAULT_WEIGHTS) == pytest.approx(5.0)
    w = {"compute": 1.0, "communication": 3.0}
    assert ranking.level2(l1, w) == pytest.approx((8 + 6) / 4)
    assert ranking.level2(l1, {"cost": 1.0}) is None  # the only weighted one is missing


def test_score_of_one_result_by_hand() -> None:
    facts = ranking.EntryFacts(
        gpu_util=50, mem_used_mib=40, mem_total_mib=80, price=10, pue=1.25, grid=400
    )
    s = ranking.score(facts, 8, 10.0, near=True)
    assert s.l1 == {"compute": 5.0, "communication": 5.0, "cost": 5.0, "energy": 5.0}
    assert s.l2 == 5.0 and s.carbon == 500
    # without near there is no communication score, and L2 leaves it out
    s = ranking.score(facts, 8, None, near=False)
    assert s.l1["communication"] is None and s.l2 == 5.0
    assert s.to_dict(ranking.DEFAULT_WEIGHTS)["function"] == "cpi-cats-v1"


# -- properties ---------------------------------------------------------------------------

finite = st.floats(min_value=0, max_value=1e12, allow_nan=False, allow_infinity=False)
pct = st.floats(min_value=0, max_value=100, allow_nan=False)
frac = st.floats(min_value=0, max_value=1, allow_nan=False)
free = st.integers(min_value=0, max_value=10**9)


@given(free, free, st.one_of(st.none(), pct), st.one_of(st.none(), frac))
def test_compute_is_bounded_and_grows_with_free_units(
    a: int, b: int, util: float | None, mem: float | None
) -> None:
    lo, hi = sorted((a, b))
    x, y = ranking.compute_score(lo, util, mem), ranking.compute_score(hi, util, mem)
    assert 0 <= x <= y <= 10


@given(free, pct, pct, frac, frac)
def test_compute_falls_as_accelerators_get_busier(
    n: int, u1: float, u2: float, m1: float, m2: float
) -> None:
    (ul, uh), (ml, mh) = sorted((u1, u2)), sorted((m1, m2))
    assert ranking.compute_score(n, uh, ml) <= ranking.compute_score(n, ul, ml) + 1e-12
    assert ranking.compute_score(n, ul, mh) <= ranking.compute_score(n, ul, ml) + 1e-12


@given(finite, finite)
def test_saturating_scores_are_bounded_and_fall_as_the_figure_rises(a: float, b: float) -> None:
    lo, hi = sorted((a, b))
    for fn in (ranking.communication_score, ranking.cost_score, ranking.energy_score):
        x, y = fn(lo), fn(hi)
        assert x is not None and y is not None
        assert 0 <= y <= x <= 10


@given(
    st.dictionaries(
        st.sampled_from(ranking.CATEGORIES),
        st.one_of(st.none(), st.floats(min_value=0, max_value=10)),
    ),
    st.dictionaries(
        st.sampled_from(ranking.CATEGORIES),
        st.one_of(st.just(0.0), st.floats(min_value=ranking.MIN_WEIGHT, max_value=100)),
    ),
)
def test_level2_lies_between_the_scores_it_averages(
    l1: dict[str, float | None], weights: dict[str, float]
) -> None:
    l2 = ranking.level2(l1, weights)
    used = [v for c, v in l1.items() if v is not None and weights.get(c, 0) > 0]
    if not used:
        assert l2 is None
    else:
        assert l2 is not None and min(used) - 1e-9 <= l2 <= max(used) + 1e-9


# -- parameters ---------------------------------------------------------------------------


def test_weights_parse_with_aliases_and_round_trip() -> None:
    w = ranking.parse_weights("latency:2,price:1")
    assert w == (("communication", 2.0), ("cost", 1.0))
    assert ranking.parse_weights(ranking.weights_text(w)) == w
    q = Query.from_params({"weights": "free:1,carbon:0.5", "near": "31"})
    assert q.order == "score" and dict(q.weights) == {"compute": 1.0, "energy": 0.5}
    assert Query.from_params(q.to_params()) == q
    assert Query.from_params({"sort": "PRICE"}).sort == "price"


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"sort": "cheapest"}, "expected one of default, latency, free, score, price, carbon"),
        ({"sort": "latency"}, "sort=latency needs near"),
        ({"weights": "speed:1"}, "breaks the rule"),
        ({"weights": "latency"}, "breaks the rule"),
        ({"weights": "latency:-1"}, "breaks the rule"),
        ({"weights": "latency:101"}, "breaks the rule"),
        ({"weights": "price:1e-9"}, "breaks the rule"),
        ({"weights": "latency:nan"}, "breaks the rule"),
        ({"weights": "latency:1,network:2"}, "breaks the rule"),  # one category twice
        ({"weights": "latency:0,price:0"}, "at least one above 0"),
        ({"weights": ""}, "name:number pairs"),
        ({"weights": "price:1", "sort": "free"}, "weights apply to sort=score only"),
        ({"weights": "latency:1,price:1"}, "need near"),
    ],
)
def test_bad_sort_or_weights_name_the_rule(params: dict[str, str], match: str) -> None:
    with pytest.raises(QueryError, match=match) as err:
        Query.from_params(params)
    assert err.value.code == "invalid_query" and err.value.http_status == 400


# -- discovery order ------------------------------------------------------------------------

FIGURES: dict[str, dict[str, Any]] = {
    # name: region, free, metrics, price, pue, grid
    "sh": {"region": "31", "free": 8, "util": 10, "price": 20.0, "pue": 1.3, "grid": 600},
    "sc": {"region": "51", "free": 4, "util": 90, "price": 8.0, "pue": 1.2, "grid": 150},
    "gs": {"region": "62", "free": 2, "util": 0, "price": 12.0, "pue": 1.2, "grid": None},
    "nx": {"region": "31", "free": 1, "util": None, "price": None, "pue": None, "grid": None},
}


@pytest.fixture
async def world(pki: Pki) -> World:
    w = World(pki)
    await w.publish()
    return w


async def _nodes(world: World) -> dict[str, Node]:
    out = {}
    for name, f in FIGURES.items():
        node = Node(region=f["region"])
        rec = node.record(
            location=Location(
                region=f["region"], site="S1", pue=f["pue"], grid_gco2_per_kwh=f["grid"]
            ),
            attributes=node.record().attributes.model_copy(
                update={"price_cny_per_unit_hour": f["price"]}
            ),
        )
        await world.put(Keys.rec(node.cpid), signed(world.pki, rec).to_json())
        metrics: dict[str, float] = {}
        if f["util"] is not None:
            metrics = {
                "gpu_util": f["util"],
                "gpu_mem_used_mib": 8 * 81920 * f["util"] / 100,
                "gpu_mem_total_mib": 8 * 81920,
            }
        await world.put(
            Keys.live(node.cpid), node.status(free=f["free"], metrics=metrics).to_json()
        )
        out[name] = node
    return out


def _order(world: World, **kw: Any) -> list[Match]:
    return world.state.discovery.search(Query(**kw))


def _names(nodes: dict[str, Node], matches: list[Match]) -> list[str]:
    by_cpid = {n.cpid: name for name, n in nodes.items()}
    return [by_cpid[m.cpid] for m in matches]


def _check_explained(matches: list[Match], sort: str) -> None:
    """Every result explains itself, and the keys it shows are the order it came in."""
    ranked = []
    for m in matches:
        assert m.rank is not None
        assert m.rank["sort"] == sort
        assert m.rank["score"]["function"] == "cpi-cats-v1"
        l2 = m.rank["score"]["l2"]
        assert l2 is None or 0 <= l2 <= 10
        assert m.rank["keys"][-1] == {"name": "cpid", "value": m.cpid, "order": "asc"}
        ranked.append(
            tuple(
                (1, 0)
                if k["value"] is None
                else (0, -k["value"] if k["order"] == "desc" else k["value"])
                for k in m.rank["keys"]
            )
        )
    assert ranked == sorted(ranked)


async def test_each_sort_key_orders_and_explains(world: World) -> None:
    nodes = await _nodes(world)
    # free: 8, 4, 2, 1
    got = _order(world, sort="free", near="31")
    assert _names(nodes, got) == ["sh", "sc", "gs", "nx"]
    _check_explained(got, "free")
    assert got[0].rank is not None and got[0].rank["keys"][0] == {
        "name": "free", "value": 8, "order": "desc"
    }  # fmt: skip
    # latency from Shanghai: the two in 31 first (more free first), then by distance
    got = _order(world, sort="latency", near="31")
    assert _names(nodes, got)[:2] == ["sh", "nx"]
    assert [m.latency_ms for m in got] == sorted(m.latency_ms or math.inf for m in got)
    _check_explained(got, "latency")
    # price: 8, 12, 20, then the node without a price
    got = _order(world, sort="price")
    assert _names(nodes, got) == ["sc", "gs", "sh", "nx"]
    _check_explained(got, "price")
    assert got[-1].rank is not None and got[-1].rank["keys"][0]["value"] is None
    # carbon: Sichuan 180, Shanghai 780, then the two without a grid figure (by L2)
    got = _order(world, sort="carbon")
    assert _names(nodes, got)[:2] == ["sc", "sh"]
    assert got[0].rank is not None and got[0].rank["keys"][0]["value"] == pytest.approx(180)
    _check_explained(got, "carbon")
    # score: L2 descending
    got = _order(world, sort="score", near="31")
    _check_explained(got, "score")
    l2 = [m.rank["score"]["l2"] for m in got if m.rank is not None]
    assert l2 == sorted(l2, reverse=True)
    # the default order is unchanged and explains itself with the blended score
    got = _order(world, near="31")
    _check_explained(got, "default")
    assert [m.cpid for m in got] == [m.cpid for m in sorted(got, key=lambda m: (-m.score, m.cpid))]
    assert got[0].rank is not None and got[0].rank["keys"][0]["name"] == "score"


async def test_weights_change_the_order(world: World) -> None:
    nodes = await _nodes(world)
    cheap = _names(nodes, _order(world, weights=(("cost", 1.0),)))
    assert cheap[:3] == ["sc", "gs", "sh"]
    # free capacity alone: the node with most free units and idle cards leads
    idle = _names(nodes, _order(world, weights=(("compute", 1.0),)))
    assert idle[0] == "sh"
    m = _order(world, weights=(("energy", 2.0), ("compute", 1.0)), limit=1)[0]
    assert m.rank is not None and m.rank["score"]["weights"] == {"compute": 1.0, "energy": 2.0}


async def test_filters_and_limit_still_apply_under_every_sort(world: World) -> None:
    nodes = await _nodes(world)
    for sort in ("free", "latency", "score", "price", "carbon"):
        got = _order(world, sort=sort, near="31", min_free=3, limit=5)
        assert set(_names(nodes, got)) == {"sh", "sc"}
        assert len(_order(world, sort=sort, near="31", limit=1)) == 1
        assert _order(world, sort=sort, near="31", within="CN.32") == []
        # a short answer is the head of a long one (the group walks stop early)
        full = [m.cpid for m in _order(world, sort=sort, near="31", limit=10)]
        for k in (1, 2, 3):
            assert [m.cpid for m in _order(world, sort=sort, near="31", limit=k)] == full[:k]


async def test_score_inputs_follow_a_new_status(world: World) -> None:
    nodes = await _nodes(world)
    sh = nodes["sh"]
    before = _order(world, sort="score", within="CN.31.CMCC", limit=10)
    first = next(m for m in before if m.cpid == sh.cpid)
    await world.put(
        Keys.live(sh.cpid),
        sh.status(
            free=8,
            metrics={"gpu_util": 100, "gpu_mem_used_mib": 1, "gpu_mem_total_mib": 1},
        ).to_json(),
    )
    after = _order(world, sort="score", within="CN.31.CMCC", limit=10)
    second = next(m for m in after if m.cpid == sh.cpid)
    assert first.rank is not None and second.rank is not None
    assert second.rank["score"]["l1"]["compute"] < first.rank["score"]["l1"]["compute"]


def test_record_fields_and_metric_bounds() -> None:
    loc = Location(region="31", pue=1.2, grid_gco2_per_kwh=550)
    assert loc.pue == 1.2
    for bad in ({"pue": 0.9}, {"pue": 6}, {"grid_gco2_per_kwh": -1}, {"grid_gco2_per_kwh": 1e9}):
        with pytest.raises(ValueError):
            Location(region="31", **bad)
    Attributes(cpu=CpuInfo(model="x", cores=1), price_cny_per_unit_hour=12.5)
    for price in (-1, 1e7, math.nan, math.inf):
        with pytest.raises(ValueError):
            Attributes(price_cny_per_unit_hour=price)


opt = st.one_of(st.none(), st.floats(min_value=0, max_value=1e6, allow_nan=False))


@given(
    st.sampled_from(ranking.SORTS[1:]),
    st.booleans(),
    st.integers(min_value=0, max_value=10_000),
    opt,
    st.builds(
        ranking.EntryFacts,
        gpu_util=st.one_of(st.none(), pct),
        mem_used_mib=opt,
        mem_total_mib=opt,
        price=opt,
        pue=st.one_of(st.none(), st.floats(min_value=1, max_value=5)),
        grid=st.one_of(st.none(), st.floats(min_value=0, max_value=2000)),
    ),
    st.dictionaries(
        st.sampled_from(ranking.CATEGORIES),
        st.one_of(st.just(0.0), st.floats(min_value=ranking.MIN_WEIGHT, max_value=100)),
    ),
)
def test_the_fast_sort_key_is_the_explained_one(
    order: str,
    near: bool,
    n: int,
    latency: float | None,
    facts: ranking.EntryFacts,
    weights: dict[str, float],
) -> None:
    """Discovery orders by Sorter.key and shows explain()'s keys: they must agree."""
    w = weights or dict(ranking.DEFAULT_WEIGHTS)
    sorter = ranking.Sorter(order, near=near, weights=w)
    fast = sorter.key(sorter.group(n, latency), "CN/GPU.X", facts)
    slow = ranking.explain("CN/GPU.X", n, latency, facts, sort=order, near=near, weights=w)
    assert fast == slow.sort_key()
    if order in ("price", "carbon"):  # the cheap first pass keeps what the full keys need
        assert ranking.first_key(order, facts) == fast[0]


async def test_every_order_equals_sorting_all_matches_by_their_shown_keys(world: World) -> None:
    """30 nodes with tied prices, carbon figures and free units: each order's best k
    is the head of all matches sorted by the keys each result shows."""
    import random

    rng = random.Random(5)
    for _ in range(30):
        node = Node(region=rng.choice(["31", "32", "51", "62"]))
        rec = node.record(
            location=Location(
                region=node.region,
                pue=rng.choice([None, 1.2, 1.5]),
                grid_gco2_per_kwh=rng.choice([None, 400.0, 600.0]),
            ),
            attributes=node.record().attributes.model_copy(
                update={"price_cny_per_unit_hour": rng.choice([None, 8.0, 12.0])}
            ),
        )
        await world.put(Keys.rec(node.cpid), signed(world.pki, rec).to_json())
        util = rng.choice([0, 50, 100])
        await world.put(
            Keys.live(node.cpid),
            node.status(free=rng.choice([0, 2, 8]), metrics={"gpu_util": util}).to_json(),
        )
    for sort in ranking.SORTS:
        everything = _order(world, sort=sort, near="31", limit=100)
        assert len(everything) == 30
        _check_explained(everything, sort)
        for k in (1, 5, 12):
            assert [m.cpid for m in _order(world, sort=sort, near="31", limit=k)] == [
                m.cpid for m in everything[:k]
            ]


@pytest.mark.parametrize(
    "payload",
    [
        b"not json",
        b"[" * 100_000 + b"]" * 100_000,  # deeper than Python's reader goes
        b'["a list", {"attributes": {"price_cny_per_unit_hour": 3}}]',
        b'{"attributes": {"price_cny_per_unit_hour": NaN}, "location": {"pue": Infinity}}',
        b'{"attributes": {"price_cny_per_unit_hour": -1}, "location": {"pue": "1.2"}}',
        b'{"attributes": {"price_cny_per_unit_hour": 1e400}, "location": {"pue": true}}',
        b"\xff\xfe",
    ],
)
def test_score_inputs_of_unreadable_payloads_are_unknown(payload: bytes) -> None:
    # verified payloads never look like these; should one, it costs its scores alone
    sealed = SimpleNamespace(payload=payload)
    entry = cast(
        "Entry",
        SimpleNamespace(cpid=f"CN.11.T/GPU.{len(payload)}", sealed=sealed, status_sealed=sealed),
    )
    ranking.clear_cache()
    assert ranking.entry_facts(entry) == ranking.EntryFacts(None, None, None, None, None, None)
