"""``/alloc/<cpid>`` after its record is gone: the claims reconciler removes it, and the
audit sweep tells such a leftover (0 units) from a forged total (units, no claims)."""

from __future__ import annotations

import json

from registry.index import Index, Keys
from resolver.audit.sweep import Sweeper
from resolver.claims.service import ClaimService
from resolver.core import Resolver
from tests.resolver.claims.test_claims import FAST_CLAIMS, live_node, units_at
from tests.resolver.kit import Node, Pki
from tests.until import until


async def test_claim_release_deregister_leaves_no_alloc_and_the_sweep_passes(
    index: Index, pki: Pki, resolver: Resolver
) -> None:
    node = await live_node(index, pki, resolver, free=10)
    claims = ClaimService(index=index, resolver=resolver, settings=FAST_CLAIMS)
    c = await claims.claim(node.cpid, units=2, ttl_s=60, holder="alice")
    await claims.release(c.claim_id, holder="alice")
    assert await units_at(index, Keys.alloc(node.cpid)) == 0
    # deregistration: the record and live keys go (as the registrar deletes them)
    await index.delete(Keys.live(node.cpid))
    await index.delete(Keys.rec(node.cpid))
    await until(lambda: resolver.get(node.cpid) is None, what="the replica to drop the record")

    # before the reconciler ran: the sweep reports a leftover, not a failure
    report = await Sweeper(index, pki.anchors).run()
    assert report.counts["alloc"]["leftover"] == 1
    assert report.ok, [f.to_dict() for f in report.failures]
    assert [f.key for f in report.warnings] == [Keys.alloc(node.cpid)]

    await claims.start()
    try:

        async def gone() -> bool:
            return await index.get(Keys.alloc(node.cpid)) is None

        await until(gone, within=10, what="the reconciler to remove the leftover /alloc/")
    finally:
        await claims.close()
    report = await Sweeper(index, pki.anchors).run()
    assert report.ok and "alloc" not in report.counts and not report.warnings


async def test_an_alloc_of_a_live_record_stays_and_one_claiming_units_for_nobody_is_a_finding(
    index: Index, pki: Pki, resolver: Resolver
) -> None:
    node = await live_node(index, pki, resolver, free=10)
    await index.put(Keys.alloc(node.cpid), b'{"units":0}')  # record present: kept
    ghost = Node()
    await index.put(Keys.alloc(ghost.cpid), json.dumps({"units": 3}))  # no record, no claims
    report = await Sweeper(index, pki.anchors).run()
    assert [(f.key, f.outcome) for f in report.failures] == [(Keys.alloc(ghost.cpid), "orphan")]
    assert report.counts["alloc"]["valid"] == 1
    async with ClaimService(index=index, resolver=resolver, settings=FAST_CLAIMS) as claims:
        await claims.reconcile()
    assert await index.get(Keys.alloc(node.cpid)) is not None
    assert await index.get(Keys.alloc(ghost.cpid)) is None  # no record, no claim: removed
