"""A transparency-log witness (C2SP tlog-witness): cosigns a log's checkpoint only when it
is consistent with the last one it cosigned.

``POST /add-checkpoint`` takes ``old <size>``, a consistency proof and a checkpoint note
(:mod:`schemas.cosignature`).  The witness

1. parses the body (400 when malformed, 413 when larger than the limit),
2. finds the log by the checkpoint's origin (404 when it does not witness that log),
3. verifies the log's signature with the keys configured for that origin (403 when no
   trusted key signed, or a trusted key's signature fails),
4. checks ``old <= size`` (400), that ``old`` is the size it last cosigned for that
   origin, 0 if none (409, body: its size and a newline, ``text/x.tlog.size``), that an
   unchanged size has an unchanged root (409), and that the proof leads from its stored
   root to the new one (RFC 6962 / RFC 9162 consistency; 422 when it does not),
5. stores the new size, root and note durably (atomic write, fsync of file and
   directory) and only then answers 200 with its cosignature line.

Steps 4 and 5 run under one lock per origin, so two requests can never both pass the
check against the same old state (no rollback by interleaving).  A checkpoint with a
valid log signature that is refused at step 4 is evidence of a misbehaving log: it is
logged at CRITICAL and the request body is kept in ``<state>/evidence/``.

State: one JSON file per log in the state directory (``<sha256(origin)[:32]>.json``:
origin, size, root, the cosigned note).  A state file that cannot be read stops the
witness from starting: forgetting a log's state would let it cosign a fork.  A lock
file (``flock``) keeps a second witness process off the same directory.

Read routes: ``GET /v1/witness`` (name, verifier key, logs and their sizes),
``GET /v1/witness/checkpoint?origin=O`` (the latest checkpoint it cosigned for O,
with its cosignature), ``/healthz``, ``/readyz``, ``/metrics``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from schemas.api import ErrorBody, Health
from schemas.checkpoint import Checkpoint, Note, NoteVerifier, open_note
from schemas.cosignature import (
    MAX_REQUEST_BYTES,
    SIZE_CONTENT_TYPE,
    CosignerVerifier,
    add_signatures,
    cosign,
    parse_add_checkpoint,
)
from schemas.errors import (
    CheckpointError,
    ConfigError,
    InvalidDataError,
    ProofError,
    SignatureError,
)
from schemas.keys import Ed25519PrivateKey
from schemas.merkle import EMPTY_ROOT, verify_consistency
from schemas.openapi import METRICS, SELF_DESCRIPTION, Operation, Param, Reply, build, routes_of

__all__ = [
    "MAX_EVIDENCE_FILES",
    "OPERATIONS",
    "LogState",
    "Witness",
    "WitnessState",
    "create_witness_app",
    "description",
]

_log = logging.getLogger(__name__)

MAX_EVIDENCE_FILES: Final = 1000
_BODY_TIMEOUT_S: Final = 10.0
_LOCK_FILE: Final = ".lock"


@dataclass(frozen=True, slots=True)
class LogState:
    """What the witness remembers of one log: the latest checkpoint it cosigned."""

    origin: str
    size: int
    root_hash: bytes
    note: bytes

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "origin": self.origin,
                "size": self.size,
                "root": base64.b64encode(self.root_hash).decode(),
                "note": self.note.decode("utf-8"),
            },
            indent=1,
        ).encode()

    @classmethod
    def from_json(cls, data: bytes) -> LogState:
        obj = json.loads(data)
        root = base64.b64decode(obj["root"], validate=True)
        size = obj["size"]
        if not isinstance(size, int) or size < 0 or len(root) != 32:
            raise ValueError("size must be an integer >= 0 and root 32 bytes")
        return cls(str(obj["origin"]), size, root, str(obj["note"]).encode("utf-8"))


def _file_name(origin: str) -> str:
    return hashlib.sha256(origin.encode("utf-8")).hexdigest()[:32] + ".json"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class WitnessState:
    """The per-log state files in one directory (0700), written atomically and durably."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.dir, 0o700)
        self._lock_fd = os.open(self.dir / _LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(self._lock_fd)
            raise ConfigError(
                f"witness state {self.dir} is in use by another process (lock {_LOCK_FILE})"
            ) from exc
        self._logs: dict[str, LogState] = {}
        for path in sorted(self.dir.glob("*.json")):
            try:
                st = LogState.from_json(path.read_bytes())
            except (OSError, ValueError, KeyError, TypeError) as exc:
                self.close()
                raise ConfigError(
                    f"witness state file {path} is unreadable ({exc}); refusing to start, "
                    "since forgetting a log's state would let the witness cosign a fork"
                ) from exc
            if path.name != _file_name(st.origin):
                self.close()
                raise ConfigError(f"witness state file {path} holds origin {st.origin!r}")
            self._logs[st.origin] = st

    def close(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = -1

    def get(self, origin: str) -> LogState | None:
        return self._logs.get(origin)

    def put(self, st: LogState) -> None:
        """Write ``st`` so that a crash leaves the old or the new state, never a mix."""
        path = self.dir / _file_name(st.origin)
        tmp = path.with_name(f".{path.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            data = st.to_json()
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        _fsync_dir(self.dir)
        self._logs[st.origin] = st

    def keep_evidence(self, origin: str, size: int, body: bytes) -> Path | None:
        """Keep a refused request (at most :data:`MAX_EVIDENCE_FILES`); its path."""
        edir = self.dir / "evidence"
        edir.mkdir(exist_ok=True, mode=0o700)
        if sum(1 for _ in edir.iterdir()) >= MAX_EVIDENCE_FILES:
            return None
        path = edir / f"{_file_name(origin)[:-5]}-{size}-{time.time_ns()}.txt"
        path.write_bytes(body)
        return path

    @property
    def origins(self) -> list[str]:
        return sorted(self._logs)


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    body: bytes
    content_type: str

    def response(self) -> web.Response:
        return web.Response(status=self.status, body=self.body, content_type=self.content_type)


def _error(status: int, code: str, message: str) -> Answer:
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    return Answer(status, body, "application/json")


class WitnessMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "cpi_witness_requests",
            "add-checkpoint requests by outcome (cosigned; conflict: another old size; fork: "
            "another root at the size held; bad_proof: not consistent; unknown_log, "
            "bad_signature, bad_request)",
            ["outcome"],
            registry=self.registry,
        )
        self.tree_size = Gauge(
            "cpi_witness_tree_size",
            "Tree size of the latest checkpoint the witness cosigned, per log origin",
            ["origin"],
            registry=self.registry,
        )


class Witness:
    """The witness's logic, without HTTP (see the module doc)."""

    def __init__(
        self,
        name: str,
        key: Ed25519PrivateKey,
        logs: Mapping[str, Sequence[NoteVerifier]],
        state: WitnessState,
        *,
        clock: Callable[[], float] = time.time,
        metrics: WitnessMetrics | None = None,
    ) -> None:
        self.name = name
        self._key = key
        self.verifier = CosignerVerifier.from_public_key(name, key)
        self.logs = {o: list(v) for o, v in logs.items()}
        self.state = state
        self._clock = clock
        self._locks: dict[str, asyncio.Lock] = {}
        self.metrics = metrics or WitnessMetrics()
        for origin in self.logs:
            st = state.get(origin)
            self.metrics.tree_size.labels(origin).set(st.size if st else 0)

    def _count(self, answer: Answer, outcome: str) -> Answer:
        self.metrics.requests.labels(outcome).inc()
        return answer

    async def add_checkpoint(self, body: bytes) -> Answer:
        try:
            req = parse_add_checkpoint(body)
            note = Note.from_bytes(req.note)
            cp = Checkpoint.from_text(note.text)
        except (InvalidDataError, CheckpointError) as exc:
            return self._count(_error(400, "bad_request", str(exc)), "bad_request")
        verifiers = self.logs.get(cp.origin)
        if verifiers is None:
            return self._count(
                _error(404, "unknown_log", f"this witness does not witness log {cp.origin!r}"),
                "unknown_log",
            )
        try:
            open_note(req.note, verifiers)
        except (SignatureError, CheckpointError) as exc:
            return self._count(_error(403, "bad_signature", str(exc)), "bad_signature")
        if req.old_size > cp.size:
            return self._count(
                _error(
                    400,
                    "bad_request",
                    f"old size {req.old_size} is larger than the checkpoint's size {cp.size}",
                ),
                "bad_request",
            )
        lock = self._locks.setdefault(cp.origin, asyncio.Lock())
        async with lock:
            return self._check_and_cosign(req.old_size, list(req.proof), note, cp, body)

    def _conflict(self, size: int) -> Answer:
        return Answer(409, f"{size}\n".encode(), SIZE_CONTENT_TYPE)

    def _check_and_cosign(
        self, old_size: int, proof: list[bytes], note: Note, cp: Checkpoint, body: bytes
    ) -> Answer:
        stored = self.state.get(cp.origin)
        known = stored.size if stored is not None else 0
        known_root = stored.root_hash if stored is not None else EMPTY_ROOT
        if old_size != known:
            return self._count(self._conflict(known), "conflict")
        if stored is not None and cp.size == known and cp.root_hash != known_root:
            self._evidence(cp, body, f"a second root for size {cp.size}")
            return self._count(self._conflict(known), "fork")
        try:
            verify_consistency(
                first=known,
                second=cp.size,
                first_root=known_root,
                second_root=cp.root_hash,
                proof=proof,
            )
        except ProofError as exc:
            if stored is not None:
                self._evidence(cp, body, f"not consistent with size {known}: {exc}")
            return self._count(
                _error(
                    422,
                    "bad_proof",
                    f"checkpoint {cp.origin} size {cp.size} is not proven consistent with the "
                    f"cosigned size {known}: {exc}",
                ),
                "bad_proof",
            )
        line = cosign(note.text, self.name, self._key, timestamp=int(self._clock()))
        cosigned = add_signatures(note.to_bytes(), [line])
        try:
            self.state.put(LogState(cp.origin, cp.size, cp.root_hash, cosigned))
        except OSError as exc:  # not stored: no cosignature may leave this witness
            _log.error("cannot store the state of %s: %s", cp.origin, exc)
            return self._count(
                _error(503, "state_unavailable", f"the witness cannot store its state: {exc}"),
                "error",
            )
        self.metrics.tree_size.labels(cp.origin).set(cp.size)
        _log.info("cosigned %s at size %d", cp.origin, cp.size)
        return self._count(Answer(200, line.to_line().encode(), "text/plain"), "cosigned")

    def _evidence(self, cp: Checkpoint, body: bytes, why: str) -> None:
        try:
            path = self.state.keep_evidence(cp.origin, cp.size, body)
        except OSError as exc:
            _log.error("cannot keep evidence: %s", exc)
            path = None
        _log.critical(
            "REFUSED a checkpoint validly signed by log %s at size %d: %s. The log may be "
            "showing different histories to different parties (split view); request kept in %s",
            cp.origin,
            cp.size,
            why,
            path or "<evidence directory full>",
        )

    def info(self) -> dict[str, Any]:
        logs = []
        for origin in sorted(self.logs):
            st = self.state.get(origin)
            logs.append({"origin": origin, "size": st.size if st else 0})
        return {"name": self.name, "vkey": self.verifier.to_vkey(), "logs": logs}


WITNESS: Final = web.AppKey("cpi_witness", Witness)

_TEXT: Final = {"type": "string"}
OPERATIONS: Final[dict[tuple[str, str], Operation]] = {
    ("POST", "/add-checkpoint"): Operation(
        summary="Submit a checkpoint with a consistency proof; get the witness's cosignature",
        description=(
            "C2SP tlog-witness. The body (text) is the line 'old <size>', zero to 63 lines "
            "of base64 consistency-proof hashes, an empty line, then the signed checkpoint "
            "note (docs/protocol.md section 7). At most 72 KiB."
        ),
        replies={
            200: Reply("the witness's cosignature line(s)", media="text/plain", schema=_TEXT),
            409: Reply(
                "the old size is not the one the witness holds, or the same size has another "
                "root; the body is the witness's size and a newline",
                media=SIZE_CONTENT_TYPE,
                schema=_TEXT,
            ),
            422: Reply("the consistency proof does not verify", ErrorBody),
        },
        errors=(400, 403, 404, 408, 413, 503),
        tags=("witness",),
    ),
    ("GET", "/v1/witness"): Operation(
        summary="The witness's name, verifier key and the size it cosigned per log",
        replies={200: Reply("witness info", media="application/json", schema={"type": "object"})},
        tags=("witness",),
    ),
    ("GET", "/v1/witness/checkpoint"): Operation(
        summary="The latest checkpoint the witness cosigned for a log, with its cosignature",
        params=(Param("origin", "query", _TEXT, "the log's origin", required=True),),
        replies={200: Reply("a signed note", media="text/plain", schema=_TEXT)},
        errors=(404,),
        tags=("witness",),
    ),
    ("GET", "/healthz"): Operation(
        summary="The process runs", replies={200: Reply("ok", Health)}, tags=("operations",)
    ),
    ("GET", "/readyz"): Operation(
        summary="Ready (its state is loaded at start)",
        replies={200: Reply("ok", Health)},
        tags=("operations",),
    ),
    ("GET", "/metrics"): METRICS,
    ("GET", "/openapi.json"): SELF_DESCRIPTION,
}


def description(router: web.UrlDispatcher) -> dict[str, Any]:
    """The OpenAPI document of a witness app's routes."""
    return build(
        title="CPI transparency-log witness",
        version="1",
        description=(
            "Cosigns a log's checkpoints (C2SP tlog-cosignature) only when they are consistent "
            "with the last one it cosigned (C2SP tlog-witness)."
        ),
        routes=routes_of(router),
        table=OPERATIONS,
    )


async def _add_checkpoint(request: web.Request) -> web.StreamResponse:
    witness = request.app[WITNESS]
    try:
        body = await asyncio.wait_for(request.read(), _BODY_TIMEOUT_S)
    except TimeoutError:
        return _error(408, "request_timeout", "request body not received in time").response()
    except web.HTTPRequestEntityTooLarge:
        return _error(
            413, "too_large", f"request body is larger than {MAX_REQUEST_BYTES} bytes"
        ).response()
    return (await witness.add_checkpoint(body)).response()


async def _info(request: web.Request) -> web.StreamResponse:
    return web.json_response(request.app[WITNESS].info())


async def _checkpoint(request: web.Request) -> web.StreamResponse:
    witness = request.app[WITNESS]
    origin = request.query.get("origin", "")
    if origin not in witness.logs:
        return _error(
            404, "unknown_log", f"this witness does not witness log {origin!r}"
        ).response()
    st = witness.state.get(origin)
    if st is None:
        return _error(404, "not_found", f"no checkpoint of {origin!r} cosigned yet").response()
    return web.Response(body=st.note, content_type="text/plain", charset="utf-8")


async def _openapi(request: web.Request) -> web.StreamResponse:
    return web.json_response(description(request.app.router))


async def _health(request: web.Request) -> web.StreamResponse:
    return web.json_response({"status": "ok"})


async def _metrics(request: web.Request) -> web.StreamResponse:
    data = generate_latest(request.app[WITNESS].metrics.registry)
    return web.Response(body=data, content_type="text/plain", charset="utf-8")


@web.middleware
async def _json_errors(
    request: web.Request,
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
) -> web.StreamResponse:
    """aiohttp's own refusals (404 route, 405 method, 413) as JSON errors too."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}.get(
            exc.status, "bad_request"
        )
        answer = _error(exc.status, code, f"{request.method} {request.path}: {exc.reason}")
        resp = answer.response()
        if exc.status == 405 and "Allow" in exc.headers:
            resp.headers["Allow"] = exc.headers["Allow"]
        return resp


def create_witness_app(witness: Witness) -> web.Application:
    """The witness's aiohttp app; bodies above :data:`MAX_REQUEST_BYTES` get 413."""
    app = web.Application(client_max_size=MAX_REQUEST_BYTES, middlewares=[_json_errors])
    app[WITNESS] = witness
    app.router.add_post("/add-checkpoint", _add_checkpoint)
    app.router.add_get("/v1/witness", _info)
    app.router.add_get("/v1/witness/checkpoint", _checkpoint)
    app.router.add_get("/healthz", _health)
    app.router.add_get("/readyz", _health)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/openapi.json", _openapi)

    async def close_state(app: web.Application) -> None:
        with contextlib.suppress(OSError):
            app[WITNESS].state.close()

    app.on_cleanup.append(close_state)
    return app
