"""The warm start's fast path (ReplicaState.restore, the snapshot's ``fast`` chunks):
what it restores equals what a cold start builds, and what it must not trust -- a
closed validity window, a chain that no longer verifies, a pending revocation of a node
key -- is verified again as on a cold start."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from registry import ca
from registry.index import Keys, Prefix
from resolver.entry import NODE_KID
from resolver.snapshot import LoadedSnapshot, SnapshotStore, TrustedRunner
from resolver.state import Change, ReplicaState, Restored
from resolver.verify import Context, Job, Outcome, run_jobs
from schemas import keys
from schemas.models import Record, Status
from tests.resolver.kit import Node, Pki, signed


class Counting:
    """An inline verification runner that counts the jobs it verified."""

    def __init__(self) -> None:
        self.jobs = 0

    async def __call__(self, ctx: Context, jobs: Sequence[Job]) -> AsyncIterator[list[Outcome]]:
        self.jobs += len(jobs)
        yield run_jobs(ctx, jobs)


def _view(state: ReplicaState) -> dict[str, Any]:
    entries = {
        cpid: (
            e.body(),
            e.free,
            e.claimed,
            e.live,
            e.live_held,
            e.lease,
            e.chain,
            e.revision,
            e.facts,
            e.status_facts,
            e.valid_until,
        )
        for cpid, e in state.served.items()
    }
    # live entries per namespace (mass-expiry detection starts from these counts)
    return {"entries": entries, "live": +state._live_count}


async def _cold(pki: Pki, extra: list[Change], clock: Any = time.time) -> ReplicaState:
    state = ReplicaState(anchors=pki.anchors, clock=clock)
    changes = [Change("put", Keys.cert(pki.kid(ns)), c.to_json(), 2) for ns, c in pki.certs.items()]
    await state.apply(changes + extra, 3, check=Counting())
    return state


def _world(pki: Pki, n: int = 8) -> tuple[list[Node], list[Change]]:
    nodes = [Node(region="31" if i % 2 else "62", labels={"tier": f"t{i % 3}"}) for i in range(n)]
    changes: list[Change] = []
    for i, node in enumerate(nodes):
        changes.append(Change("put", Keys.rec(node.cpid), signed(pki, node.record()).to_json(), 3))
        if i % 4 != 3:  # some records have no status
            changes.append(Change("put", Keys.live(node.cpid), node.status(free=i).to_json(), 3, 7))
    stray = Node()  # a status whose record is absent: kept, unverified
    changes.append(Change("put", Keys.live(stray.cpid), stray.status().to_json(), 3))
    forged = Node()  # signed by another namespace's key: not served
    env = signed(pki, forged.record(), "CN.31")
    changes.append(Change("put", Keys.rec(forged.cpid), env.to_json(), 3))
    wrong = Node()  # a status signed by another node's key: not used
    changes.append(Change("put", Keys.rec(wrong.cpid), signed(pki, wrong.record()).to_json(), 3))
    changes.append(
        Change("put", Keys.live(wrong.cpid), nodes[0].status(cpid=wrong.cpid).to_json(), 3)
    )
    changes.append(Change("put", Keys.alloc(nodes[1].cpid), b'{"units": 1}', 3))
    return nodes, changes


async def _snapshot_of(pki: Pki, state: ReplicaState, tmp_path: Path) -> LoadedSnapshot:
    """``state``'s snapshot, written and read back."""
    store = SnapshotStore(tmp_path / "snap", pki.anchors)
    revision, chunks = await SnapshotStore.collect(state)
    store.write(revision, chunks)
    return store.read()


