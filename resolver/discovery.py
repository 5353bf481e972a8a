"""Discovery: filter verified entries by attributes, rank them, return the best few.

A :class:`Query` filters by kind, namespace (``within``, segment by segment, so ``CN.3``
never matches ``CN.31``), accelerator model (case-insensitive), free units
(``min_free``: the status's free capacity minus claimed units), labels (all must
match), liveness, and estimated latency from a region (``near`` + ``max_latency_ms``).

Ranking (documented in ``docs/resolver.md``)::

    score = 0.6 * L + 0.4 * F
    L = 1 / (1 + latency_ms / 10)     latency from `near`; L = 1 when `near` is not given;
                                      a region missing from the table counts as 50 ms
    F = free / (free + 8)             free units: 0 -> 0, 8 -> 0.5, 24 -> 0.75

Ties are broken by CPID (ascending), so answers are deterministic.  That is the
default order; ``sort=latency|free|score|price|carbon`` (and ``weights=``) choose
another one, defined with the ``cpi-cats-v1`` scores in :mod:`resolver.ranking`, and
every result carries a ``rank`` object saying which keys put it where it is.

:class:`DiscoveryIndex` keeps secondary indexes (sets of CPIDs) by kind, accelerator
model, every namespace prefix of the CPID, label pair, and by *score group* -- region
and exact free units, which fix the score for a given ``near``.  A query intersects
the index sets of its filters, then walks the score groups best first and stops as
soon as ``limit`` results are certain, so it rarely looks at more than a few groups.
"""

from __future__ import annotations

import heapq
import math
import re
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from resolver import ranking
from resolver.entry import Entry
from resolver.errors import QueryError
from schemas import _json
from schemas.cpid import KINDS, ns_contains, parse_namespace
from schemas.errors import InvalidCPIDError
from schemas.http import parse_int, parse_number

__all__ = [
    "UNKNOWN_LATENCY_MS",
    "W_FREE",
    "W_LATENCY",
    "DiscoveryIndex",
    "LatencyTable",
    "Match",
    "Query",
    "free_score",
    "latency_score",
]

W_LATENCY: Final = 0.6
W_FREE: Final = 0.4
LATENCY_SCALE_MS: Final = 10.0
FREE_SCALE: Final = 8.0
UNKNOWN_LATENCY_MS: Final = 50.0
"""Latency assumed for scoring when the table has no figure for a pair of regions."""
SAME_PROVINCE_MS: Final = 2.0
"""Latency assumed between two regions of one province that the table does not list."""

_REGION = re.compile(r"[0-9]{2}(?:[0-9]{2}){0,2}")
_LABEL_KEY = re.compile(r"[a-z0-9._/-]{1,63}")


def latency_score(latency_ms: float | None) -> float:
    """``L`` of the score: 1 at 0 ms, 0.5 at 10 ms, 0.2 at 40 ms."""
    ms = UNKNOWN_LATENCY_MS if latency_ms is None else latency_ms
    return 1.0 / (1.0 + ms / LATENCY_SCALE_MS)


def free_score(free: int) -> float:
    """``F`` of the score: 0 for no free units, 0.5 at 8, approaching 1."""
    return free / (free + FREE_SCALE)


