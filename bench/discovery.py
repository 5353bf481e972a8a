"""Discovery index: memory per entry and query latency, the new index against the old one.

    python bench/discovery.py [--records 100000,1000000] [--queries 1200] [--ranked 30]

Builds, in process, ``--records`` entries distributed as ``bench/resolve.py``'s
generator makes them (52 industry namespaces over 13 regions, GPU / NPU / CPU, models,
1-16 accelerators, free units, labels ``tier`` and ``rack``) -- real
:class:`resolver.entry.Entry` objects, but without signatures (the index reads only the
CPID, kind, namespace, models, labels, region, free units and liveness) -- and indexes
them twice: with :class:`resolver.discovery.DiscoveryIndex` and with the index it
replaced (:class:`OldIndex` below, kept here as the same-run baseline).  Printed per
size:

* bytes per entry of each index (``tracemalloc``, traced memory after building it
  minus before, divided by the entries) and build time;
* p50 / p99 per query class (wall clock, and CPU time of the process: on a shared
  machine the first includes time the bench was preempted) of ``bench/resolve.py``'s ``queries()`` (the mix
  ``bench/scale.py`` sends over HTTP), the two indexes taking turns query by query; and
  (``--ranked``) of a few queries in the other orders;
* score inputs of ``sort=score|price|carbon`` are read once before such a query is
  timed (both indexes then find them cached);
* CPU time of two queries naming a label that 500, 2,000, 8,000, 8,300 and 20,000
  entries carry (``--label-holders``): the new index keeps a label's entries up to
  8,192 and checks labels entry by entry above that;
* every answer of the new index is compared with the old one's (same CPIDs, scores,
  order); a difference stops the bench.

Ratios are new / old.  Generating a million entries takes about a minute and ~2 GB.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import heapq
import json
import random
import sys
import time
import tracemalloc
from collections.abc import Callable, Collection, Iterator, Mapping
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import seeds
from bench.resolve import MODELS, OPERATORS, REGIONS, namespaces, queries
from resolver import ranking
from resolver.discovery import DiscoveryIndex, LatencyTable, Match, Query
from resolver.entry import Entry, seal
from resolver.verify import RecordFacts, StatusFacts
from schemas.dsse import Envelope

assert OPERATORS  # the namespaces below are bench/resolve.py's

# score inputs for the other orders: a handful of record / status payloads, shared
_RECORDS = [
    seal(
        Envelope(
            "application/vnd.cpi.record.v1+json",
            json.dumps(
                {
                    "attributes": {"price_cny_per_unit_hour": price},
                    "location": {"pue": pue, "grid_gco2_per_kwh": grid},
                }
            ).encode(),
            (),
        )
    )
    for price, pue, grid in [(6.0, 1.2, 500.0), (9.5, 1.3, 300.0), (14.0, 1.15, 700.0)]
]
_STATUSES = [
    seal(
        Envelope(
            "application/vnd.cpi.status.v1+json",
            json.dumps({"metrics": {"gpu_util": util}}).encode(),
            (),
        )
    )
    for util in (5.0, 50.0, 95.0)
]


def entries(n: int, seed: int = 7) -> dict[str, Entry]:
    """``n`` entries with ``bench/resolve.py``'s distribution (``_gen``), unsigned."""
    rng = random.Random(seed)
    nss = namespaces()
    kinds = {k: k for k in ("GPU", "NPU", "CPU")}
    models = {m.casefold(): (m.casefold(),) for _, m in MODELS}
    tiers = ["gold", "silver", "bronze"]
    labels = {(t, r): (("rack", f"r{r}"), ("tier", t)) for t in tiers for r in range(50)}
    out: dict[str, Entry] = {}
    for i in range(n):
        ns, region = nss[rng.randrange(len(nss))]
        if rng.random() < 0.15:
            kind, model = "NPU", MODELS[3][1]
        else:
            kind, model = "GPU", rng.choice(MODELS)[1]
        if rng.random() < 0.1:
            kind = "CPU"
        serial = f"{rng.getrandbits(80):020X}"
        cpid = f"{ns}/{kind}.{serial}-{i % 97:02d}"
        count = rng.choice([1, 2, 4, 8, 8, 8, 16])
        accel = () if kind == "CPU" else models[model.casefold()]
        free = rng.randint(0, count) if kind != "CPU" else 0
        facts = RecordFacts(
            cpid, kinds[kind], "", 1, 0, region, accel, labels[(rng.choice(tiers), i % 50)]
        )
        status = StatusFacts(cpid, "up", free, rng.randint(0, 64))
        out[cpid] = Entry(
            facts=facts,
            sealed=_RECORDS[i % 3],
            chain=(),
            record_revision=1,
            status_facts=status,
            status_sealed=_STATUSES[i % 3],
            status_revision=1,
            lease=0,
            live_held=False,
            held_until=0.0,
            claimed=0,
            revision=1,
            valid_until=float("inf"),
            leases={},
        )
    return out