async def _warm(
    pki: Pki, state: ReplicaState, tmp_path: Path, clock: Any = time.time
) -> tuple[ReplicaState, Counting, int]:
    snap = await _snapshot_of(pki, state, tmp_path)
    fresh = ReplicaState(anchors=pki.anchors, clock=clock)
    verifier = Counting()
    runner = TrustedRunner(snap, verifier)
    restored = 0
    for batch in snap.batches():
        if isinstance(batch, Restored):
            again = fresh.restore(batch, snap.revision)
            restored += len(batch) - sum(c.key.startswith(Prefix.REC) for c in again)
            if again:
                await fresh.apply(again, snap.revision, check=runner, emit=False)
        else:
            await fresh.apply(batch, snap.revision, check=runner, emit=False)
    return fresh, verifier, restored


async def test_restored_state_equals_the_cold_one(pki: Pki, tmp_path: Path) -> None:
    nodes, changes = _world(pki)
    cold = await _cold(pki, changes)
    warm, verifier, restored = await _warm(pki, cold, tmp_path)
    assert restored == len(cold.served) == len(nodes) + 1  # every served record: fast path
    # the only signature checked again: the status that failed (failures are not kept)
    assert verifier.jobs == 1
    assert all(e.facts.canonical for e in cold.served.values())  # kept, as all facts are
    assert _view(warm) == _view(cold)
    assert warm.sizes() == cold.sizes()
    assert warm.keys() == cold.keys()
    assert warm.rejection(nodes[0].cpid) is None
    assert {c: cold.rejection(c) for c in cold.recs} == {c: warm.rejection(c) for c in warm.recs}
    for q in ({"kind": "GPU"}, {"labels": (("tier", "t1"),)}, {"min_free": 3}):
        from resolver.discovery import Query

        query = Query(**q)
        assert [m.cpid for m in warm.discovery.search(query)] == [
            m.cpid for m in cold.discovery.search(query)
        ]


async def test_served_records_are_written_a_discovery_set_at_a_time(
    pki: Pki, tmp_path: Path
) -> None:
    """So that a warm start adds each set's records together (DiscoveryIndex.add_alike)."""
    _, changes = _world(pki, n=24)
    cold = await _cold(pki, changes)
    _, chunks = await SnapshotStore.collect(cold)
    written = [cpid for what, cols in chunks if what == "fast" for cpid in cols["cpid"]]
    sets = [list(members) for members in cold.discovery.sets()]
    assert len(sets) > 3
    assert written == [cpid for members in sets for cpid in members]
    warm, _, restored = await _warm(pki, cold, tmp_path)
    assert restored == len(cold.served)
    assert _view(warm) == _view(cold)


async def test_an_index_out_of_step_with_the_served_records_loses_none(
    pki: Pki, tmp_path: Path
) -> None:
    """The discovery order is only used when the index holds exactly the served CPIDs."""
    nodes, changes = _world(pki)
    cold = await _cold(pki, changes)
    cold.discovery.remove(cold.served[nodes[0].cpid])  # as a bug elsewhere could leave it
    warm, _, restored = await _warm(pki, cold, tmp_path)
    assert restored == len(cold.served)
    assert warm.served.keys() == cold.served.keys()


async def test_a_record_restored_again_is_handed_back_not_replaced(
    pki: Pki, tmp_path: Path
) -> None:
    """A chunk naming CPIDs the replica holds already (a repeated key): those rows are
    returned for verification and what is held stays."""
    _, changes = _world(pki)
    cold = await _cold(pki, changes)
    warm, _, _ = await _warm(pki, cold, tmp_path)
    held = dict(warm.served)
    snap = SnapshotStore(tmp_path / "snap", pki.anchors).read()
    chunk = next(b for b in snap.batches() if isinstance(b, Restored))
    again = warm.restore(chunk, snap.revision)
    assert sorted(c.key for c in again if c.key.startswith(Prefix.REC)) == sorted(
        Keys.rec(cpid) for cpid in chunk.cpids
    )
    assert sum(c.key.startswith(Prefix.LIVE) for c in again) == len(
        chunk
    ) - chunk.status_blobs.count(None)
    assert warm.served == held  # the same entries, not rebuilt
    assert _view(warm) == _view(cold)


