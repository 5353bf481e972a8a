"""The index is not trusted input (DESIGN.md section 8): a hostile value in etcd costs
that key alone.  It is counted, logged once, shown by ``/readyz`` and ``/metrics``, and
never blocks the keys written after it (no re-list loop)."""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from cpi.etcdproc import EtcdProcess
from registry import ca
from registry.index import Index, Keys
from resolver.core import Resolver
from resolver.http import RESOLVER, create_app
from schemas import keys
from tests.resolver.kit import Node, Pki, make_resolver, put_record, put_status, resolver_config
from tests.until import until

Client = TestClient  # type: ignore[type-arg]

DEEP = b"[" * 10_000


def _hostile_envelope() -> bytes:
    """A well-formed DSSE envelope whose payload is 10,000 nested arrays."""
    return json.dumps(
        {
            "payloadType": "application/vnd.cpi.record.v1+json",
            "payload": base64.b64encode(DEEP).decode(),
            "signatures": [
                {"keyid": "AAAAAAAAAAAAAAAA", "sig": base64.b64encode(b"x" * 64).decode()}
            ],
        }
    ).encode()


SHAPES: dict[str, bytes] = {
    "deep": DEEP,
    "empty_list": b"[]",
    "string": b'"x"',
    "huge_number": b"1e999",
    "units_bool": b'{"units": true}',
    "bad_utf8": b'{"kid": "\xff\xfe"}',
    "huge": b"[" * (1 << 20),
    "hostile_payload": _hostile_envelope(),
}

PREFIXES = ("rec", "live", "alloc", "certs", "revoked", "ns", "claim")
ENVELOPES = ("rec", "live", "certs", "revoked")


def bad_key(prefix: str, victim: Node, n: int = 0) -> str:
    """A key of ``prefix`` (well formed) for a hostile value."""
    kid = keys.kid_of(keys.generate())
    if prefix == "rec":
        return Keys.rec(victim.cpid)
    if prefix == "live":
        return Keys.live(victim.cpid)
    if prefix == "alloc":
        return Keys.alloc(victim.cpid)
    if prefix == "certs":
        return Keys.cert(kid)
    if prefix == "revoked":
        return Keys.revoked(kid)
    if prefix == "ns":
        return Keys.ns(f"CN.9{n}")
    if prefix == "claim":
        return Keys.claim(victim.cpid, f"c{n}x{kid}")
    raise AssertionError(prefix)


def counted(shape: str, prefix: str) -> bool:
    """Whether the replica files ``shape`` under ``prefix`` as a bad value (an envelope
    with a hostile payload parses: it is a record that does not verify, not a bad value)."""
    return not (shape == "hostile_payload" and prefix in ENVELOPES)


@pytest.fixture
async def client(
    index: Index, pki: Pki, anchor_file: Path, etcd_server: EtcdProcess, aiohttp_client: Any
) -> AsyncIterator[Client]:
    await pki.publish(index)
    config = resolver_config(etcd_server.endpoint, anchor_file)
    c: Client = await aiohttp_client(create_app(config))

    async def ready() -> bool:
        return (await c.get("/readyz")).status == 200

    await until(ready, what="the resolver to be ready")
    yield c


async def readyz(client: Client) -> dict[str, Any]:
    resp = await client.get("/readyz")
    assert resp.status == 200, await resp.text()
    body: dict[str, Any] = await resp.json()
    return body


async def metrics(client: Client) -> str:
    resp = await client.get("/metrics")
    assert resp.status == 200
    return await resp.text()


def revoke(pki: Pki, node: Node) -> tuple[str, bytes]:
    rev = ca.revoke(
        issuer_key=pki.key_of("CN.31.CMCC"),
        subject="CN.31.CMCC",
        kid=keys.kid_of(node.key),
        reason="stolen",
    )
    return Keys.revoked(keys.kid_of(node.key)), rev.to_json()


