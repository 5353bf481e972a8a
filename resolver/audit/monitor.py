"""A log monitor: follows the transparency log and reports every entry in watched namespaces.

Certificate Transparency monitors watch a log for certificates of their domains; this
one watches the audit log for changes under namespaces (``CN.31.CMCC``): every
register, update, renew, deregister and revoke appears in the log, so a record that
the namespace's operator did not write shows up here within a polling interval of the
log signer's next checkpoint.

Each :meth:`Monitor.poll`:

1. fetches ``/v1/log/checkpoint`` and verifies it (:class:`CheckpointPolicy`: the log's
   key, and a quorum of witness cosignatures if configured);
2. checks it extends the last checkpoint it accepted (consistency proof from the
   resolver; a rollback or split view is an alarm, with both notes as evidence);
3. downloads the new entries (``/v1/log/entries``, 256 at a time) up to the checkpoint's
   size and folds their leaf hashes into a *compact range* (the hashes of the perfect
   subtrees covering ``[0, n)``, at most ``log2 n`` of them), whose root must equal the
   checkpoint's: every entry is proven to be in the tree the log signed, without an
   inclusion proof per entry and without keeping the whole tree;
4. reports the entries whose ``cpid`` (or ``subject``, for a revocation) lies in a
   watched namespace (segment-wise, docs/protocol.md §1.3).  With ``expect_signers``,
   a record change is also checked against the kid that signed the record: the
   resolver's bundle is fetched, and when its envelope's digest is the entry's, a kid
   outside the list is flagged ``unexpected``.

State (a small JSON document: the accepted checkpoint note, the next entry and the
compact range) lets a monitor resume where it stopped, verifying from there.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from resolver.audit.logcheck import CheckpointPolicy, check_transition
from schemas import _json, dsse
from schemas.checkpoint import Checkpoint
from schemas.cpid import ns_contains, parse_namespace
from schemas.errors import (
    CheckpointError,
    CPIError,
    LogConsistencyError,
    RetrievalError,
    SignatureError,
)
from schemas.merkle import EMPTY_ROOT, leaf_hash, node_hash

__all__ = ["CompactRange", "Finding", "Monitor", "MonitorAlarm"]

_PAGE = 256


class CompactRange:
    """The perfect-subtree hashes covering leaves ``[0, size)``, largest first."""

    def __init__(self, size: int = 0, hashes: Sequence[bytes] = ()) -> None:
        if len(hashes) != bin(size).count("1"):
            raise ValueError(f"a range of {size} leaves has {bin(size).count('1')} subtrees")
        self.size = size
        self.hashes = list(hashes)

    def append(self, h: bytes) -> None:
        self.hashes.append(h)
        self.size += 1
        # merge equal-sized neighbours: one merge per trailing 1-bit of the old size
        n = self.size
        while n & 1 == 0 and len(self.hashes) > 1:
            right = self.hashes.pop()
            self.hashes[-1] = node_hash(self.hashes[-1], right)
            n >>= 1

    def root(self) -> bytes:
        if not self.hashes:
            return EMPTY_ROOT
        h = self.hashes[-1]
        for left in reversed(self.hashes[:-1]):
            h = node_hash(left, h)
        return h

    def to_json(self) -> dict[str, Any]:
        return {"size": self.size, "hashes": [base64.b64encode(h).decode() for h in self.hashes]}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> CompactRange:
        return cls(int(obj["size"]), [base64.b64decode(h, validate=True) for h in obj["hashes"]])


@dataclass(frozen=True, slots=True)
class Finding:
    """One log entry in a watched namespace."""

    index: int
    op: str
    target: str
    """The CPID, or the namespace of a revocation."""
    namespace: str
    digest: str
    time: int | None
    signer: str | None = None
    """The kid that signed the record, when it could be checked (see ``expect_signers``)."""
    unexpected: bool = False
    detail: str = ""
    """Why the signer could not be checked, when it could not."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "op": self.op,
            "target": self.target,
            "namespace": self.namespace,
            "digest": self.digest,
            "time": self.time,
            "signer": self.signer,
            "unexpected": self.unexpected,
            "detail": self.detail,
        }