async def test_a_window_closed_while_down_is_judged_again(pki: Pki, tmp_path: Path) -> None:
    nodes, changes = _world(pki, 2)
    short = Node()
    rec = short.record(expires_at=int(time.time()) + 120)
    changes.append(Change("put", Keys.rec(short.cpid), signed(pki, rec).to_json(), 3))
    cold = await _cold(pki, changes)
    assert short.cpid in cold.served
    later = time.time() + 3600  # restarted an hour later: the record has expired
    warm, verifier, restored = await _warm(pki, cold, tmp_path, clock=lambda: later)
    assert restored == len(nodes) + 1
    assert verifier.jobs >= 2  # the expired one went through verification
    assert short.cpid not in warm.served
    rejected = warm.rejection(short.cpid)
    assert rejected is not None and rejected[0] == "expired"


async def test_a_chain_gone_while_down_is_not_restored(pki: Pki, tmp_path: Path) -> None:
    """A snapshot whose records' signing cert is no longer in the state it is loaded
    into (as after a cert deletion) restores none of them: each is verified again, and
    fails."""
    nodes, changes = _world(pki, 3)
    cold = await _cold(pki, changes)
    store = SnapshotStore(tmp_path / "snap", pki.anchors)
    revision, chunks = await SnapshotStore.collect(state=cold)
    kid = pki.kid("CN.31.CMCC")
    chunks[0][1] = [kv for kv in chunks[0][1] if kv[0] != Keys.cert(kid)]  # the cert is gone
    store.write(revision, chunks)
    snap = store.read()
    fresh = ReplicaState(anchors=pki.anchors)
    verifier = Counting()
    runner = TrustedRunner(snap, verifier)
    for batch in snap.batches():
        if isinstance(batch, Restored):
            again = fresh.restore(batch, snap.revision)
            assert len(again) >= len(nodes)
            await fresh.apply(again, snap.revision, check=runner, emit=False)
        else:
            await fresh.apply(batch, snap.revision, check=runner, emit=False)
    assert not fresh.served
    assert all(fresh.rejection(n.cpid) is not None for n in nodes)


async def test_a_pending_revocation_of_a_node_key_is_not_trusted(pki: Pki, tmp_path: Path) -> None:
    """A record whose node key has a revocation (dated later) is verified on load, so its
    validity window takes the revocation in again."""
    nodes, changes = _world(pki, 2)
    target = nodes[0]
    kid = keys.kid_of(target.key)
    revocation = ca.revoke(
        issuer_key=pki.key_of("CN.31.CMCC"),
        subject="CN.31.CMCC",
        kid=kid,
        reason="key_compromise",
        now=int(time.time()) + 600,
    )
    changes.append(Change("put", Keys.revoked(kid), revocation.to_json(), 3))
    cold = await _cold(pki, changes)
    assert target.cpid in cold.served
    warm, verifier, restored = await _warm(pki, cold, tmp_path)
    assert restored == len(nodes) and verifier.jobs >= 2
    assert warm.served[target.cpid].valid_until == cold.served[target.cpid].valid_until
    assert _view(warm) == _view(cold)


