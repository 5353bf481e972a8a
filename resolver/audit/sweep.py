"""The auditor: offline verification of a bundle, a sweep of the whole index, log checks.

Everything here trusts nothing but the anchors (and, for the log, the log's verifier
key).  Three jobs:

* :func:`verify_bundle` -- one record bundle ``{"record", "chain", "status"?}`` as the
  resolver serves it: the five rules of :mod:`schemas.chain`, then the status
  envelope under the record's key.
* :class:`Sweeper` -- every key of the index read in pages at one revision; every
  cert, record, status, revocation and ``/ns/`` entry verified; ``/live/``,
  ``/alloc/`` and ``/claim/`` keys without a record reported as orphans.  Each
  distinct cert chain is walked once (:func:`schemas.chain.prepare_chain`), so a
  record costs one Ed25519 verification and one payload parse.
* :func:`check_transition` and :class:`LogAuditor` -- a fetched checkpoint against
  the last one stored locally (rollback, split view, consistency proof) and a
  record's inclusion proof.

Outcomes of the sweep (``SweepReport.counts[kind][outcome]``): ``valid``, and the
failures ``forged`` (signed by a key without a valid chain to an anchor, or a cert
not signed by its issuer), ``tampered`` (bytes that do not verify under the key they
name, or unreadable), ``expired``, ``revoked``, ``outside_namespace``,
``unauthorized`` (a scope is missing), ``key_mismatch`` (CPID serial or kind vs the
record's key, a cert stored under another key's kid), ``misfiled`` (a valid document
under another name's key), ``orphan``, ``invalid`` (anything else); ``skipped`` is
a status whose record already failed (counted once, at the record).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import multiprocessing
import os
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Final

import aiohttp

from registry.index import KV, Index, Prefix, parse_key
from schemas import dsse, keys
from schemas.bundle import assemble_chain
from schemas.chain import (
    ChainResult,
    Check,
    PreparedChain,
    TrustAnchors,
    open_signed,
    prepare_chain,
    verify_record_prepared,
)
from schemas.checkpoint import Checkpoint, NoteVerifier, open_checkpoint
from schemas.cpid import ns_contains
from schemas.errors import (
    CheckpointError,
    CPIError,
    EnvelopeError,
    InvalidDataError,
    LogConsistencyError,
    ProofError,
    SignatureError,
)
from schemas.merkle import leaf_hash, verify_consistency, verify_inclusion
from schemas.models import Cert, Revocation, Status, parse_payload

__all__ = [
    "FAILURES",
    "PARALLEL_FROM",
    "BundleResult",
    "Finding",
    "LogAuditor",
    "LogReport",
    "SweepReport",
    "Sweeper",
    "check_transition",
    "classify",
    "verify_bundle",
]

FAILURES: Final = (
    "forged",
    "tampered",
    "expired",
    "revoked",
    "outside_namespace",
    "unauthorized",
    "key_mismatch",
    "misfiled",
    "orphan",
    "invalid",
)


def classify(result: ChainResult) -> str:
    """The sweep outcome of a chain or record verification (see the module doc)."""
    f = result.failure
    if f is None:
        return "valid"
    if f.rule == 3:
        return "expired"
    if f.rule == 4:
        return "revoked"
    if f.rule == 5:
        return "key_mismatch"
    what = f.what
    if what in ("certificate chain present", "chain ends at a configured anchor"):
        return "forged"
    if what.startswith("cert signed by issuer"):
        return "forged"
    if what.startswith("record signed by"):
        return "tampered"
    if what in ("signer's subject contains the CPID prefix", "issuer contains subject"):
        return "outside_namespace"
    if what in ("signer holds scope issue", "issuer holds delegate"):
        return "unauthorized"
    return "invalid"


# =============================================================================
# One bundle
# =============================================================================


@dataclass(frozen=True, slots=True)
class BundleResult:
    """A record bundle's verification: the chain result, then the status checks."""

    chain: ChainResult
    status_checks: tuple[Check, ...] = ()

    @property
    def checks(self) -> tuple[Check, ...]:
        return self.chain.checks + self.status_checks

    @property
    def failure(self) -> Check | None:
        return next((c for c in self.checks if not c.ok), None)

    @property
    def ok(self) -> bool:
        return self.failure is None

    @property
    def reason(self) -> str:
        if not self.chain.ok:
            return self.chain.reason
        f = self.failure
        return "" if f is None else f"status: {f.detail}"

    def to_dict(self) -> dict[str, Any]:
        out = self.chain.to_dict()
        out["ok"] = self.ok
        out["reason"] = self.reason
        if not self.chain.ok:
            out["outcome"] = classify(self.chain)
        else:
            out["outcome"] = "valid" if self.ok else "invalid"
        out["checks"] = [
            {"rule": c.rule, "link": c.link, "what": c.what, "ok": c.ok, "detail": c.detail}
            for c in self.checks
        ]
        return out


