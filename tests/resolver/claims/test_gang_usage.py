"""Usage receipts of gangs and renewals against the real etcd: one receipt per gang and
period listing every part, written in the transaction that claims, renews or ends the
gang; ``audit_usage`` totals them per holder and per namespace to the second."""

from __future__ import annotations

import json
from typing import Any

import pytest

from registry.index import Index, Keys, Op, Prefix
from registry.index.auditlog import Entry, read_entries
from resolver.claims.gang import MAX_GANG_PARTS, GangSpec
from resolver.claims.model import InvalidClaimError
from resolver.claims.usage import Meter
from resolver.core import Resolver
from resolver.discovery import Query
from schemas import dsse
from schemas import keys as _keys
from schemas.usage import Usage, UsagePart, sign_usage_signer
from tests.resolver.claims.test_claims import live_node, units_at
from tests.resolver.claims.test_usage import T0, World, receipts, world
from tests.resolver.kit import Node, Pki

__all__ = ["world"]  # the fixture, imported for these tests


async def gang_nodes(
    index: Index, pki: Pki, resolver: Resolver, n: int, *, free: int = 8, **kw: Any
) -> list[Node]:
    return [
        await live_node(index, pki, resolver, free=free, count=max(free, 1), **kw) for _ in range(n)
    ]


def by_n(got: list[Usage], claim_id: str) -> list[Usage]:
    return sorted((r for r in got if r.claim_id == claim_id), key=lambda r: r.n)


async def test_a_gang_of_64_over_8_servers_claimed_renewed_released_is_billed_per_part(
    world: World, index: Index, pki: Pki, resolver: Resolver
) -> None:
    a = await gang_nodes(index, pki, resolver, 5)
    b = await gang_nodes(index, pki, resolver, 3, namespace="CN.32")
    svc = world.claims
    g = await svc.claim_gang(
        Query(kind="GPU"), spec=GangSpec(64, 8, 8), ttl_s=600, holder="trainer"
    )
    assert g.units == 64 and len(g.parts) == 8 and g.created_at == T0
    assert {c for c, _ in g.parts} == {n.cpid for n in a + b}

    # one meter for the whole gang, written with the claim keys (one revision)
    meter = await index.get(Keys.meter(g.claim_id))
    assert meter is not None
    m = json.loads(meter.value)
    assert (m["cpid"], m["units"], m["start"], m["n"]) == (g.cpid, 64, T0, 1)
    assert [(p["cpid"], p["units"]) for p in m["parts"]] == list(g.parts)
    anchor_kv = await index.get(Keys.claim(g.cpid, g.claim_id))
    assert anchor_kv is not None and anchor_kv.mod_revision == meter.mod_revision

    world.clock.now += 400.7
    renewed = await svc.renew(g.claim_id, holder="trainer", ttl_s=3600)
    assert renewed.expires_at == T0 + 400 + 3600
    # the period's receipt and the moved meter are in the transaction that moved the keys
    (r1,) = by_n(await receipts(index), g.claim_id)
    assert (r1.n, r1.start, r1.end, r1.reason, r1.units) == (1, T0, T0 + 400, "renewal", 64)
    assert r1.cpid == g.cpid and r1.split() == list(g.parts)
    r1_kv = await index.get(Keys.usage(g.claim_id, 1))
    meter2 = await index.get(Keys.meter(g.claim_id))
    parts_kvs, _ = await index.get_prefix(Prefix.CLAIM)
    assert r1_kv is not None and meter2 is not None and len(parts_kvs) == 8
    assert {kv.mod_revision for kv in parts_kvs} == {r1_kv.mod_revision, meter2.mod_revision}
    m2 = json.loads(meter2.value)
    assert (m2["start"], m2["n"], m2["expires_at"]) == (T0 + 400, 2, T0 + 4000)

    world.clock.now += 1000
    await svc.release(g.claim_id, holder="trainer")
    got = by_n(await receipts(index), g.claim_id)
    assert [(r.n, r.start, r.end, r.reason) for r in got] == [
        (1, T0, T0 + 400, "renewal"),
        (2, T0 + 400, T0 + 1400, "release"),
    ]
    for r in got:  # every part in both periods, with its units
        assert r.split() == list(g.parts) and all(u == 8 for _, u in r.split())
    assert await index.get(Keys.meter(g.claim_id)) is None
    assert (await index.get_prefix(Prefix.CLAIM))[0] == []
    for n in a + b:
        assert await units_at(index, Keys.alloc(n.cpid)) == 0
    usage = [e for e in await read_entries(index) if e.op == "usage"]
    assert [e.receipt for e in usage] == [Keys.receipt(g.claim_id, 1), Keys.receipt(g.claim_id, 2)]
    assert {e.cpid for e in usage} == {g.cpid}

    await world.sign_log()
    rep = await world.audit()
    assert rep.ok, (rep.checks, rep.problems)
    assert rep.totals("holder") == {
        "trainer": {"receipts": 2, "unit_seconds": 64 * 1400, "hours": round(64 * 1400 / 3600, 6)}
    }
    rows = rep.to_dict()["receipts"]  # cpi usage -o json: one row per part and period
    assert len(rows) == 16 and sum(row["unit_seconds"] for row in rows) == 64 * 1400
    assert all(row["gang"] == {"anchor": g.cpid, "units": 64, "parts": 8} for row in rows)
    assert {(row["cpid"], row["units"]) for row in rows} == set(g.parts)
    by_ns = rep.totals("namespace")
    assert by_ns["CN.31.CMCC"]["unit_seconds"] == 5 * 8 * 1400
    assert by_ns["CN.32"]["unit_seconds"] == 3 * 8 * 1400
    assert by_ns["CN.32"]["receipts"] == 2  # a gang's receipt counts once per namespace
    in_cn32 = await world.audit(namespace="CN.32")
    assert in_cn32.unit_seconds == 3 * 8 * 1400 and {r.cpid for r in in_cn32.receipts} == {
        n.cpid for n in b
    }
    window = await world.audit(since=T0 + 300, until=T0 + 500)  # across the renewal
    assert window.unit_seconds == 64 * 200
    await svc.close()


