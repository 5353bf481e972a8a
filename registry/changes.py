"""The change stream: one append-only audit entry per state change, under ``/cpi/v1/audit/<seq>``.

Every register, update, renew, deregister and revoke appends one entry **in the same
etcd transaction as the change itself**, so the stream and the index never disagree.
Entries are JSON::

    {"seq": 7, "op": "register", "cpid": "CN.31.CMCC/GPU.4K7Q9M2XH3PT-Z", "version": 1,
     "digest": "<sha256 hex of the envelope>", "time": 1700000000}

(``"subject"`` instead of ``"cpid"`` for a revocation; ``"version"``, the record
version the change produced, on register, update and renew).  ``digest`` is the SHA-256 of
the envelope's compact JSON (:meth:`schemas.dsse.Envelope.to_json`), so it does not
depend on etcd revisions and a later transparency log can recompute it.

Sequence numbers start at 1 and have no gaps.  The head is the highest entry:
appending entry ``n`` compares, in the change's own transaction, that entry ``n`` is
absent and entry ``n - 1`` exists.  Two registries racing for ``n`` cannot both win
(no fork), nobody can overwrite an entry, and nobody can skip a number.  The loser's
transaction fails as a whole; :meth:`AuditStream.commit` re-reads the head and tries
again, so callers only see the failures of their own compares.

Other modules (the national tools' ``revoke``) use :meth:`AuditStream.commit` with
their own compares and operations, or :func:`entry_ops` to build the audit part of a
transaction they run themselves.

The implementation (entries, their put, the head compares and the group-committing
:class:`AuditStream`) lives in :mod:`registry.index.auditlog`, shared with the resolver,
which appends usage receipts with it; this module keeps the registry's names for it.
"""

from __future__ import annotations

from registry.index.auditlog import (
    AUDIT_OPS,
    AuditContentionError,
    AuditEntry,
    AuditOp,
    AuditStream,
    digest,
    entry_ops,
    find_head,
    read_entries,
)

__all__ = [
    "AUDIT_OPS",
    "AuditContentionError",
    "AuditEntry",
    "AuditOp",
    "AuditStream",
    "digest",
    "entry_ops",
    "find_head",
    "read_entries",
]
