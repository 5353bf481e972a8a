"""The auditor's check of the transparency log, as a resolver serves it.

Trusts nothing but the log's verifier key and the last checkpoint stored locally.
:func:`check_transition` checks a fetched checkpoint against the stored one (rollback,
split view, consistency proof); :class:`LogAuditor` does that over HTTP and checks a
record's inclusion proof.  The serving side is :mod:`resolver.audit.log`.
"""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from schemas import _json, dsse
from schemas.checkpoint import Checkpoint, Note, NoteVerifier, open_checkpoint
from schemas.cosignature import CosignerVerifier, open_cosigned_checkpoint, verify_cosignatures
from schemas.errors import (
    CheckpointError,
    CPIError,
    LogConsistencyError,
    ProofError,
    SignatureError,
)
from schemas.merkle import leaf_hash, verify_consistency, verify_inclusion

__all__ = [
    "ENV_LOG_QUORUM",
    "ENV_LOG_WITNESSES",
    "CheckpointPolicy",
    "LogAuditor",
    "LogReport",
    "check_transition",
    "policy_from_env",
]

ENV_LOG_VKEY = "CPI_RESOLVER_LOG_VKEY"
"""The log's verifier key file(s), comma-separated (the web console reads it too)."""
ENV_LOG_WITNESSES = "CPI_RESOLVER_LOG_WITNESSES"
"""Witness verifier keys (files or texts), comma-separated: served checkpoints need a quorum."""
ENV_LOG_QUORUM = "CPI_RESOLVER_LOG_QUORUM"
"""How many of those witnesses must have cosigned (default: all)."""


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


@dataclass(frozen=True, slots=True)
class CheckpointPolicy:
    """When a checkpoint is accepted: signed by the log, and cosigned by ``quorum`` of
    ``witnesses`` (C2SP tlog-cosignature).  ``quorum`` 0 asks for no cosignature."""

    log: NoteVerifier
    witnesses: tuple[CosignerVerifier, ...] = ()
    quorum: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.quorum <= len(self.witnesses):
            raise ValueError(
                f"quorum {self.quorum} must be between 0 and the {len(self.witnesses)} witnesses"
            )

    def check(self, note: bytes, *, now: float | None = None) -> tuple[Checkpoint, list[str]]:
        """The verified checkpoint and the witnesses that cosigned it.

        Raises :class:`CheckpointError`/:class:`SignatureError` (the log's signature) or
        :class:`~schemas.cosignature.QuorumError` (too few cosignatures).
        """
        cp, cosigs = open_cosigned_checkpoint(
            note,
            self.log,
            self.witnesses,
            quorum=self.quorum,
            origin=self.log.name,
            now=now,
        )
        return cp, [c.witness for c in cosigs]


