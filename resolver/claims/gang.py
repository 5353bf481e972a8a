"""Gang claims: what a gang request asks for and how its parts are chosen.  No I/O.

A gang claims ``units`` in total over several resources, all or nothing
(:meth:`resolver.claims.service.ClaimService.claim_gang`).  :class:`GangSpec` holds the
constraints: units per resource (``per_min`` to ``per_max``; whole servers are
``per_min == per_max == 8``), the most parts (:data:`MAX_GANG_PARTS`: one etcd
transaction holds the whole gang), and the set the parts form (``same_region``, or
``max_pairwise_latency_ms`` between every two parts' regions, from the resolver's
latency table).  Candidates come from discovery, best ranked first.

:func:`plan_gang` chooses the parts greedily, in rank order: for each candidate in
turn (the *seed*), the group of candidates compatible with the seed and with each other
(regions, latency) is gathered in rank order, and its members are taken in rank order
until their room covers the total.  The first seed whose group covers it wins, so the
gang contains the best-ranked candidate that can be part of any gang the greedy finds.
When no seed does, the largest gang any group could hold (never above the total) is
returned instead, for the refusal.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

from resolver.claims.model import MAX_UNITS, InvalidClaimError

__all__ = ["MAX_GANG_PARTS", "Candidate", "GangPlan", "GangSpec", "plan_gang"]

MAX_GANG_PARTS: Final = 61
"""Most parts of one gang.  A gang is granted in one etcd transaction comparing the
``/live/`` and ``/alloc/`` key of every part and the holder's key (``2n + 1``
comparisons) and writing every ``/alloc/`` total, every part's claim key, the holder's
total and the gang's meter (``2n + 2`` operations); its release (or removal once past
``expires_at``) compares each claim key, ``/alloc/`` key and the holder's key, the meter,
the receipt key and the audit head (``2n + 5``) and deletes or writes the same keys plus
the receipt, the meter and the audit entry (``2n + 4``).  etcd refuses more than 128
in any one list by default (``--max-txn-ops``): ``2n + 5 <= 128`` gives 61."""

MAX_PAIRWISE_LATENCY_MS: Final = 10_000.0

Part = tuple[str, int]
"""``(cpid, units)`` of one part of a gang."""


@dataclass(frozen=True, slots=True)
class GangSpec:
    """What a gang request asks for (validated on construction; InvalidClaimError)."""

    units: int
    """Units in total."""
    per_min: int = 1
    """Units per resource, at least."""
    per_max: int = MAX_UNITS
    """Units per resource, at most (``per_min == per_max``: exactly that many)."""
    same_region: bool = False
    """All parts in one region (the records' ``location.region``, exactly)."""
    max_pairwise_latency_ms: float | None = None
    """Every two parts' regions at most this far apart (latency table; unknown = too far)."""
    max_parts: int = MAX_GANG_PARTS

    def __post_init__(self) -> None:
        for name in ("units", "per_min", "per_max"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise InvalidClaimError(f"gang {name} must be an integer, got {value!r}")
            if not 1 <= value <= MAX_UNITS:
                raise InvalidClaimError(
                    f"gang {name} must be between 1 and {MAX_UNITS}, got {value}"
                )
        if self.per_min > self.per_max:
            raise InvalidClaimError(
                f"gang per_resource: min {self.per_min} is above max {self.per_max}"
            )
        if self.per_min > self.units:
            raise InvalidClaimError(
                f"gang per_resource {self.per_min} is more than the {self.units} units asked in total"
            )
        if not 1 <= self.max_parts <= MAX_GANG_PARTS:
            raise InvalidClaimError(f"gang max_parts must be between 1 and {MAX_GANG_PARTS}")
        lat = self.max_pairwise_latency_ms
        if lat is not None and (
            isinstance(lat, bool)
            or not isinstance(lat, int | float)
            or not math.isfinite(lat)
            or not 0 < lat <= MAX_PAIRWISE_LATENCY_MS
        ):
            raise InvalidClaimError(
                f"gang max_pairwise_latency_ms must be a number above 0 and at most "
                f"{MAX_PAIRWISE_LATENCY_MS:g}, got {lat!r}"
            )
        if not isinstance(self.same_region, bool):
            raise InvalidClaimError(
                f"gang same_region must be true or false, got {self.same_region!r}"
            )
        fewest = -(-self.units // self.per_max)  # parts needed at least
        most = self.units // self.per_min  # parts possible at most
        if fewest > most:
            raise InvalidClaimError(
                f"{self.units} units cannot be split into parts of {self.per_min} to "
                f"{self.per_max} units"
            )
        if fewest > self.max_parts:
            raise InvalidClaimError(
                f"{self.units} units in parts of at most {self.per_max} need {fewest} parts; "
                f"a gang has at most {self.max_parts} (one etcd transaction)"
            )

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"units": self.units}
        if self.per_min == self.per_max:
            out["per_resource"] = self.per_min
        else:
            out["per_resource"] = {"min": self.per_min, "max": self.per_max}
        if self.same_region:
            out["same_region"] = True
        if self.max_pairwise_latency_ms is not None:
            out["max_pairwise_latency_ms"] = self.max_pairwise_latency_ms
        return out


@dataclass(frozen=True, slots=True)
class Candidate:
    """A resource a gang may use: its region and the units it can take now."""

    cpid: str
    region: str
    room: int


@dataclass(frozen=True, slots=True)
class GangPlan:
    """``parts`` when a gang fits (best ranked first), else ``()``; ``largest``: the
    largest gang found (equal to ``parts`` when it fits)."""

    parts: tuple[Part, ...]
    largest: tuple[Part, ...]

    @property
    def fits(self) -> bool:
        return bool(self.parts)

    @property
    def largest_units(self) -> int:
        return sum(u for _, u in self.largest)


def _distribute(rooms: Sequence[tuple[str, int]], total: int, per_min: int) -> tuple[Part, ...]:
    """``per_min`` each, the rest filled in order up to each room (caller checked it fits)."""
    left = total - per_min * len(rooms)
    out: list[Part] = []
    for cpid, room in rooms:
        extra = min(room - per_min, left)
        left -= extra
        out.append((cpid, per_min + extra))
    return tuple(out)


def _largest(group: Sequence[tuple[str, int]], spec: GangSpec) -> tuple[Part, ...]:
    """The largest gang (at most ``spec.units``) the members of ``group`` can hold."""
    by_room = sorted(group, key=lambda m: -m[1])[: spec.max_parts]
    best: tuple[int, int] = (0, 0)  # (total, members)
    room = 0
    for k, (_, r) in enumerate(by_room, start=1):
        room += r
        total = min(room, spec.units)
        if k * spec.per_min <= total and total > best[0]:
            best = (total, k)
    total, k = best
    if not total:
        return ()
    chosen = by_room[:k]
    order = {c: i for i, (c, _) in enumerate(group)}
    chosen.sort(key=lambda m: order[m[0]])
    return _distribute(chosen, total, spec.per_min)


def plan_gang(
    candidates: Sequence[Candidate],
    spec: GangSpec,
    rtt: Callable[[str, str], float | None],
) -> GangPlan:
    """Choose the parts of a gang among ``candidates`` (best ranked first); see the
    module docstring.  ``rtt(a, b)`` is the latency table's estimate between regions."""
    usable = [
        (c.cpid, c.region, min(c.room, spec.per_max)) for c in candidates if c.room >= spec.per_min
    ]
    pair: dict[tuple[str, str], bool] = {}

    def compatible(a: str, b: str) -> bool:
        if spec.same_region and a != b:
            return False
        bound = spec.max_pairwise_latency_ms
        if bound is None:
            return True
        key = (a, b) if a <= b else (b, a)
        ok = pair.get(key)
        if ok is None:
            ms = rtt(a, b)
            ok = pair[key] = ms is not None and ms <= bound
        return ok

    constrained = spec.same_region or spec.max_pairwise_latency_ms is not None
    largest: tuple[Part, ...] = ()
    seeded: set[str] = set()
    for seed_cpid, seed_region, seed_room in usable:
        # seeds of one region gather the same group: the first (best ranked) stands for all
        if seed_region in seeded or not compatible(seed_region, seed_region):
            continue
        seeded.add(seed_region)
        regions = {seed_region}  # pairwise compatible: a clique of regions
        rejected: set[str] = set()
        group: list[tuple[str, int]] = [(seed_cpid, seed_room)]
        taken: list[tuple[str, int]] = [(seed_cpid, seed_room)]
        room = seed_room
        for cpid, region, r in usable:
            if cpid == seed_cpid or region in rejected:
                continue
            if region not in regions:
                if not compatible(region, region) or not all(
                    compatible(region, x) for x in regions
                ):
                    rejected.add(region)
                    continue
                regions.add(region)
            group.append((cpid, r))
            if (
                room < spec.units
                and len(taken) < spec.max_parts
                and (len(taken) + 1) * spec.per_min <= spec.units
            ):
                taken.append((cpid, r))
                room += r
        if room >= spec.units and len(taken) * spec.per_min <= spec.units:
            parts = _distribute(taken, spec.units, spec.per_min)
            return GangPlan(parts, parts)
        found = _largest(group, spec)
        if sum(u for _, u in found) > sum(u for _, u in largest):
            largest = found
        if not constrained:
            break  # one group holds every candidate
    return GangPlan((), largest)
