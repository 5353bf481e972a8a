"""Warm restarts: a snapshot of the replica's verified state, kept in the data directory.

A resolver with a snapshot directory writes what it has verified at one revision to
``<dir>/replica.snap`` -- in the background every ``interval`` seconds (when the
revision moved) and on shutdown -- and loads it on start instead of listing and
verifying the whole index, then watches from that revision.

What is stored (format 6: 5 with whether each record's payload is canonical,
:attr:`~resolver.verify.RecordFacts.canonical`): the records that verified and were served, with their
statuses that verified under the record's key, as columns (``fast`` chunks: the CPID,
revisions, lease, each envelope as the replica holds it -- one signature-then-payload
bytes object, the payload compressed or not (:mod:`resolver.sealed`), with its payload
type, form and key id -- and the facts verification produced), loaded straight into
the replica's structures by :meth:`~resolver.state.ReplicaState.restore` without
verifying their signatures again -- they are trusted only because this resolver wrote
them and the file passes its integrity check.  Chains and validity windows are judged
again at load time: a record whose chain no longer verifies, whose window has closed or
whose node key has a revocation, is verified as on a cold start.  Every other
``/rec/`` and ``/live/`` key is stored as its envelope and revisions (``recs``/``lives``
chunks, with the facts when it verified: :class:`TrustedRunner`), and the other
collections (``/certs/``, ``/revoked/``, ``/ns/``, ``/alloc/``, ``/claim/``) as a value
that reads back to what the replica holds.

Integrity: the file is ``MAGIC || HMAC-SHA256(key, body) || body``, the key being 32
random bytes in ``<dir>/snapshot.key`` (mode 0600, created on first use); the body
names the snapshot format, the revision, a digest of the trust anchors and one of the
compression dictionaries (:data:`~resolver.sealed.DICTIONARIES_DIGEST`).  A file that
fails the MAC, another format, another anchor set or other dictionaries is not used: the
resolver lists
the index (a cold start) and says why (log, ``/readyz`` ``snapshot`` detail, metric).
The body is a sequence of :mod:`marshal` chunks, only unmarshalled once the MAC has
been checked.  Writing is atomic: a temporary file in the same directory, fsync,
rename, fsync of the directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import marshal
import os
import secrets
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from registry.index.layout import Prefix
from resolver.entry import NODE_KID, Sealed, node_kid, with_keyid
from resolver.sealed import DICTIONARIES_DIGEST, Packed
from resolver.state import UNREADABLE_ALLOC, Change, ReplicaState, Restored, Runner, node_key
from resolver.verify import (
    Context,
    Job,
    Outcome,
    RecordFacts,
    StatusFacts,
    _status,
)
from schemas.chain import TrustAnchors
from schemas.dsse import Envelope, Signature
from schemas.errors import EnvelopeError

__all__ = ["LoadedSnapshot", "SnapshotStore", "TrustedRunner", "anchors_digest"]

_log = logging.getLogger("resolver.snapshot")

_MAGIC_PREFIX: Final = b"CPI-REPLICA-SNAPSHOT/"
FORMAT: Final = 6
MAGIC: Final = _MAGIC_PREFIX + b"%d\n" % FORMAT
FILE: Final = "replica.snap"
KEY_FILE: Final = "snapshot.key"
_CHUNK: Final = 20_000


def anchors_digest(anchors: TrustAnchors) -> str:
    """SHA-256 over the sorted anchors (a snapshot is only used with the same set)."""
    h = hashlib.sha256()
    for blob in sorted(a.to_json() for a in anchors):
        h.update(len(blob).to_bytes(4, "big") + blob)
    return h.hexdigest()


def _env_tuple(env: Envelope) -> tuple[str, bytes, tuple[tuple[str, bytes], ...]]:
    return env.payload_type, env.payload, tuple((s.keyid, s.sig) for s in env.signatures)


def _env(t: tuple[str, bytes, tuple[tuple[str, bytes], ...]]) -> Envelope:
    return Envelope(t[0], t[1], tuple(Signature(k, s) for k, s in t[2]))


def _rec_facts(f: RecordFacts, public_key: str) -> tuple[Any, ...]:
    # the replica files record facts without the node's key (it reads it from the payload)
    return (
        f.cpid, f.kind, public_key, f.version, f.expires_at, f.region, f.accelerators, f.labels,
        f.canonical,
    )  # fmt: skip


def _live_facts(f: StatusFacts, cpid: str) -> tuple[Any, ...]:
    # the replica files status facts without their CPID (checked against the key)
    return cpid, f.state, f.accelerators_free, f.cpu_free, f.withheld


def _status_kid(rec: Any) -> str:
    """The key id of a status held with :data:`~resolver.entry.NODE_KID`: the node key's
    id, from the record of its CPID (verified or not since: the CPID's serial binds the
    key, rule 5), or none when that record is gone or unreadable (the status is verified
    again on load in any case: the id is only a hint)."""
    sealed = None if rec is None else rec.sealed
    if sealed is None:
        return ""
    try:
        return node_kid(sealed)
    except (ValueError, KeyError, TypeError):
        return ""


class _Table:
    """Distinct values of one column of a chunk, each stored once (an index per row)."""

    def __init__(self) -> None:
        self.index: dict[Any, int] = {}
        self.values: list[Any] = []

    def __call__(self, value: Any) -> int:
        i = self.index.get(value)
        if i is None:
            i = self.index[value] = len(self.values)
            self.values.append(value)
        return i


_FAST_FORMS: Final = (Sealed, Packed)
"""The forms a ``fast`` chunk holds; its type table pairs each payload type with whether
the blob is compressed (:class:`~resolver.sealed.Packed`)."""


class _FastChunk:
    """Served records (and their verified statuses) as columns, the repeating values
    (payload types with the blob's form, signing key ids, kind/region/accelerators/labels,
    states) in tables."""

    def __init__(self) -> None:
        self.types = _Table()
        self.kids = _Table()
        self.profiles = _Table()
        self.states = _Table()
        self.cols: dict[str, list[Any]] = {name: [] for name in _FAST_COLUMNS}

    def add(self, cpid: str, revision: int, sealed: Sealed, facts: RecordFacts, lv: Any) -> None:
        c = self.cols
        c["cpid"].append(cpid)
        c["rev"].append(revision)
        c["type"].append(self.types((sealed.payload_type, type(sealed) is Packed)))
        c["kid"].append(self.kids(sealed.keyid))
        c["blob"].append(sealed.blob)
        c["ver"].append(facts.version)
        c["exp"].append(facts.expires_at)
        c["profile"].append(
            self.profiles(
                (facts.kind, facts.region, facts.accelerators, facts.labels, facts.canonical)
            )
        )
        if lv is None:
            for name in _STATUS_COLUMNS:
                c[name].append(None)
            return
        st: Sealed = lv.sealed
        sf: StatusFacts = lv.facts
        c["lrev"].append(lv.revision)
        c["lease"].append(lv.lease)
        c["ltype"].append(self.types((st.payload_type, type(st) is Packed)))
        c["lkid"].append(st.keyid)
        c["lblob"].append(st.blob)
        c["state"].append(self.states(sf.state))
        c["afree"].append(sf.accelerators_free)
        c["cfree"].append(sf.cpu_free)
        c["withheld"].append(sf.withheld)

    def columns(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.cols)
        out["tables"] = (
            self.types.values,
            self.kids.values,
            self.profiles.values,
            self.states.values,
        )
        return out


_STATUS_COLUMNS: Final = (
    "lrev",
    "lease",
    "ltype",
    "lkid",
    "lblob",
    "state",
    "afree",
    "cfree",
    "withheld",
)
_FAST_COLUMNS: Final = (
    "cpid",
    "rev",
    "type",
    "kid",
    "blob",
    "ver",
    "exp",
    "profile",
    *_STATUS_COLUMNS,
)


def _restored(cols: dict[str, Any]) -> Restored:
    """A ``fast`` chunk (:class:`_FastChunk`) as :meth:`ReplicaState.restore` takes it:
    its columns as they are (checked for equal length as it runs)."""
    c = cols
    return Restored(
        c["cpid"], c["rev"], c["type"], c["kid"], c["blob"], c["ver"], c["exp"], c["profile"],
        c["lrev"], c["lease"], c["ltype"], c["lkid"], c["lblob"],
        c["state"], c["afree"], c["cfree"], c["withheld"],
        *c["tables"],
    )  # fmt: skip


@dataclass(slots=True)
class LoadedSnapshot:
    """A snapshot read back and checked, unpacked a chunk at a time by :meth:`batches`
    (so a warm start never holds every record twice: as the snapshot's objects and as
    the replica's).  ``records`` and ``statuses`` hold the facts that let the records
    and statuses of the chunk being applied skip signature verification: records of
    the current chunk; statuses of every chunk so far (records, written after them,
    carry their statuses)."""

    revision: int
    written_at: float
    body: memoryview
    spans: list[tuple[int, int]]
    records: dict[bytes, RecordFacts] = field(default_factory=dict)  # payload -> facts
    statuses: dict[bytes, tuple[str, StatusFacts]] = field(default_factory=dict)
    keys: int = 0

    def batches(self) -> Iterator[list[Change] | Restored]:
        """What rebuilds the replica at ``revision``, a chunk at a time: changes for
        :meth:`ReplicaState.apply`, or records for :meth:`ReplicaState.restore`."""
        for offset, n in self.spans:
            what, items = marshal.loads(self.body[offset : offset + n])
            changes: list[Change] = []
            self.records.clear()
            if what == "fast":
                restored = _restored(items)
                del items
                n = len(restored)
                self.keys += n + n - restored.status_blobs.count(None)
                yield restored
                continue
            if what == "kvs":
                changes = [Change("put", k, v, rev, lease) for k, v, rev, lease in items]
            elif what == "recs":
                rec = Prefix.REC
                for cpid, rev, et, facts in items:
                    env = _env(et)
                    changes.append(Change("put", rec + cpid, b"", rev, 0, env))
                    if facts is not None:
                        self.records[env.payload] = RecordFacts(*facts)
            elif what == "lives":
                live = Prefix.LIVE
                for cpid, rev, lease, et, checked, facts in items:
                    env = _env(et)
                    changes.append(Change("put", live + cpid, b"", rev, lease, env))
                    if facts is not None and checked:
                        self.statuses[env.payload] = (checked, StatusFacts(*facts))
            else:
                raise SnapshotError(f"unknown chunk {what!r}")
            del items
            self.keys += len(changes)
            yield changes
        self.statuses.clear()


def _in_discovery_order(state: ReplicaState) -> list[tuple[str, Any]]:
    """``state.recs``' items, the served ones a discovery set after another (a warm start
    adds the records of a set together: :meth:`DiscoveryIndex.add_alike`), then the
    rest; in the replica's order if the index does not hold exactly the served CPIDs."""
    recs, served = state.recs, state.served
    ordered = {
        cpid: rs
        for members in state.discovery.sets()
        for cpid in members
        if cpid in served and (rs := recs.get(cpid)) is not None
    }
    if len(ordered) != len(served):
        return list(recs.items())
    for cpid, rs in recs.items():
        if cpid not in served:
            ordered[cpid] = rs
    return list(ordered.items())


