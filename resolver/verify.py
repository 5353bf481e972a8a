"""Verification jobs, run inline or in worker processes: the replica's and the auditor's.

Every record is decided by the contract's own verifier:
:func:`schemas.chain.verify_record_prepared` (all five rules) against the chain of its
signing key, walked once per batch with :func:`schemas.chain.prepare_chain`; every
status by :func:`schemas.chain.open_signed` under its record's key.  That is about
0.15 ms per record, most of it Ed25519 verification, which holds the GIL.  At start-up
(and after a re-list) there is a job per record in the index, so large batches go to a
small process pool (``spawn``: safe beside gRPC's threads) in chunks whose results are
handed back one by one, so the main process files chunk *n* while the workers verify
chunk *n+1*; small batches (a watch event) run inline.

A record job may carry the record's status envelope: the worker verifies the status
under the key of the record it has just verified, which saves a second round.

What comes back is compact: whether it verified (or the first failed check and the
verifier's message) and the few :class:`RecordFacts` / :class:`StatusFacts` the
replica indexes.  Full pydantic models are only returned by inline runs; for the rest
the entry parses its (verified) payload the first time someone asks for the model.

The auditor's sweep (:mod:`resolver.audit.sweep`) uses the same jobs, outcomes and
pool: :meth:`Verifier.stream` verifies pages as they are read from the index.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import functools
import logging
import math
import multiprocessing
import os
import secrets
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, Literal, NamedTuple

from resolver.sealed import Sealed, seal
from schemas.chain import (
    CLOCK_SKEW,
    PreparedChain,
    TrustAnchors,
    open_signed,
    prepare_chain,
    verify_record_prepared,
)
from schemas.dsse import Envelope
from schemas.errors import EnvelopeError, InvalidDataError
from schemas.models import Anchor, Record, Status

__all__ = [
    "NO_CHAIN",
    "NO_ENVELOPE",
    "UNVERIFIABLE",
    "Context",
    "Job",
    "Outcome",
    "RecordFacts",
    "StatusFacts",
    "Verifier",
    "run_jobs",
]

_log = logging.getLogger("resolver.replica")

POOL_MIN_JOBS: Final = 2000
"""Batches smaller than this run inline (no process start-up, no pickling)."""
CHUNK: Final = 1000


class RecordFacts(NamedTuple):
    """What the replica indexes about a verified record.

    A named tuple (immutable and hashable like a frozen dataclass, built in a quarter of
    its time: a warm start makes one per record, a cold start unpickles one per record
    from the verification workers)."""

    cpid: str
    kind: str
    public_key: str
    version: int
    expires_at: int
    region: str
    accelerators: tuple[str, ...]  # models, case-folded
    labels: tuple[tuple[str, str], ...]
    canonical: bool = False
    """The payload is exactly what pydantic writes for the record it holds
    (``model_dump_json(exclude_none=True)``, as this project's registries sign it): an
    answer can show the verified bytes as they are (:meth:`Entry.record_text`)."""

    @classmethod
    def of(cls, rec: Record, payload: bytes | None = None) -> RecordFacts:
        """The facts of ``rec``; ``payload``: the bytes it was read from, to tell whether
        they are :attr:`canonical` (about 5 µs, once per record version verified)."""
        return cls(
            rec.cpid,
            rec.kind,
            rec.public_key,
            rec.version,
            rec.expires_at,
            rec.location.region,
            tuple(sorted({a.model.casefold() for a in rec.attributes.accelerators})),
            tuple(sorted(rec.labels.items())),
            payload is not None and rec.model_dump_json(exclude_none=True).encode() == payload,
        )


class StatusFacts(NamedTuple):
    """What the replica needs from a verified status.  ``cpid`` is the CPID the status
    names; once the replica has checked it against the live key it files the facts with
    ``cpid=""``, one object shared among equal facts."""

    cpid: str
    state: str
    accelerators_free: int
    cpu_free: int | None
    withheld: int = 0
    """Units the node already left out of its free capacity for claims (its
    ``claimed_units`` metric); discovery adds them back before subtracting ``/alloc/``."""

    @classmethod
    def of(cls, st: Status) -> StatusFacts:
        withheld = st.metrics.get("claimed_units", 0)
        return cls(
            st.cpid,
            st.state,
            st.capacity.accelerators_free,
            st.capacity.cpu_free,
            int(withheld) if math.isfinite(withheld) and withheld > 0 else 0,
        )


Job = (
    tuple[Literal["record"], str, Envelope, Envelope | bytes | None]
    | tuple[Literal["raw"], bytes, Envelope | bytes | None]
    | tuple[Literal["status"], str, Envelope | bytes]
)
"""``("record", signer_kid, envelope, status_or_None)``,
``("raw", record_value_as_stored, status_or_None)`` or
``("status", record_public_key, status)``, a status being its envelope or its value as
stored (bytes: the job parses it, and the status's :attr:`Outcome.envelope` hands the
envelope back; it is None when the value is not one, ``what`` then the
:class:`~schemas.errors.EnvelopeError` code).

A ``raw`` job is a record the replica has not parsed: the job parses the envelope
(:attr:`Outcome.envelope` hands it back), finds the chain of its signing key in
:attr:`Context.chains` (which then holds every signer whose chain verifies) and goes on
as a ``record`` job.  Bulk loads send these, so that parsing is spread over the workers
too and the main process hands out work at once."""

NO_ENVELOPE: Final = "not_an_envelope"
"""``Outcome.what`` of a raw job whose value is not a DSSE envelope (``message`` says why)."""
UNVERIFIABLE: Final = "unverifiable"
"""``Outcome.what`` of a job whose verification raised (a hostile value): it fails alone,
``message`` says what was raised."""
NO_CHAIN: Final = "no_verified_chain"
"""``Outcome.what`` of a raw job whose signing key has no chain in the context: the
caller decides it from its own verdict on that key."""


@dataclass(frozen=True, slots=True)
class Context:
    """Everything a batch of jobs is verified against.

    ``token`` names this context: a worker process keeps the chains it prepared for
    the chunks of one batch (one context) and walks each chain once per batch, not
    once per chunk.  A new context (a new batch) gets a new token.
    """

    anchors: tuple[Anchor, ...]
    chains: Mapping[str, tuple[Envelope, ...]]
    revocations: Mapping[str, Envelope]
    now: int
    skew: int = CLOCK_SKEW
    token: bytes = field(default_factory=lambda: secrets.token_bytes(16), compare=False)


@dataclass(frozen=True, slots=True)
class Outcome:
    """The verdict on one job.

    For a failure: the first failed check of the contract's verifier (for a status:
    ``rule`` 0 and the error's code as ``what``) and its full message.  For a success:
    the facts, and the parsed model when the job ran inline.  ``status`` is the outcome
    of the status carried by a record job (None if there was none, or the record failed).
    ``envelope`` is the parsed envelope of a ``raw`` job (None for other jobs, and when
    the value is not an envelope: ``what`` is then :data:`NO_ENVELOPE`).
    """

    ok: bool
    rule: int = 0
    what: str = ""
    detail: str = ""
    message: str = ""
    facts: RecordFacts | StatusFacts | None = None
    document: Record | Status | None = field(default=None, compare=False)
    status: Outcome | None = None
    envelope: Envelope | Sealed | None = None
    """Sealed (:mod:`resolver.sealed`) when the job ran in a worker process."""

    def __reduce__(self) -> tuple[type[Outcome], tuple[object, ...]]:
        return Outcome, (
            self.ok,
            self.rule,
            self.what,
            self.detail,
            self.message,
            self.facts,
            self.document,
            self.status,
            self.envelope,
        )


def _status(env: Envelope, public_key: str, keep: bool) -> Outcome:
    try:
        st = open_signed(env, public_key=public_key, expected=Status, key_registered=True)
    except InvalidDataError as exc:
        return Outcome(False, 0, exc.code, str(exc), str(exc))
    except Exception as exc:  # a hostile status costs itself alone
        message = f"cannot verify: {type(exc).__name__}: {str(exc)[:200]}"
        return Outcome(False, 0, UNVERIFIABLE, message, message)
    return Outcome(True, facts=StatusFacts.of(st), document=st if keep else None)


def _status_job(stored: Envelope | bytes, public_key: str, keep: bool) -> Outcome:
    """A status job: parse ``stored`` if it is a value (handing the envelope back), verify."""
    if not isinstance(stored, bytes):
        return _status(stored, public_key, keep)
    try:
        env = Envelope.from_json(stored)
    except EnvelopeError as exc:
        return Outcome(False, 0, exc.code, str(exc), str(exc))
    except Exception as exc:  # whatever a hostile value causes: itself alone
        message = f"cannot parse: {type(exc).__name__}: {str(exc)[:200]}"
        return Outcome(False, 0, UNVERIFIABLE, message, message)
    out = _status(env, public_key, keep)
    return Outcome(
        out.ok, out.rule, out.what, out.detail, out.message, out.facts, out.document, None, env
    )


def run_jobs(
    ctx: Context,
    jobs: Sequence[Job],
    *,
    keep_documents: bool = True,
    prepared: dict[str, PreparedChain] | None = None,
) -> list[Outcome]:
    """Verify every job; the chain of each signing key is walked once per call (or once
    per ``prepared``: chains already walked against ``ctx``, filled in as needed)."""
    anchors = TrustAnchors(ctx.anchors)
    if prepared is None:
        prepared = {}
    out: list[Outcome] = []
    for job in jobs:
        try:
            out.append(_run_job(ctx, job, anchors, prepared, keep_documents))
        except Exception as exc:  # a hostile value costs its job alone
            message = f"cannot verify: {type(exc).__name__}: {str(exc)[:200]}"
            _log.debug("job failed: %s", message, exc_info=True)
            what = NO_ENVELOPE if job[0] == "raw" else UNVERIFIABLE
            out.append(Outcome(False, 0, what, message, message))
    return out


def _run_job(
    ctx: Context,
    job: Job,
    anchors: TrustAnchors,
    prepared: dict[str, PreparedChain],
    keep_documents: bool,
) -> Outcome:
    """One job of :func:`run_jobs` (which contains what it raises)."""
    if job[0] == "status":
        _, public_key, stored = job
        return _status_job(stored, public_key, keep_documents)
    parsed: Envelope | None = None
    if job[0] == "raw":
        _, value, status_env = job
        try:
            env = parsed = Envelope.from_json(value)
        except EnvelopeError as exc:
            return Outcome(False, 0, NO_ENVELOPE, str(exc), str(exc))
        kid = env.keyid
        if kid not in ctx.chains:
            return Outcome(False, 0, NO_CHAIN, envelope=env)
    else:
        _, kid, env, status_env = job
    chain = prepared.get(kid)
    if chain is None:
        chain = prepared[kid] = prepare_chain(
            ctx.chains.get(kid, ()),
            anchors=anchors,
            revocations=ctx.revocations,
            now=ctx.now,
            skew=ctx.skew,
        )
    result = verify_record_prepared(env, chain, checks=False)
    f = result.failure
    if f is not None:
        return Outcome(False, f.rule, f.what, f.detail, result.reason, envelope=parsed)
    rec = result.record
    assert rec is not None
    status = None if status_env is None else _status_job(status_env, rec.public_key, keep_documents)
    return Outcome(
        True,
        facts=RecordFacts.of(rec, env.payload),
        document=rec if keep_documents else None,
        status=status,
        envelope=parsed,
    )


_prepared: tuple[bytes, dict[str, PreparedChain]] = (b"", {})
"""In a worker process: the chains prepared for the context (token) of the last chunk."""


def _worker_run(ctx: Context, jobs: list[Job]) -> tuple[list[Outcome], int]:
    """Run ``jobs`` in a worker; also says how many chains it walked for them."""
    global _prepared
    if _prepared[0] != ctx.token:
        _prepared = (ctx.token, {})
    before = len(_prepared[1])
    out = [_sealed(o) for o in run_jobs(ctx, jobs, keep_documents=False, prepared=_prepared[1])]
    return out, len(_prepared[1]) - before


def _sealed(o: Outcome) -> Outcome:
    """``o`` with its envelopes sealed: the replica keeps them that way, and receiving
    one bytes object per envelope instead of four objects leaves its heap less torn."""
    status = o.status
    if status is not None and isinstance(status.envelope, Envelope):
        status = dataclasses.replace(status, envelope=seal(status.envelope))
    if isinstance(o.envelope, Envelope):
        return dataclasses.replace(o, envelope=seal(o.envelope), status=status)
    if status is not o.status:
        return dataclasses.replace(o, status=status)
    return o


def _warm() -> int:
    return os.getpid()


def _ignore(fut: asyncio.Future[list[int]]) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        _log.debug("verification worker warm-up failed: %s", fut.exception())


class Verifier:
    """Runs job batches inline, or on a process pool when they are large.

    ``workers``: pool size (``None``: the number of CPUs; 0 or 1: never use a pool).
    The pool starts on the first large batch, or ahead of time with :meth:`prepare`.
    """

    def __init__(self, *, workers: int | None = None, pool_min_jobs: int = POOL_MIN_JOBS) -> None:
        n = (os.cpu_count() or 1) if workers is None else workers
        self.workers = n if n > 1 else 0
        self.pool_min_jobs = pool_min_jobs
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None
        self._warming: asyncio.Future[list[int]] | None = None
        self.checked_inline = 0
        self.checked_pool = 0
        self.chains_walked_pool = 0
        """Chains walked in the worker processes (each worker walks a chain once per context)."""

    def prepare(self) -> None:
        """Start the worker processes in the background (no-op without workers)."""
        if self.workers == 0 or self._pool is not None:
            return
        ctx = multiprocessing.get_context("spawn")
        self._pool = concurrent.futures.ProcessPoolExecutor(self.workers, mp_context=ctx)
        loop = asyncio.get_running_loop()
        self._warming = asyncio.gather(
            *(loop.run_in_executor(self._pool, _warm) for _ in range(self.workers))
        )
        self._warming.add_done_callback(_ignore)

    def uses_pool(self, n: int) -> bool:
        return self.workers > 0 and n >= self.pool_min_jobs

    async def run(
        self, ctx: Context, jobs: Sequence[Job], *, any_size: bool = False
    ) -> AsyncIterator[list[Outcome]]:
        """Verify every job; yields outcome lists that, concatenated, follow the jobs.

        Small batches run inline (one list); large ones (any, with ``any_size``, when
        there are workers) in chunks on the pool, each yielded as soon as it and the
        chunks before it are done.
        """
        if not (self.uses_pool(len(jobs)) or (any_size and self.workers > 0 and jobs)):
            self.checked_inline += len(jobs)
            yield run_jobs(ctx, jobs)
            return
        self.prepare()
        assert self._pool is not None
        loop = asyncio.get_running_loop()
        pool = self._pool
        futures = [
            loop.run_in_executor(pool, _worker_run, ctx, list(jobs[i : i + CHUNK]))
            for i in range(0, len(jobs), CHUNK)
        ]
        try:
            for i, fut in enumerate(futures):
                try:
                    part, walked = await fut
                except concurrent.futures.process.BrokenProcessPool:
                    _log.warning("verification worker pool broke; verifying the rest inline")
                    self._pool = None
                    rest = jobs[i * CHUNK :]
                    self.checked_inline += len(rest)
                    yield run_jobs(ctx, rest)
                    return
                self.checked_pool += len(part)
                self.chains_walked_pool += walked
                yield part
        finally:
            for fut in futures:
                fut.cancel()

    async def stream(
        self,
        ctx: Context,
        batches: AsyncIterator[Sequence[Job]],
        *,
        chunk: int = CHUNK,
        prepared: dict[str, PreparedChain] | None = None,
    ) -> AsyncIterator[list[Outcome]]:
        """Verify batches as they arrive (pages of a listing); yields outcome lists that,
        concatenated, follow the jobs of all batches.

        Without workers every batch runs inline against ``prepared`` (chains already
        walked against ``ctx``, filled in as needed).  With workers, batches are cut into
        ``chunk``-sized pieces for the pool while the next batches are being read, at
        most two pieces per worker in flight; documents are not kept either way.
        """
        if self.workers == 0:
            async for batch in batches:
                self.checked_inline += len(batch)
                yield run_jobs(ctx, batch, keep_documents=False, prepared=prepared)
            return
        self.prepare()
        assert self._pool is not None
        loop = asyncio.get_running_loop()
        pool = self._pool
        pending: collections.deque[asyncio.Future[tuple[list[Outcome], int]]] = collections.deque()

        def take(part: list[Outcome], walked: int) -> list[Outcome]:
            self.checked_pool += len(part)
            self.chains_walked_pool += walked
            return part

        try:
            async for batch in batches:
                for i in range(0, len(batch), chunk):
                    piece = list(batch[i : i + chunk])
                    pending.append(loop.run_in_executor(pool, _worker_run, ctx, piece))
                while len(pending) >= 2 * self.workers:
                    yield take(*await pending.popleft())
            while pending:
                yield take(*await pending.popleft())
        finally:
            for fut in pending:
                fut.cancel()

    async def close(self) -> None:
        """Stop the worker processes (a later large batch starts them again)."""
        pool, self._pool = self._pool, None
        if self._warming is not None:
            self._warming.cancel()
            self._warming = None
        if pool is not None:
            await asyncio.get_running_loop().run_in_executor(
                None, functools.partial(pool.shutdown, wait=True, cancel_futures=True)
            )
