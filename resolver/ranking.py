"""Compute- and network-aware ranking: the ``cpi-cats-v1`` scores and the sort orders.

The levels follow the IETF CATS metric definition draft (draft-ietf-cats-metric-definition):
level 0 metrics are raw measurements with units (a status's ``gpu_util``, memory in
MiB, watts; a record's price and site energy figures; the estimated latency from the
client's region); level 1 metrics are one unitless score per category; the level 2
metric is a single score.  The draft leaves the normalisation and aggregation
functions to implementations and asks that they be documented precisely, so scores
can be compared; this module is that definition, named :data:`FUNCTION` and written
into every discovery answer.  Changing any constant or formula here means a new name
(``cpi-cats-v2``), never a silent change.  docs/resolver.md ("Ranking") is the prose
version of this docstring.

Every score lies in [0, 10]; 10 is best.  The saturating map used throughout is

    sat(x, r) = 10 * r / (r + x)          x >= 0, r > 0

(10 at x = 0, 5 at x = r, falling towards 0); it is a logistic curve in ``ln x``
centred on ``ln r``, the draft's "sigmoid" normalisation on a log scale.

Level 1, per category (None when the category's inputs are missing):

    compute        = 10 * (0.5 * f + 0.3 * (1 - u) + 0.2 * (1 - m)) / (sum of the weights
                     of the terms present); f = free / (free + 8); u = gpu_util / 100;
                     m = gpu_mem_used_mib / gpu_mem_total_mib.  A term whose metric the
                     status lacks is left out (f is always present: 0 free without status).
    communication  = sat(latency_ms, 10); with ``near`` only (None without it); a pair of
                     regions the latency table does not know counts as 50 ms.
    cost           = sat(price_cny_per_unit_hour, 10)
    energy         = sat(carbon, 500), carbon = grid_gco2_per_kwh * pue (grams of CO2 per
                     kWh delivered to the IT equipment); a site without ``pue`` counts 1.5;
                     None without ``grid_gco2_per_kwh``.

Level 2: the weighted mean of the level 1 scores that are present, with weights
(default 1 each) from the query's ``weights=``; None when no weighted category is
present.  All scores are rounded to 4 decimals, and sorting compares the rounded
values, so the numbers an answer shows are exactly the ones that ordered it.

Sort orders (each ends with the CPID, ascending, so answers are deterministic):

    default  the blended score 0.6 L + 0.4 F of docs/protocol.md §8, best first
    latency  latency_ms ascending (needs near), then free descending
    free     free descending, then latency_ms ascending
    score    level 2 descending
    price    price ascending, then level 2 descending
    carbon   carbon ascending, then level 2 descending

A missing value (no price, no carbon figure, unknown latency) sorts after every
present one, whatever the direction.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from resolver.errors import QueryError
from schemas.http import parse_number

if TYPE_CHECKING:
    from resolver.entry import Entry

__all__ = [
    "CATEGORIES",
    "DEFAULT_WEIGHTS",
    "FUNCTION",
    "SORTS",
    "EntryFacts",
    "Ranked",
    "Score",
    "Sorter",
    "carbon_figure",
    "clear_cache",
    "communication_score",
    "compute_score",
    "cost_score",
    "energy_score",
    "entry_facts",
    "explain",
    "first_key",
    "level2",
    "parse_sort",
    "parse_weights",
    "sat",
    "score",
    "weights_text",
]

FUNCTION: Final = "cpi-cats-v1"
"""Name and version of the scoring functions defined in this module."""

CATEGORIES: Final = ("compute", "communication", "cost", "energy")
"""Level 1 categories, in the order answers list them."""

SORTS: Final = ("default", "latency", "free", "score", "price", "carbon")

_ALIASES: Final = {
    "compute": "compute",
    "free": "compute",
    "communication": "communication",
    "network": "communication",
    "latency": "communication",
    "cost": "cost",
    "price": "cost",
    "energy": "energy",
    "carbon": "energy",
}
"""Names a ``weights=`` entry may use: the categories, and the sort keys that feed them."""

DEFAULT_WEIGHTS: Final[Mapping[str, float]] = {c: 1.0 for c in CATEGORIES}
MAX_WEIGHT: Final = 100.0
MIN_WEIGHT: Final = 0.001
"""The smallest weight above 0 (smaller ones would reach floating-point underflow)."""

FREE_SCALE: Final = 8.0
LATENCY_REF_MS: Final = 10.0
UNKNOWN_LATENCY_MS: Final = 50.0
PRICE_REF_CNY: Final = 10.0
CARBON_REF_G_PER_KWH: Final = 500.0
DEFAULT_PUE: Final = 1.5
_W_FREE: Final = 0.5
_W_IDLE: Final = 0.3
_W_MEMORY: Final = 0.2
_DIGITS: Final = 4


def _round(x: float) -> float:
    return round(x, _DIGITS)


def _unit(x: float) -> float:
    return 0.0 if x < 0 else 1.0 if x > 1 else x


def sat(x: float, ref: float) -> float:
    """``10 * ref / (ref + x)``: 10 at 0, 5 at ``ref``, decreasing, never below 0."""
    return 10.0 * ref / (ref + max(0.0, x))


def _free_term(free: int) -> float:
    return _W_FREE * (free / (free + FREE_SCALE) if free > 0 else 0.0)


def _busy_terms(gpu_util: float | None, mem_fraction: float | None) -> tuple[float, float]:
    """The idle and free-memory terms of *compute* and their total weight."""
    total = weight = 0.0
    if gpu_util is not None:
        total += _W_IDLE * (1.0 - _unit(gpu_util / 100.0))
        weight += _W_IDLE
    if mem_fraction is not None:
        total += _W_MEMORY * (1.0 - _unit(mem_fraction))
        weight += _W_MEMORY
    return total, weight


def _compute(free_term: float, terms: tuple[float, float]) -> float:
    return 10.0 * (free_term + terms[0]) / (_W_FREE + terms[1])


def compute_score(free: int, gpu_util: float | None, mem_fraction: float | None) -> float:
    """Level 1 *compute*: free units, idle accelerators, free accelerator memory."""
    return _compute(_free_term(free), _busy_terms(gpu_util, mem_fraction))


def communication_score(latency_ms: float | None) -> float:
    """Level 1 *communication* from the estimated latency (unknown: 50 ms)."""
    return sat(UNKNOWN_LATENCY_MS if latency_ms is None else latency_ms, LATENCY_REF_MS)


def cost_score(price: float | None) -> float | None:
    """Level 1 *cost* from the price per unit-hour in CNY (None without a price)."""
    return None if price is None else sat(price, PRICE_REF_CNY)


def carbon_figure(grid_gco2_per_kwh: float | None, pue: float | None) -> float | None:
    """Grams of CO2 per kWh delivered to the IT equipment: grid intensity x PUE."""
    if grid_gco2_per_kwh is None:
        return None
    return grid_gco2_per_kwh * (DEFAULT_PUE if pue is None else pue)


def energy_score(carbon: float | None) -> float | None:
    """Level 1 *energy* from :func:`carbon_figure` (None without a grid figure)."""
    return None if carbon is None else sat(carbon, CARBON_REF_G_PER_KWH)


def _level2(values: tuple[float | None, ...], weights: tuple[float, ...]) -> float | None:
    num = den = 0.0
    for value, w in zip(values, weights, strict=True):
        if value is not None and w > 0:
            num += w * value
            den += w
    return None if den == 0 else num / den


def level2(l1: Mapping[str, float | None], weights: Mapping[str, float]) -> float | None:
    """Weighted mean of the present level 1 scores (None when none has weight)."""
    return _level2(
        tuple(l1.get(c) for c in CATEGORIES), tuple(weights.get(c, 0.0) for c in CATEGORIES)
    )


def _opt_round(x: float | None) -> float | None:
    return None if x is None else _round(x)


@dataclass(frozen=True, slots=True)
class EntryFacts:
    """The inputs of the scores that come from an entry's signed documents."""

    gpu_util: float | None = None
    mem_used_mib: float | None = None
    mem_total_mib: float | None = None
    price: float | None = None
    pue: float | None = None
    grid: float | None = None

    @property
    def mem_fraction(self) -> float | None:
        if self.mem_used_mib is None or not self.mem_total_mib:
            return None
        return self.mem_used_mib / self.mem_total_mib


