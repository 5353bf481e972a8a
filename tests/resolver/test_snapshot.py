"""Warm restarts from the replica snapshot (resolver.snapshot)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import marshal
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from registry.index import Index, Keys
from resolver.core import Resolver
from resolver.snapshot import FILE, SnapshotStore
from schemas.api import ResolverReady
from tests.resolver.kit import FAST, Node, Pki, make_resolver, put_record, put_status, signed
from tests.until import until


def _settings(tmp_path: Path) -> Any:
    return dataclasses.replace(FAST, snapshot_dir=tmp_path / "snap")


def _view(r: Resolver) -> dict[str, tuple[Any, ...]]:
    return {
        e.cpid: (
            e.revision,
            e.record_revision,
            e.facts,
            e.status_facts,
            e.status_revision,
            e.claimed,
            e.free,
            e.envelope.to_json(),
            None if e.status_envelope is None else e.status_envelope.to_json(),
            e.kid,
        )
        for e in r.entries()
    }


async def _populate(index: Index, pki: Pki, n: int = 6) -> list[Node]:
    nodes = [Node() for _ in range(n)]
    for i, node in enumerate(nodes):
        await put_record(index, pki, node)
        if i % 2 == 0:
            await put_status(index, node, free=i)
    await index.put(Keys.alloc(nodes[0].cpid), b'{"units": 2}')
    # a record that fails verification (signed by another namespace's key)
    bad = Node()
    await index.put(Keys.rec(bad.cpid), signed(pki, bad.record(), "CN.31").to_json())
    return nodes


async def _start(index: Index, pki: Pki, settings: Any) -> Resolver:
    r = make_resolver(index, pki, settings)
    await r.start()
    async with asyncio.timeout(20):
        await r.wait_ready()
    return r


async def _written(
    index: Index, pki: Pki, tmp_path: Path, n: int = 6
) -> tuple[Any, dict[str, tuple[Any, ...]]]:
    """A first resolver on a populated index, stopped (so its snapshot is written): the
    settings to start the next one with, and what the first one served."""
    await pki.publish(index)
    await _populate(index, pki, n)
    settings = _settings(tmp_path)
    first = await _start(index, pki, settings)
    cold = _view(first)
    await first.close()
    return settings, cold


async def test_warm_start_serves_what_a_cold_start_does(
    index: Index, pki: Pki, tmp_path: Path
) -> None:
    await pki.publish(index)
    await _populate(index, pki)
    settings = _settings(tmp_path)
    first = await _start(index, pki, settings)
    assert first.health()["snapshot"]["status"] == "absent"
    cold = _view(first)
    revision = first.revision
    await first.close()  # writes the snapshot
    assert (tmp_path / "snap" / FILE).exists()
    assert ((tmp_path / "snap" / "snapshot.key").stat().st_mode & 0o777) == 0o600

    warm = await _start(index, pki, settings)
    try:
        snap = warm.health()["snapshot"]
        assert snap["status"] == "loaded" and snap["loaded_revision"] == revision
        assert warm.revision == revision
        assert _view(warm) == cold
        # only the record that failed is verified again: the rest come from the snapshot
        assert warm._verifier.checked_inline == 1 < first._verifier.checked_inline
        assert warm.health()["rejected"] == first.health()["rejected"]
        # the models parse lazily from the trusted payloads
        node_entry = next(iter(warm.entries()))
        assert node_entry.record.cpid == node_entry.cpid
    finally:
        await warm.close()

    plain = await _start(index, pki, FAST)  # no snapshot at all
    try:
        assert "snapshot" not in plain.health()
        assert _view(plain) == cold
    finally:
        await plain.close()


async def test_a_warm_start_writes_its_snapshot_again_only_once_the_revision_moves(
    index: Index, pki: Pki, tmp_path: Path
) -> None:
    settings, _ = await _written(index, pki, tmp_path)
    path = tmp_path / "snap" / FILE
    stamp = path.stat().st_mtime_ns
    warm = await _start(index, pki, settings)
    try:
        assert await warm.write_snapshot() is False  # the file holds this revision
    finally:
        await warm.close()  # nor on shutdown
    assert path.stat().st_mtime_ns == stamp and warm.snapshots is not None
    assert warm.snapshots.writes == 0
    warm = await _start(index, pki, settings)
    try:
        rev = await put_record(index, pki, Node())
        await until(lambda: warm.revision >= rev, what="the new record")
        assert await warm.write_snapshot() is True
    finally:
        await warm.close()
    assert path.stat().st_mtime_ns != stamp


async def test_changes_while_down_are_applied_after_a_warm_start(
    index: Index, pki: Pki, tmp_path: Path
) -> None:
    await pki.publish(index)
    nodes = await _populate(index, pki)
    settings = _settings(tmp_path)
    first = await _start(index, pki, settings)
    await first.close()

    new = Node()
    await put_record(index, pki, new)
    await put_status(index, nodes[1], free=7)
    await index.delete(Keys.rec(nodes[2].cpid))

    warm = await _start(index, pki, settings)
    try:
        assert warm.health()["snapshot"]["status"] == "loaded"
        await until(lambda: warm.get(new.cpid) is not None, what="the new record")
        await until(lambda: warm.get(nodes[2].cpid) is None, what="the deletion")
        await until(lambda: warm.resolve(nodes[1].cpid).free == 7, what="the new status")
        cold = await _start(index, pki, FAST)
        try:
            assert _view(warm) == _view(cold)
        finally:
            await cold.close()
    finally:
        await warm.close()


async def test_a_tampered_snapshot_is_not_used(index: Index, pki: Pki, tmp_path: Path) -> None:
    settings, cold = await _written(index, pki, tmp_path)
    path = tmp_path / "snap" / FILE
    data = bytearray(path.read_bytes())
    data[-5] ^= 1
    path.write_bytes(bytes(data))

    warm = await _start(index, pki, settings)
    try:
        snap = warm.health()["snapshot"]
        assert snap["status"].startswith("not used: unreadable: integrity check failed")
        assert snap["fallbacks"] == 1
        assert "cpi_resolver_snapshot_fallbacks_total 1.0" in warm.metrics.render().decode()
        assert _view(warm) == cold  # listed the index instead
    finally:
        await warm.close()


async def test_a_snapshot_that_cannot_be_restored_falls_back_to_a_listing(
    index: Index, pki: Pki, tmp_path: Path
) -> None:
    """A snapshot that passes its MAC but cannot be restored (only a resolver with a bug
    writes one: here a chunk whose columns differ in length, found after other chunks
    were applied): the replica is emptied, the index listed, and the status says why."""
    settings, cold = await _written(index, pki, tmp_path)
    store = SnapshotStore(tmp_path / "snap", pki.anchors)
    snap = store.read()
    chunks = [marshal.loads(snap.body[at : at + n]) for at, n in snap.spans]
    fast = next(cols for what, cols in chunks if what == "fast")
    fast["lblob"] = fast["lblob"][:-1]
    store.write(snap.revision, chunks)

    warm = await _start(index, pki, settings)
    try:
        status = warm.health()["snapshot"]
        assert status["status"].startswith("not used: could not be restored: zip()")
        assert status["fallbacks"] == 1
        assert _view(warm) == cold  # listed the index instead, nothing left over
        assert warm.health()["records"] == len(cold) + 1  # and the one that does not verify
    finally:
        await warm.close()


async def test_a_snapshot_of_the_previous_format_is_not_used(
    index: Index, pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A snapshot of an earlier format (4: uncompressed blobs) is refused as another
    format: the resolver lists the index instead and says so."""
    from resolver import snapshot as snapshot_mod

    await pki.publish(index)
    await _populate(index, pki)
    settings = _settings(tmp_path)
    first = await _start(index, pki, settings)
    cold = _view(first)
    with monkeypatch.context() as m:  # written as a format-4 resolver writes it
        m.setattr(snapshot_mod, "MAGIC", b"CPI-REPLICA-SNAPSHOT/4\n")
        m.setattr(snapshot_mod, "FORMAT", 4)
        await first.close()
    assert (tmp_path / "snap" / FILE).read_bytes().startswith(b"CPI-REPLICA-SNAPSHOT/4\n")

    warm = await _start(index, pki, settings)
    try:
        snap = warm.health()["snapshot"]
        assert snap["status"] == (
            "not used: unreadable: another snapshot format (4, this resolver reads 6)"
        )
        assert snap["fallbacks"] == 1
        assert _view(warm) == cold
    finally:
        await warm.close()
    assert (tmp_path / "snap" / FILE).read_bytes().startswith(b"CPI-REPLICA-SNAPSHOT/6\n")