def ranked_queries(rng: random.Random, n: int) -> list[tuple[str, Query]]:
    """Queries in the other orders (``score``/``price`` cost O(matches))."""
    out: list[tuple[str, Query]] = []
    for _ in range(n):
        region = rng.choice(REGIONS)
        model = rng.choice(MODELS)[1]
        ns = rng.choice(namespaces())[0]
        out += [
            ("sort=free kind+near", Query(kind="GPU", near=region, sort="free")),
            ("sort=latency accelerator+near", Query(accelerator=model, near=region, sort="latency")),
            ("sort=price within(leaf)+near", Query(within=ns, near=region, sort="price")),
            (
                "sort=score within+accel+label",
                Query(within=ns.rsplit(".", 1)[0], accelerator=model, labels=(("tier", "gold"),),
                      near=region, sort="score"),
            ),
        ]  # fmt: skip
    rng.shuffle(out)
    return out


def percentile(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]


def shape(ms: list[Match]) -> list[tuple[str, float, int, float | None]]:
    return [(m.cpid, m.score, m.free, m.latency_ms) for m in ms]


def build(make: Callable[[], Any], es: Mapping[str, Entry]) -> tuple[Any, float, float]:
    """Index ``es`` with ``make()``: (index, traced bytes per entry, seconds)."""
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    t0 = time.perf_counter()
    index = make()
    for e in es.values():
        index.add(e)
    seconds = time.perf_counter() - t0
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return index, (after - before) / max(1, len(es)), seconds


def run(n: int, n_queries: int, n_ranked: int, holders: list[int]) -> None:
    table = LatencyTable.from_file(seeds.path(seeds.LATENCY))
    gc.disable()
    t0 = time.perf_counter()
    es = entries(n)
    print(f"\n== {n:,} entries (generated in {time.perf_counter() - t0:.1f} s)")
    old, old_b, old_s = build(lambda: OldIndex(es, table), es)
    new, new_b, new_s = build(lambda: DiscoveryIndex(es, table), es)
    gc.enable()
    gc.collect()
    gc.freeze()  # as the resolver does after loading its replica
    print(f"{'index':10} {'B/entry':>9} {'build s':>8} {'score groups':>13}")
    print(f"{'old':10} {old_b:9.0f} {old_s:8.1f} {old.groups:13,}")
    print(f"{'new':10} {new_b:9.0f} {new_s:8.1f} {new.groups:13,}")
    print(f"{'new / old':10} {new_b / old_b:9.3f} {new_s / old_s:8.2f}")
    mix = queries(random.Random(7))[:n_queries]
    if n_ranked:
        mix += ranked_queries(random.Random(8), n_ranked)
    # wall-clock time, and the CPU time of this process (the machine is shared: a query
    # preempted by another process shows in the first, not in the second)
    times: dict[str, dict[str, list[float]]] = {}
    for j, (name, q) in enumerate(mix):
        row = times.setdefault(name, {"old": [], "new": [], "old cpu": [], "new cpu": []})
        pair = [("old", old), ("new", new)]
        if j % 2:
            pair.reverse()  # take turns going first
        answers = {}
        if q.order in ("score", "price", "carbon"):
            # these read each match's score inputs, kept per CPID after the first read
            # (resolver.ranking): read them before timing, or the index that goes
            # first pays for both
            new.search(q)
        for label, index in pair:
            c0 = time.process_time()
            t0 = time.perf_counter()
            answers[label] = index.search(q)
            row[label].append((time.perf_counter() - t0) * 1000)
            row[f"{label} cpu"].append((time.process_time() - c0) * 1000)
        if shape(answers["old"]) != shape(answers["new"]):
            raise SystemExit(f"answers differ for {q}")
    every: dict[str, list[float]] = {}
    for name, row in times.items():
        if not name.startswith("sort="):
            for k, v in row.items():
                every.setdefault(k, []).extend(v)
    times["resolve.py mix, all"] = every
    for clock in ("", " cpu"):
        print(
            f"{'wall clock' if not clock else 'CPU time':34} {'n':>4} {'old p50':>8} "
            f"{'old p99':>8} {'new p50':>8} {'new p99':>8} {'p50 x':>6} {'p99 x':>6}"
            "   (ms; x = new / old)"
        )
        for name, row in times.items():
            old_t, new_t = row["old" + clock], row["new" + clock]
            o50, o99 = percentile(old_t, 50), percentile(old_t, 99)
            n50, n99 = percentile(new_t, 50), percentile(new_t, 99)
            print(
                f"{name:34} {len(old_t):4} {o50:8.3f} {o99:8.3f} {n50:8.3f} {n99:8.3f} "
                f"{n50 / max(o50, 1e-9):6.3f} {n99 / max(o99, 1e-9):6.3f}"
            )
    if holders:
        label_holders(es, old, new, holders)
    gc.unfreeze()