def _status_envelope(bundle: Mapping[str, Any]) -> Any:
    """The status envelope of a bundle: ``status`` (or ``live``) when it is an envelope."""
    for name in ("status", "live"):
        value = bundle.get(name)
        if isinstance(value, dict) and "payloadType" in value:
            return value
    return None


def verify_bundle(
    bundle: Mapping[str, Any],
    *,
    anchors: TrustAnchors,
    revocations: Mapping[str, dsse.Envelope] | None = None,
    now: int | None = None,
) -> BundleResult:
    """Verify ``{"record", "chain", "status"?}``: the five rules, then the status.

    The status must verify under the record's ``public_key`` and name the record's
    CPID (status checks are reported with rule 0, link 0).
    """
    if not isinstance(bundle, Mapping) or "record" not in bundle:
        raise EnvelopeError('expected a bundle {"record": <envelope>, "chain": [...]}')
    chain_docs = bundle.get("chain") or []
    if not isinstance(chain_docs, list):
        raise EnvelopeError(f"bundle 'chain' must be a list, got {type(chain_docs).__name__}")
    record = dsse.Envelope.from_dict(bundle["record"])
    certs = [dsse.Envelope.from_dict(c) for c in chain_docs]
    prepared = prepare_chain(certs, anchors=anchors, revocations=revocations, now=now)
    result = verify_record_prepared(record, prepared)
    status_doc = _status_envelope(bundle)
    if status_doc is None or result.record is None:
        return BundleResult(result)
    rec = result.record
    try:
        st = open_signed(
            dsse.Envelope.from_dict(status_doc), public_key=rec.public_key, expected=Status
        )
        checks = [Check(0, 0, "status signed by the record's key", True)]
        checks.append(
            Check(
                0,
                0,
                "status names the record's CPID",
                st.cpid == rec.cpid,
                "" if st.cpid == rec.cpid else f"status is for {st.cpid}, record is {rec.cpid}",
            )
        )
    except InvalidDataError as exc:
        checks = [Check(0, 0, "status signed by the record's key", False, str(exc))]
    return BundleResult(result, tuple(checks))


# =============================================================================
# Sweep
# =============================================================================


@dataclass(frozen=True, slots=True)
class Finding:
    """One failure found by the sweep."""

    kind: str
    key: str
    outcome: str
    detail: str

    def to_dict(self) -> dict[str, str]:
        return {"kind": self.kind, "key": self.key, "outcome": self.outcome, "detail": self.detail}


