"""The claim model alone (no etcd, no HTTP): claim ids, units, stored claims, settings."""

from __future__ import annotations

import pytest

from registry.index import KV, Keys
from resolver.claims.model import (
    Claim,
    ClaimsSettings,
    InvalidClaimError,
    available_units,
    new_claim_id,
    parse_claim_id,
    read_units,
    reported_claimed,
    units_json,
)
from schemas.models import Capacity, Status
from tests.resolver.kit import Node


def kv(key: str, value: bytes, *, lease: int = 0, rev: int = 7) -> KV:
    return KV(key, value, create_revision=rev, mod_revision=rev, version=1, lease=lease)


def test_claim_ids_carry_their_cpid() -> None:
    cpid = Node().cpid
    cid = new_claim_id(cpid)
    assert parse_claim_id(cid) == cpid and Keys.claim(cpid, cid).endswith("/" + cid)
    for bad in ("x", f"{cid}~more", cid.lower(), cid.replace("~", "/", 1), cid[:-10]):
        with pytest.raises(InvalidClaimError, match="claim id"):
            parse_claim_id(bad)


@pytest.mark.parametrize(
    ("free", "metric", "state", "allocated", "expected"),
    [
        (10, None, "up", 0, 10),
        (10, None, "up", 4, 6),
        (10, None, "up", 12, 0),
        (6, 4, "up", 4, 6),  # the node already subtracted the 4 claimed units
        (6, 4, "up", 6, 4),  # two more claimed since its last status
        (6, 4, "up", 2, 8),  # two released since its last status
        (6, 1000, "up", 0, 16),  # never more than the record's hardware
        (10, None, "draining", 0, 0),
        (10, None, "down", 0, 0),
    ],
)
def test_available_units(
    free: int, metric: int | None, state: str, allocated: int, expected: int
) -> None:
    node = Node(count=16)
    status = Status(
        cpid=node.cpid,
        seq=1,
        observed_at=1,
        state=state,  # type: ignore[arg-type]
        capacity=Capacity(accelerators_free=free),
        metrics={} if metric is None else {"claimed_units": metric},
    )
    assert available_units(node.record(), status, allocated) == expected
    assert available_units(node.record(), None, 0) == 0


@pytest.mark.parametrize(
    ("value", "units"),
    [
        (None, 0),
        (b'{"units":5}', 5),
        (b"3", 3),
        (b"0", 0),
        (b'{"units":-1}', None),
        (b'{"units":true}', None),
        (b'{"units":"2"}', None),
        (b"[]", None),
        (b"not json", None),
    ],
)
def test_read_units(value: bytes | None, units: int | None) -> None:
    got = read_units(None if value is None else kv("/cpi/v1/alloc/x", value))
    assert got == units


def test_units_json_reads_back() -> None:
    for n in (0, 1, 4096):
        assert read_units(kv("/cpi/v1/alloc/x", units_json(n))) == n


@pytest.mark.parametrize(
    ("metric", "count", "expected"),
    [(None, 8, 0), (3, 8, 3), (3.9, 8, 3), (-2, 8, 0), (0.5, 8, 0), (100, 8, 8)],
)
def test_reported_claimed_is_bounded_by_the_hardware(
    metric: float | None, count: int, expected: int
) -> None:
    node = Node(count=count)
    status = Status(
        cpid=node.cpid,
        seq=1,
        observed_at=1,
        state="up",
        capacity=Capacity(accelerators_free=0),
        metrics={} if metric is None else {"claimed_units": metric},
    )
    assert reported_claimed(status, node.record()) == expected


def test_a_claim_round_trips_through_its_stored_form() -> None:
    cpid = Node().cpid
    claim = Claim(new_claim_id(cpid), cpid, "alice", 3, 100, 700, lease=9, revision=7)
    assert Claim.from_kv(kv(claim.key, claim.to_json(), lease=9)) == claim


@pytest.mark.parametrize(
    ("value", "match"),
    [
        (b'{"units":0,"holder":"a"}', "positive integer"),
        (b'{"units":true,"holder":"a"}', "positive integer"),
        (b'{"units":2}', "holder"),
        (b"[1]", "not a JSON object"),
    ],
)
def test_bad_stored_claims_are_refused(value: bytes, match: str) -> None:
    cpid = Node().cpid
    with pytest.raises(ValueError, match=match):
        Claim.from_kv(kv(Keys.claim(cpid, new_claim_id(cpid)), value))


def test_a_non_claim_key_is_refused() -> None:
    with pytest.raises(ValueError, match="not a claim key"):
        Claim.from_kv(kv(Keys.alloc(Node().cpid), b'{"units":1,"holder":"a"}'))


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"default_ttl_s": 0}, "default_ttl_s"),
        ({"default_ttl_s": 100, "max_ttl_s": 50}, "default_ttl_s"),
        ({"max_attempts": 0}, "max_attempts"),
    ],
)
def test_settings_refuse_nonsense(changes: dict[str, int], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ClaimsSettings(**changes)  # type: ignore[arg-type]
