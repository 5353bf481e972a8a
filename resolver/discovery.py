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

:class:`DiscoveryIndex` puts each entry in one set: its *score group* (region and exact
free units, which fix the score for a given ``near``), then its *subgroup* (kind,
accelerator models, namespace, liveness).  A query orders the score groups once (cached
until a group appears or disappears), keeps the subgroups its kind / accelerator /
within / live filters admit (decided once per subgroup key, not per entry), checks
labels on the members, and walks best first, stopping as soon as ``limit`` results are
certain.
"""

from __future__ import annotations

import heapq
import json
import math
import re
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
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
        return self._fields(self.entry.record_dict())

    def to_json(self) -> str:
        """:meth:`to_dict` as JSON text, the record spliced in as pydantic writes it
        (a third of the cost of making its dict and encoding that)."""
        text = json.dumps(self._fields(_SPLICE), separators=(",", ":"), ensure_ascii=False)
        return text.replace(_SPLICED, self.entry.record_text(), 1)

    def _fields(self, record: Any) -> dict[str, Any]:
        e = self.entry
        out = {
            "cpid": self.cpid,
            "score": round(self.score, 6),
            "free": self.free,
            "claimed": e.claimed,
            "latency_ms": self.latency_ms,
            "record": record,
            "live": e.live,
            "kid": e.kid,
            "version": e.version,
            "revision": e.revision,
        }
        rank = self.rank
        if rank is not None:
            out["rank"] = rank
        return out


_SPLICE: Final = "\x00record"
_SPLICED: Final = json.dumps(_SPLICE)
"""Where :meth:`Match.to_json` puts the record: the first string value of its text that
is this (``"cpid"``, the only string field before it, cannot hold a control character)."""

Facet = tuple[str, tuple[str, ...], str]
"""What of an entry a query filters on at subgroup level: kind, accelerator models
(case-folded) and namespace (the CPID's prefix)."""

GroupKey = tuple[str, int]
"""A score group: region (the latency table's name for it) and free units."""

Loc = tuple[GroupKey, int]
"""Where an entry's set is: its score group and subgroup key."""

Ranked = list[tuple[Any, int, float | None, GroupKey]]
"""Score groups in order: ``(sort key, free, latency, group)``; equal keys tie."""

_CACHED_ORDERS: Final = 64
_CACHED_FILTERS: Final = 4096


class _Subgroups:
    """Which subgroups a query's kind / accelerator / within / live filters admit,
    by subgroup key (``2 * facet id + live``), for the facets known so far."""

    __slots__ = ("covered", "keys", "ok", "sets", "shape")

    def __init__(self) -> None:
        self.covered = 0
        self.ok = bytearray()
        self.keys: list[int] = []
        self.shape = -1  # the index's shape when `sets` was counted
        self.sets = 0  # sets (group, subgroup) that the admitted subgroups have


class DiscoveryIndex:
    """The served entries by score group and facets (the replica keeps it in step).

    Each entry is in exactly one set: ``_group[(region, free)][sub]``, where ``sub`` is
    ``2 * facet + live`` and a facet (interned as a small integer) is the entry's kind,
    accelerator models and namespace.  The same sets are reachable by subgroup key
    (``_subs[sub][(region, free)]``), so a query whose facet filters admit few
    subgroups collects just those, and a broad one walks the score groups best first.
    Labels are the only filter checked member by member (:meth:`_labels`).
    """

    _RARE = 8192
    """A label pair held by at most this many entries keeps them, each with where its
    set is (a query naming it places those entries without reading them); a commoner
    one keeps a count."""
    _PLACE = 128
    """Place a rare label's entries (rather than walk the groups checking labels) when
    they are at most 1 / _PLACE of all entries, or fewer than the collected subgroups
    hold."""
    _COLLECT = 4
    """Collect the admitted subgroups (rather than walk every group) when their sets
    are at most 1 / _COLLECT of all."""

    def __init__(self, entries: Mapping[str, Entry], table: LatencyTable) -> None:
        self._entries = entries
        self._table = table
        self._group: dict[GroupKey, dict[int, set[str]]] = {}
        self._subs: dict[int, dict[GroupKey, set[str]]] = {}
        self._facet_id: dict[Facet, int] = {}
        self._facets: list[Facet] = []
        # per facet: how its members' CPIDs begin ("<namespace>/<kind>."), "" if unsure
        self._heads: list[str] = []
        self._pairs = 0  # sets in the index (subgroups of every group)
        self._size = 0  # entries in the index
        self._shape = 0  # changes whenever a set appears or disappears
        self._locs: dict[Loc, Loc] = {}  # one tuple per set, shared by label postings
        # label pair -> entries holding it; while never more than _RARE, where each of
        # them is (one as a tuple, more as a dict), dropped for good once more (until 0)
        self._label_count: dict[tuple[str, str], int] = {}
        self._label_few: dict[tuple[str, str], tuple[str, Loc] | dict[str, Loc]] = {}
        # per query shape: score groups in order (until a group appears or disappears)
        self._orders: dict[tuple[Any, ...], tuple[Ranked, dict[GroupKey, int]]] = {}
        # per (kind, accelerator, within, live): the subgroups admitted
        self._filters: dict[tuple[Any, ...], _Subgroups] = {}

    @property
    def table(self) -> LatencyTable:
        return self._table

    @table.setter
    def table(self, table: LatencyTable) -> None:
        """A new latency table: the score groups are keyed by its region names, so every
        entry is indexed again."""
        held = [c for inner in self._group.values() for m in inner.values() for c in m]
        self.clear()
        self._table = table
        for cpid in held:
            self.add(self._entry(cpid))

    def _region_key(self, entry: Entry) -> str:
        return self._table.key(entry.region) or entry.region

    def _sub(self, entry: Entry) -> int | None:
        """The subgroup key of ``entry``: ``2 * facet id + live`` (None: facet unknown)."""
        fid = self._facet_id.get((entry.kind, entry.facts.accelerators, entry.namespace))
        return None if fid is None else 2 * fid + (1 if entry.live else 0)

    def _set_of(self, entry: Entry) -> tuple[Loc, set[str]]:
        """Where ``entry`` belongs and the set there (facet, group and set made as needed)."""
        sub = self._sub(entry)
        if sub is None:
            kind, namespace = entry.kind, entry.namespace
            facet = (kind, entry.facts.accelerators, namespace)
            fid = self._facet_id[facet] = len(self._facets)
            self._facets.append(facet)
            self._heads.append(f"{namespace}/{kind}.")
            sub = 2 * fid + (1 if entry.live else 0)
        head = self._heads[sub >> 1]
        if head and not entry.cpid.startswith(head):
            self._heads[sub >> 1] = ""  # never skip this facet's sets by their head
        gkey = (self._region_key(entry), entry.free)
        inner = self._group.get(gkey)
        if inner is None:
            inner = self._group[gkey] = {}
            self._orders.clear()
        members = inner.get(sub)
        if members is None:
            members = inner[sub] = set()
            by_group = self._subs.get(sub)
            if by_group is None:
                by_group = self._subs[sub] = {}
            by_group[gkey] = members
            self._pairs += 1
            self._shape += 1
            loc: Loc = (gkey, sub)
            self._locs[loc] = loc
        return self._locs[gkey, sub], members

    def add(self, entry: Entry) -> None:
        loc, members = self._set_of(entry)
        if entry.cpid in members:
            return  # indexed already (as the remove of an entry not indexed is a no-op)
        members.add(entry.cpid)
        self._size += 1
        if entry.facts.labels:
            self._add_labels(entry.cpid, entry.facts.labels, loc)

    def sets(self) -> Iterator[Collection[str]]:
        """The indexed CPIDs, a set at a time: entries alike for :meth:`add_alike` (a
        snapshot lists its records in this order, so that a warm start adds them a set
        at a time)."""
        for inner in self._group.values():
            yield from inner.values()

    def add_alike(self, entries: Sequence[Entry]) -> None:
        """:meth:`add` for entries alike in kind, accelerator models, namespace, region,
        free units and liveness (one set holds them all): a warm start adds its entries
        grouped so (:meth:`ReplicaState.restore`), one set update per group rather than
        a pass per entry; labels are still counted entry by entry."""
        if not entries:
            return
        loc, members = self._set_of(entries[0])
        fresh = [e for e in {e.cpid: e for e in entries}.values() if e.cpid not in members]
        if not fresh:
            return
        sub = loc[1]
        head = self._heads[sub >> 1]
        if head and not all(e.cpid.startswith(head) for e in fresh):
            self._heads[sub >> 1] = ""
        members.update(e.cpid for e in fresh)
        self._size += len(fresh)
        for e in fresh:
            if e.facts.labels:
                self._add_labels(e.cpid, e.facts.labels, loc)

    def _add_labels(self, cpid: str, pairs: tuple[tuple[str, str], ...], loc: Loc) -> None:
        count, few = self._label_count, self._label_few
        for pair in pairs:
            n = count.get(pair, 0) + 1
            count[pair] = n
            if n == 1:
                if self._RARE > 0:
                    few[pair] = (cpid, loc)
                continue
            held = few.get(pair)
            if held is None:
                continue
            if n > self._RARE:
                del few[pair]
            elif isinstance(held, tuple):
                few[pair] = {held[0]: held[1], cpid: loc}
            else:
                held[cpid] = loc

    def _remove_labels(self, cpid: str, pairs: tuple[tuple[str, str], ...]) -> None:
        count, few = self._label_count, self._label_few
        for pair in pairs:
            n = count.get(pair, 0) - 1
            if n <= 0:
                count.pop(pair, None)
                few.pop(pair, None)
                continue
            count[pair] = n
            held = few.get(pair)
            if isinstance(held, dict):
                held.pop(cpid, None)
                if len(held) == 1:
                    few[pair] = next(iter(held.items()))

    def remove(self, entry: Entry) -> None:
        sub = self._sub(entry)
        gkey = (self._region_key(entry), entry.free)
        inner = self._group.get(gkey)
        if sub is None or inner is None:
            return
        members = inner.get(sub)
        if members is None or entry.cpid not in members:
            return
        members.discard(entry.cpid)
        self._size -= 1
        if entry.facts.labels:
            self._remove_labels(entry.cpid, entry.facts.labels)
        if members:
            return
        del inner[sub]
        del self._locs[gkey, sub]
        self._pairs -= 1
        self._shape += 1
        by_group = self._subs[sub]
        del by_group[gkey]
        if not by_group:
            del self._subs[sub]
        if not inner:
            del self._group[gkey]
            self._orders.clear()

    def clear(self) -> None:
        for table in (
            self._group,
            self._subs,
            self._facet_id,
            self._locs,
            self._label_count,
            self._label_few,
            self._orders,
            self._filters,
        ):
            table.clear()
        self._facets.clear()
        self._heads.clear()
        self._pairs = 0
        self._size = 0
        self._shape += 1

    @property
    def groups(self) -> int:
        return len(self._group)

    def _labels(self, cpid: str) -> tuple[tuple[str, str], ...]:
        """The label pairs of a member: the only per-member read of a filtering query."""
        return self._entries[cpid].facts.labels

    def _entry(self, cpid: str) -> Entry:
        return self._entries[cpid]

    def _match(self, cpid: str, score: float, free: int, latency: float | None, q: Query) -> Match:
        return Match(cpid, score, free, latency, self._entry(cpid), q)

    def _few(self, q: Query) -> Mapping[str, Loc] | None:
        """The only entries that can match ``q``'s labels, with where their sets are,
        when one of its label pairs is rare (held by at most _RARE entries; empty when
        by none), else None."""
        best: Mapping[str, Loc] | None = None
        for pair in q.labels:
            if pair not in self._label_count:
                return {}
            held = self._label_few.get(pair)
            if held is not None:
                members = {held[0]: held[1]} if isinstance(held, tuple) else held
                if best is None or len(members) < len(best):
                    best = members
        return best

    # -- query planning -----------------------------------------------------------------

    def _admitted(self, q: Query) -> _Subgroups | None:
        """The subgroups ``q``'s kind, accelerator, namespace and liveness filters admit
        (None: every one).  Cached per filter; extended as new facets appear."""
        if q.kind is None and q.accelerator is None and q.within is None and q.live is None:
            return None
        fkey = (q.kind, q.accelerator, q.within, q.live)
        found = self._filters.get(fkey)
        if found is None:
            if len(self._filters) >= _CACHED_FILTERS:
                self._filters.clear()
            found = self._filters[fkey] = _Subgroups()
        facets = self._facets
        if found.covered < len(facets):
            kind, accel, within, live = fkey
            for fid in range(found.covered, len(facets)):
                k, models, prefix = facets[fid]
                ok = (
                    (kind is None or k == kind)
                    and (accel is None or accel in models)
                    and (within is None or ns_contains(within, prefix))
                )
                for lb in (0, 1):
                    admit = ok and (live is None or live == bool(lb))
                    found.ok.append(admit)
                    if admit:
                        found.keys.append(2 * fid + lb)
            found.covered = len(facets)
        return found

    def _ranked_groups(self, q: Query, order: str) -> tuple[Ranked, dict[GroupKey, int]]:
        """The score groups ``q``'s free-unit, liveness and latency bounds admit, in
        ``order`` (default, free or latency), with each group's position; cached until
        a group appears or disappears."""
        okey = (order, q.near, q.min_free, q.max_latency_ms, q.live is False)
        hit = self._orders.get(okey)
        if hit is not None:
            return hit
        groups: list[tuple[GroupKey, int, float | None]] = []
        for gkey in self._group:
            region, free = gkey
            if q.min_free is not None and free < q.min_free:
                continue
            if q.live is False and free > 0:  # free units need an `up` status
                continue
            latency = None if q.near is None else self._table.rtt(q.near, region)
            if q.max_latency_ms is not None and (latency is None or latency > q.max_latency_ms):
                continue
            groups.append((gkey, free, latency))
        ranked: Ranked
        if order == "default":
            scored = [(q.score(free, lat), free, lat, gkey) for gkey, free, lat in groups]
            # equal scores tie whatever the group; region and free only fix the walk
            scored.sort(key=lambda g: (-g[0], g[3]))
            ranked = scored
        else:
            sorter = ranking.Sorter(order, near=q.near is not None, weights=q.weight_map)
            none = ranking.EntryFacts()
            ranked = [
                (sorter.key(sorter.group(free, lat), "", none)[:-1], free, lat, gkey)
                for gkey, free, lat in groups
            ]
            ranked.sort(key=lambda g: g[0])
        pos = {g[3]: i for i, g in enumerate(ranked)}
        if len(self._orders) >= _CACHED_ORDERS:
            self._orders.clear()
        self._orders[okey] = (ranked, pos)
        return ranked, pos

    def _sets(
        self, q: Query, ranked: Ranked, pos: dict[GroupKey, int]
    ) -> Iterator[tuple[int, int, set[str]]]:
        """``(position in ranked, subgroup, members)`` of every subgroup ``q`` admits, by position.

        When the admitted subgroups are few (a selective kind / accelerator / within),
        they are collected from ``_subs`` and sorted; when a label of ``q`` is rare and
        its entries fewer than those, they are placed one by one instead; otherwise the
        groups are walked in order, skipping what is not admitted, and the caller stops
        when it has enough."""
        admitted = self._admitted(q)
        found: list[tuple[int, int, set[str]]] | None = None
        if admitted is not None:
            subs = self._subs
            keys = admitted.keys
            if admitted.shape != self._shape:
                admitted.sets = sum(len(subs.get(k, _NONE)) for k in keys)
                admitted.shape = self._shape
            if admitted.sets * self._COLLECT <= self._pairs:
                found = []
                for k in keys:
                    for gkey, members in subs.get(k, _NONE).items():
                        i = pos.get(gkey)
                        if i is not None:
                            found.append((i, k, members))
        few = self._few(q) if q.labels else None
        if few is not None and (
            len(few) * self._PLACE <= self._size
            if found is None
            else len(few) < sum(len(f[2]) for f in found)
        ):
            # a rare label, and fewer entries than the admitted subgroups hold: its
            # entries, placed one by one where their sets are
            placed: dict[tuple[int, int], set[str]] = {}
            for cpid, (gkey, sub) in few.items():
                i = pos.get(gkey)
                if i is None or (admitted is not None and not admitted.ok[sub]):
                    continue
                at = placed.get((i, sub))
                if at is None:
                    placed[i, sub] = {cpid}
                else:
                    at.add(cpid)
            yield from sorted(((i, sub, m) for (i, sub), m in placed.items()), key=_first)
            return
        if found is not None:
            found.sort(key=_first)
            yield from found
            return
        group = self._group
        if admitted is None:
            for i, g in enumerate(ranked):
                for k, members in group[g[3]].items():
                    yield i, k, members
            return
        ok = admitted.ok
        for i, g in enumerate(ranked):
            for k, members in group[g[3]].items():
                if ok[k]:
                    yield i, k, members

    def _filtered(self, members: Collection[str], labels: tuple[tuple[str, str], ...]) -> list[str]:
        """The members carrying every label pair of ``labels``."""
        of = self._labels
        if len(labels) == 1:
            pair = labels[0]
            return [c for c in members if pair in of(c)]
        out = []
        for c in members:
            have = of(c)
            for p in labels:
                if p not in have:
                    break
            else:
                out.append(c)
        return out

    # -- search -----------------------------------------------------------------------

    def search(self, q: Query) -> list[Match]:
        """The best ``q.limit`` matches, best first (see the module docstring)."""
        order = q.order
        if order in ("default", "free", "latency"):
            return self._take(q, order)
        return self._ranked(q)

    def _take(self, q: Query, order: str) -> list[Match]:
        """The default, ``free`` and ``latency`` orders: their keys are those of a score
        group, so the groups are walked in key order and the walk stops once ``limit``
        is certain (within equal keys, by CPID)."""
        ranked, pos = self._ranked_groups(q, order)
        if not ranked:
            return []
        labels = q.labels
        default = order == "default"
        heads = self._heads
        out: list[Match] = []
        sets = self._sets(q, ranked, pos)
        pending = next(sets, None)
        while pending is not None and len(out) < q.limit:
            key = ranked[pending[0]][0]
            need = q.limit - len(out)
            # the block (equal keys: ties go by CPID) by how its sets' CPIDs begin; the
            # `need` smallest CPIDs so far bound what a later set can add, and a set
            # whose CPIDs all sort after the bound ends the block
            block: list[tuple[str, int, set[str]]] = []
            while pending is not None and ranked[pending[0]][0] == key:
                i, sub, members = pending
                block.append((heads[sub >> 1], i, members))
                pending = next(sets, None)
            block.sort(key=_first)
            best: list[tuple[str, int, float | None]] = []
            bound: str | None = None
            for head, i, members in block:
                chosen: Collection[str] = members
                if bound is not None:
                    if head > bound:
                        break
                    if bound.startswith(head):
                        chosen = [c for c in members if c < bound]
                if labels and chosen:
                    chosen = self._filtered(chosen, labels)
                if len(chosen) > need:
                    chosen = (
                        heapq.nsmallest(need, chosen)
                        if len(chosen) > 8 * need
                        else sorted(chosen)[:need]
                    )
                if chosen:
                    _, free, latency, _ = ranked[i]
                    best.extend((cpid, free, latency) for cpid in chosen)
                    if len(best) >= need:
                        best.sort()
                        del best[need:]
                        bound = best[-1][0]
            best.sort()
            for c, f, lat in best:
                out.append(self._match(c, key if default else q.score(f, lat), f, lat, q))
        return out

    def _ranked(self, q: Query) -> list[Match]:
        """``score``, ``price`` and ``carbon``: the sort keys of every match are
        computed (the admitted subgroups only), then the best ``q.limit`` kept."""
        ranked, pos = self._ranked_groups(q, "default")
        if not ranked:
            return []
        order, near = q.order, q.near is not None
        sorter = ranking.Sorter(order, near=near, weights=q.weight_map)
        key, facts_of = sorter.key, ranking.entry_facts
        entry_of = self._entry
        labels = set(q.labels)
        # price and carbon: the first key depends on the entry alone and is cheap, so
        # it is computed for every match, and the full keys only for the matches whose
        # first key is within the best `limit` (the others cannot make the answer)
        first = ranking.first_key if order in ("price", "carbon") else None
        pending: list[tuple[tuple[int, float], Any, str, ranking.EntryFacts]] = []
        found: list[tuple[tuple[Any, ...], str, int, float | None]] = []
        last = -1
        group: Any = None
        for i, _, members in self._sets(q, ranked, pos):
            if i != last:
                _, free, latency, _ = ranked[i]
                group = sorter.group(free, latency)
                last = i
            for cpid in members:
                entry = entry_of(cpid)
                if labels and not labels <= set(entry.facts.labels):
                    continue
                facts = facts_of(entry)
                if first is not None:
                    pending.append((first(order, facts), group, cpid, facts))
                else:
                    found.append((key(group, cpid, facts), cpid, group[0], group[4]))
        if pending:
            if len(pending) > q.limit:
                worst = heapq.nsmallest(q.limit, pending, key=lambda p: p[0])[-1][0]
                pending = [p for p in pending if p[0] <= worst]
            found = [
                (key(group, cpid, facts), cpid, group[0], group[4])
                for _, group, cpid, facts in pending
            ]
        return [
            self._match(cpid, q.score(free, latency), free, latency, q)
            for _, cpid, free, latency in heapq.nsmallest(q.limit, found, key=lambda f: f[0])
        ]


_NONE: Mapping[GroupKey, set[str]] = {}


def _first(item: tuple[Any, ...]) -> Any:
    return item[0]
