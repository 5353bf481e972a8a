"""The shared audit-append code: several entries per change, group-committed."""

from __future__ import annotations

import asyncio

import pytest

from registry.index import Cmp, Index, Op
from registry.index.auditlog import AuditStream, Entry, read_entries
from schemas import dsse
from schemas import keys as _keys

ENV = dsse.sign("application/vnd.cpi.x+json", b"{}", _keys.generate())


def usage(i: int, j: int) -> Entry:
    return Entry("usage", ENV, cpid=f"CN.3/GPU.{i}", receipt=f"c~{i}~x/{j}")


async def test_concurrent_changes_with_several_entries_each_stay_gapless(index: Index) -> None:
    stream = AuditStream(index)

    async def change(i: int) -> None:
        result = await stream.commit_entries(
            compare=[Cmp.absent(f"/cpi/v1/meter/k{i}")],
            success=[Op.put(f"/cpi/v1/meter/k{i}", b"v"), Op.get(f"/cpi/v1/meter/k{i}")],
            entries=[usage(i, j) for j in range(1, 1 + i % 3 + 1)],
        )
        assert result.succeeded
        assert len(result.responses) == 2  # the caller's ops only
        assert result.responses[1].kvs[0].value == b"v"

    await asyncio.gather(*(change(i) for i in range(30)))
    entries = await read_entries(index)
    assert [e.seq for e in entries] == list(range(1, len(entries) + 1))
    assert len(entries) == sum(i % 3 + 1 for i in range(30))
    assert stream.batches < 30  # group-committed
    # per change, its entries are consecutive and in the given order
    by_cpid: dict[str, list[int]] = {}
    for e in entries:
        assert e.cpid is not None and e.receipt is not None
        by_cpid.setdefault(e.cpid, []).append(e.seq)
    for seqs in by_cpid.values():
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))


async def test_a_failed_compare_writes_no_entry(index: Index) -> None:
    stream = AuditStream(index)
    await index.put("/cpi/v1/meter/taken", b"x")
    result = await stream.commit_entries(
        compare=[Cmp.absent("/cpi/v1/meter/taken")],
        success=[Op.put("/cpi/v1/meter/taken", b"y")],
        failure=[Op.get("/cpi/v1/meter/taken")],
        entries=[usage(1, 1), usage(1, 2)],
    )
    assert not result.succeeded
    assert result.responses[0].kvs[0].value == b"x"
    assert await read_entries(index) == []


def test_entries_are_checked() -> None:
    with pytest.raises(ValueError, match="receipt"):
        Entry("usage", ENV, cpid="CN.3/GPU.1").check()
    with pytest.raises(ValueError, match="receipt"):
        Entry("register", ENV, cpid="CN.3/GPU.1", receipt="x/1").check()
    with pytest.raises(ValueError, match="unknown audit op"):
        Entry("nope", ENV, cpid="CN.3/GPU.1").check()  # type: ignore[arg-type]