async def test_a_compacted_revision_falls_back_to_a_listing(
    index: Index, pki: Pki, tmp_path: Path
) -> None:
    await pki.publish(index)
    nodes = await _populate(index, pki)
    settings = _settings(tmp_path)
    first = await _start(index, pki, settings)
    await first.close()
    await put_status(index, nodes[3], free=3)
    await index.compact(await index.revision())

    warm = await _start(index, pki, settings)
    try:
        snap = warm.health()["snapshot"]
        assert "compacted" in snap["status"] and snap["fallbacks"] == 1
        assert warm.resolve(nodes[3].cpid).free == 3
    finally:
        await warm.close()


async def test_a_snapshot_for_other_anchors_is_not_used(
    index: Index, pki: Pki, tmp_path: Path
) -> None:
    from registry import ca
    from resolver.core import Resolver
    from resolver.discovery import LatencyTable
    from schemas import keys
    from schemas.chain import TrustAnchors
    from tests.resolver.kit import LATENCY

    settings, cold = await _written(index, pki, tmp_path)

    more = TrustAnchors([*pki.anchors, ca.make_anchor("US", keys.generate())])
    other = Resolver(
        index=index, anchors=more, latency=LatencyTable.from_file(LATENCY), settings=settings
    )
    await other.start()
    try:
        async with asyncio.timeout(20):
            await other.wait_ready()
        snap = other.health()["snapshot"]
        assert snap["status"] == "not used: unreadable: written for another set of trust anchors"
        assert _view(other) == cold
    finally:
        await other.close()