def label_holders(
    es: dict[str, Entry], old: OldIndex, new: DiscoveryIndex, holders: list[int]
) -> None:
    """CPU time of queries naming a label that ``h`` entries carry, for each ``h``: the
    label is added to more entries (replaced in the map and both indexes) as ``h``
    grows.  Around the new index's threshold for keeping a label's set."""
    print(
        f"{'a label on h entries (CPU time)':34} {'h':>6} {'old p50':>8} {'new p50':>8} "
        f"{'p50 x':>6}   (ms, 15 runs each)"
    )
    order = random.Random(3).sample(sorted(es), max(holders))
    done = 0
    pair = ("pool", "p1")
    for h in sorted(holders):
        for cpid in order[done:h]:
            e = es[cpid]
            changed = dataclasses.replace(e, facts=e.facts._replace(labels=(*e.facts.labels, pair)))
            for index in (old, new):
                index.remove(e)
            es[cpid] = changed
            for index in (old, new):
                index.add(changed)
        done = h
        for name, q in (
            ("kind+label", Query(kind="GPU", labels=(pair,))),
            ("accelerator+near+label", Query(accelerator="h100", near="31", labels=(pair,))),
        ):
            row: dict[str, list[float]] = {"old": [], "new": []}
            for j in range(15):
                for label, index in (("old", old), ("new", new))[:: 1 if j % 2 else -1]:
                    c0 = time.process_time()
                    found = index.search(q)
                    row[label].append((time.process_time() - c0) * 1000)
                    if label == "new" and j == 0 and shape(found) != shape(old.search(q)):
                        raise SystemExit(f"answers differ for {q}")
            o50, n50 = percentile(row["old"], 50), percentile(row["new"], 50)
            print(f"{name:34} {h:6} {o50:8.3f} {n50:8.3f} {n50 / o50:6.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--records", default="100000,1000000", help="comma-separated sizes")
    ap.add_argument("--queries", type=int, default=1200, help="of bench/resolve.py's mix")
    ap.add_argument("--ranked", type=int, default=30, help="rounds of the other orders (x4)")
    ap.add_argument(
        "--label-holders",
        default="500,2000,8000,8300,20000",
        help="entries given one more label, comma-separated ('' for none)",
    )
    args = ap.parse_args()
    holders = [int(x) for x in args.label_holders.split(",") if x]
    for n in (int(x) for x in args.records.split(",")):
        run(n, args.queries, args.ranked, [h for h in holders if h <= n])


