"""The discovery index answers what a brute-force filter and sort of every entry answers,
for every ``sort=`` order and filter, while entries come, go and change score group
(free units, liveness), and whichever way a query is planned (walking the score groups
or collecting the admitted subgroups)."""

from __future__ import annotations

import dataclasses
import json
import random
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from resolver import ranking
from resolver.discovery import DiscoveryIndex, LatencyTable, Match, Query
from resolver.entry import Entry, Sealed, seal
from resolver.errors import QueryError
from resolver.verify import RecordFacts, StatusFacts
from schemas.cpid import ns_contains
from schemas.dsse import Envelope
from tests.resolver.kit import LATENCY, bare_entry

TABLE = LatencyTable.from_file(LATENCY)
NAMESPACES = ["CN.31.A", "CN.31.B", "CN.32.A", "CN.3205.X", "CN.11.A", "CN.62.Z"]
LATE_NAMESPACES = ["CN.31.C", "CN.44.N"]  # appear only after the first queries
REGIONS = ["31", "32", "3205", "11", "62", "1307", "99"]
MODELS = ["h100", "a800", "910b"]
LABELS = [("tier", "gold"), ("tier", "silver"), ("rack", "r1"), ("rack", "r2")]


def _envelope(obj: dict[str, Any]) -> Sealed:
    return seal(Envelope("application/x", json.dumps(obj).encode(), ()))


# score inputs: a few record and status payloads shared by many entries, some with gaps
RECORDS = [
    _envelope(
        {
            "attributes": {} if price is None else {"price_cny_per_unit_hour": price},
            "location": {k: v for k, v in (("pue", pue), ("grid_gco2_per_kwh", grid)) if v},
        }
    )
    for price, pue, grid in [
        (None, None, None),
        (8.0, 1.2, 500.0),
        (8.0, None, 400.0),
        (12.5, 1.3, None),
        (4.0, 1.5, 300.0),
        (None, 1.1, 600.0),
    ]
]
STATUSES = [
    _envelope({"metrics": {}}),
    _envelope({"metrics": {"gpu_util": 40.0}}),
    _envelope({"metrics": {"gpu_util": 90.0, "gpu_mem_used_mib": 10.0, "gpu_mem_total_mib": 80.0}}),
]


def _spy_reads(index: DiscoveryIndex) -> list[str]:
    """The CPIDs whose labels or entry ``index`` reads from now on, in order."""
    read: list[str] = []
    plain_labels, plain_entry = index._labels, index._entry

    def spy_labels(cpid: str) -> tuple[tuple[str, str], ...]:
        read.append(cpid)
        return plain_labels(cpid)

    def spy_entry(cpid: str) -> Entry:
        read.append(cpid)
        return plain_entry(cpid)

    index._labels = spy_labels  # type: ignore[method-assign]
    index._entry = spy_entry  # type: ignore[method-assign]
    return read


def make_entry(cpid: str, rng: random.Random) -> Entry:
    """An entry for ``cpid`` (kind and namespace from it) with random facts and status."""
    kind = cpid.partition("/")[2].partition(".")[0]
    accel = () if kind == "CPU" else tuple(sorted(set(rng.sample(MODELS, rng.randint(1, 2)))))
    labels = tuple(sorted(rng.sample(LABELS, rng.randint(0, 2))))
    facts = RecordFacts(cpid, kind, "pk", 1, 0, rng.choice(REGIONS), accel, labels)
    status = status_env = None
    if rng.random() < 0.8:
        state = rng.choice(["up", "up", "up", "down", "draining"])
        status = StatusFacts(cpid, state, rng.randint(0, 6), rng.randint(0, 6))
        status_env = rng.choice(STATUSES)
    return bare_entry(
        facts,
        rng.choice(RECORDS),
        status=status,
        status_sealed=status_env,
        claimed=rng.randint(0, 3),
    )


def new_cpid(i: int, rng: random.Random, namespaces: list[str] = NAMESPACES) -> str:
    kind = rng.choice(["GPU", "NPU", "CPU"])
    return f"{rng.choice(namespaces)}/{kind}.{i:012d}-{rng.randrange(100):02d}"


Row = tuple[str, float, int, float | None]