@dataclass(frozen=True, slots=True)
class _Derived:
    """What of the scores depends on the entry alone (cached with its facts)."""

    busy: tuple[float, float]
    cost: float | None
    energy: float | None
    carbon: float | None

    @classmethod
    def of(cls, facts: EntryFacts) -> _Derived:
        carbon = carbon_figure(facts.grid, facts.pue)
        return cls(
            _busy_terms(facts.gpu_util, facts.mem_fraction),
            _opt_round(cost_score(facts.price)),
            _opt_round(energy_score(carbon)),
            _opt_round(carbon),
        )


@dataclass(frozen=True, slots=True)
class Score:
    """Level 1 scores by category and the level 2 score (rounded)."""

    l1: dict[str, float | None]
    l2: float | None
    carbon: float | None

    def to_dict(self, weights: Mapping[str, float]) -> dict[str, Any]:
        return {
            "function": FUNCTION,
            "l1": dict(self.l1),
            "l2": self.l2,
            "weights": dict(weights),
        }


def score(
    facts: EntryFacts,
    free: int,
    latency_ms: float | None,
    *,
    near: bool,
    weights: Mapping[str, float] = DEFAULT_WEIGHTS,
) -> Score:
    """The ``cpi-cats-v1`` scores of one result (see the module docstring)."""
    d = _derived(facts)
    values = (
        _round(_compute(_free_term(free), d.busy)),
        _round(communication_score(latency_ms)) if near else None,
        d.cost,
        d.energy,
    )
    l2 = _level2(values, tuple(weights.get(c, 0.0) for c in CATEGORIES))
    return Score(dict(zip(CATEGORIES, values, strict=True)), _opt_round(l2), d.carbon)