@dataclass(slots=True)
class SweepReport:
    """Counts by kind and outcome, every failure, and how fast it went."""

    revision: int = 0
    counts: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    failures: list[Finding] = field(default_factory=list)
    records: int = 0
    elapsed: float = 0.0
    record_seconds: float = 0.0
    chains_walked: int = 0
    jobs: int = 1

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def records_per_s(self) -> float:
        return self.records / self.record_seconds if self.record_seconds > 0 else 0.0

    def add(self, kind: str, key: str, outcome: str, detail: str = "") -> None:
        self.counts[kind][outcome] += 1
        if outcome not in ("valid", "skipped"):
            self.failures.append(Finding(kind, key, outcome, detail))

    def by_outcome(self, outcome: str) -> list[Finding]:
        return [f for f in self.failures if f.outcome == outcome]

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "revision": self.revision,
            "counts": {k: dict(sorted(v.items())) for k, v in sorted(self.counts.items())},
            "failures": [f.to_dict() for f in self.failures],
            "records": self.records,
            "chains_walked": self.chains_walked,
            "jobs": self.jobs,
            "elapsed_s": round(self.elapsed, 3),
            "records_per_s": round(self.records_per_s, 1),
        }


PARALLEL_FROM: Final = 5000
"""``jobs=0`` uses worker processes from this many records on."""

Progress = Callable[[str, int, int], None]
"""``progress(phase, done, total)``, called after every page."""


Outcome = tuple[str, str, str, str | None]
"""``(key, outcome, detail, public key of a valid record or None)``."""


class _Checker:
    """Checks records and statuses; one per process (the sweep's, or each worker's).

    Holds the certs, revocations and anchors read before the records, and walks each
    distinct signer's chain once (:func:`schemas.chain.prepare_chain`).
    """

    def __init__(
        self,
        anchors: TrustAnchors,
        certs: Mapping[str, dsse.Envelope],
        revocations: Mapping[str, dsse.Envelope],
        now: int,
    ) -> None:
        self.anchors = anchors
        self.anchor_kids = {a.kid for a in anchors}
        self.certs = certs
        self.revocations = revocations
        self.now = now
        self.prepared: dict[str, PreparedChain] = {}
        self.walked = 0

    def chain_for(self, kid: str) -> PreparedChain:
        """The prepared chain of signer ``kid`` (walked once, then cached)."""
        got = self.prepared.get(kid)
        if got is None:
            chain = assemble_chain(kid, self.certs, anchor_kids=self.anchor_kids)
            got = prepare_chain(
                chain, anchors=self.anchors, revocations=self.revocations, now=self.now
            )
            self.prepared[kid] = got
            self.walked += 1
        return got

    def record(self, key: str, value: bytes) -> Outcome:
        name = parse_key(key).name
        try:
            env = dsse.Envelope.from_json(value)
        except EnvelopeError as exc:
            return key, "tampered", f"unreadable envelope: {exc}", None
        result = verify_record_prepared(env, self.chain_for(env.keyid))
        outcome = classify(result)
        if outcome != "valid":
            return key, outcome, result.reason, None
        assert result.record is not None
        if result.record.cpid != name:
            return (
                key,
                "misfiled",
                f"stored under {name} but is the record of {result.record.cpid}",
                None,
            )
        return key, "valid", "", result.record.public_key

    @staticmethod
    def status(key: str, value: bytes, public_key: str) -> Outcome:
        cpid = parse_key(key).name
        try:
            st = open_signed(dsse.Envelope.from_json(value), public_key=public_key, expected=Status)
        except SignatureError as exc:
            return key, "forged", f"not signed by the record's key: {exc}", None
        except InvalidDataError as exc:
            return key, "tampered", str(exc), None
        if st.cpid != cpid:
            return key, "misfiled", f"stored under {cpid} but is for {st.cpid}", None
        return key, "valid", "", None


_WORKER: _Checker | None = None


def _worker_init(
    anchors: bytes, certs: dict[str, bytes], revocations: dict[str, bytes], now: int
) -> None:
    global _WORKER
    _WORKER = _Checker(
        TrustAnchors.from_json(anchors),
        {k: dsse.Envelope.from_json(v) for k, v in certs.items()},
        {k: dsse.Envelope.from_json(v) for k, v in revocations.items()},
        now,
    )


