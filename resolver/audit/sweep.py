"""The auditor's sweep: every key of the index verified, reading it in pages at one revision.

Trusts nothing but the anchors.  Every cert, record, status, revocation and ``/ns/``
entry is verified; ``/live/``, ``/alloc/`` and ``/claim/`` keys without a record are
reported as orphans.  Records and statuses are verified by the resolver's own
verification jobs and worker pool (:mod:`resolver.verify`): each distinct cert chain
is walked once per process (:func:`schemas.chain.prepare_chain`), so a record costs one
Ed25519 verification and one payload parse.

Outcomes (``SweepReport.counts[kind][outcome]``): ``valid``, the failures of
:data:`resolver.audit.bundle.FAILURES`, and ``skipped`` for a status whose record
already failed (counted once, at the record).

The index is not trusted input: a value that cannot be read (not JSON, nested deeper
than 16 levels, not a DSSE envelope, the wrong shape), or whose checking raises, is
an ``unreadable`` finding for that key alone; the sweep goes on with the others.
"""

from __future__ import annotations

import collections
import os
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from registry.index import KV, Index, Prefix, parse_key, read_units
from resolver.audit.bundle import classify, classify_check
from resolver.state import claim_problem, describe_bad_value
from resolver.verify import (
    NO_CHAIN,
    NO_ENVELOPE,
    UNVERIFIABLE,
    Context,
    Job,
    Outcome,
    RecordFacts,
    StatusFacts,
    Verifier,
    run_jobs,
)
from schemas import _json, dsse, keys
from schemas.bundle import assemble_chain
from schemas.chain import PreparedChain, TrustAnchors, prepare_chain
from schemas.cpid import ns_contains
from schemas.errors import EnvelopeError, InvalidDataError, SignatureError
from schemas.models import Cert, Revocation, parse_payload

__all__ = ["PARALLEL_FROM", "UNREADABLE", "Finding", "Progress", "SweepReport", "Sweeper"]

UNREADABLE: Final = "unreadable"
"""The outcome of a key whose value cannot be read (or whose checking raised)."""
_DETAIL_MAX: Final = 300


def _describe(exc: BaseException) -> str:
    return describe_bad_value(exc, _DETAIL_MAX)


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
    warnings: list[Finding] = field(default_factory=list)
    """``leftover`` keys: harmless remains of normal operation, not failures."""
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
        if len(detail) > _DETAIL_MAX:
            detail = detail[: _DETAIL_MAX - 3] + "..."
        self.counts[kind][outcome] += 1
        if outcome in WARNINGS:
            self.warnings.append(Finding(kind, key, outcome, detail))
        elif outcome not in ("valid", "skipped"):
            self.failures.append(Finding(kind, key, outcome, detail))

    def by_outcome(self, outcome: str) -> list[Finding]:
        return [f for f in self.failures if f.outcome == outcome]

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "revision": self.revision,
            "counts": {k: dict(sorted(v.items())) for k, v in sorted(self.counts.items())},
            "failures": [f.to_dict() for f in self.failures],
            "warnings": [f.to_dict() for f in self.warnings],
            "records": self.records,
            "chains_walked": self.chains_walked,
            "jobs": self.jobs,
            "elapsed_s": round(self.elapsed, 3),
            "records_per_s": round(self.records_per_s, 1),
        }


WARNINGS: Final = frozenset({"leftover"})
"""Outcomes reported but not failures: ``leftover``, an ``/alloc/`` without a record that
claims nothing (``{"units": 0}``), which a release before a deregistration leaves until
the claims reconciler removes it."""

PARALLEL_FROM: Final = 5000
"""``jobs=0`` uses worker processes from this many records on."""