class MonitorAlarm(Exception):
    """The log contradicted what the monitor accepted before, or its entries do not hash
    to the signed root.  ``evidence`` holds the notes involved."""

    def __init__(self, message: str, *, kind: str, evidence: Iterable[tuple[str, bytes]] = ()):
        super().__init__(message)
        self.kind = kind
        self.evidence = list(evidence)


@dataclass(slots=True)
class _State:
    note: bytes | None = None
    range: CompactRange = field(default_factory=CompactRange)


class Monitor:
    """Follows the log through a resolver (see the module doc)."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        base_url: str,
        policy: CheckpointPolicy,
        namespaces: Sequence[str],
        *,
        state: Mapping[str, Any] | None = None,
        expect_signers: Iterable[str] = (),
        clock: Callable[[], float] | None = None,
        root: str | None = None,
    ) -> None:
        self._http = session
        self._base = base_url.rstrip("/")
        self._root = root
        """A federated resolver's root whose log is followed (``?root=``); None: the home log."""
        self._policy = policy
        self.namespaces = [parse_namespace(n) for n in namespaces]
        self._expect = set(expect_signers)
        self._clock = clock
        self._state = _State()
        if state:
            note = state.get("checkpoint")
            self._state = _State(
                note.encode("utf-8") if isinstance(note, str) else None,
                CompactRange.from_json(state["range"]),
            )

    @property
    def size(self) -> int:
        """Entries verified and inspected so far."""
        return self._state.range.size

    def state(self) -> dict[str, Any]:
        """What to store to resume (JSON-serialisable)."""
        note = self._state.note
        return {
            "checkpoint": note.decode("utf-8") if note is not None else None,
            "range": self._state.range.to_json(),
        }

    async def _get(self, path: str, params: Mapping[str, Any] | None = None) -> bytes:
        if self._root is not None:
            params = {**(params or {}), "root": self._root}
        async with self._http.get(self._base + path, params=params) as resp:
            body = await resp.read()
            if resp.status != 200:
                raise RetrievalError(
                    f"GET {path} answered {resp.status}: {body[:200].decode('utf-8', 'replace')}"
                )
            return body

    async def _json(self, path: str, params: Mapping[str, Any] | None = None) -> Any:
        try:
            return _json.loads(await self._get(path, params))
        except ValueError as exc:
            raise RetrievalError(f"GET {path}: not JSON: {exc}") from exc

    def _watched(self, target: str) -> str | None:
        prefix = target.split("/", 1)[0].upper()
        try:
            prefix = parse_namespace(prefix)
        except CPIError:
            return None
        for ns in self.namespaces:
            if ns_contains(ns, prefix):
                return ns
        return None

    async def poll(self) -> list[Finding]:
        """One round: verify the newest checkpoint, read and check new entries, report.

        Raises :class:`MonitorAlarm` (split view, rollback, entries that do not match the
        signed root), :class:`CheckpointError`/:class:`SignatureError` (a checkpoint that
        does not verify), :class:`RetrievalError` (the resolver could not answer).  State is
        advanced only when everything verified.
        """
        note = await self._get("/v1/log/checkpoint")
        now = self._clock() if self._clock is not None else None
        cp, _ = self._policy.check(note, now=now)
        old = self._accepted()
        if old is not None and (
            old.size != self._state.range.size or old.root_hash != self._state.range.root()
        ):
            raise ValueError(
                "monitor state is damaged: its stored entries do not hash to its stored "
                "checkpoint (start again with a new state file)"
            )
        proof: list[bytes] | None = None
        if old is not None and 0 < old.size < cp.size:
            doc = await self._json(
                "/v1/log/proof/consistency", {"first": old.size, "second": cp.size}
            )
            proof = [base64.b64decode(h, validate=True) for h in doc.get("proof", [])]
        try:
            check_transition(old, cp, proof)
        except LogConsistencyError as exc:
            stored = self._state.note
            raise MonitorAlarm(
                str(exc),
                kind=exc.kind,
                evidence=[("stored", stored), ("served", note)] if stored else [("served", note)],
            ) from exc
        rng = CompactRange(self._state.range.size, self._state.range.hashes)
        leaves: list[tuple[int, bytes]] = []
        while rng.size < cp.size:
            doc = await self._json(
                "/v1/log/entries", {"start": rng.size, "end": min(cp.size, rng.size + _PAGE)}
            )
            entries = doc.get("entries") if isinstance(doc, dict) else None
            if not isinstance(entries, list) or not entries:
                raise RetrievalError(f"no entries from {rng.size} (the checkpoint has {cp.size})")
            for e in entries:
                if not isinstance(e, dict) or e.get("index") != rng.size:
                    raise RetrievalError(f"entry {rng.size} is missing from the answer")
                leaf = base64.b64decode(e["leaf"], validate=True)
                rng.append(leaf_hash(leaf))
                leaves.append((rng.size - 1, leaf))
        if rng.root() != cp.root_hash:
            raise MonitorAlarm(
                f"the log's entries 0..{cp.size - 1} hash to {rng.root().hex()}, but the signed "
                f"checkpoint at size {cp.size} has root {cp.root_hash.hex()}: the resolver serves "
                "entries that are not the signed log",
                kind="bad_entries",
                evidence=[("served", note)],
            )
        findings = [f for i, leaf in leaves if (f := self._finding(i, leaf)) is not None]
        if self._expect:
            findings = [await self._check_signer(f) for f in findings]
        self._state = _State(note, rng)
        return findings

    def _accepted(self) -> Checkpoint | None:
        if self._state.note is None:
            return None
        try:
            return self._policy.check(self._state.note)[0]
        except (CheckpointError, SignatureError):
            # witnesses may have changed since: the log's own signature is what counts here
            return CheckpointPolicy(self._policy.log).check(self._state.note)[0]

    def _finding(self, index: int, leaf: bytes) -> Finding | None:
        try:
            obj = _json.loads(leaf)
        except ValueError:
            return None
        if not isinstance(obj, dict):
            return None
        target = obj.get("cpid") if isinstance(obj.get("cpid"), str) else obj.get("subject")
        if not isinstance(target, str):
            return None
        ns = self._watched(target)
        if ns is None:
            return None
        t = obj.get("time")
        return Finding(
            index=index,
            op=str(obj.get("op", "")),
            target=target,
            namespace=ns,
            digest=str(obj.get("digest", "")),
            time=t if isinstance(t, int) else None,
        )

    async def _check_signer(self, f: Finding) -> Finding:
        if f.op not in ("register", "update", "renew") or "/" not in f.target:
            return f
        try:
            bundle = await self._json(f"/v1/resources/{f.target}")
            env = dsse.Envelope.from_dict(bundle["record"])
        except RetrievalError as exc:
            why = (
                "the resolver does not serve this record: it did not verify, or it was "
                "removed since"
                if " 404" in str(exc)
                else f"signer not checked: {exc}"
            )
            return Finding(**{**f.to_dict(), "detail": why})
        except (CPIError, KeyError, TypeError) as exc:
            return Finding(**{**f.to_dict(), "detail": f"signer not checked: {exc}"})
        if hashlib.sha256(env.to_json()).hexdigest() != f.digest:
            detail = "the record changed since: this version's signer is not known"
            return Finding(**{**f.to_dict(), "detail": detail})
        kid = env.keyid
        return Finding(**{**f.to_dict(), "signer": kid, "unexpected": kid not in self._expect})