async def test_records_and_statuses_come_back_in_their_compressed_form(
    pki: Pki, tmp_path: Path
) -> None:
    """The snapshot stores the compressed blobs as held (no decompression to write, none
    to read) and restores each in its form, byte for byte."""
    from resolver.sealed import Packed, Sealed

    nodes, changes = _world(pki)
    cold = await _cold(pki, changes)
    held = {c: (e.sealed, e.status_sealed) for c, e in cold.served.items()}
    assert all(type(s) is Packed for s, _ in held.values())
    assert sum(type(st) is Packed for _, st in held.values()) == 6
    # one record held uncompressed (as a payload that does not shrink would be)
    one = held[nodes[1].cpid][0]
    plain = Sealed(one.payload_type, one.keyid, one.blob[:64] + one.payload)
    cold.recs[nodes[1].cpid].sealed = plain
    _, chunks = await SnapshotStore.collect(cold)
    fast = [c[1] for c in chunks if c[0] == "fast"]
    assert {t for c in fast for t in c["tables"][0]} == {
        (Record.media_type(), True),
        (Record.media_type(), False),
        (Status.media_type(), True),
    }
    warm, verifier, restored = await _warm(pki, cold, tmp_path)
    assert restored == len(cold.served) and verifier.jobs == 1
    for cpid, (rec, st) in held.items():
        e = warm.served[cpid]
        want = plain if cpid == nodes[1].cpid else rec
        assert type(e.sealed) is type(want) and e.sealed.blob == want.blob
        assert (type(e.status_sealed), getattr(e.status_sealed, "blob", None)) == (
            type(st),
            getattr(st, "blob", None),
        )
        assert e.envelope == cold.served[cpid].envelope
    assert _view(warm) == _view(cold)


async def test_a_snapshot_of_another_format_or_other_dictionaries_is_refused(
    pki: Pki, tmp_path: Path, monkeypatch: Any
) -> None:
    import pytest

    from resolver import snapshot as snapshot_mod
    from resolver.snapshot import SnapshotError

    _, changes = _world(pki, 2)
    cold = await _cold(pki, changes)
    store = SnapshotStore(tmp_path / "snap", pki.anchors)
    revision, chunks = await SnapshotStore.collect(cold)
    for old in (3, 4, 5):  # as a resolver of an earlier format wrote it
        with monkeypatch.context() as m:
            m.setattr(snapshot_mod, "MAGIC", b"CPI-REPLICA-SNAPSHOT/%d\n" % old)
            m.setattr(snapshot_mod, "FORMAT", old)
            store.write(revision, chunks)
        with pytest.raises(
            SnapshotError, match=rf"^another snapshot format \({old}, this resolver reads 6\)"
        ):
            store.read()
    with monkeypatch.context() as m:
        m.setattr(snapshot_mod, "DICTIONARIES_DIGEST", "0" * 64)
        store.write(revision, chunks)
    with pytest.raises(SnapshotError, match="written with other compression dictionaries"):
        store.read()
    store.write(revision, chunks)
    assert store.read().revision == revision


async def test_a_status_whose_record_is_no_longer_served_is_stored_as_it_came(
    pki: Pki, tmp_path: Path
) -> None:
    """A verified status is held with the node key-id marker; once its record stops
    being served (here: expired) the status goes to the snapshot's slow path, which must
    write the envelope as stored in etcd, key id included."""
    node = Node()
    now = [time.time()]
    status = node.status(free=4)
    changes = [
        Change(
            "put",
            Keys.rec(node.cpid),
            signed(pki, node.record(expires_at=int(now[0]) + 120)).to_json(),
            3,
        ),
        Change("put", Keys.live(node.cpid), status.to_json(), 3),
    ]
    cold = await _cold(pki, changes, clock=lambda: now[0])
    assert cold.lives[node.cpid].sealed.keyid is NODE_KID  # type: ignore[union-attr]
    now[0] += 3600
    await cold.sweep(check=Counting())
    assert node.cpid not in cold.served
    _, chunks = await SnapshotStore.collect(cold)
    rows = [row for what, items in chunks if what == "lives" for row in items]
    (row,) = [r for r in rows if r[0] == node.cpid]
    sig = status.signatures[0]
    assert row[3] == (status.payload_type, status.payload, ((sig.keyid, sig.sig),))
    # and after a warm start, the record renewed: served with the status as stored
    warm, _, _ = await _warm(pki, cold, tmp_path, clock=lambda: now[0])
    renewed = signed(pki, node.record(version=2, expires_at=int(now[0]) + 3600))
    await warm.apply(
        [Change("put", Keys.rec(node.cpid), renewed.to_json(), 9)], 9, check=Counting()
    )
    entry = warm.get(node.cpid)
    assert entry is not None and entry.free == 4 and entry.status_envelope == status