def _layout(r: Resolver) -> dict[str, Any]:
    """How the entries are held: which values are one shared object across entries."""
    entries = sorted(r.entries(), key=lambda e: e.cpid)

    def shared(values: list[Any]) -> bool:
        return len({id(v) for v in values}) == len({v for v in values})

    return {
        "kinds": shared([e.facts.kind for e in entries]),
        "regions": shared([e.facts.region for e in entries]),
        "labels": shared([e.facts.labels for e in entries]),
        "accelerators": shared([e.facts.accelerators for e in entries]),
        "payload_types": shared([e.envelope.payload_type for e in entries]),
        "signers": shared([e.envelope.signatures[0].keyid for e in entries]),
        "prefixes": shared([e.id.prefix for e in entries]),
        "cpid_in_facts": all(e.facts.cpid is e.cpid for e in entries),
        "status_facts": shared([e.status_facts for e in entries if e.status_facts is not None]),
        "models_kept": sum(e._record is not None or e._status is not None for e in entries),
        "sizes": r._state.sizes(),
    }


async def test_a_warm_start_holds_entries_as_a_cold_start_does(
    index: Index, pki: Pki, tmp_path: Path
) -> None:
    """Memory after a warm start is laid out as after a cold one: repeated values are
    one object across entries, no parsed model is kept per entry."""
    await pki.publish(index)
    await _populate(index, pki, n=10)
    settings = _settings(tmp_path)
    first = await _start(index, pki, settings)
    cold = _layout(first)
    assert [k for k, v in cold.items() if k not in ("models_kept", "sizes") and not v] == []
    assert cold["models_kept"] == 0
    await first.close()
    warm = await _start(index, pki, settings)
    try:
        assert warm.health()["snapshot"]["status"] == "loaded"
        assert _layout(warm) == cold
    finally:
        await warm.close()


