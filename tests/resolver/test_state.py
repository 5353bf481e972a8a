"""The replica state alone (no etcd, no I/O), on an injected clock: what is served, when."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Sequence

import pytest

from registry.index import Keys
from resolver.entry import NODE_KID, with_keyid
from resolver.state import Change, ReplicaState
from resolver.verify import Context, Job, Outcome, run_jobs
from schemas.chain import CLOCK_SKEW
from tests.resolver.kit import Node, Pki, signed


async def inline(ctx: Context, jobs: Sequence[Job]) -> AsyncIterator[list[Outcome]]:
    yield run_jobs(ctx, jobs)


class Clock:
    """Starts at the real time (the kit's certs and default records are valid around it)."""

    def __init__(self) -> None:
        self.now = float(int(time.time()))

    def __call__(self) -> float:
        return self.now


class World:
    def __init__(self, pki: Pki) -> None:
        self.pki = pki
        self.clock = Clock()
        self.t0 = int(self.clock.now)
        self.state = ReplicaState(anchors=pki.anchors, clock=self.clock)
        self.rev = 1

    async def put(self, key: str, value: bytes) -> None:
        self.rev += 1
        await self.state.apply([Change("put", key, value, self.rev)], self.rev, check=inline)

    async def delete(self, key: str) -> None:
        self.rev += 1
        await self.state.apply([Change("delete", key, b"", self.rev)], self.rev, check=inline)


@pytest.fixture
async def world(pki: Pki) -> World:
    w = World(pki)
    for ns, cert in pki.certs.items():
        await w.put(Keys.cert(pki.kid(ns)), cert.to_json())
    return w


@pytest.mark.parametrize(
    ("issued", "expires", "served", "reason"),
    [
        (-10, 3600, True, None),
        (-7200, -3600, False, "expired"),
        (-7200, -CLOCK_SKEW + 5, True, None),  # ended, but within the allowed clock skew
        (3600, 7200, False, "not_yet_valid"),
        (CLOCK_SKEW - 5, 7200, True, None),  # starts within the skew
    ],
    ids=["valid", "ended", "ended-within-skew", "not-yet-valid", "starts-within-skew"],
)
async def test_a_record_is_served_only_inside_its_window(
    world: World, issued: int, expires: int, served: bool, reason: str | None
) -> None:
    node = Node()
    t0 = world.t0
    rec = node.record(issued_at=t0 + issued, expires_at=t0 + expires)
    await world.put(Keys.rec(node.cpid), signed(world.pki, rec).to_json())
    assert (world.state.get(node.cpid) is not None) is served
    if reason is not None:
        assert world.state.failures[reason] == 1
        rejected = world.state.rejection(node.cpid)
        assert rejected is not None and rejected[0] == reason


async def test_the_clock_sweep_drops_a_record_when_its_window_closes(world: World) -> None:
    node = Node()
    t0 = world.t0
    rec = node.record(issued_at=t0 - 10, expires_at=t0 + 100)
    await world.put(Keys.rec(node.cpid), signed(world.pki, rec).to_json())
    assert world.state.get(node.cpid) is not None
    assert await world.state.sweep(check=inline) == []  # nothing is due yet
    world.clock.now = t0 + 100 + CLOCK_SKEW + 1
    events = await world.state.sweep(check=inline)
    assert [(e.type, e.cpid) for e in events] == [("delete", node.cpid)]
    assert world.state.get(node.cpid) is None


async def test_a_status_is_served_only_under_its_records_key(world: World) -> None:
    node, other = Node(), Node()
    await world.put(Keys.rec(node.cpid), signed(world.pki, node.record()).to_json())
    await world.put(Keys.live(node.cpid), other.status(cpid=node.cpid).to_json())
    entry = world.state.get(node.cpid)
    assert entry is not None and entry.status_facts is None
    await world.put(Keys.live(node.cpid), node.status(free=3).to_json())
    entry = world.state.get(node.cpid)
    assert entry is not None and entry.status_facts is not None and entry.free == 3


async def test_deleting_the_record_stops_serving(world: World) -> None:
    node = Node()
    await world.put(Keys.rec(node.cpid), signed(world.pki, node.record()).to_json())
    rev = world.state.revision
    await world.delete(Keys.rec(node.cpid))
    assert world.state.get(node.cpid) is None
    assert world.state.revision == rev + 1


async def test_any_exception_a_value_causes_costs_its_key_alone(
    world: World, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Per-key containment: whatever a handler raises (here a RecursionError, as deep
    nesting did through the stdlib parser) files the key as bad; the batch goes on."""
    from schemas.chain import verify_record_prepared
    from schemas.dsse import Envelope

    real = Envelope.from_json

    def from_json(data: bytes | str, **kw: object) -> object:
        if data == b"boom":
            raise RecursionError("maximum recursion depth exceeded")
        return real(data, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(Envelope, "from_json", staticmethod(from_json))
    a, b = Node(), Node()
    world.rev += 1
    changes = [
        Change("put", Keys.live(a.cpid), b"boom", world.rev),
        Change("put", Keys.rec(b.cpid), signed(pki, b.record()).to_json(), world.rev),
    ]
    await world.state.apply(changes, world.rev, check=inline)
    assert world.state.get(b.cpid) is not None
    assert world.state.bad_values()["keys"] == [Keys.live(a.cpid)]
    assert world.state.bad_found == {"live": 1}
    tracked = world.state.keys()  # with its revision: a re-list does not deliver it again
    assert tracked[Keys.live(a.cpid)] == world.rev

    # a job whose verification raises fails alone; the next job is still verified
    calls = 0
    real_verify = verify_record_prepared

    def verify(env: object, chain: object, **kw: object) -> object:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise TypeError("hostile")
        return real_verify(env, chain, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr("resolver.verify.verify_record_prepared", verify)
    c, d = Node(), Node()
    world.rev += 1
    changes = [
        Change("put", Keys.rec(n.cpid), signed(pki, n.record()).to_json(), world.rev)
        for n in (c, d)
    ]
    await world.state.apply(changes, world.rev, check=inline)
    served = [world.state.get(n.cpid) is not None for n in (c, d)]
    assert sorted(served) == [False, True]
    unserved = c if not served[0] else d
    got = world.state.rejection(unserved.cpid)
    assert got is not None and "TypeError: hostile" in got[1]

    # deleted: cleared
    await world.delete(Keys.live(a.cpid))
    assert world.state.bad_values()["count"] == 0


class _CountingRecs(dict[str, object]):
    """The replica's records, counting the passes made over them."""

    passes = 0

    def __iter__(self):  # type: ignore[no-untyped-def]
        self.passes += 1
        return super().__iter__()


async def test_a_revocation_passes_over_the_records_only_when_one_may_be_concerned(
    world: World,
) -> None:
    """Revocations of node keys find their records by a pass over the records, made only
    when a record may have the revoked key's serial (a bit filter of the serials held):
    a flood of revocations naming keys without records costs no pass."""
    from registry import ca
    from schemas import keys

    nodes = [Node() for _ in range(3)]
    for node in nodes:
        await world.put(Keys.rec(node.cpid), signed(world.pki, node.record()).to_json())
    counting = _CountingRecs(world.state.recs)
    world.state.recs = counting  # type: ignore[assignment]
    issuer = world.pki.key_of("CN.31.CMCC")
    for _ in range(50):  # keys no record has
        kid = keys.kid_of(keys.generate())
        revocation = ca.revoke(issuer_key=issuer, subject="CN.31.CMCC", kid=kid, reason="x")
        await world.put(Keys.revoked(kid), revocation.to_json())
    assert counting.passes <= 5  # the filter answers "maybe" for ~3 % of unknown serials
    target = nodes[1]
    kid = keys.kid_of(target.key)
    revocation = ca.revoke(issuer_key=issuer, subject="CN.31.CMCC", kid=kid, reason="x")
    before = counting.passes
    await world.put(Keys.revoked(kid), revocation.to_json())
    assert counting.passes > before
    assert world.state.get(target.cpid) is None
    rejected = world.state.rejection(target.cpid)
    assert rejected is not None and rejected[0] == "revoked"
    assert all(world.state.get(n.cpid) is not None for n in (nodes[0], nodes[2]))


async def test_a_status_is_checked_again_when_its_record_changes_and_only_then(
    pki: Pki,
) -> None:
    """The replica notes which record a status was checked against (the record's facts,
    by identity: it keeps no copy of the node key beside the payload)."""
    checks: list[str] = []
    record_jobs: list[Job] = []

    async def counting(ctx: Context, jobs: Sequence[Job]) -> AsyncIterator[list[Outcome]]:
        record_jobs.extend(job for job in jobs if job[0] in ("record", "raw"))
        for job in jobs:
            if job[0] == "status" or (job[0] in ("record", "raw") and job[-1] is not None):
                checks.append(job[0])
        yield run_jobs(ctx, jobs)

    state = ReplicaState(anchors=pki.anchors)
    node = Node()
    cert_key = Keys.cert(pki.kid("CN.31.CMCC"))
    rev = 1

    async def put(key: str, value: bytes) -> None:
        nonlocal rev
        rev += 1
        await state.apply([Change("put", key, value, rev)], rev, check=counting)

    for ns, cert in pki.certs.items():
        await put(Keys.cert(pki.kid(ns)), cert.to_json())
    await put(Keys.rec(node.cpid), signed(pki, node.record()).to_json())
    await put(Keys.live(node.cpid), node.status(free=3).to_json())
    assert checks == ["status"]
    entry = state.get(node.cpid)
    assert entry is not None and entry.free == 3
    # the chain judged again (its cert renewed for the same key): the record is verified
    # again, the status it was checked against stands
    jobs_before = len(record_jobs)
    renewed = pki.delegate("CN.31", "CN.31.CMCC", ["issue"], key=pki.keys["CN.31.CMCC"], days=400)
    await put(cert_key, renewed.to_json())
    assert len(record_jobs) == jobs_before + 1
    assert checks == ["status"]
    entry = state.get(node.cpid)
    assert entry is not None and entry.free == 3
    # a new version of the record: its status is checked against it
    await put(Keys.rec(node.cpid), signed(pki, node.record(version=2)).to_json())
    assert checks == ["status", "status"]
    entry = state.get(node.cpid)
    assert entry is not None and entry.version == 2 and entry.free == 3
    # a status by another key is not served under it
    await put(Keys.live(node.cpid), Node().status(cpid=node.cpid).to_json())
    entry = state.get(node.cpid)
    assert entry is not None and entry.status_facts is None and entry.free == 0


async def test_a_verified_status_is_shown_with_the_key_id_it_was_stored_with(world: World) -> None:
    """The replica holds a verified status's key id as a marker (the node key's id is
    in the record) and shows the envelope exactly as stored."""
    node = Node()
    await world.put(Keys.rec(node.cpid), signed(world.pki, node.record()).to_json())
    stored = node.status(free=2)
    await world.put(Keys.live(node.cpid), stored.to_json())
    assert world.state.lives[node.cpid].sealed.keyid is NODE_KID  # type: ignore[union-attr]
    entry = world.state.get(node.cpid)
    assert entry is not None and entry.free == 2
    assert entry.status_envelope == stored
    assert json.loads(entry.body())["status"] == stored.to_dict()
    # no key id at all: verified with the record's key, shown without one
    bare = with_keyid(node.status(free=1), "")
    await world.put(Keys.live(node.cpid), bare.to_json())
    entry = world.state.get(node.cpid)
    assert entry is not None and entry.free == 1 and entry.status_envelope == bare
    # a key id that is the marker's text, from the index: a hint naming no key, refused
    odd = with_keyid(node.status(free=5), "\x00node")
    await world.put(Keys.live(node.cpid), json.dumps(odd.to_dict()).encode())
    entry = world.state.get(node.cpid)
    assert entry is not None and entry.status_facts is None


async def test_reset_leaves_a_replica_as_new_and_keeps_its_listeners(world: World) -> None:
    """What a warm start that could not be completed does before listing the index."""
    heard: list[str] = []
    world.state.listeners.append(lambda e: heard.append(e.cpid))
    node, forged = Node(), Node()
    await world.put(Keys.rec(node.cpid), signed(world.pki, node.record()).to_json())
    await world.put(Keys.live(node.cpid), node.status(free=2).to_json())
    await world.put(Keys.rec(forged.cpid), signed(world.pki, forged.record(), "CN.31").to_json())
    await world.put(Keys.alloc(node.cpid), b"not json")
    assert world.state.served and world.state.failures and world.state.bad and heard
    table = world.state.discovery.table

    world.state.reset()
    fresh = ReplicaState(anchors=world.pki.anchors, clock=world.clock)
    assert world.state.sizes() == fresh.sizes()
    assert world.state.keys() == fresh.keys() == {}
    assert not world.state.served and not world.state.recs and not world.state.lives
    assert not world.state.failures and not world.state.bad and world.state.revision == 0
    assert world.state.discovery.groups == 0 and world.state.discovery.table is table
    heard.clear()
    world.rev = 1
    for ns, cert in world.pki.certs.items():  # it takes changes again, as a new one does
        await world.put(Keys.cert(world.pki.kid(ns)), cert.to_json())
    await world.put(Keys.rec(node.cpid), signed(world.pki, node.record()).to_json())
    assert world.state.get(node.cpid) is not None and heard == [node.cpid]
