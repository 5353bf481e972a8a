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

Ties are broken by CPID (ascending), so answers are deterministic.

:class:`DiscoveryIndex` keeps the served CPIDs in *score groups* -- region and exact
free units, which fix the score for a given ``near`` -- each a sorted list, plus posting
sets by accelerator model, leaf namespace and label pair.  A query scores every group
once and walks them best first in CPID order, checking its other filters on the entries
and stopping as soon as ``limit`` results are certain; when its filters are selective,
it intersects the posting sets instead and scores only the survivors.
"""

from __future__ import annotations

import bisect
import heapq
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

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
        if with_limit:
            out.append(("limit", str(self.limit)))
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

    def to_dict(self) -> dict[str, Any]:
        """``{"cpid", "score", "free", "latency_ms", "record", ...}`` (record decoded)."""
        e = self.entry
        return {
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


_WALK_COST: Final = 1.0
"""Relative cost of looking at one entry while walking the score groups (Python)."""
_PROBE_COST: Final = 0.06
"""Relative cost of one set probe while intersecting posting sets (in C)."""
_CHECK_COST: Final = 1.5
"""Relative cost of checking and scoring one candidate of an intersection (Python)."""


@dataclass(slots=True)
class _Plan:
    """How :meth:`DiscoveryIndex.search` finds the matches of one query."""

    postings: list[set[str]]  # posting sets of the filters (accelerator, labels), smallest first
    within: list[set[str]] | None  # the leaf-namespace sets under ``within`` (None: no within)
    within_size: int
    smallest: int  # size of the smallest posting (sets or the within union); -1 without any
    walk_budget: int  # entries the group walk may look at before switching to the postings


class DiscoveryIndex:
    """Secondary indexes over the served entries (the replica keeps them in step).

    * **score groups**: (region key, free units) -> the CPIDs of the group as a sorted
      list.  Region and free units fix the score for a given query, so a query scores
      each group once and walks the groups best first, each in CPID order (the tie
      break), checking the other filters on the entries themselves and stopping as
      soon as ``limit`` matches are found.  A broad query looks at about ``limit``
      entries, whatever the size of the index;
    * **posting sets** for the selective filters: accelerator model, leaf namespace (the
      CPID's own prefix; ``within`` takes the union of those below it) and label pair.
      When the filters are selective enough that walking the groups would look at many
      entries for few matches, the posting sets are intersected (in C) and only the
      survivors are checked and scored.  Which way a query goes is a cost estimate; both
      give the same answer (tests compare them with a brute-force scan).

    Kind has no posting set (a handful of kinds, each a large share of the index).
    """

    def __init__(self, entries: Mapping[str, Entry], table: LatencyTable) -> None:
        self._entries = entries
        self.table = table
        self._accel: dict[str, set[str]] = {}
        self._ns: dict[str, set[str]] = {}  # leaf namespace (a CPID's prefix) -> CPIDs
        self._label: dict[tuple[str, str], set[str]] = {}
        self._group: dict[tuple[str, int], list[str]] = {}  # sorted CPIDs
        self._size = 0

    def _region_key(self, entry: Entry) -> str:
        return self.table.key(entry.region) or entry.region

    def _sets(self, entry: Entry) -> list[tuple[dict[Any, set[str]], Any]]:
        facts = entry.facts
        keys: list[tuple[dict[Any, set[str]], Any]] = [(self._ns, entry.id.prefix)]
        keys += [(self._accel, model) for model in facts.accelerators]
        keys += [(self._label, pair) for pair in facts.labels]
        return keys

    def add(self, entry: Entry) -> None:
        cpid = entry.cpid
        for table, key in self._sets(entry):
            members = table.get(key)
            if members is None:
                members = table[key] = set()
            members.add(cpid)
        gkey = (self._region_key(entry), entry.free)
        group = self._group.get(gkey)
        if group is None:
            self._group[gkey] = [cpid]
        elif group[-1] < cpid:
            group.append(cpid)  # the usual case when a listing arrives in key order
        else:
            i = bisect.bisect_left(group, cpid)
            if i == len(group) or group[i] != cpid:
                group.insert(i, cpid)
        self._size += 1

    def remove(self, entry: Entry) -> None:
        cpid = entry.cpid
        for table, key in self._sets(entry):
            members = table.get(key)
            if members is not None:
                members.discard(cpid)
                if not members:
                    del table[key]
        gkey = (self._region_key(entry), entry.free)
        group = self._group.get(gkey)
        if group is not None:
            i = bisect.bisect_left(group, cpid)
            if i < len(group) and group[i] == cpid:
                del group[i]
                self._size -= 1
            if not group:
                del self._group[gkey]

    def clear(self) -> None:
        for table in (self._accel, self._ns, self._label, self._group):
            table.clear()
        self._size = 0

    @property
    def groups(self) -> int:
        return len(self._group)

    # -- search -----------------------------------------------------------------------

    def _ranked(self, q: Query) -> list[tuple[float, str, int, float | None, list[str]]]:
        """The groups a query can match, best first (score, then region and free units)."""
        ranked: list[tuple[float, str, int, float | None, list[str]]] = []
        for (region, free), members in self._group.items():
            if q.min_free is not None and free < q.min_free:
                continue
            if q.live is False and free > 0:
                continue
            latency = None if q.near is None else self.table.rtt(q.near, region)
            if q.max_latency_ms is not None and (latency is None or latency > q.max_latency_ms):
                continue
            ranked.append((q.score(free, latency), region, free, latency, members))
        ranked.sort(key=lambda g: (-g[0], g[1], g[2]))
        return ranked

    def _plan(self, q: Query, ranked_size: int) -> _Plan:
        postings: list[set[str]] = []
        if q.accelerator is not None:
            postings.append(self._accel.get(q.accelerator, set()))
        for pair in q.labels:
            postings.append(self._label.get(pair, set()))
        postings.sort(key=len)
        within: list[set[str]] | None = None
        within_size = 0
        if q.within is not None:
            outer = q.within
            within = [s for ns, s in self._ns.items() if ns_contains(outer, ns)]
            within_size = sum(len(s) for s in within)
        sizes = [len(s) for s in postings] + ([within_size] if within is not None else [])
        if not sizes:
            return _Plan(postings, within, within_size, -1, 0)
        total = max(1, self._size)
        selectivity = max(1.0 / total, math.prod(min(1.0, n / total) for n in sizes))
        if q.kind is not None:
            selectivity *= 0.5  # no statistics by kind: assume it halves the matches
        if ranked_size < total:
            selectivity *= max(ranked_size, 1) / total
        smallest = min(sizes)
        intersect = _PROBE_COST * smallest * max(1, len(sizes) - 1) + _CHECK_COST * (
            selectivity * total
        )
        walk = _WALK_COST * min(total, q.limit / selectivity)
        budget = int(walk * 2 + 256) if walk <= intersect else 0
        return _Plan(postings, within, within_size, smallest, budget)

    def _check(self, q: Query) -> Callable[[Entry, int], bool]:
        """A test of the filters that the groups do not decide (kind, namespace,
        accelerator, labels, and liveness for entries without free units)."""
        kind, accel, labels, live, outer = q.kind, q.accelerator, q.labels, q.live, q.within
        inside: dict[str, bool] = {}

        def check(e: Entry, free: int) -> bool:
            if kind is not None and e.id.kind != kind:
                return False
            if accel is not None and accel not in e.facts.accelerators:
                return False
            if outer is not None:
                prefix = e.id.prefix
                ok = inside.get(prefix)
                if ok is None:
                    ok = inside[prefix] = ns_contains(outer, prefix)
                if not ok:
                    return False
            if labels:
                have = e.facts.labels
                if not all(pair in have for pair in labels):
                    return False
            return live is None or free > 0 or e.live == live

        return check

    def search(self, q: Query) -> list[Match]:
        """The best ``q.limit`` matches, best first (see the module docstring): ordered by
        score, descending, then CPID, ascending."""
        ranked = self._ranked(q)
        if not ranked:
            return []
        plan = self._plan(q, sum(len(g[4]) for g in ranked) if len(ranked) < 64 else self._size)
        if plan.smallest == 0:
            return []
        check = self._check(q)
        if plan.smallest < 0 or plan.walk_budget > 0:
            out = self._walk(q, ranked, check, plan.walk_budget if plan.smallest > 0 else 0)
            if out is not None:
                return out
        return self._intersect(q, ranked, check, plan)

    def _walk(
        self,
        q: Query,
        ranked: list[tuple[float, str, int, float | None, list[str]]],
        check: Callable[[Entry, int], bool],
        budget: int,
    ) -> list[Match] | None:
        """Walk the groups best first, each run of equal scores in CPID order; None when
        ``budget`` (> 0) entries were looked at without finishing."""
        entries = self._entries
        out: list[Match] = []
        looked = 0
        i = 0
        while i < len(ranked) and len(out) < q.limit:
            score = ranked[i][0]
            j = i + 1
            while j < len(ranked) and ranked[j][0] == score:
                j += 1
            run = ranked[i:j]
            i = j
            stream: Iterable[tuple[str, int, float | None]]
            if len(run) == 1:
                _, _, free, latency, members = run[0]
                stream = ((c, free, latency) for c in members)
            else:
                stream = heapq.merge(*(((c, g[2], g[3]) for c in g[4]) for g in run), key=_first)
            for cpid, free, latency in stream:
                looked += 1
                if budget and looked > budget:
                    return None
                e = entries[cpid]
                if check(e, free):
                    out.append(Match(cpid, score, free, latency, e))
                    if len(out) == q.limit:
                        break
        return out

    def _intersect(
        self,
        q: Query,
        ranked: list[tuple[float, str, int, float | None, list[str]]],
        check: Callable[[Entry, int], bool],
        plan: _Plan,
    ) -> list[Match]:
        """Intersect the posting sets, then check and score each survivor."""
        entries = self._entries
        scores = {(g[1], g[2]): (g[0], g[3]) for g in ranked}
        sets = plan.postings
        cands: Iterable[str]
        if plan.within is not None and (not sets or plan.within_size <= len(sets[0])):
            leafs = plan.within
            cands = (c for s in leafs for c in s if all(c in o for o in sets))
        else:
            cands = sets[0].intersection(*sets[1:]) if len(sets) > 1 else sets[0]
        region_key = self._region_key
        best: list[tuple[float, str, int, float | None]] = []
        for cpid in cands:
            e = entries.get(cpid)
            if e is None:
                continue
            free = e.free
            got = scores.get((region_key(e), free))
            if got is None or not check(e, free):
                continue
            best.append((-got[0], cpid, free, got[1]))
        top = heapq.nsmallest(q.limit, best) if len(best) > q.limit else sorted(best)
        return [Match(c, -s, f, lat, entries[c]) for s, c, f, lat in top]


def _first(item: tuple[str, int, float | None]) -> str:
    return item[0]