async def test_a_gang_past_expires_at_is_removed_with_its_receipt(
    world: World, index: Index, pki: Pki, resolver: Resolver
) -> None:
    ns = await gang_nodes(index, pki, resolver, 3, free=4)
    svc = world.claims
    g = await svc.claim_gang(Query(kind="GPU"), spec=GangSpec(12, 4, 4), ttl_s=600, holder="ann")
    world.clock.now += 5000  # long past expires_at; the keys remain (the lease has 600 s)
    report = await svc.reconcile()
    assert report is not None
    (r,) = by_n(await receipts(index), g.claim_id)
    assert (r.start, r.end, r.reason, r.units, r.holder) == (T0, T0 + 600, "expiry", 12, "ann")
    assert r.split() == list(g.parts)
    assert await index.get(Keys.meter(g.claim_id)) is None
    assert (await index.get_prefix(Prefix.CLAIM))[0] == []
    for n in ns:
        assert await units_at(index, Keys.alloc(n.cpid)) == 0
    await world.sign_log()
    rep = await world.audit()
    assert rep.ok and rep.unit_seconds == 12 * 600
    await svc.close()


async def test_a_gang_whose_lease_ran_out_gets_its_receipt_from_the_reconciler(
    world: World, index: Index, pki: Pki, resolver: Resolver
) -> None:
    ns = await gang_nodes(index, pki, resolver, 2, free=8)
    svc = world.claims
    g = await svc.claim_gang(Query(kind="GPU"), spec=GangSpec(16, 8, 8), ttl_s=60, holder="ben")
    world.clock.now += 30
    renewed = await svc.renew(g.claim_id, holder="ben", ttl_s=90)  # period 2 ends at T0 + 120
    assert renewed.lease
    await index.revoke_lease(renewed.lease)  # etcd deletes every part (no code of ours runs)
    assert (await index.get_prefix(Prefix.CLAIM))[0] == []
    world.clock.now += 7200
    await svc.reconcile()
    got = by_n(await receipts(index), g.claim_id)
    assert [(r.n, r.start, r.end, r.reason, r.units) for r in got] == [
        (1, T0, T0 + 30, "renewal", 16),
        (2, T0 + 30, T0 + 120, "expiry", 16),
    ]
    assert all(r.split() == list(g.parts) for r in got)
    await svc.reconcile()  # a second pass writes nothing more
    assert len(await receipts(index)) == 2
    for n in ns:  # the reconciler also fixed the totals
        assert await units_at(index, Keys.alloc(n.cpid)) == 0
    await world.sign_log()
    rep = await world.audit()
    assert rep.ok and rep.totals("holder")["ben"]["unit_seconds"] == 16 * 120
    await svc.close()


