"""The discovery index answers exactly what a brute-force scan of every entry answers:
ordered by score (descending) then CPID, first ``limit``."""

from __future__ import annotations

import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from resolver.discovery import DiscoveryIndex, LatencyTable, Match, Query
from resolver.entry import Entry, seal
from resolver.verify import RecordFacts, StatusFacts
from schemas.cpid import ns_contains
from schemas.dsse import Envelope
from tests.resolver.kit import LATENCY, bare_entry

TABLE = LatencyTable.from_file(LATENCY)
NAMESPACES = ["CN.31.A", "CN.31.B", "CN.32.A", "CN.3205.X", "CN.11.A", "CN.62.Z"]
REGIONS = ["31", "32", "3205", "11", "62", "1307", "99"]
MODELS = ["h100", "a800", "910b"]
LABELS = [("tier", "gold"), ("tier", "silver"), ("rack", "r1"), ("rack", "r2")]
ENV = Envelope("application/x", b"{}", ())


def make_entry(i: int, rng: random.Random) -> Entry:
    ns = rng.choice(NAMESPACES)
    kind = rng.choice(["GPU", "NPU", "CPU"])
    cpid = f"{ns}/{kind}.{i:012d}-{rng.randrange(100):02d}"
    accel = () if kind == "CPU" else tuple(sorted(set(rng.sample(MODELS, rng.randint(1, 2)))))
    labels = tuple(sorted(rng.sample(LABELS, rng.randint(0, 2))))
    facts = RecordFacts(cpid, kind, "pk", 1, 0, rng.choice(REGIONS), accel, labels)
    status = None
    if rng.random() < 0.8:
        state = rng.choice(["up", "up", "up", "down", "draining"])
        status = StatusFacts(cpid, state, rng.randint(0, 6), rng.randint(0, 6))
    return bare_entry(facts, seal(ENV), status=status, claimed=rng.randint(0, 3))


def brute(entries: dict[str, Entry], q: Query) -> list[tuple[str, float, int, float | None]]:
    out = []
    for e in entries.values():
        region = TABLE.key(e.region) or e.region
        latency = None if q.near is None else TABLE.rtt(q.near, region)
        if q.kind is not None and e.id.kind != q.kind:
            continue
        if q.within is not None and not ns_contains(q.within, e.id.prefix):
            continue
        if q.accelerator is not None and q.accelerator not in e.facts.accelerators:
            continue
        if q.min_free is not None and e.free < q.min_free:
            continue
        if q.live is not None and e.live != q.live:
            continue
        if not set(q.labels) <= set(e.facts.labels):
            continue
        if q.max_latency_ms is not None and (latency is None or latency > q.max_latency_ms):
            continue
        out.append((e.cpid, q.score(e.free, latency), e.free, latency))
    out.sort(key=lambda m: (-m[1], m[0]))
    return out[: q.limit]


def shape(ms: list[Match]) -> list[tuple[str, float, int, float | None]]:
    return [(m.cpid, m.score, m.free, m.latency_ms) for m in ms]


queries = st.builds(
    Query,
    kind=st.none() | st.sampled_from(["GPU", "NPU", "CPU"]),
    within=st.none() | st.sampled_from(["CN", "CN.31", "CN.31.A", "CN.3205", "CN.7"]),
    accelerator=st.none() | st.sampled_from([*MODELS, "l40s"]),
    min_free=st.none() | st.integers(0, 7),
    near=st.none() | st.sampled_from(REGIONS),
    labels=st.lists(st.sampled_from([*LABELS, ("rack", "r9")]), max_size=2, unique=True).map(tuple),
    live=st.none() | st.booleans(),
    limit=st.integers(1, 40),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32), n=st.integers(0, 400), q=queries, drop=st.integers(0, 50))
def test_index_matches_brute_force(seed: int, n: int, q: Query, drop: int) -> None:
    rng = random.Random(seed)
    entries: dict[str, Entry] = {}
    index = DiscoveryIndex(entries, TABLE)
    order = list(range(n))
    rng.shuffle(order)  # insertion order must not matter
    for i in order:
        e = make_entry(i, rng)
        entries[e.cpid] = e
        index.add(e)
    for cpid in rng.sample(sorted(entries), min(drop, len(entries))):  # and removals
        index.remove(entries.pop(cpid))
    assert shape(index.search(q)) == brute(entries, q)


def test_remove_leaves_no_group_behind() -> None:
    rng = random.Random(1)
    entries = {e.cpid: e for e in (make_entry(i, rng) for i in range(50))}
    index = DiscoveryIndex(entries, TABLE)
    for e in entries.values():
        index.add(e)
    assert index.groups > 0
    for e in list(entries.values()):
        index.remove(e)
    assert index.groups == 0
    assert index.search(Query()) == []


def _index_state(index: DiscoveryIndex) -> tuple[object, ...]:
    """The index's sets and label bookkeeping, with facets named rather than numbered
    (their numbers follow the order they were first seen)."""

    def named(loc: tuple[tuple[str, int], int]) -> tuple[object, ...]:
        gkey, sub = loc
        return gkey, index._facets[sub >> 1], sub & 1

    sets = {named(loc): set(index._group[loc[0]][loc[1]]) for loc in index._locs}
    few = {
        pair: {cpid: named(loc) for cpid, loc in (dict([held]) if isinstance(held, tuple) else held).items()}
        for pair, held in index._label_few.items()
    }  # fmt: skip
    heads = dict(zip(index._facets, index._heads, strict=True))
    return sets, index._size, dict(index._label_count), few, heads, index.groups


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32), n=st.integers(1, 300), rare=st.integers(0, 6), q=queries)
def test_adding_alike_entries_together_is_adding_them_one_by_one(
    seed: int, n: int, rare: int, q: Query
) -> None:
    """What a warm start does (ReplicaState.restore): entries alike in facet, region, free
    units and liveness go in together; the index is the same as after adding each (sets,
    label counts and the entries kept for rare labels, past the rare bound or not), with
    entries indexed already and repeated ones added once."""
    rng = random.Random(seed)
    entries = {e.cpid: e for e in (make_entry(i, rng) for i in range(n))}
    one, together = (DiscoveryIndex(entries, TABLE) for _ in range(2))
    one._RARE = together._RARE = rare
    alike: dict[tuple[object, ...], list[Entry]] = {}
    for e in entries.values():
        one.add(e)
        key = (e.kind, e.facts.accelerators, e.namespace, TABLE.key(e.region), e.free, e.live)
        alike.setdefault(key, []).append(e)
    early = rng.sample(list(entries.values()), min(3, n))
    for e in early:  # indexed already: not counted twice
        together.add(e)
    for group in alike.values():
        together.add_alike([*group, group[-1]])  # a repeated entry: added once
    assert _index_state(together) == _index_state(one)
    assert shape(together.search(q)) == shape(one.search(q)) == brute(entries, q)