Progress = Callable[[str, int, int], None]
"""``progress(phase, done, total)``, called after every page."""


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
        self._prepared: dict[str, PreparedChain] = {}
        """Chains walked in this process, by signer kid (shared with inline jobs)."""
        self._ctx: Context | None = None
        self._verifier = Verifier(workers=0)
        self._report = SweepReport()

    def _context(self) -> Context:
        """What records and statuses are verified against, once certs and revocations are read."""
        if self._ctx is None:
            anchor_kids = {a.kid for a in self._anchors}
            chains = {
                kid: tuple(assemble_chain(kid, self._certs, anchor_kids=anchor_kids))
                for kid in self._certs
            }
            self._ctx = Context(
                anchors=tuple(self._anchors),
                chains=chains,
                revocations=dict(self._revocations),
                now=self._now,
            )
        return self._ctx

    def _chain_for(self, kid: str) -> PreparedChain:
        """The prepared chain of signer ``kid`` (walked once, then cached)."""
        got = self._prepared.get(kid)
        if got is None:
            ctx = self._context()
            got = self._prepared[kid] = prepare_chain(
                ctx.chains.get(kid, ()),
                anchors=self._anchors,
                revocations=ctx.revocations,
                now=ctx.now,
                skew=ctx.skew,
            )
        return got

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

    async def run(self) -> SweepReport:
        r = self._report
        t0 = time.perf_counter()
        # revocations and certs first: every chain needs them
        async for kvs in self._list(Prefix.REVOKED, "revocations"):
            for kv in kvs:
                try:
                    self._revocations[parse_key(kv.key).name] = dsse.Envelope.from_json(kv.value)
                except Exception as exc:
                    r.add(
                        "revocation", kv.key, UNREADABLE, f"unreadable envelope: {_describe(exc)}"
                    )
        async for kvs in self._list(Prefix.CERTS, "certs"):
            for kv in kvs:
                try:
                    self._certs[parse_key(kv.key).name] = dsse.Envelope.from_json(kv.value)
                except Exception as exc:
                    r.add("cert", kv.key, UNREADABLE, f"unreadable envelope: {_describe(exc)}")
        valid_certs = self._check_certs()
        self._check_revocations(valid_certs)
        if self._jobs == 0:
            many = await self._index.count_prefix(Prefix.REC) >= PARALLEL_FROM
            self._jobs = (os.cpu_count() or 1) if many else 1
        r.jobs = self._jobs
        self._verifier = Verifier(workers=self._jobs)
        try:
            record_keys = await self._records()
            await self._statuses(record_keys)
        finally:
            await self._verifier.close()
        r.chains_walked = len(self._prepared) + self._verifier.chains_walked_pool
        for prefix, kind in ((Prefix.ALLOC, "alloc"), (Prefix.CLAIM, "claim")):
            async for kvs in self._list(prefix, kind):
                for kv in kvs:
                    try:
                        problem = self._unreadable(prefix, kv.value)
                        cpid = parse_key(kv.key).parts[0]
                    except Exception as exc:
                        problem = _describe(exc)
                    if problem:
                        r.add(kind, kv.key, UNREADABLE, problem)
                    elif cpid in record_keys:
                        r.add(kind, kv.key, "valid")
                    elif kind == "alloc" and _claims_nothing(kv.value):
                        r.add(
                            kind,
                            kv.key,
                            "leftover",
                            f"0 units; no record at /cpi/v1/rec/{cpid}",
                        )
                    else:
                        r.add(kind, kv.key, "orphan", f"no record at /cpi/v1/rec/{cpid}")
        async for kvs in self._list(Prefix.NS, "ns"):
            for kv in kvs:
                try:
                    self._check_ns(parse_key(kv.key).name, kv.key, kv.value, valid_certs)
                except Exception as exc:
                    r.add("ns", kv.key, UNREADABLE, _describe(exc))
        r.elapsed = time.perf_counter() - t0
        return r

    @staticmethod
    def _unreadable(prefix: Prefix, value: bytes) -> str:
        """Why an ``/alloc/`` or ``/claim/`` value cannot be read, or ''."""
        if prefix is Prefix.CLAIM:
            return claim_problem(value)
        _json.loads(value)  # bounded nesting first: read_units uses the stdlib parser
        read_units(value)
        return ""

    async def _stream(
        self, pages: AsyncIterator[list[tuple[str, Job]]]
    ) -> AsyncIterator[tuple[str, Outcome]]:
        """``(key, outcome)`` for every ``(key, job)`` of ``pages``, in order, verified
        inline or on the worker pool while the next pages are read."""
        keys_in_flight: collections.deque[str] = collections.deque()

        async def jobs() -> AsyncIterator[list[Job]]:
            async for items in pages:
                keys_in_flight.extend(key for key, _ in items)
                yield [job for _, job in items]

        chunk = max(50, self._page // max(1, self._jobs))
        async for outcomes in self._verifier.stream(
            self._context(), jobs(), chunk=chunk, prepared=self._prepared
        ):
            for o in outcomes:
                yield keys_in_flight.popleft(), o

    def _record_outcome(self, key: str, o: Outcome) -> tuple[str, str, str | None]:
        """``(outcome, detail, public key of a valid record or None)`` of a record job."""
        try:
            return self._record_verdict(key, o)
        except Exception as exc:
            return UNREADABLE, _describe(exc), None

    def _record_verdict(self, key: str, o: Outcome) -> tuple[str, str, str | None]:
        name = parse_key(key).name
        if o.what == NO_CHAIN:
            # signed by a key with no stored cert: verify it against its (empty) chain here
            assert o.envelope is not None
            env = o.envelope if isinstance(o.envelope, dsse.Envelope) else o.envelope.envelope()
            job: Job = ("record", env.keyid, env, None)
            o = run_jobs(self._context(), [job], keep_documents=False, prepared=self._prepared)[0]
        if o.what == NO_ENVELOPE:
            return UNREADABLE, f"unreadable envelope: {o.message}", None
        if o.what == UNVERIFIABLE:
            return UNREADABLE, o.message, None
        if not o.ok:
            return classify_check(o.rule, o.what), o.message, None
        facts = o.facts
        assert isinstance(facts, RecordFacts)
        if facts.cpid != name:
            return "misfiled", f"stored under {name} but is the record of {facts.cpid}", None
        return "valid", "", facts.public_key

    @staticmethod
    def _status_outcome(key: str, o: Outcome) -> tuple[str, str]:
        """``(outcome, detail)`` of a status job."""
        cpid = parse_key(key).name
        if not o.ok and o.what in (EnvelopeError.code, UNVERIFIABLE):
            return UNREADABLE, o.message
        if not o.ok:
            if o.what == SignatureError.code:
                return "forged", f"not signed by the record's key: {o.message}"
            return "tampered", o.message
        facts = o.facts
        assert isinstance(facts, StatusFacts)
        if facts.cpid != cpid:
            return "misfiled", f"stored under {cpid} but is for {facts.cpid}"
        return "valid", ""

    async def _records(self) -> dict[str, str | None]:
        """Verify every record; returns CPID -> public key (None when the record failed)."""
        r = self._report
        record_keys: dict[str, str | None] = {}

        async def pages() -> AsyncIterator[list[tuple[str, Job]]]:
            async for kvs in self._list(Prefix.REC, "records"):
                yield [(kv.key, ("raw", kv.value, None)) for kv in kvs]

        t1 = time.perf_counter()
        async for key, o in self._stream(pages()):
            outcome, detail, pub = self._record_outcome(key, o)
            r.records += 1
            record_keys[key[len(Prefix.REC) :]] = pub
            r.add("record", key, outcome, detail)
        r.record_seconds = time.perf_counter() - t1
        return record_keys

    async def _statuses(self, record_keys: Mapping[str, str | None]) -> None:
        r = self._report

        async def pages() -> AsyncIterator[list[tuple[str, Job]]]:
            async for kvs in self._list(Prefix.LIVE, "live"):
                items: list[tuple[str, Job]] = []
                for kv in kvs:
                    try:
                        cpid = parse_key(kv.key).name
                    except ValueError as exc:
                        r.add("status", kv.key, UNREADABLE, _describe(exc))
                        continue
                    if cpid not in record_keys:
                        r.add("status", kv.key, "orphan", f"no record at /cpi/v1/rec/{cpid}")
                    elif (pub := record_keys[cpid]) is None:
                        r.add("status", kv.key, "skipped")
                    else:
                        items.append((kv.key, ("status", pub, kv.value)))
                yield items

        async for key, o in self._stream(pages()):
            outcome, detail = self._status_outcome(key, o)
            r.add("status", key, outcome, detail)

    def _check_certs(self) -> dict[str, Cert]:
        """Verify every stored cert; returns the valid ones by kid."""
        valid: dict[str, Cert] = {}
        for kid in sorted(self._certs):
            key = f"{Prefix.CERTS}{kid}"
            try:
                prepared = self._chain_for(kid)
            except Exception as exc:  # a hostile cert in the chain: this key alone
                self._report.add("cert", key, UNREADABLE, _describe(exc))
                continue
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
            except Exception as exc:  # whatever a hostile value raises: this key alone
                self._report.add("revocation", key, UNREADABLE, _describe(exc))
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
            obj = _json.loads(value)
        except ValueError as exc:
            self._report.add("ns", key, UNREADABLE, _describe(exc))
            return
        if not isinstance(obj, dict) or "kid" not in obj:
            self._report.add(
                "ns", key, UNREADABLE, f'not {{"kid", "endpoints"}}: a {type(obj).__name__}'
            )
            return
        kid = obj["kid"]
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


def _claims_nothing(value: bytes) -> bool:
    """An ``/alloc/`` value that reads as 0 units (a leftover, not a forgery)."""
    try:
        return read_units(value) == 0
    except InvalidDataError:
        return False