# -- query parameters ---------------------------------------------------------------------


def parse_sort(text: str) -> str:
    """``sort=`` value, checked (400 ``invalid_query`` naming the choices)."""
    value = text.strip().lower()
    if value not in SORTS:
        raise QueryError(f"sort={text!r}: expected one of {', '.join(SORTS)}")
    return value


def parse_weights(text: str) -> tuple[tuple[str, float], ...]:
    """``weights=latency:2,price:1`` -> ``(("communication", 2.0), ("cost", 1.0))``.

    Names are the level 1 categories or the sort keys that feed them (``free`` ->
    compute, ``latency``/``network`` -> communication, ``price`` -> cost, ``carbon`` ->
    energy); each weight is 0 or a number in [0.001, 100]; a category named twice, an unknown
    name or all weights zero is refused.  Categories not named weigh 0.
    """
    rule = (
        "weights must be name:number pairs separated by commas, names from "
        f"{', '.join(sorted(_ALIASES))}, each number 0 or between {MIN_WEIGHT:g} and "
        f"{MAX_WEIGHT:g}, "
        "at least one above 0, no category twice"
    )
    if not text or len(text) > 256:
        raise QueryError(f"weights={text[:64]!r}: {rule}")
    out: dict[str, float] = {}
    for part in text.split(","):
        name, sep, number = part.partition(":")
        cat = _ALIASES.get(name.strip().lower())
        w = parse_number(number.strip()) if sep else None
        if cat is None or w is None or cat in out or not (w == 0 or MIN_WEIGHT <= w <= MAX_WEIGHT):
            raise QueryError(f"weights={text!r}: {part!r} breaks the rule: {rule}")
        out[cat] = w
    if not any(w > 0 for w in out.values()):
        raise QueryError(f"weights={text!r}: {rule}")
    return tuple((c, out[c]) for c in CATEGORIES if c in out)


