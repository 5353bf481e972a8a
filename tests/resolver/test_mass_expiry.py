"""Mass-expiry protection: a namespace whose live keys vanish at once keeps its last good set."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

from registry.index import Index, Keys
from resolver.core import Resolver
from resolver.discovery import Query
from resolver.state import ReplicaSettings
from tests.resolver.kit import FAST, Node, Pki, make_resolver, put_record, put_status
from tests.until import until


async def _live_nodes(
    index: Index, pki: Pki, r: Resolver, n: int, lease: int, ns: str = "CN.31.CMCC"
) -> list[Node]:
    nodes = [Node(namespace=ns) for _ in range(n)]
    for node in nodes:
        await put_record(index, pki, node)
        await put_status(index, node, free=4, lease=lease)
    await until(lambda: all(r.get(x.cpid) and r.get(x.cpid).live for x in nodes), what="live")  # type: ignore[union-attr]
    return nodes


async def test_a_namespace_losing_its_live_keys_at_once_is_held(
    index: Index, pki: Pki, resolver: Resolver
) -> None:
    lease = await index.grant_lease(60)
    nodes = await _live_nodes(index, pki, resolver, 6, lease.id)
    others = await _live_nodes(index, pki, resolver, 2, 0, ns="CN.32")
    events: list[Any] = []
    resolver.add_listener(events.append)

    await lease.revoke()  # the registry's lease: all six live keys go in one revision
    await until(lambda: resolver.mass_expiry, what="protection to engage")
    for node in nodes:
        entry = resolver.resolve(node.cpid)
        assert entry.live and entry.live_held and entry.free == 4
        assert entry.live_expires_at == resolver.mass_expiry[0].until
    health = resolver.health()
    assert [m["namespace"] for m in health["mass_expiry"]] == ["CN.31.CMCC"]
    assert health["mass_expiry"][0]["disappeared"] == 6 and health["held"] == 6
    assert len(resolver.discover(Query(within="CN.31", min_free=1)).results) == 6
    assert {e.reason for e in events} == {"mass_expiry"}
    text = resolver.metrics.render().decode()
    assert 'cpi_resolver_mass_expiry{namespace="CN.31.CMCC"} 1.0' in text
    assert "cpi_resolver_mass_expiry_held 6.0" in text

    # an unrelated namespace is untouched, and its expiries are applied normally
    await index.delete(Keys.live(others[0].cpid))
    await until(lambda: not resolver.resolve(others[0].cpid).live, what="a normal expiry")

    # the registry comes back and rewrites the live keys: protection ends
    for node in nodes:
        await put_status(index, node, free=3)
    await until(lambda: not resolver.mass_expiry, what="protection to end")
    assert all(not resolver.resolve(n.cpid).live_held for n in nodes)
    assert resolver.resolve(nodes[0].cpid).free == 3


async def test_a_small_share_expires_normally(index: Index, pki: Pki, resolver: Resolver) -> None:
    nodes = await _live_nodes(index, pki, resolver, 6, 0)
    for node in nodes[:3]:  # half: not more than the 50 % threshold
        await index.delete(Keys.live(node.cpid))
    await until(lambda: not resolver.resolve(nodes[2].cpid).live, what="expiry")
    assert resolver.mass_expiry == []
    assert [resolver.resolve(n.cpid).live for n in nodes] == [False] * 3 + [True] * 3


async def test_a_hold_ends_after_its_time(index: Index, pki: Pki) -> None:
    settings = dataclasses.replace(FAST, replica=ReplicaSettings(mass_expiry_hold_s=0.6))
    await pki.publish(index)
    async with make_resolver(index, pki, settings) as r:
        async with asyncio.timeout(10):
            await r.wait_ready()
        lease = await index.grant_lease(60)
        nodes = await _live_nodes(index, pki, r, 4, lease.id)
        await lease.revoke()
        await until(lambda: r.mass_expiry, what="protection")
        await until(lambda: not r.mass_expiry, within=5, what="the hold to end")
        assert [r.resolve(n.cpid).live for n in nodes] == [False] * 4
        assert r.health()["held"] == 0
