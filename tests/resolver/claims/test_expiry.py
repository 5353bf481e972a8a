"""A claim never counts after its ``expires_at``, even while its key remains (a lease
re-armed by an etcd restart held one 9 minutes past its expiry): not in capacity, not in
quotas, not in listings; the service removes such keys with their units."""

from __future__ import annotations

import json
import time

import pytest

from registry.index import Index, Keys
from resolver.claims.service import (
    Claim,
    ClaimService,
    InsufficientCapacityError,
    new_claim_id,
)
from resolver.core import Resolver
from tests.resolver.claims.test_claims import FAST_CLAIMS, claim_keys, live_node, units_at
from tests.resolver.kit import Node, Pki, signed
from tests.resolver.test_state import World, inline


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


async def stale_claim(index: Index, cpid: str, holder: str, units: int, *, ago: int = 540) -> Claim:
    """A claim whose ``expires_at`` passed ``ago`` seconds ago, on a long lease (as a
    lease re-armed to its full TTL by an etcd restart leaves it), counted in the totals."""
    now = int(time.time())
    lease = await index.grant_lease(3600, revoke_on_exit=False)
    claim = Claim(
        new_claim_id(cpid), cpid, holder, units, created_at=now - 600, expires_at=now - ago
    )
    await index.put(claim.key, claim.to_json(), lease=lease.id)
    for key in (Keys.alloc(cpid), Keys.holder(holder)):
        await index.put(key, json.dumps({"units": await units_at(index, key) + units}))
    return claim


async def test_a_claim_past_expires_at_with_its_key_still_there_is_not_counted(
    index: Index, pki: Pki, resolver: Resolver
) -> None:
    node = await live_node(index, pki, resolver, free=10)
    old = await stale_claim(index, node.cpid, "ghost", 10)
    claims = ClaimService(index=index, resolver=resolver, settings=FAST_CLAIMS)
    assert await claims.list_claims("ghost") == []  # not listed
    # all 10 units are free again: the stale key is removed with its units, in one txn
    fresh = await claims.claim(node.cpid, units=10, ttl_s=60, holder="alice")
    assert fresh.units == 10
    assert [c.claim_id for c in await claim_keys(index, node.cpid)] == [fresh.claim_id]
    assert await units_at(index, Keys.alloc(node.cpid)) == 10
    assert await units_at(index, Keys.holder("ghost")) == 0
    assert await units_at(index, Keys.holder("alice")) == 10
    assert await index.get(old.key) is None
    await claims.close()


async def test_expiry_by_the_clock_frees_capacity_and_quota(
    index: Index, pki: Pki, resolver: Resolver
) -> None:
    a = await live_node(index, pki, resolver, free=10)
    b = await live_node(index, pki, resolver, free=10)
    clock = Clock()
    claims = ClaimService(index=index, resolver=resolver, settings=FAST_CLAIMS, clock=clock)
    first = await claims.claim(a.cpid, units=10, ttl_s=60, holder="h", max_units=10)
    with pytest.raises(InsufficientCapacityError):
        await claims.claim(a.cpid, units=1, ttl_s=60, holder="other")
    assert [c.claim_id for c in await claims.list_claims("h")] == [first.claim_id]

    clock.now += 61  # past expires_at; the key is still there (its lease has 60 s)
    assert await claims.list_claims("h") == []
    # quota: h may hold 10; its expired claim on a no longer counts
    on_b = await claims.claim(b.cpid, units=10, ttl_s=600, holder="h", max_units=10)
    assert on_b.units == 10
    assert await index.get(first.key) is None
    assert await units_at(index, Keys.alloc(a.cpid)) == 0
    assert await units_at(index, Keys.holder("h")) == 10
    # capacity on a is back
    again = await claims.claim(a.cpid, units=10, ttl_s=60, holder="other")
    assert again.units == 10
    await claims.close()


async def test_the_reconciler_removes_claims_past_expires_at(
    index: Index, pki: Pki, resolver: Resolver
) -> None:
    node = await live_node(index, pki, resolver, free=10)
    live = await ClaimService(index=index, resolver=resolver).claim(
        node.cpid, units=2, ttl_s=600, holder="keep"
    )
    old = await stale_claim(index, node.cpid, "ghost", 3)
    claims = ClaimService(index=index, resolver=resolver, settings=FAST_CLAIMS)
    await claims.reconcile()
    assert [c.claim_id for c in await claim_keys(index)] == [live.claim_id]
    assert await index.get(old.key) is None
    assert await units_at(index, Keys.alloc(node.cpid)) == 2
    assert await units_at(index, Keys.holder("ghost")) == 0
    assert await units_at(index, Keys.holder("keep")) == 2
    await claims.close()


async def test_the_replica_stops_counting_a_claim_at_its_expires_at(pki: Pki) -> None:
    w = World(pki)
    for ns, cert in pki.certs.items():
        await w.put(Keys.cert(pki.kid(ns)), cert.to_json())
    node = Node()
    await w.put(Keys.rec(node.cpid), signed(pki, node.record()).to_json())
    await w.put(Keys.live(node.cpid), node.status(free=8).to_json())
    t0 = w.t0
    short = Claim(new_claim_id(node.cpid), node.cpid, "a", 3, created_at=t0, expires_at=t0 + 60)
    long = Claim(new_claim_id(node.cpid), node.cpid, "b", 2, created_at=t0, expires_at=t0 + 600)
    for c in (short, long):
        await w.put(c.key, c.to_json())
    await w.put(Keys.alloc(node.cpid), b'{"units":5}')
    entry = w.state.get(node.cpid)
    assert entry is not None and (entry.claimed, entry.free) == (5, 3)

    w.clock.now = t0 + 61  # the short claim's key remains (its lease was re-armed)
    events = await w.state.sweep(check=inline)
    assert [(e.type, e.cpid) for e in events] == [("put", node.cpid)]
    entry = w.state.get(node.cpid)
    assert entry is not None and (entry.claimed, entry.free) == (2, 6)