def weights_text(weights: Iterable[tuple[str, float]]) -> str:
    """The ``weights=`` text that :func:`parse_weights` turns back into ``weights``."""
    return ",".join(f"{c}:{w!r}" for c, w in weights)


# -- the accessor: score inputs from an entry's verified documents --------------------------

_CACHE_MAX: Final = 1 << 18
_cache: dict[str, tuple[object, object, EntryFacts]] = {}
_derived_cache: dict[EntryFacts, _Derived] = {}


def _derived(facts: EntryFacts) -> _Derived:
    d = _derived_cache.get(facts)
    if d is None:
        d = _Derived.of(facts)
        if len(_derived_cache) >= _CACHE_MAX:
            _derived_cache.clear()
        _derived_cache[facts] = d
    return d


def _number(obj: Any, name: str) -> float | None:
    value = obj.get(name) if isinstance(obj, dict) else None
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) and value >= 0 else None


def _read(entry: Entry) -> EntryFacts:
    """Read the score inputs from the verified payloads (they were validated, bounds
    included, when verified; this only picks fields, defensively).  Python's own reader
    is enough for bytes the strict one (:mod:`schemas._json`) accepted when they were
    verified, and three times as fast: no hook per object (a discovery answer reads
    each of its results' payloads the first time it shows them)."""
    try:
        rec = json.loads(entry.sealed.payload)
    except (ValueError, RecursionError):
        rec = {}
    metrics: Any = {}
    if entry.status_sealed is not None:
        try:
            st = json.loads(entry.status_sealed.payload)
            metrics = st.get("metrics", {}) if isinstance(st, dict) else {}
        except (ValueError, RecursionError):
            metrics = {}
    rec = rec if isinstance(rec, dict) else {}
    loc = rec.get("location")
    return EntryFacts(
        gpu_util=_number(metrics, "gpu_util"),
        mem_used_mib=_number(metrics, "gpu_mem_used_mib"),
        mem_total_mib=_number(metrics, "gpu_mem_total_mib"),
        price=_number(rec.get("attributes"), "price_cny_per_unit_hour"),
        pue=_number(loc, "pue"),
        grid=_number(loc, "grid_gco2_per_kwh"),
    )


def clear_cache() -> None:
    """Forget every cached score input (benchmarks measure the cold case with it)."""
    _cache.clear()
    _derived_cache.clear()


def entry_facts(entry: Entry) -> EntryFacts:
    """Score inputs of ``entry``: status metrics, price, PUE and grid intensity.

    Kept per CPID while the entry's record and status envelopes stay the same objects
    (an entry is rebuilt, never edited, when either changes), so a resolver reads each
    payload once per change rather than once per query; the cache holds at most
    2**18 CPIDs and starts over when full.
    """
    hit = _cache.get(entry.cpid)
    if hit is not None and hit[0] is entry.sealed and hit[1] is entry.status_sealed:
        return hit[2]
    facts = _read(entry)
    if len(_cache) >= _CACHE_MAX:
        _cache.clear()
    _cache[entry.cpid] = (entry.sealed, entry.status_sealed, facts)
    return facts


# -- ordering ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ranked:
    """One result with the keys that ordered it and its scores."""

    cpid: str
    free: int
    latency_ms: float | None
    score: Score
    keys: tuple[tuple[str, Any, str], ...]
    """``(name, value, "asc" | "desc")`` in the order they were compared."""

    def sort_key(self) -> tuple[Any, ...]:
        out: list[Any] = []
        for _, value, order in self.keys:
            if value is None:
                out.append((1, 0.0))
            elif isinstance(value, str):
                out.append((0, value))
            else:
                out.append((0, -value if order == "desc" else value))
        return tuple(out)

    def explanation(self, sort: str, weights: Mapping[str, float]) -> dict[str, Any]:
        return {
            "sort": sort,
            "keys": [{"name": n, "value": v, "order": o} for n, v, o in self.keys],
            "score": self.score.to_dict(weights),
        }


