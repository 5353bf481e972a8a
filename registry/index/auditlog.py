"""The audit stream's entries and the compares that append one (docs/protocol.md §6).

One implementation for every writer of ``/cpi/v1/audit/<seq>``: the registries and the
national tools (through :class:`registry.changes.AuditStream`, which adds group commit)
and the resolver's claims service (usage receipts, :mod:`resolver.claims.usage`).  This
module builds entries, their put and the head compares; it reads etcd only in
:func:`find_head` and :func:`read_entries`.

Appending entry ``n`` compares, in the change's own transaction, that entry ``n`` is
absent and entry ``n - 1`` exists; the failure branch of such a transaction carries
:func:`head_probe`, and :func:`lost_head` tells from its answers whether the head moved
(another writer appended first) or a compare of the caller's own failed.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Literal

from registry.index.layout import Keys, Prefix
from registry.index.values import Cmp, Op, OpResult
from schemas import _json
from schemas.dsse import Envelope

if TYPE_CHECKING:
    from registry.index.client import Index

__all__ = [
    "AUDIT_OPS",
    "ENTRY_OPS",
    "AuditEntry",
    "AuditOp",
    "EntryOp",
    "digest",
    "entry_ops",
    "find_head",
    "head_compares",
    "head_probe",
    "lost_head",
    "read_entries",
]

AuditOp = Literal["register", "update", "renew", "deregister", "revoke"]
"""The ops of the registry side (a record or trust change)."""
AUDIT_OPS: Final[tuple[str, ...]] = ("register", "update", "renew", "deregister", "revoke")
EntryOp = Literal["register", "update", "renew", "deregister", "revoke", "usage"]
"""Every op an entry may carry: the registry's and ``usage`` (a usage receipt)."""
ENTRY_OPS: Final[tuple[str, ...]] = (*AUDIT_OPS, "usage")


def digest(envelope: Envelope) -> str:
    """Revision-independent SHA-256 (hex) of an envelope's compact JSON."""
    return hashlib.sha256(envelope.to_json()).hexdigest()


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One entry of the stream.  ``receipt`` (op ``usage`` only) names the receipt's key
    below ``/cpi/v1/usage/``: ``<claim-id>/<20-digit n>``."""

    seq: int
    op: str
    digest: str
    time: int
    cpid: str | None = None
    subject: str | None = None
    version: int | None = None
    receipt: str | None = None

    def to_json(self) -> bytes:
        obj: dict[str, Any] = {"seq": self.seq, "op": self.op}
        if self.cpid is not None:
            obj["cpid"] = self.cpid
        if self.version is not None:
            obj["version"] = self.version
        if self.subject is not None:
            obj["subject"] = self.subject
        if self.receipt is not None:
            obj["receipt"] = self.receipt
        obj["digest"] = self.digest
        obj["time"] = self.time
        return json.dumps(obj, separators=(",", ":")).encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes) -> AuditEntry:
        obj = _json.loads(data)
        return cls(
            seq=int(obj["seq"]),
            op=str(obj["op"]),
            digest=str(obj["digest"]),
            time=int(obj["time"]),
            cpid=obj.get("cpid"),
            subject=obj.get("subject"),
            version=obj.get("version"),
            receipt=obj.get("receipt"),
        )


def head_compares(head: int) -> list[Cmp]:
    """Compares that make a transaction append right after entry ``head``: entry
    ``head + 1`` absent and (``head > 0``) entry ``head`` present."""
    cmps = [Cmp.absent(Keys.audit(head + 1))]
    if head > 0:
        cmps.append(Cmp.exists(Keys.audit(head)))
    return cmps


def head_probe(head: int) -> list[Op]:
    """Reads for a transaction's failure branch: with :func:`lost_head` they tell whether
    the head compares of :func:`head_compares` failed."""
    return [Op.get(Keys.audit(head + 1))] + ([Op.get(Keys.audit(head))] if head > 0 else [])


def lost_head(head: int, probe: Sequence[OpResult]) -> tuple[bool, bool]:
    """From the answers to :func:`head_probe`: ``(taken, missing)``: entry ``head + 1``
    was written by someone else, or entry ``head`` is gone (another etcd, or a deletion)."""
    taken = bool(probe[0].kvs)
    missing = head > 0 and not probe[1].kvs
    return taken, missing


def entry_ops(
    seq: int,
    *,
    op: EntryOp,
    envelope: Envelope,
    cpid: str | None = None,
    subject: str | None = None,
    version: int | None = None,
    receipt: str | None = None,
    now: int | None = None,
) -> tuple[list[Cmp], list[Op]]:
    """The compares and the put that append entry ``seq`` inside a caller's transaction.

    Exactly one of ``cpid`` (register, update, renew, deregister, usage) or ``subject``
    (revoke) names what changed; ``receipt`` is given with op ``usage`` and only then.
    """
    if op not in ENTRY_OPS:
        raise ValueError(f"unknown audit op {op!r}, expected one of {', '.join(ENTRY_OPS)}")
    if (cpid is None) == (subject is None):
        raise ValueError("give exactly one of cpid or subject")
    if (op == "usage") != (receipt is not None):
        raise ValueError("a usage entry names its receipt, and only a usage entry does")
    if seq < 1:
        raise ValueError(f"audit sequence numbers start at 1, got {seq}")
    entry = AuditEntry(
        seq=seq,
        op=op,
        digest=digest(envelope),
        time=int(time.time()) if now is None else now,
        cpid=cpid,
        subject=subject,
        version=version,
        receipt=receipt,
    )
    return head_compares(seq - 1), [Op.put(Keys.audit(seq), entry.to_json())]


async def find_head(index: Index, *, hint: int = 0) -> int:
    """The highest sequence number in the stream (0 when empty).

    Starts from ``hint`` (a head seen before) and probes forwards, galloping, then
    bisects: O(log n) reads, and one or two when the hint is recent.
    """
    lo = max(0, hint)
    if lo > 0 and await index.get(Keys.audit(lo)) is None:
        lo = 0  # the hint is ahead of the stream (another etcd?): search from scratch
    step = 1
    hi = lo + step
    while await index.get(Keys.audit(hi)) is not None:
        lo = hi
        step *= 2
        hi = lo + step
    # entry lo exists (or lo == 0), entry hi does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if await index.get(Keys.audit(mid)) is not None:
            lo = mid
        else:
            hi = mid
    return lo


async def read_entries(index: Index) -> list[AuditEntry]:
    """Every entry, in sequence order."""
    kvs, _ = await index.get_prefix(Prefix.AUDIT)
    return [AuditEntry.from_json(kv.value) for kv in kvs]