def _books(state: ReplicaState) -> dict[str, Any]:
    """The bookkeeping a warm start files after ready (ReplicaState.file_restored)."""
    deadlines = state._deadlines
    return {
        "lives": {
            cpid: (lv.revision, lv.lease, lv.facts, lv.reason, lv.checked is not None)
            for cpid, lv in state.lives.items()
        },
        # a verified status is checked against its record's facts (the same object)
        "checked": sorted(
            cpid
            for cpid, lv in state.lives.items()
            if cpid in state.recs and lv.checked is state.recs[cpid].facts
        ),
        "leases": +state._lease_refs,
        "signers": +state._signer_refs,
        "deadlines": {sec: sorted(b) for sec, b in deadlines._at.items()},
        "heap": sorted(deadlines._heap),
        "serials": all(
            c.rpartition(".")[2].rpartition("-")[0] in state._serial_seen for c in state.recs
        ),
        "sizes": state.sizes(),
    }


async def _restored_only(
    pki: Pki, cold: ReplicaState, tmp_path: Path
) -> tuple[ReplicaState, list[list[Change]], TrustedRunner]:
    """A replica with ``cold``'s snapshot's keys (certs first) and fast chunks restored,
    nothing filed yet; the snapshot's batches after those, and a runner for them."""
    snap = await _snapshot_of(pki, cold, tmp_path)
    runner = TrustedRunner(snap, Counting())
    fresh = ReplicaState(anchors=pki.anchors)
    slow: list[list[Change]] = []
    for batch in snap.batches():
        if isinstance(batch, Restored):
            assert fresh.restore(batch, snap.revision) == []
        elif fresh.served:
            slow.append(batch)
        else:
            await fresh.apply(batch, snap.revision, check=runner, emit=False)
    return fresh, slow, runner


async def test_what_is_filed_after_ready_matches_the_cold_state(pki: Pki, tmp_path: Path) -> None:
    _, changes = _world(pki)
    cold = await _cold(pki, changes)
    fresh, slow, runner = await _restored_only(pki, cold, tmp_path)
    # what lookups and discovery read is complete before the bookkeeping is filed
    assert fresh.unfiled == 1 and fresh.lives == {}
    assert _view(fresh) == _view(cold)
    assert fresh.sizes()["live"] == sum(1 for e in cold.served.values() if e.status_facts)
    assert fresh.file_restored(chunks=1) and fresh.unfiled == 0
    assert fresh.file_restored()  # nothing left: a no-op
    for batch in slow:
        await fresh.apply(batch, 3, check=runner, emit=False)
    assert _books(fresh) == _books(cold)
    assert _view(fresh) == _view(cold)


async def test_a_change_to_a_restored_entry_files_first(pki: Pki, tmp_path: Path) -> None:
    """An apply (a watch batch, a re-list) before the bookkeeping is filed files it
    first: a status deleted from a lease, a record rewritten, leave the same books as
    on the cold replica."""
    nodes, changes = _world(pki)
    cold = await _cold(pki, changes)
    fresh, slow, runner = await _restored_only(pki, cold, tmp_path)
    assert fresh.unfiled
    later = [
        Change("delete", Keys.live(nodes[0].cpid), revision=9),
        Change(
            "put", Keys.rec(nodes[2].cpid), signed(pki, nodes[2].record(version=2)).to_json(), 9
        ),
    ]
    await fresh.apply([c for batch in slow for c in batch] + later, 9, check=runner)
    await cold.apply(later, 9, check=Counting())
    assert fresh.unfiled == 0
    assert _books(fresh) == _books(cold)
    assert _view(fresh) == _view(cold)
    assert fresh._lease_refs[7] == cold._lease_refs[7] == 5  # 6 statuses on lease 7, one gone