Group = tuple[int, float | None, float, float | None, float | None]
"""Per score group: free units, latency as compared (None without near), the free term
of *compute*, the *communication* score, latency as given."""


class Sorter:
    """Sort keys of one query, fast: what depends on the group (free units, latency) is
    computed once per group, what depends on the entry alone once per change of it.

    ``key(...)`` equals ``explain(...).sort_key()`` for the same inputs (tested): the
    same primitives in the same order of operations, so the keys an answer shows are
    those that ordered it.
    """

    def __init__(self, order: str, *, near: bool, weights: Mapping[str, float]) -> None:
        self.order = order
        self.near = near
        self.weights = tuple(weights.get(c, 0.0) for c in CATEGORIES)

    def group(self, free: int, latency_ms: float | None) -> Group:
        """What the keys of a score group's members share (``latency_ms`` last, as given)."""
        comm = _round(communication_score(latency_ms)) if self.near else None
        return free, latency_ms if self.near else None, _free_term(free), comm, latency_ms

    def key(self, group: Group, cpid: str, facts: EntryFacts) -> tuple[Any, ...]:
        free, lat, free_term, comm, _ = group
        order = self.order
        if order == "free":
            return ((0, -free), _asc(lat), (0, cpid))
        if order == "latency":
            return (_asc(lat), (0, -free), (0, cpid))
        d = _derived(facts)
        values = (_round(_compute(free_term, d.busy)), comm, d.cost, d.energy)
        l2 = _opt_round(_level2(values, self.weights))
        desc = (1, 0.0) if l2 is None else (0, -l2)
        if order == "price":
            return (_asc(facts.price), desc, (0, cpid))
        if order == "carbon":
            return (_asc(d.carbon), desc, (0, cpid))
        return (desc, (0, cpid))


def _asc(value: float | None) -> tuple[int, float]:
    return (1, 0.0) if value is None else (0, value)


def first_key(order: str, facts: EntryFacts) -> tuple[int, float]:
    """The first sort key of ``price`` or ``carbon``: the entry's alone, as
    :meth:`Sorter.key` puts it first (used to drop matches that cannot make the answer)."""
    if order == "price":
        return _asc(facts.price)
    return _asc(_opt_round(carbon_figure(facts.grid, facts.pue)))


def explain(
    cpid: str,
    free: int,
    latency_ms: float | None,
    facts: EntryFacts,
    *,
    sort: str,
    near: bool,
    weights: Mapping[str, float] = DEFAULT_WEIGHTS,
    blended: float | None = None,
) -> Ranked:
    """The sort keys and scores of one result under ``sort`` (``blended``: the default
    order's score, given by the caller that computed it)."""
    s = score(facts, free, latency_ms, near=near, weights=weights)
    lat = latency_ms if near else None
    keys: tuple[tuple[str, Any, str], ...]
    if sort == "latency":
        keys = (("latency_ms", lat, "asc"), ("free", free, "desc"))
    elif sort == "free":
        keys = (("free", free, "desc"), ("latency_ms", lat, "asc"))
    elif sort == "score":
        keys = (("l2", s.l2, "desc"),)
    elif sort == "price":
        keys = (("price_cny_per_unit_hour", facts.price, "asc"), ("l2", s.l2, "desc"))
    elif sort == "carbon":
        keys = (("carbon_g_per_kwh", s.carbon, "asc"), ("l2", s.l2, "desc"))
    else:
        keys = (("score", None if blended is None else round(blended, 6), "desc"),)
    return Ranked(cpid, free, latency_ms, s, (*keys, ("cpid", cpid, "asc")))