class LatencyTable:
    """Estimated round-trip times between regions (GB/T 2260 codes), in milliseconds.

    A region missing from the table is looked up by its prefecture (first 4 digits),
    then its province (first 2); two regions of one province that the table does not
    know are :data:`SAME_PROVINCE_MS` apart; otherwise the latency is unknown (None).
    """

    def __init__(self, rtt_ms: Mapping[str, Mapping[str, float]] | None = None) -> None:
        self._rtt: dict[str, dict[str, float]] = {
            a: {b: float(ms) for b, ms in row.items()} for a, row in (rtt_ms or {}).items()
        }
        self._keys: dict[str, str | None] = {}

    @classmethod
    def from_file(cls, path: str | Path) -> LatencyTable:
        """Read a table like ``seeds/latency.json`` (``{"rtt_ms": {a: {b: ms}}}``)."""
        try:
            obj = _json.loads(Path(path).read_text())
            table = obj["rtt_ms"] if isinstance(obj, dict) and "rtt_ms" in obj else obj
            if not isinstance(table, dict) or not all(isinstance(r, dict) for r in table.values()):
                raise TypeError("expected {region: {region: milliseconds}}")
            return cls(table)
        except (OSError, ValueError, TypeError) as exc:
            raise QueryError(f"latency table {path}: {exc}") from exc

    @property
    def regions(self) -> list[str]:
        return sorted(self._rtt)

    def key(self, region: str) -> str | None:
        """The table's name for ``region`` (itself, its prefecture or province), or None."""
        try:
            return self._keys[region]
        except KeyError:
            pass
        found = next((r for r in (region, region[:4], region[:2]) if r in self._rtt), None)
        if len(self._keys) < 100_000:
            self._keys[region] = found
        return found

    def rtt(self, a: str, b: str) -> float | None:
        """Estimated RTT between regions ``a`` and ``b`` in ms, or None when unknown."""
        ka, kb = self.key(a), self.key(b)
        if ka is not None and kb is not None:
            ms = self._rtt[ka].get(kb)
            if ms is None:
                ms = self._rtt.get(kb, {}).get(ka)
            if ms is not None:
                return ms
        if a[:2] == b[:2]:
            return SAME_PROVINCE_MS
        return None


