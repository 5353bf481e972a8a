"""registry.claimed: the /alloc/ values behind the X-CPI-Claimed header, kept by a watch."""

from __future__ import annotations

from registry.claimed import ClaimedUnits
from registry.index import Index, Keys
from tests.until import until

A = "CN.31.CMCC/GPU.4K7Q9M2XH3PT-Z"
B = "CN.31/CPU.4K7Q9M2XH3PT-Z"
SIBLING = "CN.3/GPU.4K7Q9M2XH3PT-Z"


async def test_lists_then_follows_the_held_namespaces_only(index: Index) -> None:
    await index.put(Keys.alloc(A), '{"units":3}')
    await index.put(Keys.alloc(SIBLING), '{"units":9}')
    claimed = ClaimedUnits(index, ["CN.31.CMCC", "CN.31"])  # CN.31 covers CN.31.CMCC
    await claimed.start()
    try:
        assert claimed.units(A) == 3 and claimed.units(B) == 0
        assert claimed.units(SIBLING) == 0  # CN.3 is not held (nor inside CN.31)
        await index.put(Keys.alloc(B), "2")
        await index.put(Keys.alloc(A), '{"units":0}')
        await until(lambda: claimed.units(B) == 2 and claimed.units(A) == 0, what="the watch")
        await index.put(Keys.alloc(A), "5")
        await until(lambda: claimed.units(A) == 5, what="the watch")
        await index.put(Keys.alloc(A), "garbage")  # unreadable counts as nothing claimed
        await index.delete(Keys.alloc(B))
        await until(lambda: claimed.units(B) == 0, what="the delete")
        assert claimed.units(A) == 0  # it was 5: the unreadable value replaced it
        await index.put(Keys.alloc(A), "7")  # and the watch survived it
        await until(lambda: claimed.units(A) == 7, what="the watch after garbage")
    finally:
        await claimed.stop()


def test_the_agent_and_the_resolver_use_the_registry_s_names() -> None:
    # the agent does not import registry.claimed (it would pull the etcd client in)
    from registry import agent, claimed
    from resolver.claims import service as claims

    assert agent.CLAIMED_HEADER == claimed.CLAIMED_HEADER
    assert agent.CLAIMED_METRIC == claims.CLAIMED_METRIC