@dataclass(slots=True)
class LogReport:
    """What ``cpi audit log`` checked, in order."""

    checks: list[tuple[str, bool, str]] = field(default_factory=list)
    checkpoint: Checkpoint | None = None
    alarm: str | None = None
    """``rollback`` or ``split_view`` when the log contradicted the stored checkpoint."""
    evidence: list[tuple[str, bytes]] = field(default_factory=list)
    """With an alarm: the two signed checkpoints that contradict each other, labelled
    (``stored``: the one accepted before; ``served``: the one the log shows now)."""
    cosigners: list[str] = field(default_factory=list)

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
            "cosigners": list(self.cosigners),
            "evidence": [
                {"role": role, "note": note.decode("utf-8", "replace")}
                for role, note in self.evidence
            ],
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
        witnesses: Sequence[CosignerVerifier] = (),
        quorum: int = 0,
        gossip: Sequence[str] = (),
        root: str | None = None,
    ) -> None:
        self._http = session
        self._base = base_url.rstrip("/")
        self._root = root
        """A federated resolver's root whose log is checked (``?root=``); None: the home log."""
        self._verifier = verifier
        self._state = state
        self._witnesses = list(witnesses)
        self._quorum = quorum
        self._gossip = list(gossip)
        """Witness URLs whose latest cosigned checkpoint is compared with the served one."""
        self.new_state: bytes | None = None

    async def _get(self, path: str, params: Mapping[str, Any] | None = None) -> tuple[int, bytes]:
        if self._root is not None:
            params = {**(params or {}), "root": self._root}
        async with self._http.get(self._base + path, params=params) as resp:
            return resp.status, await resp.read()

    async def _json(self, path: str, params: Mapping[str, Any] | None = None) -> Any:
        status, body = await self._get(path, params)
        try:
            doc = _json.loads(body)
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
        if self._witnesses:
            try:
                cosigs = verify_cosignatures(Note.from_bytes(note), self._witnesses)
            except (CheckpointError, SignatureError) as exc:
                rep.add("witness cosignatures", False, str(exc))
                return rep
            rep.cosigners = [c.witness for c in cosigs]
            names = ", ".join(rep.cosigners) or "none"
            ok = len(cosigs) >= self._quorum
            rep.add(
                "witness cosignatures",
                ok,
                f"{len(cosigs)} of {len(self._witnesses)} witnesses cosigned ({names}); "
                f"{self._quorum} required",
            )
            if not ok:
                return rep
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
            if self._state is not None:
                rep.evidence = [("stored", self._state), ("served", note)]
            return rep
        except (_HTTPError, ProofError) as exc:
            rep.add("consistent with the stored checkpoint", False, str(exc))
            return rep
        for url in self._gossip:
            await self._compare_with_witness(rep, url, new, note)
        if rep.alarm is not None:
            return rep
        self.new_state = note
        if cpid is not None:
            await self._inclusion(rep, new, cpid, version)
        return rep

    async def _compare_with_witness(
        self, rep: LogReport, url: str, served: Checkpoint, note: bytes
    ) -> None:
        """Compare the served checkpoint with the latest one a witness cosigned.

        Two checkpoints signed by the log key that no consistency proof links are a
        split view, whoever holds them: the auditor needs no state of its own for this.
        """
        what = f"consistent with witness {url}"
        base = url.rstrip("/")
        try:
            async with self._http.get(
                base + "/v1/witness/checkpoint", params={"origin": served.origin}
            ) as resp:
                status, body = resp.status, await resp.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            rep.add(what, False, f"unreachable: {exc or type(exc).__name__}")
            return
        if status == 404:
            rep.add(what, True, "the witness has cosigned nothing of this log yet")
            return
        if status != 200:
            rep.add(what, False, f"answered {status}: {body[:200].decode('utf-8', 'replace')}")
            return
        try:
            theirs = open_checkpoint(body, self._verifier, origin=self._verifier.name)
        except (CheckpointError, SignatureError) as exc:
            rep.add(what, False, f"its checkpoint is not signed by the log key: {exc}")
            return
        small, large = sorted([(theirs, body), (served, note)], key=lambda c: c[0].size)
        proof: list[bytes] | None = None
        try:
            if 0 < small[0].size < large[0].size:
                doc = await self._json(
                    "/v1/log/proof/consistency",
                    {"first": small[0].size, "second": large[0].size},
                )
                proof = _hashes(doc.get("proof", []), "consistency proof")
            check_transition(small[0], large[0], proof)
        except LogConsistencyError as exc:
            rep.alarm = "split_view"
            rep.add(
                what,
                False,
                f"SPLIT VIEW: the witness cosigned size {theirs.size} (root "
                f"{theirs.root_hash.hex()[:16]}...), the resolver serves size {served.size} (root "
                f"{served.root_hash.hex()[:16]}...), and they are not consistent: {exc}",
            )
            rep.evidence = [("witness", body), ("served", note)]
            return
        except (_HTTPError, ProofError) as exc:
            rep.add(what, False, f"cannot compare sizes {small[0].size} and {large[0].size}: {exc}")
            return
        rep.add(what, True, f"the witness holds size {theirs.size}: consistent")

    async def _inclusion(
        self, rep: LogReport, cp: Checkpoint, cpid: str, version: int | None
    ) -> None:
        what = f"record {cpid}" + (f" version {version}" if version is not None else "")
        digest: str | None = None
        try:
            bundle = await self._json(f"/v1/resources/{cpid}")
            env = dsse.Envelope.from_dict(bundle["record"])
            rec = _json.loads(env.payload)
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
            entry = _json.loads(leaf)
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


def policy_from_env(env: Mapping[str, str] | None = None) -> CheckpointPolicy | None:
    """The resolver's checkpoint policy from its environment, or None.

    Only when ``CPI_RESOLVER_LOG_WITNESSES`` names witnesses: then the log's key comes
    from ``CPI_RESOLVER_LOG_VKEY`` (required) and ``CPI_RESOLVER_LOG_QUORUM`` (default:
    all) cosignatures are required before the resolver serves a checkpoint.  Raises
    :class:`CheckpointError` for an unreadable key or a bad quorum.
    """
    env = os.environ if env is None else env
    specs = [s.strip() for s in env.get(ENV_LOG_WITNESSES, "").split(",") if s.strip()]
    if not specs:
        return None

    def text(spec: str) -> str:
        try:
            return Path(spec).read_text(encoding="utf-8") if Path(spec).is_file() else spec
        except OSError as exc:
            raise CheckpointError(f"{spec}: cannot read: {exc.strerror}") from exc

    logs = [s.strip() for s in env.get(ENV_LOG_VKEY, "").split(",") if s.strip()]
    if not logs:
        raise CheckpointError(f"{ENV_LOG_WITNESSES} needs {ENV_LOG_VKEY}: the log's verifier key")
    witnesses = tuple(CosignerVerifier.from_vkey(text(s)) for s in specs)
    raw = env.get(ENV_LOG_QUORUM, "").strip()
    if raw and not raw.isdigit():
        raise CheckpointError(f"{ENV_LOG_QUORUM}={raw!r} must be a number")
    quorum = int(raw) if raw else len(witnesses)
    try:
        return CheckpointPolicy(NoteVerifier.from_vkey(text(logs[0])), witnesses, quorum)
    except ValueError as exc:
        raise CheckpointError(f"{ENV_LOG_QUORUM}: {exc}") from exc