def _bool(name: str, text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes"):
        return True
    if low in ("0", "false", "no"):
        return False
    raise QueryError(f"{name}={text!r}: expected true or false")


@dataclass(frozen=True, slots=True)
class Query:
    """A discovery (or watch) filter; build with :meth:`from_params` or directly.

    ``accelerator`` is compared case-insensitively; ``within`` segment by segment;
    ``labels`` must all match; ``max_latency_ms`` needs ``near`` and excludes entries
    whose latency is unknown; ``limit`` only applies to discovery.
    """

    kind: str | None = None
    within: str | None = None
    accelerator: str | None = None
    min_free: int | None = None
    near: str | None = None
    max_latency_ms: float | None = None
    labels: tuple[tuple[str, str], ...] = ()
    live: bool | None = None
    limit: int = 20
    sort: str | None = None
    """One of :data:`resolver.ranking.SORTS`; None: ``score`` with ``weights``, else the
    default order."""
    weights: tuple[tuple[str, float], ...] = ()
    """Level 2 weights by category (:func:`resolver.ranking.parse_weights`); only with
    ``sort=score`` (implied when not given)."""

    def __post_init__(self) -> None:
        if self.kind is not None and self.kind not in KINDS:
            raise QueryError(f"kind={self.kind!r}: expected one of {', '.join(KINDS)}")
        if self.within is not None:
            try:
                canonical = parse_namespace(self.within)
            except InvalidCPIDError as exc:
                raise QueryError(f"within={self.within!r}: {exc.reason}") from None
            object.__setattr__(self, "within", canonical)
        if self.accelerator is not None:
            if not self.accelerator.strip() or len(self.accelerator) > 256:
                raise QueryError("accelerator must be 1 to 256 characters")
            object.__setattr__(self, "accelerator", self.accelerator.strip().casefold())
        if self.min_free is not None and self.min_free < 0:
            raise QueryError(f"min_free={self.min_free}: must be 0 or more")
        if self.near is not None and not _REGION.fullmatch(self.near):
            raise QueryError(
                f"near={self.near!r}: expected a GB/T 2260 region code (2, 4 or 6 digits)"
            )
        if self.max_latency_ms is not None:
            if self.near is None:
                raise QueryError("max_latency_ms needs near=<region>")
            if not math.isfinite(self.max_latency_ms) or self.max_latency_ms <= 0:
                raise QueryError(f"max_latency_ms={self.max_latency_ms}: must be a positive number")
        for k, v in self.labels:
            if not _LABEL_KEY.fullmatch(k) or len(v) > 256:
                raise QueryError(
                    f"label {k}:{v}: key must match [a-z0-9._/-]{{1,63}}, value at most 256 characters"
                )
        if self.limit < 1:
            raise QueryError(f"limit={self.limit}: must be at least 1")
        if self.sort is not None:
            object.__setattr__(self, "sort", ranking.parse_sort(self.sort))
        if self.weights:
            # the same rule as the URL form, so a Query built in code is checked alike
            object.__setattr__(
                self, "weights", ranking.parse_weights(ranking.weights_text(self.weights))
            )
            if self.sort not in (None, "score"):
                raise QueryError(
                    f"weights apply to sort=score only (got sort={self.sort}); "
                    "drop weights or use sort=score"
                )
        if self.sort == "latency" and self.near is None:
            raise QueryError("sort=latency needs near=<region> to estimate latencies from")
        if self.near is None and dict(self.weights).get("communication", 0) > 0:
            raise QueryError(
                "weights on communication (latency, network) need near=<region> to estimate "
                "latencies from"
            )

    @property
    def order(self) -> str:
        """The sort in effect: ``sort``, else ``score`` with weights, else ``default``."""
        if self.sort is not None:
            return self.sort
        return "score" if self.weights else "default"

    @property
    def weight_map(self) -> Mapping[str, float]:
        """Level 2 weights in effect (the defaults without ``weights``)."""
        return dict(self.weights) if self.weights else ranking.DEFAULT_WEIGHTS

    @classmethod
    def from_params(
        cls,
        params: Mapping[str, str] | Iterable[tuple[str, str]],
        *,
        default_limit: int = 20,
        max_limit: int = 500,
    ) -> Query:
        """Parse URL query parameters (``label`` may repeat; others must not)."""
        items = list(params.items()) if isinstance(params, Mapping) else list(params)
        known = {
            "kind",
            "within",
            "accelerator",
            "min_free",
            "near",
            "max_latency_ms",
            "label",
            "live",
            "limit",
            "sort",
            "weights",
        }
        seen: dict[str, str] = {}
        labels: list[tuple[str, str]] = []
        for name, value in items:
            if name not in known:
                raise QueryError(
                    f"unknown query parameter {name!r}; known: {', '.join(sorted(known))}"
                )
            if name == "label":
                k, sep, v = value.partition(":")
                if not sep:
                    raise QueryError(f"label={value!r}: expected key:value")
                labels.append((k, v))
                continue
            if name in seen:
                raise QueryError(f"query parameter {name!r} is given more than once")
            seen[name] = value

        def integer(name: str) -> int | None:
            if name not in seen:
                return None
            value = parse_int(seen[name], negative=True)
            if value is None:
                raise QueryError(
                    f"{name}={seen[name]!r}: expected an integer (ASCII digits 0-9 only)"
                )
            return value

        max_latency: float | None = None
        if "max_latency_ms" in seen:
            max_latency = parse_number(seen["max_latency_ms"])
            if max_latency is None:
                raise QueryError(
                    f"max_latency_ms={seen['max_latency_ms']!r}: expected a positive number "
                    "(ASCII digits 0-9 in JSON's number form, e.g. 12 or 12.5)"
                )
        limit = integer("limit")
        if limit is not None and not 1 <= limit <= max_limit:
            raise QueryError(f"limit={limit}: must be between 1 and {max_limit}")
        return cls(
            kind=seen["kind"].upper() if "kind" in seen else None,
            within=seen.get("within"),
            accelerator=seen.get("accelerator"),
            min_free=integer("min_free"),
            near=seen.get("near"),
            max_latency_ms=max_latency,
            labels=tuple(labels),
            live=_bool("live", seen["live"]) if "live" in seen else None,
            limit=default_limit if limit is None else limit,
            sort=ranking.parse_sort(seen["sort"]) if "sort" in seen else None,
            weights=ranking.parse_weights(seen["weights"]) if "weights" in seen else (),
        )

    def to_params(self, *, with_limit: bool = True) -> list[tuple[str, str]]:
        """URL query parameters that :meth:`from_params` turns back into this query."""
        out: list[tuple[str, str]] = []
        for name in ("kind", "within", "accelerator", "min_free", "near", "max_latency_ms"):
            value = getattr(self, name)
            if value is not None:
                # repr() of a float is the shortest string that parses back to the same
                # float, so the server sees exactly the max_latency_ms it was given.
                out.append((name, repr(value) if isinstance(value, float) else str(value)))
        out.extend(("label", f"{k}:{v}") for k, v in self.labels)
        if self.live is not None:
            out.append(("live", "true" if self.live else "false"))
        if with_limit:  # discovery only: a watch has no order
            out.append(("limit", str(self.limit)))
            if self.sort is not None:
                out.append(("sort", self.sort))
            if self.weights:
                out.append(("weights", ranking.weights_text(self.weights)))
        return out

    def latency(self, entry: Entry, table: LatencyTable) -> float | None:
        return None if self.near is None else table.rtt(self.near, entry.region)

    def matches(self, entry: Entry, table: LatencyTable) -> bool:
        """True when ``entry`` passes every filter (used for watches)."""
        if self.kind is not None and entry.kind != self.kind:
            return False
        if self.within is not None and not ns_contains(self.within, entry.namespace):
            return False
        if self.accelerator is not None and self.accelerator not in entry.accelerators:
            return False
        if self.min_free is not None and entry.free < self.min_free:
            return False
        if self.live is not None and entry.live != self.live:
            return False
        if self.labels and not set(self.labels) <= set(entry.facts.labels):
            return False
        if self.max_latency_ms is not None:
            ms = self.latency(entry, table)
            if ms is None or ms > self.max_latency_ms:
                return False
        return True

    def score(self, free: int, latency_ms: float | None) -> float:
        lat = 1.0 if self.near is None else latency_score(latency_ms)
        return W_LATENCY * lat + W_FREE * free_score(free)


@dataclass(frozen=True, slots=True)
class Match:
    """One discovery result."""

    cpid: str
    score: float
    free: int
    latency_ms: float | None
    entry: Entry
    order: Query | None = None
    """The query that ordered this result; its ``rank`` is computed from it when asked
    for (rendering), so callers that only read the entries (DNS, claims) pay nothing."""

    @property
    def rank(self) -> dict[str, Any] | None:
        """Why the result ranks where it does (:meth:`resolver.ranking.Ranked.explanation`)."""
        q = self.order
        if q is None:
            return None
        sort, weights = q.order, q.weight_map
        r = ranking.explain(
            self.cpid,
            self.free,
            self.latency_ms,
            ranking.entry_facts(self.entry),
            sort=sort,
            near=q.near is not None,
            weights=weights,
            blended=self.score,
        )
        return r.explanation(sort, weights)

    def to_dict(self) -> dict[str, Any]:
        """``{"cpid", "score", "free", "latency_ms", "record", ..., "rank"}`` (record decoded)."""
        e = self.entry
        out = {
            "cpid": self.cpid,
            "score": round(self.score, 6),
            "free": self.free,
            "claimed": e.claimed,
            "latency_ms": self.latency_ms,
            "record": e.record_dict(),
            "live": e.live,
            "kid": e.kid,
            "version": e.version,
            "revision": e.revision,
        }
        rank = self.rank
        if rank is not None:
            out["rank"] = rank
        return out


_EMPTY: frozenset[str] = frozenset()


class DiscoveryIndex:
    """Secondary indexes over the served entries (the replica keeps them in step)."""

    def __init__(self, entries: Mapping[str, Entry], table: LatencyTable) -> None:
        self._entries = entries
        self.table = table
        self._kind: dict[str, set[str]] = {}
        self._accel: dict[str, set[str]] = {}
        self._ns: dict[str, set[str]] = {}
        self._label: dict[tuple[str, str], set[str]] = {}
        # score groups: (region key, free units) -> CPIDs
        self._group: dict[tuple[str, int], set[str]] = {}
        self._prefixes: dict[str, tuple[str, ...]] = {}

    def _region_key(self, entry: Entry) -> str:
        return self.table.key(entry.region) or entry.region

    def _namespaces(self, prefix: str) -> tuple[str, ...]:
        """Every namespace containing ``prefix`` (``CN``, ``CN.31``, ...), cached: few
        namespaces hold many entries."""
        found = self._prefixes.get(prefix)
        if found is None:
            segs = prefix.split(".")
            found = tuple(".".join(segs[:i]) for i in range(1, len(segs) + 1))
            if len(self._prefixes) < 100_000:
                self._prefixes[prefix] = found
        return found

    def _keys(self, entry: Entry) -> list[tuple[dict[Any, set[str]], Any]]:
        ns = self._ns
        accel = self._accel
        label = self._label
        facts = entry.facts
        keys: list[tuple[dict[Any, set[str]], Any]] = [(self._kind, entry.id.kind)]
        keys += [(accel, model) for model in facts.accelerators]
        keys += [(ns, name) for name in self._namespaces(entry.id.prefix)]
        keys += [(label, pair) for pair in facts.labels]
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

    def clear(self) -> None:
        for table in (self._kind, self._accel, self._ns, self._label, self._group):
            table.clear()

    @property
    def groups(self) -> int:
        return len(self._group)

    def _candidates(self, q: Query) -> set[str] | frozenset[str] | None:
        """Intersection of the index sets the query's filters name (None: no such filter)."""
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
        """The best ``q.limit`` matches, best first (see the module docstring)."""
        if q.order != "default":
            return self._ranked(q)
        return [_explained(m, q) for m in self._search_default(q)]

    def _search_default(self, q: Query) -> list[Match]:
        candidates = self._candidates(q)
        if candidates is not None and not candidates:
            return []
        # score every group once; a group's members share one score
        scored = [
            (q.score(free, latency), region, free, latency, members)
            for region, free, latency, members in self._groups(q)
        ]
        scored.sort(key=lambda g: (-g[0], g[1], g[2]))
        # every group with the same exact score ties, so ties are broken by CPID
        ranked = [(score, free, latency, members) for score, _, free, latency, members in scored]
        return self._take(
            q,
            candidates,
            ranked,
            lambda score, c, f, lat: Match(c, score, f, lat, self._entries[c]),
        )

    def _groups(self, q: Query) -> Iterator[tuple[str, int, float | None, set[str]]]:
        """The score groups ``(region, free, latency, members)`` that ``q``'s free-unit,
        liveness and latency bounds admit (latency from ``near``, None without it)."""
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
        """The best ``q.limit`` members of ``ranked`` (groups ``(key, free, latency,
        members)`` in order; groups with equal keys tie, and ties go by CPID), each made
        a match by ``make(key, cpid, free, latency)``.  Stops once ``limit`` is certain."""
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
        """Every match ordered by ``q.order`` (:mod:`resolver.ranking`), the best
        ``q.limit``: the sort keys of each match are computed, then the smallest kept."""
        candidates = self._candidates(q)
        if candidates is not None and not candidates:
            return []
        order, weights, near = q.order, q.weight_map, q.near is not None
        if order in ("free", "latency"):
            return self._by_group(q, candidates)
        sorter = ranking.Sorter(order, near=near, weights=weights)
        key, facts_of = sorter.key, ranking.entry_facts
        entries = self._entries
        # price and carbon: the first key depends on the entry alone and is cheap, so
        # it is computed for every match, and the full keys only for the matches whose
        # first key is within the best `limit` (the others cannot make the answer)
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
        """``sort=free`` and ``sort=latency``: their keys are those of a score group, so
        the groups are walked in key order and the walk stops once ``limit`` is certain
        (within equal keys, by CPID), as the default order does."""
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


def _explained(m: Match, q: Query) -> Match:
    """``m`` (a match of the default order) that can explain its rank."""
    return Match(m.cpid, m.score, m.free, m.latency_ms, m.entry, q)


def _intersect(a: set[str], b: set[str] | frozenset[str]) -> set[str] | frozenset[str]:
    return a & b if len(a) <= len(b) else b & a