async def test_a_single_claim_renewed_then_released_has_two_receipts(
    world: World, index: Index, pki: Pki, resolver: Resolver
) -> None:
    node = await live_node(index, pki, resolver, free=8)
    svc = world.claims
    c = await svc.claim(node.cpid, units=3, ttl_s=600, holder="cid")
    world.clock.now += 300
    renewed = await svc.renew(c.claim_id, holder="cid", ttl_s=600)
    assert renewed.expires_at == T0 + 900
    assert [r.reason for r in await receipts(index)] == ["renewal"]
    kv = await index.get(c.key)
    r1_kv = await index.get(Keys.usage(c.claim_id, 1))
    assert kv is not None and r1_kv is not None and kv.mod_revision == r1_kv.mod_revision
    world.clock.now += 200
    await svc.release(c.claim_id, holder="cid")
    got = sorted((r.n, r.start, r.end, r.reason, r.units, r.parts) for r in await receipts(index))
    assert got == [
        (1, T0, T0 + 300, "renewal", 3, None),
        (2, T0 + 300, T0 + 500, "release", 3, None),
    ]
    await world.sign_log()
    rep = await world.audit()
    assert rep.ok and rep.unit_seconds == 3 * 500
    await svc.close()


async def test_the_largest_gang_claims_renews_and_releases_within_one_transaction(
    world: World, index: Index, pki: Pki, resolver: Resolver
) -> None:
    """61 parts: the release's 2n + 5 compares (claim, alloc, holder, meter, receipt,
    audit head) is 127, inside etcd's 128."""
    assert MAX_GANG_PARTS == 61
    with pytest.raises(InvalidClaimError, match="need 62 parts"):
        GangSpec(62, 1, 1)
    await gang_nodes(index, pki, resolver, MAX_GANG_PARTS, free=1)
    svc = world.claims
    g = await svc.claim_gang(
        Query(kind="GPU", limit=100), spec=GangSpec(61, 1, 1), ttl_s=600, holder="big"
    )
    assert len(g.parts) == 61
    world.clock.now += 10
    await svc.renew(g.claim_id, holder="big", ttl_s=600)
    world.clock.now += 10
    await svc.release(g.claim_id, holder="big")
    got = by_n(await receipts(index), g.claim_id)
    assert [(r.reason, r.end - r.start, len(r.split())) for r in got] == [
        ("renewal", 10, 61),
        ("release", 10, 61),
    ]
    await world.sign_log()
    rep = await world.audit()
    assert rep.ok and rep.unit_seconds == 61 * 20
    await svc.close()