def passes(e: Entry, q: Query, latency: float | None) -> bool:
    return (
        (q.kind is None or e.id.kind == q.kind)
        and (q.within is None or ns_contains(q.within, e.id.prefix))
        and (q.accelerator is None or q.accelerator in e.facts.accelerators)
        and (q.min_free is None or e.free >= q.min_free)
        and (q.live is None or e.live == q.live)
        and set(q.labels) <= set(e.facts.labels)
        and (q.max_latency_ms is None or (latency is not None and latency <= q.max_latency_ms))
    )


def brute(entries: dict[str, Entry], q: Query) -> list[Row]:
    """Filter every entry, compute its full sort key, sort, cut."""
    rows: list[tuple[tuple[Any, ...], Row]] = []
    for e in entries.values():
        region = TABLE.key(e.region) or e.region
        latency = None if q.near is None else TABLE.rtt(q.near, region)
        if not passes(e, q, latency):
            continue
        score = q.score(e.free, latency)
        if q.order == "default":
            key: tuple[Any, ...] = (-score, e.cpid)
        else:
            key = ranking.explain(
                e.cpid,
                e.free,
                latency,
                ranking.entry_facts(e),
                sort=q.order,
                near=q.near is not None,
                weights=q.weight_map,
            ).sort_key()
        rows.append((key, (e.cpid, score, e.free, latency)))
    rows.sort(key=lambda r: r[0])
    return [row for _, row in rows[: q.limit]]


def shape(ms: list[Match]) -> list[Row]:
    return [(m.cpid, m.score, m.free, m.latency_ms) for m in ms]


@st.composite
def queries(draw: st.DrawFn) -> Query:
    sort = draw(st.none() | st.sampled_from(ranking.SORTS))
    weights: tuple[tuple[str, float], ...] = ()
    if sort in (None, "score") and draw(st.booleans()):
        weights = tuple(
            (c, w)
            for c, w in zip(
                ranking.CATEGORIES,
                draw(st.lists(st.sampled_from([0.0, 1.0, 2.5]), min_size=4, max_size=4)),
                strict=True,
            )
        )
    near = draw(st.none() | st.sampled_from(REGIONS))
    try:
        return Query(
            kind=draw(st.none() | st.sampled_from(["GPU", "NPU", "CPU"])),
            within=draw(st.none() | st.sampled_from(["CN", "CN.31", "CN.31.A", "CN.3205", "CN.7"])),
            accelerator=draw(st.none() | st.sampled_from([*MODELS, "l40s"])),
            min_free=draw(st.none() | st.integers(0, 7)),
            near=near,
            max_latency_ms=draw(st.none() | st.sampled_from([1.0, 5.0, 30.0])) if near else None,
            labels=tuple(
                draw(st.lists(st.sampled_from([*LABELS, ("rack", "r9")]), max_size=2, unique=True))
            ),
            live=draw(st.none() | st.booleans()),
            limit=draw(st.integers(1, 40)),
            sort=sort,
            weights=weights,
        )
    except QueryError:
        assume(False)
        raise