async def good_changes_apply(index: Index, pki: Pki, resolver: Resolver) -> None:
    """A registration, a deregistration and a revocation, each applied within seconds."""
    a, c = Node(), Node()
    await put_record(index, pki, a)
    await put_record(index, pki, c)
    await until(lambda: resolver.get(a.cpid) and resolver.get(c.cpid), what="a and c served")
    b = Node()
    await put_record(index, pki, b)
    await until(lambda: resolver.get(b.cpid) is not None, within=5, what="a new record served")
    await index.delete(Keys.rec(a.cpid))
    await until(lambda: resolver.get(a.cpid) is None, within=5, what="a deregistration applied")
    key, value = revoke(pki, c)
    await index.put(key, value)
    await until(lambda: resolver.get(c.cpid) is None, within=5, what="a revocation applied")


@pytest.mark.parametrize("prefix", PREFIXES)
async def test_one_deep_value_costs_its_key_alone(
    index: Index, pki: Pki, client: Client, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    resolver: Resolver = client.app[RESOLVER]
    replica = resolver._replica
    victim = Node()
    await put_record(index, pki, victim)
    await until(lambda: resolver.get(victim.cpid) is not None, what="the victim served")
    key = bad_key(prefix, victim)
    caplog.set_level(logging.WARNING)
    await index.put(key, DEEP)

    await good_changes_apply(index, pki, resolver)
    assert dict(replica.relists) == {"initial": 1}
    health = await readyz(client)
    assert health["ready"] is True
    assert health["bad_values"]["count"] == 1, health
    assert health["bad_values"]["by_prefix"] == {prefix: 1}
    assert key in health["bad_values"]["keys"]
    text = await metrics(client)
    assert f'cpi_resolver_bad_values{{prefix="{prefix}"}} 1.0' in text, text
    assert f'cpi_resolver_bad_values_found_total{{prefix="{prefix}"}} 1.0' in text
    assert len([r for r in caplog.records if key in r.getMessage()]) == 1, [
        r.getMessage() for r in caplog.records if key in r.getMessage()
    ]
    if prefix != "rec":
        assert resolver.get(victim.cpid) is not None  # only the bad key is lost

    # deleted: the entry goes away; the next good change still applies
    await index.delete(key)
    await until(lambda: resolver.health()["bad_values"]["count"] == 0, within=5, what="cleared")
    assert f'cpi_resolver_bad_values{{prefix="{prefix}"}} 1.0' not in await metrics(client)
    d = Node()
    await put_record(index, pki, d)
    await until(lambda: resolver.get(d.cpid) is not None, within=5, what="served after")
    assert dict(replica.relists) == {"initial": 1}


async def test_every_hostile_shape_under_every_prefix(
    index: Index, pki: Pki, client: Client
) -> None:
    resolver: Resolver = client.app[RESOLVER]
    victims = {(p, s): Node() for p in PREFIXES for s in SHAPES}
    for node in victims.values():
        await put_record(index, pki, node)
    await until(lambda: len(resolver._state.served) >= len(victims), what="victims served")
    expected: dict[str, int] = {}
    planted: list[str] = []
    for n, ((prefix, shape), node) in enumerate(victims.items()):
        key = bad_key(prefix, node, n)
        await index.put(key, SHAPES[shape])
        planted.append(key)
        if counted(shape, prefix):
            expected[prefix] = expected.get(prefix, 0) + 1
    await good_changes_apply(index, pki, resolver)
    assert dict(resolver._replica.relists) == {"initial": 1}
    health = await readyz(client)
    by_prefix = dict(health["bad_values"]["by_prefix"])
    # the claims reconciler may already have rewritten the unreadable /alloc/ totals
    # (the /claim/ writes wake it): repaired, they are no longer bad
    assert by_prefix.pop("alloc", 0) <= expected.pop("alloc")
    assert by_prefix == expected, health["bad_values"]
    # a record whose envelope carries a hostile payload is not served, and says why
    rec_key = bad_key("rec", victims[("rec", "hostile_payload")])
    assert resolver.get(rec_key.rpartition("/rec/")[2]) is None
    # overwritten with good values: the entries are cleared
    for (prefix, _), node in victims.items():
        if prefix == "rec":
            await put_record(index, pki, node)
    await until(
        lambda: "rec" not in resolver.health()["bad_values"]["by_prefix"],
        within=10,
        what="bad records replaced",
    )
    assert dict(resolver._replica.relists) == {"initial": 1}


async def test_bad_values_present_at_start_up(index: Index, pki: Pki) -> None:
    await pki.publish(index)
    good = [Node() for _ in range(3)]
    for node in good:
        await put_record(index, pki, node)
    planted: list[str] = []
    for n, prefix in enumerate(PREFIXES):
        victim = Node()
        await put_record(index, pki, victim)
        key = bad_key(prefix, victim, n)
        await index.put(key, DEEP)
        planted.append(key)
    await index.put(Keys.ns("CN.88"), b'{"kid": []}')
    planted.append(Keys.ns("CN.88"))
    async with make_resolver(index, pki) as r:
        await r.wait_ready()
        for node in good:
            assert r.get(node.cpid) is not None
        bad = r.health()["bad_values"]
        assert bad["count"] == len(planted), bad
        assert bad["keys"] and set(bad["keys"]) <= set(planted)
        await good_changes_apply(index, pki, r)
        assert dict(r._replica.relists) == {"initial": 1}
        assert r.health()["bad_values"]["count"] == len(planted)


async def test_a_large_first_listing_with_bad_records(
    index: Index, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bulk loads parse records in the verification jobs: a bad one costs itself there too."""
    from resolver import state as resolver_state

    monkeypatch.setattr(resolver_state, "_BULK", 4)
    await pki.publish(index)
    good = [Node() for _ in range(4)]
    for node in good:
        await put_record(index, pki, node)
    bad = [Node() for _ in range(3)]
    for node, value in zip(bad, (DEEP, b"[]", _hostile_envelope()), strict=True):
        await index.put(Keys.rec(node.cpid), value)
    async with make_resolver(index, pki) as r:
        await r.wait_ready()
        assert all(r.get(n.cpid) for n in good)
        assert r.health()["bad_values"]["by_prefix"] == {"rec": 2}
        await good_changes_apply(index, pki, r)
        assert dict(r._replica.relists) == {"initial": 1}


async def test_a_large_first_listing_with_bad_statuses(
    index: Index, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bulk loads parse statuses in the verification jobs too: a bad one costs its key
    alone, and the replica ends as a listing applied key by key does."""
    from resolver import state as resolver_state

    await pki.publish(index)
    good = [Node() for _ in range(4)]
    for i, node in enumerate(good):
        await put_record(index, pki, node)
        await put_status(index, node, free=i + 1)
    bad = [Node() for _ in range(4)]
    other = Node()
    values = (DEEP, b"[]", _hostile_envelope(), other.status(free=3).to_json())
    for node, value in zip(bad, values, strict=True):
        await put_record(index, pki, node)
        await index.put(Keys.live(node.cpid), value)
    unserved = Node()  # a status whose record is not in the index: kept, never verified
    await index.put(Keys.live(unserved.cpid), unserved.status(free=1).to_json())

    def view(r: Resolver) -> dict[str, Any]:
        return {
            "entries": {e.cpid: (e.live, e.free, e.status_facts) for e in r.entries()},
            "bad": r.health()["bad_values"],
            "failures": dict(r._state.failures),
            "sizes": r._state.sizes(),
        }

    async with make_resolver(index, pki) as r:  # small: key by key
        await r.wait_ready()
        by_key = view(r)
    monkeypatch.setattr(resolver_state, "_BULK", 4)
    async with make_resolver(index, pki) as r:
        await r.wait_ready()
        bulk = view(r)
        assert all(r.resolve(n.cpid).live for n in good)
        assert not any(r.resolve(n.cpid).live for n in bad)  # served, without a status
        assert r.health()["bad_values"]["by_prefix"] == {"live": 2}
        assert all(lv.raw is None for c, lv in r._state.lives.items() if c != unserved.cpid)
        assert r._state.lives[unserved.cpid].raw is not None  # the bulk path was taken
        await good_changes_apply(index, pki, r)
        assert dict(r._replica.relists) == {"initial": 1}
    assert bulk == by_key