class SnapshotError(Exception):
    """A snapshot that cannot be used (the message says why)."""


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists (on this host, in this pid namespace)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class SnapshotStore:
    """Reads and writes ``<directory>/replica.snap`` for one anchor set."""

    def __init__(self, directory: str | os.PathLike[str], anchors: TrustAnchors) -> None:
        self.directory = Path(directory)
        self.path = self.directory / FILE
        self.anchors = anchors_digest(anchors)
        self._key: bytes | None = None
        self.status = "none"
        """What happened to the snapshot on start (``loaded``, ``absent``, or why it was
        not used), for ``/readyz``."""
        self.loaded_revision = 0
        self.written_revision = 0
        self.written_at = 0.0
        self.write_seconds = 0.0
        self.writes = 0
        self.fallbacks = 0
        self.write_failures = 0
        self.last_write_error = ""
        """Why the last failed write failed ("" while none has)."""

    # -- key --------------------------------------------------------------------------

    def key(self) -> bytes:
        if self._key is None:
            self.directory.mkdir(parents=True, exist_ok=True)
            path = self.directory / KEY_FILE
            try:
                key = path.read_bytes()
            except FileNotFoundError:
                key = secrets.token_bytes(32)
                tmp = self.directory / f".{KEY_FILE}.{os.getpid()}.tmp"
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "wb") as f:
                    f.write(key)
                    f.flush()
                    os.fsync(f.fileno())
                try:  # another process on the same directory may have won: use its key
                    os.link(tmp, path)
                except FileExistsError:
                    key = path.read_bytes()
                finally:
                    tmp.unlink()
            if len(key) < 32:
                raise SnapshotError(f"{path} holds {len(key)} bytes, not a 32-byte key")
            self._key = key
        return self._key

    # -- writing ----------------------------------------------------------------------

    def remove_stale(self) -> tuple[int, int]:
        """Remove the temporary files of writers that did not finish (killed while
        writing: a stop timeout, the OOM killer, a power cut): ``.replica.snap.<pid>.tmp``
        and ``.snapshot.key.<pid>.tmp`` whose process is gone, or is this one (a
        container's resolver often has the same pid each time; this process writes
        nothing before it has started).  A file of a live process is left alone.  At a
        million records each is up to ~450 MB, and each kill left one more.  Returns
        (files, bytes) removed."""
        removed = freed = 0
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return 0, 0
        for name in names:
            base, dot, rest = name.partition(".")
            if base or not dot or not rest.endswith(".tmp"):
                continue
            what, _, pid_text = rest.removesuffix(".tmp").rpartition(".")
            if what not in (FILE, KEY_FILE) or not (
                pid_text.isascii() and pid_text.isdigit() and len(pid_text) <= 10
            ):
                continue  # not a name this module writes (``isdigit`` alone takes "²")
            pid = int(pid_text)
            if pid != os.getpid() and _alive(pid):
                continue
            path = self.directory / name
            try:
                size = path.lstat().st_size
                path.unlink()
            except FileNotFoundError:
                continue
            removed += 1
            freed += size
        return removed, freed

    @staticmethod
    async def collect(state: ReplicaState) -> tuple[int, list[list[Any]]]:
        """What to write, taken from ``state`` (hold the replica's lock, so that it does
        not change meanwhile).  Lookups go on: the event loop gets a turn every
        :data:`_CHUNK` records."""
        state.file_restored()
        kvs: list[tuple[str, bytes, int, int]] = []
        for kid, (env, rev) in state.certs.items():
            kvs.append((Prefix.CERTS + kid, env.to_json(), rev, 0))
        for ident, (env, rev) in state.revocations.items():
            kvs.append((Prefix.REVOKED + ident, env.to_json(), rev, 0))
        for prefix, (kid, endpoints, rev) in state.ns.items():
            value = _dumps({"kid": kid, "endpoints": list(endpoints)})
            kvs.append((Prefix.NS + prefix, value, rev, 0))
        for cpid, (units, rev) in state.allocs.items():
            value = b"null" if units >= UNREADABLE_ALLOC else _dumps({"units": units})
            kvs.append((Prefix.ALLOC + cpid, value, rev, 0))
        for cpid, claims in state.claims.items():
            for claim_id, (value, rev, lease) in claims.items():
                kvs.append((f"{Prefix.CLAIM}{cpid}/{claim_id}", value, rev, lease))
        chunks: list[list[Any]] = [["kvs", kvs]]
        revision = state.revision
        # records served, with their verified statuses: restored without verification
        # (ReplicaState.restore), a chunk of columns at a time; the rest as changes
        rec_items = _in_discovery_order(state)
        slow_recs: list[Any] = []
        slow_lives: list[Any] = []
        in_fast: set[str] = set()
        for i in range(0, len(rec_items), _CHUNK):
            fast = _FastChunk()
            for cpid, rs in rec_items[i : i + _CHUNK]:
                sealed = rs.sealed
                if sealed is None:
                    continue
                facts = rs.facts
                if facts is None or rs.reason or type(sealed) not in _FAST_FORMS:
                    facts_t = None
                    if facts is not None and not rs.reason:  # with the key its statuses need
                        facts_t = _rec_facts(facts, node_key(rs))
                    slow_recs.append((cpid, rs.revision, _env_tuple(sealed.envelope()), facts_t))
                    continue
                lv = state.lives.get(cpid)
                status = None
                if (
                    lv is not None
                    and lv.raw is None
                    and lv.facts is not None
                    and not lv.reason
                    and lv.checked is facts
                    and type(lv.sealed) in _FAST_FORMS
                ):
                    status = lv
                    in_fast.add(cpid)
                fast.add(cpid, rs.revision, sealed, facts, status)
            chunks.append(["fast", fast.columns()])
            await asyncio.sleep(0)
        del rec_items
        for cpid, lv in list(state.lives.items()):
            if cpid in in_fast:
                continue
            st_env = lv.envelope
            if st_env is None and lv.raw is not None:  # never verified (its record is not
                with contextlib.suppress(EnvelopeError):  # served): kept as it came
                    st_env = Envelope.from_json(lv.raw)
            if st_env is None:
                continue
            rec = state.recs.get(cpid)
            if lv.sealed is not None and lv.sealed.keyid is NODE_KID:  # stored as it came:
                st_env = with_keyid(st_env, _status_kid(rec))
            facts_s = checked = None
            sf = None if lv.reason else lv.facts
            if sf is not None and rec is not None and rec.facts is lv.checked:  # this record's
                facts_s, checked = _live_facts(sf, cpid), node_key(rec)
            slow_lives.append((cpid, lv.revision, lv.lease, _env_tuple(st_env), checked, facts_s))
        for i in range(0, len(slow_lives), _CHUNK):
            chunks.append(["lives", slow_lives[i : i + _CHUNK]])
        for i in range(0, len(slow_recs), _CHUNK):
            chunks.append(["recs", slow_recs[i : i + _CHUNK]])
        return revision, chunks

    def write(self, revision: int, chunks: list[list[Any]]) -> int:
        """Write the snapshot atomically (blocking: run it in a thread); returns its size."""
        started = time.monotonic()
        key = self.key()
        header: dict[str, Any] = {"format": FORMAT, "revision": revision}
        header |= {"anchors": self.anchors, "dictionaries": DICTIONARIES_DIGEST}
        header["written_at"] = time.time()
        parts: list[bytes] = []
        objs: list[Any] = [header, *chunks]
        for obj in objs:  # each chunk: its length (8 bytes), then marshal
            blob = marshal.dumps(obj)
            parts += [len(blob).to_bytes(8, "big"), blob]
        mac = hmac.new(key, digestmod=hashlib.sha256)
        for p in parts:
            mac.update(p)
        tmp = self.directory / f".{FILE}.{os.getpid()}.tmp"
        size = len(MAGIC) + 32
        try:
            with open(tmp, "wb") as f:
                f.write(MAGIC)
                f.write(mac.digest())
                for p in parts:
                    f.write(p)
                    size += len(p)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        dfd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        self.written_revision = revision
        self.written_at = time.time()
        self.write_seconds = time.monotonic() - started
        self.writes += 1
        return size

    # -- reading ----------------------------------------------------------------------

    def read(self) -> LoadedSnapshot:
        """The snapshot, checked; raises :class:`SnapshotError` (FileNotFoundError when
        there is none)."""
        data = self.path.read_bytes()
        if not data.startswith(MAGIC) or len(data) < len(MAGIC) + 32:
            if data.startswith(_MAGIC_PREFIX):
                version = data[len(_MAGIC_PREFIX) :].split(b"\n", 1)[0][:8]
                raise SnapshotError(
                    f"another snapshot format ({version.decode('ascii', 'replace')}, "
                    f"this resolver reads {FORMAT})"
                )
            raise SnapshotError("not a replica snapshot (bad magic)")
        mac = data[len(MAGIC) : len(MAGIC) + 32]
        body = memoryview(data)[len(MAGIC) + 32 :]
        expected = hmac.new(self.key(), body, hashlib.sha256).digest()
        if not hmac.compare_digest(mac, expected):
            raise SnapshotError("integrity check failed (MAC mismatch)")

        spans: list[tuple[int, int]] = []  # (offset, length) of each chunk, framing checked
        at = 0
        while at < len(body):
            n = int.from_bytes(body[at : at + 8], "big")
            if n > len(body) - at - 8:
                raise SnapshotError("truncated chunk")
            spans.append((at + 8, n))
            at += 8 + n
        if not spans:
            raise SnapshotError("no header")
        header = marshal.loads(body[spans[0][0] : spans[0][0] + spans[0][1]])
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise SnapshotError("another snapshot format")
        if header.get("anchors") != self.anchors:
            raise SnapshotError("written for another set of trust anchors")
        if header.get("dictionaries") != DICTIONARIES_DIGEST:
            raise SnapshotError("written with other compression dictionaries")
        return LoadedSnapshot(int(header["revision"]), float(header["written_at"]), body, spans[1:])