PLANS = {"auto": DiscoveryIndex._COLLECT, "collect": 0, "walk": 10**9}
PLACE = [1, DiscoveryIndex._PLACE]  # place a rare label's entries up to 1/1 or 1/128
RARE = [0, 3, DiscoveryIndex._RARE, 10**6]  # label pairs with their entries' set: up to ...


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32),
    n=st.integers(0, 300),
    qs=st.lists(queries(), min_size=1, max_size=4),
    churn=st.integers(0, 120),
    plan=st.sampled_from(sorted(PLANS)),
    rare=st.sampled_from(RARE),
    place=st.sampled_from(PLACE),
)
def test_every_order_matches_brute_force_under_churn(
    seed: int, n: int, qs: list[Query], churn: int, plan: str, rare: int, place: int
) -> None:
    rng = random.Random(seed)
    entries: dict[str, Entry] = {}
    index = DiscoveryIndex(entries, TABLE)
    index._COLLECT = PLANS[plan]
    index._RARE = rare
    index._PLACE = place
    serial = 0

    def put(e: Entry) -> None:
        old = entries.get(e.cpid)
        if old is not None:
            index.remove(old)  # the replica removes the OLD entry object, then adds
        entries[e.cpid] = e
        index.add(e)

    for _ in range(n):
        serial += 1
        put(make_entry(new_cpid(serial, rng), rng))
    for q in qs:  # answers before the churn (fills the caches the churn must not spoil)
        assert shape(index.search(q)) == brute(entries, q), q
    for step in range(churn):
        op = rng.random()
        if op < 0.25 and entries:  # gone
            index.remove(entries.pop(rng.choice(sorted(entries))))
        elif op < 0.7 and entries:  # a new status / claim: free units and liveness move
            cpid = rng.choice(sorted(entries))
            put(make_entry(cpid, rng))
        else:  # new, sometimes under a namespace no query has seen yet
            serial += 1
            put(make_entry(new_cpid(serial, rng, NAMESPACES + LATE_NAMESPACES), rng))
        if step % 15 == 0:
            q = qs[step % len(qs)]
            assert shape(index.search(q)) == brute(entries, q), q
    for q in qs:
        assert shape(index.search(q)) == brute(entries, q), q
    for e in list(entries.values()):
        index.remove(e)
    assert index.groups == 0
    assert index._pairs == 0 and not index._subs
    assert not index._label_count and not index._label_few and not index._locs
    assert index._size == 0


@pytest.mark.parametrize(("plan", "rare"), [(p, r) for p in sorted(PLANS) for r in (0, 10**6)])
def test_many_queries_on_one_large_index(plan: str, rare: int) -> None:
    """3,000 entries, every order with many filter combinations, every query plan."""
    rng = random.Random(plan)
    entries: dict[str, Entry] = {}
    index = DiscoveryIndex(entries, TABLE)
    index._COLLECT = PLANS[plan]
    index._RARE = rare
    for i in range(3000):
        e = make_entry(new_cpid(i, rng), rng)
        entries[e.cpid] = e
        index.add(e)
    qrng = random.Random(1)
    checked = 0
    while checked < 150:
        try:
            sort = qrng.choice([None, *ranking.SORTS])
            near = qrng.choice([None, *REGIONS])
            q = Query(
                kind=qrng.choice([None, "GPU", "NPU", "CPU"]),
                within=qrng.choice([None, "CN.31", "CN.62.Z", "CN.3205"]),
                accelerator=qrng.choice([None, *MODELS]),
                min_free=qrng.choice([None, 1, 5]),
                near=near,
                labels=qrng.choice([(), (("tier", "gold"),), (("rack", "r1"), ("tier", "silver"))]),
                live=qrng.choice([None, True, False]),
                limit=qrng.choice([1, 7, 50]),
                sort=sort,
            )
        except QueryError:
            continue
        assert shape(index.search(q)) == brute(entries, q), q
        checked += 1


def test_a_selective_filter_touches_only_its_subgroups() -> None:
    """A query naming one namespace collects that namespace's sets; it reads the labels
    of no entry outside them, however the score groups are ordered.  A label pair no
    entry has answers at once; a rare one looks at its own entries only."""
    rng = random.Random(5)
    entries: dict[str, Entry] = {}
    index = DiscoveryIndex(entries, TABLE)
    index._RARE = 64  # the test's labels are common, but for x:y
    for i in range(2000):
        e = make_entry(new_cpid(i, rng), rng)
        entries[e.cpid] = e
        index.add(e)
    rare = make_entry("CN.11.A/GPU.999999999999-00", rng)
    rare = dataclasses.replace(rare, facts=rare.facts._replace(labels=(("x", "y"),)))
    entries[rare.cpid] = rare
    index.add(rare)
    read = _spy_reads(index)
    q = Query(within="CN.62.Z", kind="NPU", labels=(("rack", "r1"), ("tier", "gold")), near="31")
    found = index.search(q)
    assert shape(found) == brute(entries, q)
    inside = {c for c in entries if c.startswith("CN.62.Z/NPU.")}
    assert read and set(read) <= inside
    assert len(read) - len(found) <= len(inside)  # each admitted member once (+ results)

    read.clear()
    q = Query(kind="GPU", labels=(("rack", "r9"),))
    assert index.search(q) == [] == brute(entries, q)
    assert read == []

    q = Query(near="62", labels=(("x", "y"),), limit=3)
    assert [m.cpid for m in index.search(q)] == [rare.cpid]
    assert set(read) == {rare.cpid}