# -- the index this replaced (the baseline) -----------------------------------------------

_EMPTY: frozenset[str] = frozenset()


class OldIndex:
    """The discovery index before issue 12: sets of CPIDs by kind, accelerator model,
    every namespace prefix, label pair and score group; a query intersects the sets of
    its filters, then walks the score groups best first."""

    def __init__(self, entries: Mapping[str, Entry], table: LatencyTable) -> None:
        self._entries = entries
        self.table = table
        self._kind: dict[str, set[str]] = {}
        self._accel: dict[str, set[str]] = {}
        self._ns: dict[str, set[str]] = {}
        self._label: dict[tuple[str, str], set[str]] = {}
        self._group: dict[tuple[str, int], set[str]] = {}
        self._prefixes: dict[str, tuple[str, ...]] = {}

    def _region_key(self, entry: Entry) -> str:
        return self.table.key(entry.region) or entry.region

    def _namespaces(self, prefix: str) -> tuple[str, ...]:
        found = self._prefixes.get(prefix)
        if found is None:
            segs = prefix.split(".")
            found = tuple(".".join(segs[:i]) for i in range(1, len(segs) + 1))
            if len(self._prefixes) < 100_000:
                self._prefixes[prefix] = found
        return found

    def _keys(self, entry: Entry) -> list[tuple[dict[Any, set[str]], Any]]:
        facts = entry.facts
        keys: list[tuple[dict[Any, set[str]], Any]] = [(self._kind, entry.id.kind)]
        keys += [(self._accel, model) for model in facts.accelerators]
        keys += [(self._ns, name) for name in self._namespaces(entry.id.prefix)]
        keys += [(self._label, pair) for pair in facts.labels]
        keys.append((self._group, (self._region_key(entry), entry.free)))
        return keys

    def add(self, entry: Entry) -> None:
        cpid = entry.cpid
        for table, key in self._keys(entry):
            members = table.get(key)
            if members is None:
                members = table[key] = set()
            members.add(cpid)

    def remove(self, entry: Entry) -> None:
        cpid = entry.cpid
        for table, key in self._keys(entry):
            members = table.get(key)
            if members is not None:
                members.discard(cpid)
                if not members:
                    del table[key]

    @property
    def groups(self) -> int:
        return len(self._group)

    def _candidates(self, q: Query) -> set[str] | frozenset[str] | None:
        sets: list[set[str] | frozenset[str]] = []
        if q.kind is not None:
            sets.append(self._kind.get(q.kind, _EMPTY))
        if q.accelerator is not None:
            sets.append(self._accel.get(q.accelerator, _EMPTY))
        if q.within is not None:
            sets.append(self._ns.get(q.within, _EMPTY))
        for pair in q.labels:
            sets.append(self._label.get(pair, _EMPTY))
        if not sets:
            return None
        sets.sort(key=len)
        out = sets[0]
        for other in sets[1:]:
            if not out:
                break
            out = out & other
        return out

    def search(self, q: Query) -> list[Match]:
        if q.order != "default":
            return self._ranked(q)
        return [
            Match(m.cpid, m.score, m.free, m.latency_ms, m.entry, q)
            for m in self._search_default(q)
        ]

    def _search_default(self, q: Query) -> list[Match]:
        candidates = self._candidates(q)
        if candidates is not None and not candidates:
            return []
        scored = [
            (q.score(free, latency), region, free, latency, members)
            for region, free, latency, members in self._groups(q)
        ]
        scored.sort(key=lambda g: (-g[0], g[1], g[2]))
        ranked = [(score, free, latency, members) for score, _, free, latency, members in scored]
        return self._take(
            q,
            candidates,
            ranked,
            lambda score, c, f, lat: Match(c, score, f, lat, self._entries[c]),
        )

    def _groups(self, q: Query) -> Iterator[tuple[str, int, float | None, set[str]]]:
        for (region, free), members in self._group.items():
            if q.min_free is not None and free < q.min_free:
                continue
            if q.live is False and free > 0:
                continue
            latency = None if q.near is None else self.table.rtt(q.near, region)
            if q.max_latency_ms is not None and (latency is None or latency > q.max_latency_ms):
                continue
            yield region, free, latency, members

    def _take(
        self,
        q: Query,
        candidates: set[str] | frozenset[str] | None,
        ranked: list[tuple[Any, int, float | None, set[str]]],
        make: Callable[[Any, str, int, float | None], Match],
    ) -> list[Match]:
        out: list[Match] = []
        i = 0
        while i < len(ranked) and len(out) < q.limit:
            key = ranked[i][0]
            need = q.limit - len(out)
            pool: list[tuple[str, int, float | None]] = []
            while i < len(ranked) and ranked[i][0] == key:
                _, free, latency, members = ranked[i]
                chosen: Collection[str] = (
                    members if candidates is None else _intersect(members, candidates)
                )
                if q.live is not None and free == 0:
                    chosen = [c for c in chosen if self._entries[c].live == q.live]
                if len(chosen) > need:
                    chosen = heapq.nsmallest(need, chosen)
                pool.extend((cpid, free, latency) for cpid in chosen)
                i += 1
            best = pool if len(pool) <= need else heapq.nsmallest(need, pool)
            best.sort()
            out.extend(make(key, c, f, lat) for c, f, lat in best)
        return out

    def _ranked(self, q: Query) -> list[Match]:
        candidates = self._candidates(q)
        if candidates is not None and not candidates:
            return []
        order, weights, near = q.order, q.weight_map, q.near is not None
        if order in ("free", "latency"):
            return self._by_group(q, candidates)
        sorter = ranking.Sorter(order, near=near, weights=weights)
        key, facts_of = sorter.key, ranking.entry_facts
        entries = self._entries
        first = ranking.first_key if order in ("price", "carbon") else None
        pending: list[tuple[tuple[int, float], Any, str, ranking.EntryFacts]] = []
        found: list[tuple[tuple[Any, ...], str, int, float | None]] = []
        for (region, free), members in self._group.items():
            if q.min_free is not None and free < q.min_free:
                continue
            if q.live is False and free > 0:
                continue
            latency = None if q.near is None else self.table.rtt(q.near, region)
            if q.max_latency_ms is not None and (latency is None or latency > q.max_latency_ms):
                continue
            chosen = members if candidates is None else _intersect(members, candidates)
            group = sorter.group(free, latency)
            for cpid in chosen:
                entry = entries[cpid]
                if q.live is not None and free == 0 and entry.live != q.live:
                    continue
                facts = facts_of(entry)
                if first is not None:
                    pending.append((first(order, facts), group, cpid, facts))
                else:
                    found.append((key(group, cpid, facts), cpid, group[0], latency))
        if pending:
            if len(pending) > q.limit:
                worst = heapq.nsmallest(q.limit, pending, key=lambda p: p[0])[-1][0]
                pending = [p for p in pending if p[0] <= worst]
            found = [
                (key(group, cpid, facts), cpid, group[0], group[4])
                for _, group, cpid, facts in pending
            ]
        return [
            Match(cpid, q.score(free, latency), free, latency, entries[cpid], q)
            for _, cpid, free, latency in heapq.nsmallest(q.limit, found, key=lambda f: f[0])
        ]

    def _by_group(self, q: Query, candidates: set[str] | frozenset[str] | None) -> list[Match]:
        order, weights, near = q.order, q.weight_map, q.near is not None
        sorter = ranking.Sorter(order, near=near, weights=weights)
        ranked: list[tuple[Any, int, float | None, set[str]]] = [
            (
                sorter.key(sorter.group(free, latency), "", ranking.EntryFacts())[:-1],
                free,
                latency,
                members,
            )
            for _, free, latency, members in self._groups(q)
        ]
        ranked.sort(key=lambda g: g[0])
        return self._take(
            q,
            candidates,
            ranked,
            lambda _, c, f, lat: Match(c, q.score(f, lat), f, lat, self._entries[c], q),
        )


def _intersect(a: set[str], b: set[str] | frozenset[str]) -> set[str] | frozenset[str]:
    return a & b if len(a) <= len(b) else b & a


if __name__ == "__main__":
    main()
