"""Entries decode lazily: what they parse on first use equals an eager parse of the
verified envelopes, and what they cache is bounded (resolver.entry)."""

from __future__ import annotations

import json
from collections import deque
from collections.abc import AsyncIterator, Sequence

import pytest

from registry.index import Keys
from resolver import entry as entry_mod
from resolver.state import Change, ReplicaState
from resolver.verify import Context, Job, Outcome, run_jobs
from schemas.models import Record, Status, parse_payload
from tests.resolver.kit import Node, Pki, signed


async def inline(ctx: Context, jobs: Sequence[Job]) -> AsyncIterator[list[Outcome]]:
    yield run_jobs(ctx, jobs)


async def _state(pki: Pki, n: int) -> ReplicaState:
    state = ReplicaState(anchors=pki.anchors)
    changes = [Change("put", Keys.cert(pki.kid(ns)), c.to_json(), 2) for ns, c in pki.certs.items()]
    for i in range(n):
        node = Node(region="31" if i % 2 else "62")
        changes.append(Change("put", Keys.rec(node.cpid), signed(pki, node.record()).to_json(), 2))
        changes.append(Change("put", Keys.live(node.cpid), node.status(free=i % 5).to_json(), 2))
    await state.apply(changes, 2, check=inline)
    return state


async def test_lazy_decode_equals_eager(pki: Pki) -> None:
    state = await _state(pki, 6)
    assert len(state.served) == 6
    for e in state.served.values():
        assert e._record is None and e._status is None  # nothing parsed yet
        assert e.status is not None and e.status_envelope is not None
        eager_rec = parse_payload(e.envelope.payload_type, e.envelope.payload, Record)
        eager_st = parse_payload(e.status_envelope.payload_type, e.status_envelope.payload, Status)
        assert e.record == eager_rec and e.status == eager_st
        assert e.record_dict() == eager_rec.model_dump(mode="json", exclude_none=True)
        body = json.loads(e.body())
        assert body["record"] == e.envelope.to_dict()
        assert body["status"] == e.status_envelope.to_dict()
        assert json.loads(e.body(stale=True)) == {**body, "stale": True}
        assert e.facts.region == eager_rec.location.region
        assert e.status_facts is not None
        assert e.status_facts.accelerators_free == eager_st.capacity.accelerators_free


async def test_entry_caches_are_bounded(pki: Pki, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past CACHED_ENTRIES entries, the oldest forget what they parsed and parse it again
    (equal) when asked."""
    monkeypatch.setattr(entry_mod, "CACHED_ENTRIES", 3)
    monkeypatch.setattr(entry_mod, "_cached", deque())
    state = await _state(pki, 5)
    entries = sorted(state.served.values(), key=lambda e: e.cpid)
    first = [(e.record, e.body()) for e in entries]
    kept = [e for e in entries if e._record is not None]
    assert len(kept) == 3 and kept == entries[2:]  # the oldest two forgot theirs
    assert entries[0]._cache is None  # nothing rendered or parsed kept
    again = [(e.record, e.body()) for e in entries]
    assert again == first
    assert len(entry_mod._cached) == 3


async def test_reparsing_a_verified_payload_equals_the_strict_parse(pki: Pki) -> None:
    """Entries parse a verified payload again with pydantic's JSON reader: for documents
    that leave out what has defaults, write floats as integers, or carry non-ASCII text,
    the result is the model the strict reader makes."""
    from resolver.entry import _reparse
    from resolver.sealed import seal
    from schemas import dsse

    node = Node()
    rec = node.record()
    doc = rec.model_dump(mode="json", exclude_none=True)
    doc.pop("endpoints")
    doc.pop("labels")
    doc["attributes"] = {"memory_gib": 512, "cpu": {"model": "鲲鹏 920", "cores": 64}}
    doc["location"] = {"region": "31", "site": "上海 S1"}
    payload = json.dumps(doc, ensure_ascii=False).encode()
    env = dsse.sign("application/vnd.cpi.record.v1+json", payload, pki.key_of("CN.31.CMCC"))
    strict = parse_payload(env.payload_type, env.payload, Record)
    assert _reparse(seal(env), Record) == strict
    assert _reparse(seal(env), Record).model_dump() == strict.model_dump()
    st = node.status(free=3)
    assert _reparse(seal(st), Status) == parse_payload(st.payload_type, st.payload, Status)
