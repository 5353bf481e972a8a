"""Choosing a gang's parts (resolver.claims.gang, no I/O) and validating a gang request."""

from __future__ import annotations

import json

import pytest

from resolver.claims.gang import MAX_GANG_PARTS, Candidate, GangSpec, plan_gang
from resolver.claims.model import MAX_UNITS, InvalidClaimError

RTT = {
    ("31", "31"): 2.0,
    ("31", "32"): 7.4,
    ("32", "32"): 2.0,
    ("31", "3205"): 3.7,
    ("3205", "3205"): 2.0,
    ("32", "3205"): 5.8,
}


def rtt(a: str, b: str) -> float | None:
    return RTT.get((a, b), RTT.get((b, a)))


def cands(*spec: tuple[str, str, int]) -> list[Candidate]:
    return [Candidate(c, r, room) for c, r, room in spec]


def test_whole_servers_take_exactly_per_resource_in_rank_order() -> None:
    got = plan_gang(
        cands(("a", "31", 8), ("b", "31", 5), ("c", "31", 16), ("d", "31", 8), ("e", "31", 8)),
        GangSpec(units=24, per_min=8, per_max=8),
        rtt,
    )
    assert got.fits and got.parts == (("a", 8), ("c", 8), ("d", 8))  # b has too few
    assert got.largest == got.parts


def test_min_max_per_resource_fills_best_ranked_first_and_respects_the_minimum() -> None:
    spec = GangSpec(units=10, per_min=4, per_max=8)
    got = plan_gang(cands(("a", "31", 8), ("b", "31", 8)), spec, rtt)
    assert got.parts == (("a", 6), ("b", 4))  # 8 + 2 would break the minimum of 4
    got = plan_gang(cands(("a", "31", 3), ("b", "31", 5), ("c", "31", 5)), spec, rtt)
    assert got.parts == (("b", 5), ("c", 5))
    assert sum(u for _, u in got.parts) == 10


def test_pairwise_latency_keeps_every_pair_within_the_bound() -> None:
    spec = GangSpec(units=24, per_min=8, per_max=8, max_pairwise_latency_ms=5)
    # the best candidate is in 32, which is 7.4 ms from 31: its group is too small
    got = plan_gang(
        cands(("x", "32", 8), ("a", "31", 8), ("b", "3205", 8), ("y", "32", 8), ("c", "31", 8)),
        spec,
        rtt,
    )
    assert got.parts == (("a", 8), ("b", 8), ("c", 8))
    regions = {"x": "32", "y": "32", "a": "31", "b": "3205", "c": "31"}
    used = [regions[c] for c, _ in got.parts]
    assert all((rtt(p, q) or 99) <= 5 for p in used for q in used)
    # unknown latency counts as too far
    got = plan_gang(
        cands(("a", "31", 8), ("z", "99", 8)), GangSpec(16, 8, 8, max_pairwise_latency_ms=50), rtt
    )
    assert not got.fits and got.largest == (("a", 8),)


def test_same_region_and_the_largest_gang_when_none_fits() -> None:
    spec = GangSpec(units=32, per_min=8, per_max=8, same_region=True)
    got = plan_gang(
        cands(("a", "31", 8), ("x", "32", 8), ("b", "31", 8), ("y", "32", 8), ("z", "32", 8)),
        spec,
        rtt,
    )
    assert not got.fits
    assert got.largest == (("x", 8), ("y", 8), ("z", 8)) and got.largest_units == 24
    got = plan_gang(cands(("a", "31", 3)), GangSpec(units=16, per_min=4, per_max=8), rtt)
    assert not got.fits and got.largest == ()
    got = plan_gang(cands(("a", "31", 5), ("b", "31", 5), ("c", "31", 5)), GangSpec(11, 4, 8), rtt)
    # 3 parts need at least 12 units, 2 parts hold at most 10: no gang of 11, 10 at most
    assert not got.fits and got.largest == (("a", 5), ("b", 5))


def test_never_more_parts_than_one_transaction_holds() -> None:
    many = cands(*((f"c{i:03d}", "31", 1) for i in range(200)))
    assert MAX_GANG_PARTS == 61  # a release's 2n + 5 compares within etcd's 128
    got = plan_gang(many, GangSpec(units=61, per_min=1, per_max=1), rtt)
    assert got.fits and len(got.parts) == MAX_GANG_PARTS
    with pytest.raises(InvalidClaimError, match="need 62 parts"):
        GangSpec(units=62, per_min=1, per_max=1)


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"units": 0}, "between 1"),
        ({"units": MAX_UNITS + 1}, "between 1"),
        ({"units": 2**62}, "between 1"),
        ({"units": True}, "integer"),
        ({"units": 8, "per_min": 16, "per_max": 16}, "more than the 8 units"),
        ({"units": 8, "per_min": 0}, "between 1"),
        ({"units": 8, "per_min": 5, "per_max": 4}, "above max"),
        ({"units": 64, "per_min": 7, "per_max": 7}, "cannot be split"),
        ({"units": 1000, "per_min": 1, "per_max": 8}, "need 125 parts"),
        ({"units": 8, "max_pairwise_latency_ms": 0}, "above 0"),
        ({"units": 8, "max_pairwise_latency_ms": float("nan")}, "above 0"),
        ({"units": 8, "max_pairwise_latency_ms": 1e9}, "at most"),
        ({"units": 8, "max_pairwise_latency_ms": True}, "number"),
        ({"units": 8, "same_region": "yes"}, "true or false"),
    ],
)
def test_bad_gang_specs_are_refused(fields: dict[str, object], match: str) -> None:
    with pytest.raises(InvalidClaimError, match=match):
        GangSpec(**fields)  # type: ignore[arg-type]


def test_a_stored_gang_part_that_does_not_add_up_is_unreadable() -> None:
    from registry.index import KV, Keys
    from resolver.claims.model import Claim

    cpid = "CN.31.CMCC/GPU.4K7Q9M2XH3PT-Z"

    def kv(claim_id: str, value: dict[str, object]) -> KV:
        raw = json.dumps(value).encode()
        return KV(Keys.claim(cpid, claim_id), raw, 1, 1, 1, 0)

    good_id = "CN.31.CMCC~GPU.4K7Q9M2XH3PT-Z~q3JkP0c1xYw8aR5t"
    base = {"claim_id": good_id, "cpid": cpid, "holder": "h", "units": 8, "created_at": 1,
            "expires_at": 2}  # fmt: skip
    ok = Claim.from_kv(kv(good_id, {**base, "gang": {"units": 16, "parts": 2},
                                    "parts": [{"cpid": cpid, "units": 8},
                                              {"cpid": "CN.3/GPU.X", "units": 8}]}))  # fmt: skip
    assert ok.is_gang and ok.anchor == cpid and len(ok.parts) == 2
    assert Claim.from_kv(kv(good_id, base)).is_gang is False
    for bad in (
        {"gang": {"units": 16, "parts": 2}, "parts": [{"cpid": cpid, "units": 9}]},
        {"gang": {"units": 16, "parts": 2}, "parts": [{"cpid": cpid, "units": 8}] * 2 + [{}]},
        {"gang": {"units": 0, "parts": 2}},
        {"gang": {"units": 16, "parts": True}},
        {"gang": [16, 2]},
        {"gang": {"units": 16, "parts": 2}, "parts": "all"},
    ):
        with pytest.raises(ValueError):
            Claim.from_kv(kv(good_id, {**base, **bad}))
    with pytest.raises(ValueError, match="malformed"):  # a gang must be found by its id
        Claim.from_kv(kv("not-an-id", {**base, "gang": {"units": 8, "parts": 1}}))