async def test_a_snapshot_of_many_chunks_loads_a_chunk_at_a_time(
    index: Index, pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Statuses are written before records and loaded a chunk at a time: records of a
    later chunk still take their (trusted) status along, nothing is verified again but
    the record that failed, and the result is what a cold start serves."""
    from resolver import snapshot as snapshot_mod

    monkeypatch.setattr(snapshot_mod, "_CHUNK", 2)
    settings, cold = await _written(index, pki, tmp_path, n=9)
    store = snapshot_mod.SnapshotStore(tmp_path / "snap", pki.anchors)
    assert len(store.read().spans) > 5  # kvs, then several chunks of lives and of records
    warm = await _start(index, pki, settings)
    try:
        assert warm.health()["snapshot"]["status"] == "loaded"
        assert _view(warm) == cold
        assert warm._verifier.checked_inline == 1  # the record that fails, alone
    finally:
        await warm.close()


def _gone_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_remove_stale_removes_what_killed_writers_left_and_nothing_else(
    tmp_path: Path, pki: Pki
) -> None:
    store = SnapshotStore(tmp_path, pki.anchors)
    assert store.remove_stale() == (0, 0)  # no directory yet
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        gone = _gone_pid()
        stale = {
            f".{FILE}.{gone}.tmp": b"x" * 1000,  # its writer was killed
            f".{FILE}.{os.getpid()}.tmp": b"y" * 10,  # a previous process with this pid
            f".snapshot.key.{gone}.tmp": b"k" * 32,
        }
        kept = {
            f".{FILE}.{live.pid}.tmp": b"a writer still running",
            FILE: b"the snapshot",
            "snapshot.key": b"k" * 32,
            f".{FILE}.abc.tmp": b"not a pid",
            f".{FILE}.\u00b2.tmp": b"a digit int() does not read",
            f".{FILE}.{'9' * 30}.tmp": b"no pid is that long",
            f".other.{gone}.tmp": b"not ours",
            f"{FILE}.{gone}.tmp": b"not hidden: not ours",
        }
        for name, data in {**stale, **kept}.items():
            (tmp_path / name).write_bytes(data)
        assert store.remove_stale() == (3, 1042)
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)
        assert store.remove_stale() == (0, 0)
    finally:
        live.kill()
        live.wait()


async def test_a_warm_start_removes_an_unfinished_write_and_says_so(
    index: Index, pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings, cold = await _written(index, pki, tmp_path)
    left = tmp_path / "snap" / f".{FILE}.{_gone_pid()}.tmp"
    left.write_bytes(b"\0" * 4096)  # a shutdown write killed half-way
    caplog.set_level(logging.WARNING, logger="resolver.replica")
    warm = await _start(index, pki, settings)
    try:
        assert not left.exists()
        assert warm.health()["snapshot"]["status"] == "loaded"
        assert _view(warm) == cold
        assert any("removed 1 unfinished snapshot file" in r.getMessage() for r in caplog.records)
    finally:
        await warm.close()


async def test_a_snapshot_that_cannot_be_written_is_counted_and_said(
    index: Index, pki: Pki, tmp_path: Path
) -> None:
    await pki.publish(index)
    await _populate(index, pki)
    blocked = tmp_path / "not-a-dir"
    blocked.write_bytes(b"a file where the snapshot directory should be")
    settings = dataclasses.replace(FAST, snapshot_dir=blocked)
    r = await _start(index, pki, settings)
    try:
        await put_record(index, pki, Node())  # the revision moves: there is something to write
        await until(lambda: r.revision > (r.snapshots.written_revision if r.snapshots else 0))
        assert await r.write_snapshot() is False
        assert await r.write_snapshot() is False
        health = r.health()
        snap = health["snapshot"]
        assert snap["write_failures"] == 2 and snap["written_revision"] == 0
        assert snap["last_write_error"].startswith(("FileExistsError", "NotADirectoryError"))
        assert ResolverReady.model_validate(health).snapshot is not None  # the wire model
        text = r.metrics.render().decode()
        assert "cpi_resolver_snapshot_write_failures_total 2.0" in text
        assert "cpi_resolver_snapshot_writes_total 0.0" in text
    finally:
        await r.close()  # the shutdown write fails too, and the stop goes on
    assert blocked.read_bytes().startswith(b"a file")