@pytest.mark.parametrize(
    "parts",
    [
        "x",
        [{"cpid": "A", "units": 1}],  # one part is not a gang
        [{"cpid": "A", "units": 1}, {"cpid": "A", "units": 1}],  # a CPID twice
        [{"cpid": "A", "units": 1}, {"cpid": "B", "units": 0}],
        [{"cpid": "A", "units": 1}, {"cpid": "B", "units": True}],
        [{"cpid": "A", "units": 1}, ["B", 1]],
        [{"cpid": "B", "units": 1}, {"cpid": "A", "units": 1}],  # the anchor is not first
        [{"cpid": "A", "units": 1}, {"cpid": "B", "units": 2}],  # does not add up to 2
        [{"cpid": f"C{i}", "units": 1} for i in range(64)],
    ],
)
def test_a_meter_with_bad_parts_is_refused(parts: object) -> None:
    good = {
        "claim_id": "x",
        "cpid": "A",
        "holder": "h",
        "units": 2,
        "start": 1,
        "expires_at": 2,
        "n": 1,
    }
    assert Meter.from_json(
        json.dumps(
            {**good, "parts": [{"cpid": "A", "units": 1}, {"cpid": "B", "units": 1}]}
        ).encode()
    ).parts == (("A", 1), ("B", 1))
    with pytest.raises(ValueError):
        Meter.from_json(json.dumps({**good, "parts": parts}).encode())


async def test_a_gang_receipt_with_a_part_outside_its_signers_subject_is_refused(
    world: World, index: Index, pki: Pki, resolver: Resolver
) -> None:
    """A signer for CN.32 may not bill a gang anchored in CN.32 with a part in CN.31."""
    narrow = _keys.generate()
    env = sign_usage_signer(
        pki.root, narrow, subject="CN.32", not_before=T0 - 86400, not_after=T0 + 10**7
    )
    await index.put(Keys.usage_signer(_keys.kid_of(narrow)), env.to_json())
    inside = (await gang_nodes(index, pki, resolver, 1, namespace="CN.32"))[0].cpid
    outside = (await gang_nodes(index, pki, resolver, 1))[0].cpid

    async def bill(key: Any, parts: list[tuple[str, int]], suffix: str) -> None:
        claim_id = parts[0][0].replace("/", "~") + "~" + suffix * 16
        doc = Usage(
            claim_id=claim_id,
            n=1,
            holder="h",
            cpid=parts[0][0],
            units=sum(u for _, u in parts),
            start=T0,
            end=T0 + 100,
            reason="release",
            parts=[UsagePart(cpid=c, units=u) for c, u in parts],
        )
        signed = dsse.sign(Usage.media_type(), doc.to_json(), key)
        await world.recorder.stream.commit_entries(
            success=[Op.put(Keys.usage(claim_id, 1), signed.to_json())],
            entries=[Entry("usage", signed, cpid=parts[0][0], receipt=Keys.receipt(claim_id, 1))],
        )

    await bill(narrow, [(inside, 8), (outside, 8)], "a")  # refused: a part outside CN.32
    await bill(world.usage_key, [(inside, 8), (outside, 8)], "b")  # the CN signer: counted
    await world.sign_log()
    rep = await world.audit()
    assert not rep.ok and len(rep.problems) == 1
    assert f"not for {outside}" in rep.problems[0]
    assert rep.totals("namespace") == {
        "CN.31.CMCC": {"receipts": 1, "unit_seconds": 800, "hours": round(800 / 3600, 6)},
        "CN.32": {"receipts": 1, "unit_seconds": 800, "hours": round(800 / 3600, 6)},
    }
    await world.claims.close()


def test_a_gang_receipt_must_be_consistent() -> None:
    a, b = Node(namespace="CN.32").cpid, Node().cpid
    base: dict[str, Any] = {
        "claim_id": a.replace("/", "~") + "~" + "q" * 16,
        "n": 1,
        "holder": "h",
        "cpid": a,
        "units": 3,
        "start": 1,
        "end": 2,
        "reason": "release",
    }
    for parts, why in [
        ([(b, 1), (a, 2)], "anchor"),
        ([(a, 1), (a, 2)], "two parts"),
        ([(a, 1), (b, 1)], "add up"),
        ([(a, 3)], "at least 2"),
    ]:
        with pytest.raises(ValueError, match=why):
            Usage(**base, parts=[UsagePart(cpid=c, units=u) for c, u in parts])
