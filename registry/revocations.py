"""Revocations at the write side: ``/cpi/v1/revoked/`` mirrored in memory.

The registry lists ``/cpi/v1/revoked/`` at start-up and follows it with a watch
(re-listed after a compaction), as :mod:`registry.claimed` does for ``/alloc/``.  The
verdicts are those of :mod:`schemas.chain` (rule 4): a revocation counts when it names
the revoked cert's subject, is signed by a key above the revoked one in the chain, and
its ``revoked_at`` has come (within the clock skew).  So

* a signer is revoked when its own cert (by serial or kid) or any cert above it is:
  the registry then refuses to sign in that namespace (403 ``revoked``) and ``/readyz``
  answers 503 naming it;
* a node key is revoked when a revocation of its kid, signed by a key above the record,
  is in force: registration, status and deregistration of that node are refused.

Checking costs a set lookup unless a revocation names a key or serial involved; only
then is the chain (or the record) verified.  Values that do not parse are skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from registry.index import KV, Compacted, Index, Prefix
from registry.signers import Signer, Signers
from schemas import keys
from schemas.chain import ChainResult, TrustAnchors, verify_chain, verify_record
from schemas.dsse import Envelope
from schemas.errors import InvalidDataError, RetrievalError
from schemas.models import Cert, parse_payload

__all__ = ["Revocations"]

_log = logging.getLogger(__name__)


def _revoked_reason(result: ChainResult) -> str | None:
    failure = result.failure
    return result.reason if failure is not None and failure.rule == 4 else None


class Revocations:
    """The ``/cpi/v1/revoked/`` keyspace in memory, and the verdicts built on it."""

    def __init__(
        self, index: Index, signers: Signers, anchors: TrustAnchors, *, retry_s: float = 1.0
    ) -> None:
        self._index = index
        self._signers = signers
        self._anchors = anchors
        self._retry_s = retry_s
        self.envelopes: dict[str, Envelope] = {}
        self._idents: dict[str, frozenset[str]] = {}
        for s in signers:
            idents: set[str] = set()
            for env in s.chain:
                try:
                    cert = parse_payload(env.payload_type, env.payload, Cert)
                except InvalidDataError:
                    continue
                idents.add(cert.serial)
                idents.add(keys.kid(keys.b64url_decode(cert.public_key)))
            self._idents[s.kid] = frozenset(idents)
        self._task: asyncio.Task[None] | None = None

    # -- verdicts ---------------------------------------------------------------------

    def signer_revoked(self, signer: Signer) -> str | None:
        """Why ``signer`` may no longer sign (its cert or one above it is revoked), or None."""
        if not self._idents.get(signer.kid, frozenset()) & self.envelopes.keys():
            return None
        result = verify_chain(signer.chain, anchors=self._anchors, revocations=self.envelopes)
        return _revoked_reason(result)

    def revoked_signers(self) -> list[tuple[Signer, str]]:
        out: list[tuple[Signer, str]] = []
        for s in self._signers:
            reason = self.signer_revoked(s)
            if reason is not None:
                out.append((s, reason))
        return out

    def record_key_revoked(self, record: Envelope, public_key: str) -> str | None:
        """Why the node key of ``record`` is revoked, or None (also None for a record
        not signed by one of this registry's keys: other checks refuse those)."""
        if keys.kid(keys.b64url_decode(public_key)) not in self.envelopes:
            return None
        signer = self._signers.by_kid(record.keyid)
        if signer is None:
            return None
        result = verify_record(
            record, signer.chain, anchors=self._anchors, revocations=self.envelopes
        )
        return _revoked_reason(result)

    # -- the mirror -------------------------------------------------------------------

    async def start(self) -> None:
        revision = await self._list()
        self._task = asyncio.create_task(self._follow(revision), name="revocations")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _set(self, kv: KV) -> None:
        ident = kv.key[len(Prefix.REVOKED) :]
        try:
            self.envelopes[ident] = Envelope.from_json(kv.value)
            _log.info("revocation of %s seen", ident)
        except InvalidDataError as exc:
            _log.warning("ignoring unreadable revocation at %s: %s", kv.key, exc)
            self.envelopes.pop(ident, None)

    async def _list(self) -> int:
        kvs, revision = await self._index.get_prefix(Prefix.REVOKED)
        self.envelopes.clear()
        for kv in kvs:
            self._set(kv)
        return revision

    async def _follow(self, revision: int) -> None:
        while True:
            try:
                async with self._index.watch_prefix(
                    Prefix.REVOKED, start_revision=revision + 1, prev_kv=False
                ) as watch:
                    async for item in watch:
                        if isinstance(item, Compacted):
                            break
                        if item.type == "put":
                            self._set(item.kv)
                        else:
                            self.envelopes.pop(item.kv.key[len(Prefix.REVOKED) :], None)
                revision = await self._list()
            except RetrievalError as exc:
                _log.warning("watch of %s failed (re-listing): %s", Prefix.REVOKED, exc)
                while True:
                    await asyncio.sleep(self._retry_s)
                    try:
                        revision = await self._list()
                        break
                    except RetrievalError:
                        continue