def _dumps(obj: Any) -> bytes:
    import json

    return json.dumps(obj, separators=(",", ":")).encode()


class TrustedRunner:
    """A :data:`~resolver.state.Runner` for loading a snapshot: record and status jobs
    whose payloads the snapshot vouches for get the stored facts without signature
    verification; every other job goes to ``fallback`` (the real verifier)."""

    def __init__(self, snap: LoadedSnapshot, fallback: Runner) -> None:
        self.records = snap.records
        self.statuses = snap.statuses
        self.fallback = fallback
        self.trusted = 0
        self.verified = 0

    def _status(self, env: Envelope, public_key: str) -> Outcome:
        got = self.statuses.get(env.payload)
        if got is not None and got[0] == public_key:
            self.trusted += 1
            return Outcome(True, facts=got[1])
        self.verified += 1
        return _status(env, public_key, True)

    def _one(self, job: Job) -> Outcome | None:
        if job[0] == "record":
            _, _, env, carry = job
            facts = self.records.get(env.payload)
            if facts is None or isinstance(carry, bytes):
                return None
            self.trusted += 1
            status = None if carry is None else self._status(carry, facts.public_key)
            return Outcome(True, facts=facts, status=status)
        if job[0] == "status" and isinstance(job[2], Envelope):
            return self._status(job[2], job[1])
        return None

    async def __call__(self, ctx: Context, jobs: Sequence[Job]) -> AsyncIterator[list[Outcome]]:
        out: list[Outcome | None] = [self._one(job) for job in jobs]
        rest = [i for i, o in enumerate(out) if o is None]
        if rest:
            self.verified += len(rest)
            it: Iterator[int] = iter(rest)
            async for part in self.fallback(ctx, [jobs[i] for i in rest]):
                for o in part:
                    out[next(it)] = o
        done: list[Outcome] = []
        for got in out:
            assert got is not None
            done.append(got)
        yield done


async def write_in_background(store: SnapshotStore, revision: int, chunks: list[list[Any]]) -> int:
    return await asyncio.get_running_loop().run_in_executor(None, store.write, revision, chunks)