def _worker_records(items: list[tuple[str, bytes]]) -> tuple[list[Outcome], int]:
    assert _WORKER is not None
    before = _WORKER.walked
    return [_WORKER.record(k, v) for k, v in items], _WORKER.walked - before


def _worker_statuses(items: list[tuple[str, bytes, str]]) -> tuple[list[Outcome], int]:
    return [_Checker.status(k, v, pub) for k, v, pub in items], 0


class Sweeper:
    """Verify everything in the index, reading it in pages at one revision.

    Certs (and revocations) are read first and every distinct chain is walked once;
    records are then checked against those prepared chains as they stream past.
    With ``jobs > 1`` records and statuses are verified in that many worker
    processes (each walks each chain once), while the next pages are being read;
    ``jobs=0`` picks one per CPU when there are at least :data:`PARALLEL_FROM`
    records (starting workers costs about a second), else 1.
    """

    def __init__(
        self,
        index: Index,
        anchors: TrustAnchors,
        *,
        now: int | None = None,
        page_size: int = 1000,
        jobs: int = 1,
        progress: Progress | None = None,
    ) -> None:
        if jobs < 0:
            raise ValueError(f"jobs must be 0 (auto) or more, got {jobs}")
        self._index = index
        self._anchors = anchors
        self._now = int(time.time()) if now is None else now
        self._page = page_size
        self._jobs = jobs
        self._progress = progress
        self._certs: dict[str, dsse.Envelope] = {}
        self._revocations: dict[str, dsse.Envelope] = {}
        self._checker = _Checker(anchors, self._certs, self._revocations, self._now)
        self._pool: ProcessPoolExecutor | None = None
        self._report = SweepReport()

    def _chain_for(self, kid: str) -> PreparedChain:
        return self._checker.chain_for(kid)

    async def _list(self, prefix: str, phase: str) -> AsyncIterator[list[KV]]:
        rev = self._report.revision
        total = await self._index.count_prefix(prefix) if self._progress else 0
        done = 0
        async for page in self._index.iter_prefix(prefix, page_size=self._page, revision=rev):
            if self._report.revision == 0:
                self._report.revision = page.revision
            yield page.kvs
            done += len(page.kvs)
            if self._progress:
                self._progress(phase, done, total)

    def _start_pool(self) -> ProcessPoolExecutor:
        anchors = json.dumps([json.loads(a.to_json()) for a in self._anchors]).encode()
        return ProcessPoolExecutor(
            max_workers=self._jobs,
            # spawn, not fork: the parent holds gRPC threads, which do not survive a fork
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_worker_init,
            initargs=(
                anchors,
                {k: v.to_json() for k, v in self._certs.items()},
                {k: v.to_json() for k, v in self._revocations.items()},
                self._now,
            ),
        )

    async def _verify(
        self,
        pages: AsyncIterator[list[Any]],
        local: Callable[[Any], Outcome],
        remote: Callable[[list[Any]], tuple[list[Outcome], int]],
        take: Callable[[Outcome], None],
    ) -> None:
        """Run ``local`` on every item, or ``remote`` on chunks in the worker pool."""
        if self._pool is None:
            async for items in pages:
                for item in items:
                    take(local(item))
            return
        loop = asyncio.get_running_loop()
        pending: set[asyncio.Future[tuple[list[Outcome], int]]] = set()

        def drain(done: set[asyncio.Future[tuple[list[Outcome], int]]]) -> None:
            for fut in done:
                outcomes, walked = fut.result()
                self._report.chains_walked += walked
                for o in outcomes:
                    take(o)

        chunk = max(50, self._page // self._jobs)
        async for items in pages:
            for i in range(0, len(items), chunk):
                pending.add(loop.run_in_executor(self._pool, remote, items[i : i + chunk]))
            while len(pending) >= 2 * self._jobs:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                drain(done)
        if pending:
            done, _ = await asyncio.wait(pending)
            drain(done)

    async def run(self) -> SweepReport:
        r = self._report
        t0 = time.perf_counter()
        # revocations and certs first: every chain needs them
        async for kvs in self._list(Prefix.REVOKED, "revocations"):
            for kv in kvs:
                try:
                    self._revocations[parse_key(kv.key).name] = dsse.Envelope.from_json(kv.value)
                except (ValueError, EnvelopeError) as exc:
                    r.add("revocation", kv.key, "tampered", f"unreadable envelope: {exc}")
        async for kvs in self._list(Prefix.CERTS, "certs"):
            for kv in kvs:
                try:
                    self._certs[parse_key(kv.key).name] = dsse.Envelope.from_json(kv.value)
                except (ValueError, EnvelopeError) as exc:
                    r.add("cert", kv.key, "tampered", f"unreadable envelope: {exc}")
        valid_certs = self._check_certs()
        self._check_revocations(valid_certs)
        if self._jobs == 0:
            many = await self._index.count_prefix(Prefix.REC) >= PARALLEL_FROM
            self._jobs = (os.cpu_count() or 1) if many else 1
        r.jobs = self._jobs
        if self._jobs > 1:
            self._pool = self._start_pool()
        try:
            record_keys = await self._records()
            await self._statuses(record_keys)
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None
        for prefix, kind in ((Prefix.ALLOC, "alloc"), (Prefix.CLAIM, "claim")):
            async for kvs in self._list(prefix, kind):
                for kv in kvs:
                    parts = parse_key(kv.key).parts
                    if parts[0] in record_keys:
                        r.add(kind, kv.key, "valid")
                    else:
                        r.add(kind, kv.key, "orphan", f"no record at /cpi/v1/rec/{parts[0]}")
        async for kvs in self._list(Prefix.NS, "ns"):
            for kv in kvs:
                self._check_ns(parse_key(kv.key).name, kv.key, kv.value, valid_certs)
        r.elapsed = time.perf_counter() - t0
        return r

    async def _records(self) -> dict[str, str | None]:
        """Verify every record; returns CPID -> public key (None when the record failed)."""
        r = self._report
        record_keys: dict[str, str | None] = {}
        walked = self._checker.walked

        async def pages() -> AsyncIterator[list[tuple[str, bytes]]]:
            async for kvs in self._list(Prefix.REC, "records"):
                yield [(kv.key, kv.value) for kv in kvs]

        def take(o: Outcome) -> None:
            key, outcome, detail, pub = o
            r.records += 1
            record_keys[key[len(Prefix.REC) :]] = pub
            r.add("record", key, outcome, detail)

        t1 = time.perf_counter()
        await self._verify(pages(), lambda kv: self._checker.record(*kv), _worker_records, take)
        r.record_seconds = time.perf_counter() - t1
        r.chains_walked += self._checker.walked - walked
        return record_keys

    async def _statuses(self, record_keys: Mapping[str, str | None]) -> None:
        r = self._report

        async def pages() -> AsyncIterator[list[tuple[str, bytes, str]]]:
            async for kvs in self._list(Prefix.LIVE, "live"):
                items = []
                for kv in kvs:
                    cpid = parse_key(kv.key).name
                    if cpid not in record_keys:
                        r.add("status", kv.key, "orphan", f"no record at /cpi/v1/rec/{cpid}")
                    elif (pub := record_keys[cpid]) is None:
                        r.add("status", kv.key, "skipped")
                    else:
                        items.append((kv.key, kv.value, pub))
                yield items

        def take(o: Outcome) -> None:
            r.add("status", o[0], o[1], o[2])

        await self._verify(pages(), lambda item: _Checker.status(*item), _worker_statuses, take)

    def _check_certs(self) -> dict[str, Cert]:
        """Verify every stored cert; returns the valid ones by kid."""
        valid: dict[str, Cert] = {}
        walked = self._checker.walked
        for kid in sorted(self._certs):
            key = f"{Prefix.CERTS}{kid}"
            prepared = self._chain_for(kid)
            outcome = classify(prepared.result)
            if outcome != "valid":
                self._report.add("cert", key, outcome, prepared.result.reason)
                continue
            cert = prepared.result.certs[0]
            real = keys.kid(keys.b64url_decode(cert.public_key))
            if real != kid:
                self._report.add(
                    "cert",
                    key,
                    "key_mismatch",
                    f"stored under kid {kid} but certifies key {real} (subject {cert.subject})",
                )
                continue
            valid[kid] = cert
            self._report.add("cert", key, "valid")
        self._report.chains_walked += self._checker.walked - walked
        return valid

    def _check_revocations(self, valid_certs: Mapping[str, Cert]) -> None:
        """A revocation must be signed by an anchor or a valid cert's key above its subject."""
        signers: dict[str, tuple[str, Any]] = {}
        for a in self._anchors:
            signers[a.kid] = (a.subject, keys.public_from_b64url(a.public_key))
        for kid, cert in valid_certs.items():
            signers[kid] = (cert.subject, keys.public_from_b64url(cert.public_key))
        for name, env in sorted(self._revocations.items()):
            key = f"{Prefix.REVOKED}{name}"
            entry = signers.get(env.keyid)
            if entry is None:
                self._report.add(
                    "revocation",
                    key,
                    "forged",
                    f"signed by key {env.keyid!r}, which no valid cert or anchor holds",
                )
                continue
            subject, pub = entry
            try:
                v = dsse.verify(env, {env.keyid: pub}, payload_types=(Revocation.media_type(),))
                rev = parse_payload(v.payload_type, v.payload, Revocation)
            except SignatureError as exc:
                self._report.add("revocation", key, "tampered", str(exc))
                continue
            except InvalidDataError as exc:
                self._report.add("revocation", key, "invalid", str(exc))
                continue
            if not ns_contains(subject, rev.subject):
                self._report.add(
                    "revocation",
                    key,
                    "outside_namespace",
                    f"revokes in {rev.subject!r} but is signed by {subject!r}",
                )
            elif rev.target != name:
                self._report.add(
                    "revocation",
                    key,
                    "misfiled",
                    f"stored under {name!r} but revokes {rev.target!r}",
                )
            else:
                self._report.add("revocation", key, "valid")

    def _check_ns(
        self, prefix: str, key: str, value: bytes, valid_certs: Mapping[str, Cert]
    ) -> None:
        try:
            obj = json.loads(value)
            kid = obj["kid"]
        except (ValueError, KeyError, TypeError) as exc:
            self._report.add("ns", key, "invalid", f'not {{"kid", "endpoints"}}: {exc}')
            return
        anchor = self._anchors.get(kid) if isinstance(kid, str) else None
        if anchor is not None and anchor[0].subject == prefix:
            self._report.add("ns", key, "valid")
            return
        cert = valid_certs.get(kid) if isinstance(kid, str) else None
        if cert is None:
            self._report.add("ns", key, "invalid", f"names key {kid!r}, which has no valid cert")
        elif cert.subject != prefix:
            self._report.add("ns", key, "misfiled", f"names key {kid} certified for {cert.subject}")
        else:
            self._report.add("ns", key, "valid")


# =============================================================================
# Transparency log
# =============================================================================


def _hashes(values: Sequence[Any], what: str) -> list[bytes]:
    out = []
    for i, v in enumerate(values):
        try:
            out.append(base64.b64decode(v, validate=True))
        except (ValueError, TypeError) as exc:
            raise ProofError(f"{what} element {i} is not base64: {v!r}") from exc
    return out


def check_transition(old: Checkpoint | None, new: Checkpoint, proof: Sequence[bytes] | None) -> str:
    """Check that ``new`` extends ``old`` (the last checkpoint this auditor accepted).

    Returns a one-line description.  Raises :class:`LogConsistencyError` with kind
    ``rollback`` (a smaller tree), ``split_view`` (another root for the same size, or a
    consistency proof that fails); ``proof`` is the consistency proof from
    ``old.size`` to ``new.size`` (unused when the sizes are equal).
    """
    if old is None:
        return f"first checkpoint seen: size {new.size} (trust on first use)"
    if new.origin != old.origin:
        raise CheckpointError(f"checkpoint origin is {new.origin!r}, the stored one {old.origin!r}")
    if new.size < old.size:
        raise LogConsistencyError(
            f"ROLLBACK: the log shows tree size {new.size}, but size {old.size} (root "
            f"{old.root_hash.hex()}) was already seen",
            kind="rollback",
        )
    if new.size == old.size:
        if new.root_hash != old.root_hash:
            raise LogConsistencyError(
                f"SPLIT VIEW: two signed roots for tree size {new.size}: {old.root_hash.hex()} "
                f"(stored) and {new.root_hash.hex()} (now)",
                kind="split_view",
            )
        return f"unchanged at size {new.size}"
    try:
        verify_consistency(
            first=old.size,
            second=new.size,
            first_root=old.root_hash,
            second_root=new.root_hash,
            proof=list(proof or []),
        )
    except ProofError as exc:
        raise LogConsistencyError(
            f"SPLIT VIEW: the checkpoint at size {new.size} is not consistent with the stored "
            f"one at size {old.size}: {exc}",
            kind="split_view",
        ) from exc
    return f"consistent: size {old.size} -> {new.size}"


@dataclass(slots=True)
class LogReport:
    """What ``cpi audit log`` checked, in order."""

    checks: list[tuple[str, bool, str]] = field(default_factory=list)
    checkpoint: Checkpoint | None = None
    alarm: str | None = None
    """``rollback`` or ``split_view`` when the log contradicted the stored checkpoint."""

    @property
    def ok(self) -> bool:
        return all(ok for _, ok, _ in self.checks)

    def add(self, what: str, ok: bool, detail: str = "") -> None:
        self.checks.append((what, ok, detail))

    def to_dict(self) -> dict[str, Any]:
        cp = self.checkpoint
        return {
            "ok": self.ok,
            "alarm": self.alarm,
            "checkpoint": None
            if cp is None
            else {
                "origin": cp.origin,
                "size": cp.size,
                "root": cp.root_hash.hex(),
                "timestamp": cp.timestamp,
            },
            "checks": [{"what": w, "ok": ok, "detail": d} for w, ok, d in self.checks],
        }


class LogAuditor:
    """Checks a resolver's view of the log against the last checkpoint stored locally.

    ``state`` is the stored checkpoint note (or ``None`` the first time); after a
    successful :meth:`check`, :attr:`new_state` holds the note to store.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        base_url: str,
        verifier: NoteVerifier,
        *,
        state: bytes | None = None,
    ) -> None:
        self._http = session
        self._base = base_url.rstrip("/")
        self._verifier = verifier
        self._state = state
        self.new_state: bytes | None = None

    async def _get(self, path: str, params: Mapping[str, Any] | None = None) -> tuple[int, bytes]:
        async with self._http.get(self._base + path, params=params) as resp:
            return resp.status, await resp.read()

    async def _json(self, path: str, params: Mapping[str, Any] | None = None) -> Any:
        status, body = await self._get(path, params)
        try:
            doc = json.loads(body)
        except ValueError:
            doc = None
        if status != 200:
            msg = (
                doc.get("error", {}).get("message")
                if isinstance(doc, dict)
                else body[:200].decode("utf-8", "replace")
            )
            raise _HTTPError(f"GET {path} answered {status}: {msg}")
        return doc

    async def check(
        self,
        *,
        cpid: str | None = None,
        version: int | None = None,
        report: LogReport | None = None,
    ) -> LogReport:
        rep = report or LogReport()
        status, note = await self._get("/v1/log/checkpoint")
        if status != 200:
            rep.add("fetch the latest checkpoint", False, f"answered {status}: {note[:200]!r}")
            return rep
        try:
            new = open_checkpoint(note, self._verifier, origin=self._verifier.name)
        except (CheckpointError, SignatureError) as exc:
            rep.add("checkpoint signed by the log key", False, str(exc))
            return rep
        rep.checkpoint = new
        rep.add(
            "checkpoint signed by the log key",
            True,
            f"{new.origin} size {new.size} root {new.root_hash.hex()[:16]}...",
        )
        old: Checkpoint | None = None
        if self._state is not None:
            old = open_checkpoint(self._state, self._verifier, origin=self._verifier.name)
        proof: list[bytes] | None = None
        try:
            if old is not None and 0 < old.size < new.size:
                doc = await self._json(
                    "/v1/log/proof/consistency", {"first": old.size, "second": new.size}
                )
                proof = _hashes(doc.get("proof", []), "consistency proof")
            detail = check_transition(old, new, proof)
            rep.add("consistent with the stored checkpoint", True, detail)
        except LogConsistencyError as exc:
            rep.alarm = exc.kind
            rep.add("consistent with the stored checkpoint", False, str(exc))
            return rep
        except (_HTTPError, ProofError) as exc:
            rep.add("consistent with the stored checkpoint", False, str(exc))
            return rep
        self.new_state = note
        if cpid is not None:
            await self._inclusion(rep, new, cpid, version)
        return rep

    async def _inclusion(
        self, rep: LogReport, cp: Checkpoint, cpid: str, version: int | None
    ) -> None:
        what = f"record {cpid}" + (f" version {version}" if version is not None else "")
        digest: str | None = None
        try:
            bundle = await self._json(f"/v1/resources/{cpid}")
            env = dsse.Envelope.from_dict(bundle["record"])
            rec = json.loads(env.payload)
            if version is None or rec.get("version") == version:
                digest = hashlib.sha256(env.to_json()).hexdigest()
                version = rec.get("version")
        except (_HTTPError, CPIError, KeyError, TypeError, ValueError) as exc:
            if version is None:
                rep.add(f"fetch {what}", False, str(exc))
                return
        params: dict[str, Any] = {"cpid": cpid, "tree_size": cp.size}
        if digest is not None:
            params["digest"] = digest
        else:
            params["version"] = version
        try:
            doc = await self._json("/v1/log/proof/inclusion", params)
            leaf = base64.b64decode(doc["leaf"], validate=True)
            index, size = int(doc["leaf_index"]), int(doc["tree_size"])
            proof = _hashes(doc["proof"], "inclusion proof")
        except (_HTTPError, KeyError, TypeError, ValueError) as exc:
            rep.add(f"inclusion of {what}", False, str(exc))
            return
        try:
            entry = json.loads(leaf)
        except ValueError:
            entry = {}
        problems = []
        if size != cp.size:
            problems.append(f"proof is for tree size {size}, the checkpoint's is {cp.size}")
        if entry.get("cpid") != cpid:
            problems.append(f"leaf names {entry.get('cpid')!r}, expected {cpid}")
        if digest is not None and entry.get("digest") != digest:
            problems.append(f"leaf digest {entry.get('digest')!r}, the record's is {digest}")
        if problems:
            rep.add(f"inclusion of {what}", False, "; ".join(problems))
            return
        try:
            verify_inclusion(
                leaf=leaf_hash(leaf), index=index, tree_size=cp.size, proof=proof, root=cp.root_hash
            )
        except ProofError as exc:
            rep.add(f"inclusion of {what}", False, str(exc))
            return
        how = "its envelope digest matches" if digest is not None else "by version only"
        rep.add(
            f"inclusion of {what}",
            True,
            f"leaf {index} ({entry.get('op')}) of {cp.size}; {how}",
        )


class _HTTPError(Exception):
    pass