def test_clear_forgets_everything() -> None:
    rng = random.Random(2)
    entries = {e.cpid: e for e in (make_entry(new_cpid(i, rng), rng) for i in range(100))}
    index = DiscoveryIndex(entries, TABLE)
    for e in entries.values():
        index.add(e)
    assert index.search(Query(kind="GPU", near="31"))
    index.clear()
    assert index.groups == 0
    assert index.search(Query(kind="GPU", near="31")) == []
    for e in entries.values():  # and works again from scratch
        index.add(e)
    q = Query(kind="GPU", near="31", sort="price")
    assert shape(index.search(q)) == brute(entries, q)


def test_remove_of_an_unknown_entry_changes_nothing() -> None:
    rng = random.Random(3)
    entries: dict[str, Entry] = {}
    index = DiscoveryIndex(entries, TABLE)
    index.remove(make_entry("CN.31.A/GPU.000000000001-00", rng))
    e = make_entry("CN.31.A/GPU.000000000002-00", rng)
    entries[e.cpid] = e
    index.add(e)
    index.remove(make_entry("CN.62.Z/CPU.000000000003-00", rng))
    assert [m.cpid for m in index.search(Query())] == [e.cpid]


def test_entries_whose_cpid_text_does_not_begin_with_their_namespace() -> None:
    """Ties are cut by CPID text, and a set is skipped when all its CPIDs sort after
    the answer's; an entry whose text does not begin ``<namespace>/<kind>.`` (not made
    by the replica, but possible through the API) turns that shortcut off for its
    facet rather than being skipped wrongly."""
    rng = random.Random(9)
    entries: dict[str, Entry] = {}
    index = DiscoveryIndex(entries, TABLE)
    for i in range(400):
        e = make_entry(new_cpid(i, rng), rng)
        if i % 7 == 0:  # same facet as its neighbours, text sorting first of all
            odd = f"A.{i:04d}/{e.id.kind}.x-00"
            e = dataclasses.replace(e, facts=e.facts._replace(cpid=odd))
        entries[e.cpid] = e
        index.add(e)
    for q in (Query(), Query(kind="GPU", limit=5), Query(near="31", labels=(("tier", "gold"),))):
        assert shape(index.search(q)) == brute(entries, q), q


def test_a_new_latency_table_regroups_the_entries() -> None:
    rng = random.Random(4)
    entries = {e.cpid: e for e in (make_entry(new_cpid(i, rng), rng) for i in range(300))}
    # names 1307 and 3205 by their province (13, 32); TABLE by themselves
    index = DiscoveryIndex(entries, LatencyTable({"13": {"32": 9.0}, "32": {}}))
    for e in entries.values():
        index.add(e)
    index.search(Query(near="31"))  # an order cached under the old table
    index.table = TABLE
    for q in (Query(near="31"), Query(near="3205", max_latency_ms=5.0, sort="latency")):
        assert shape(index.search(q)) == brute(entries, q), q
    for e in list(entries.values()):  # removals find the entries where the new table put them
        index.remove(e)
    assert index.groups == 0


def test_a_rare_label_is_not_read_through_when_the_namespace_holds_fewer() -> None:
    """Every label is rare here (held by ~500 of 2,000 entries): a query that names one
    namespace as well reads the entries of that namespace, not the label's."""
    rng = random.Random(6)
    entries: dict[str, Entry] = {}
    index = DiscoveryIndex(entries, TABLE)
    for i in range(2000):
        e = make_entry(new_cpid(i, rng), rng)
        entries[e.cpid] = e
        index.add(e)
    assert index._few(Query(labels=(("rack", "r1"),))) is not None
    read = _spy_reads(index)
    q = Query(within="CN.62.Z", kind="NPU", labels=(("rack", "r1"),), near="31", limit=50)
    found = index.search(q)
    assert shape(found) == brute(entries, q)
    inside = {c for c in entries if c.startswith("CN.62.Z/NPU.")}
    assert set(read) <= inside
    assert len(read) <= len(inside) + len(found)
