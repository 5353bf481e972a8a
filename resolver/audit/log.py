"""Transparency log, read side: the latest checkpoint, inclusion and consistency proofs.

The log's leaves are the audit stream (leaf ``i`` = the exact bytes of
``/cpi/v1/audit/<i + 1>``); the national node's log signer (:mod:`registry.logsigner`)
stores signed checkpoints under ``/cpi/v1/log/``.  :class:`LogView` follows both
through :mod:`registry.index` alone: it keeps a :class:`~schemas.merkle.MerkleTree` of
the leaf hashes (64 bytes a leaf) and, per CPID, the indices of its leaves; leaf bytes
are read from etcd when a proof or an entry is asked for.

A record version's leaf is the audit entry of the change that produced it
(``register``, ``update`` or ``renew``), whose ``digest`` is the SHA-256 (hex) of the
record envelope's compact JSON (``Envelope.to_json()``, the bytes stored at
``/cpi/v1/rec/<cpid>``).  It is found by ``cpid`` and ``digest``, or by ``cpid`` and
``version`` (from the entry's ``version`` field when entries carry one, otherwise
only for the record's current version, whose digest the index gives).

HTTP (mounted by :func:`add_log_routes`):

* ``GET /v1/log/checkpoint``: the latest signed checkpoint, ``text/plain`` (C2SP note).
* ``GET /v1/log/proof/inclusion?cpid=&digest=|version=`` or ``?index=``, optional
  ``&tree_size=`` (default: the latest checkpoint's):
  ``{"leaf_index", "tree_size", "leaf", "leaf_hash", "proof"}``.
* ``GET /v1/log/proof/consistency?first=&second=`` (``second`` defaults to the latest
  checkpoint's size): ``{"first", "second", "proof"}``.
* ``GET /v1/log/entries?start=&end=`` (end exclusive, at most 256):
  ``{"tree_size", "entries": [{"index", "leaf"}]}``.

Byte strings (``leaf``, hashes) are standard base64, as in the checkpoint.

On a federated resolver every route also takes ``root=`` (e.g. ``?root=SG``): that
root's log, read from its own index; without it, the home root's.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final

from aiohttp import web

from registry.index import Index, Keys, Prefix, parse_key
from resolver.audit.logcheck import CheckpointPolicy, policy_from_env
from resolver.errors import QueryError
from schemas import _json
from schemas.checkpoint import Checkpoint, Note
from schemas.cpid import parse as parse_cpid
from schemas.dsse import Envelope
from schemas.errors import (
    CheckpointError,
    CPIError,
    EnvelopeError,
    NotFoundError,
    RetrievalError,
    SignatureError,
)
from schemas.http import parse_int
from schemas.merkle import MerkleTree
from schemas.models import Record, parse_payload

__all__ = [
    "LOG_VIEW",
    "MAX_ENTRIES",
    "RECORD_OPS",
    "AuditLeaf",
    "LogView",
    "add_log_routes",
    "record_digest",
]

_log = logging.getLogger(__name__)

MAX_ENTRIES: Final = 256
RECORD_OPS: Final = frozenset({"register", "update", "renew"})
_LATEST: Final = Keys.log("latest")
_FETCH_WINDOW: Final = 64
_PAGE: Final = 1000


def record_digest(envelope: Envelope) -> str:
    """The audit stream's digest of a record envelope: SHA-256 hex of its compact JSON."""
    return hashlib.sha256(envelope.to_json()).hexdigest()


@dataclass(frozen=True, slots=True)
class AuditLeaf:
    """The fields of an audit entry the log looks at (others are ignored)."""

    seq: int
    op: str
    digest: str
    cpid: str | None = None
    subject: str | None = None
    version: int | None = None

    @classmethod
    def parse(cls, data: bytes) -> AuditLeaf:
        try:
            obj = _json.loads(data)
            if not isinstance(obj, dict):
                raise TypeError("not a JSON object")
            version = obj.get("version")
            return cls(
                seq=int(obj["seq"]),
                op=str(obj["op"]),
                digest=str(obj.get("digest", "")),
                cpid=obj.get("cpid") if isinstance(obj.get("cpid"), str) else None,
                subject=obj.get("subject") if isinstance(obj.get("subject"), str) else None,
                version=version if isinstance(version, int) else None,
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise EnvelopeError(f"audit entry is not a valid entry object: {exc}") from exc


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


class LogView:
    """The log as the resolver sees it: tree of the audit stream plus the latest checkpoint.

    With a ``policy`` (:class:`~resolver.audit.logcheck.CheckpointPolicy`), a checkpoint is
    served only once it verifies under it (the log's key and a quorum of witness
    cosignatures); until then the last one that did stays served.
    """

    def __init__(self, index: Index, policy: CheckpointPolicy | None = None) -> None:
        self._index = index
        self.policy = policy
        self.tree = MerkleTree()
        self.checkpoint: Checkpoint | None = None
        self.note: bytes | None = None
        self._by_cpid: dict[str, list[int]] = {}
        self._by_digest: dict[tuple[str, str], int] = {}
        """(cpid, digest) -> index of the last register/update/renew leaf with that digest."""
        self._by_version: dict[tuple[str, int], int] = {}
        """(cpid, version) -> index of the last record leaf that carries that version."""
        self._lock = asyncio.Lock()
        self.consistent = True
        """False when our tree's root at the checkpoint's size differs from the checkpoint."""

    # -- following the index -----------------------------------------------------------------

    def _add(self, value: bytes) -> None:
        i = self.tree.append(value)
        try:
            leaf = AuditLeaf.parse(value)
        except EnvelopeError:
            _log.error("audit entry %d is not an entry object; its leaf is kept as is", i + 1)
            return
        if leaf.cpid is not None:
            self._by_cpid.setdefault(leaf.cpid, []).append(i)
            self._index_record_leaf(leaf, i)

    def _index_record_leaf(self, leaf: AuditLeaf, i: int) -> None:
        """Remember a record leaf by digest (and version), so a lookup reads no etcd key."""
        if leaf.cpid is None or leaf.op not in RECORD_OPS:
            return
        if leaf.digest:
            self._by_digest[(leaf.cpid, leaf.digest.lower())] = i
        if leaf.version is not None:
            self._by_version[(leaf.cpid, leaf.version)] = i

    async def _initial(self) -> None:
        async for page in self._index.iter_prefix(Prefix.AUDIT, page_size=_PAGE):
            for kv in page.kvs:
                seq = int(parse_key(kv.key).name)
                if seq != self.tree.size + 1:
                    _log.error(
                        "audit stream skips from %d to %d; the log view stops at %d",
                        self.tree.size,
                        seq,
                        self.tree.size,
                    )
                    return
                self._add(kv.value)

    async def _tail(self) -> None:
        """Read entries after our size, a window of concurrent gets at a time."""
        while True:
            start = self.tree.size + 1
            kvs = await asyncio.gather(
                *(self._index.get(Keys.audit(s)) for s in range(start, start + _FETCH_WINDOW))
            )
            for kv in kvs:
                if kv is None:
                    return
                self._add(kv.value)

    async def refresh(self) -> None:
        """Catch up with the audit stream and the latest checkpoint."""
        async with self._lock:
            if self.tree.size == 0:
                await self._initial()
            await self._tail()
            kv = await self._index.get(_LATEST)
            if kv is None:
                return
            try:
                cp = Checkpoint.from_text(Note.from_bytes(kv.value).text)
                if self.policy is not None and kv.value != self.note:
                    self.policy.check(kv.value)
            except CheckpointError as exc:
                _log.error("%s holds no readable checkpoint: %s", _LATEST, exc)
                return
            except SignatureError as exc:
                _log.warning("not serving the checkpoint at size %d yet: %s", cp.size, exc)
                return
            self.checkpoint, self.note = cp, kv.value
            if cp.size <= self.tree.size:
                ok = self.tree.root(cp.size) == cp.root_hash
                if not ok and self.consistent:
                    _log.critical(
                        "the audit stream's root at size %d differs from the signed checkpoint: "
                        "audit entries were rewritten after they were read, or the log signer "
                        "signed another history",
                        cp.size,
                    )
                self.consistent = ok

    async def follow(self, interval: float) -> None:
        """Refresh every ``interval`` seconds, forever (errors are logged and retried)."""
        while True:
            try:
                await self.refresh()
            except RetrievalError as exc:
                _log.warning("log view refresh failed: %s", exc)
            except Exception:  # never let the view die silently
                _log.exception("log view refresh failed")
            await asyncio.sleep(interval)

    # -- answers -------------------------------------------------------------------------------

    def _size(self, tree_size: int | None) -> int:
        if tree_size is None:
            if self.checkpoint is None:
                raise NotFoundError("the log has no signed checkpoint yet")
            tree_size = self.checkpoint.size
        if not 0 <= tree_size <= self.tree.size:
            raise NotFoundError(
                f"tree size {tree_size} is not available: this resolver has read "
                f"{self.tree.size} log entries"
            )
        return tree_size

    async def leaf_bytes(self, index: int) -> bytes:
        kv = await self._index.get(Keys.audit(index + 1))
        if kv is None:
            raise NotFoundError(f"log entry {index} ({Keys.audit(index + 1)}) is missing")
        return kv.value

    async def find_leaf(
        self, cpid: str, *, digest: str | None = None, version: int | None = None
    ) -> int:
        """The leaf index of the record version of ``cpid`` with this digest or version.

        From maps built while following the audit stream: no etcd read per version (only
        ``/rec/<cpid>`` for a lookup by version, to learn the current version's digest).
        """
        candidates = self._by_cpid.get(cpid, [])
        if not candidates:
            raise NotFoundError(f"the log has no entry for {cpid}")
        want = digest.lower() if digest else None
        current: int | None = None
        if want is None and version is not None:
            kv = await self._index.get(Keys.rec(cpid))
            if kv is not None:
                env = Envelope.from_json(kv.value)
                try:
                    rec = parse_payload(env.payload_type, env.payload, Record)
                except CPIError:
                    rec = None
                if rec is not None and rec.version == version:
                    want, current = record_digest(env), rec.version
        if want is not None:
            found = self._by_digest.get((cpid, want))
            if found is not None:
                return found
        elif version is not None:
            found = self._by_version.get((cpid, version))
            if found is not None:
                return found
        if want is not None:
            what = f"version {current}" if current is not None else f"digest {want}"
            raise NotFoundError(f"the log has no register/update/renew of {cpid} with {what}")
        raise NotFoundError(
            f"the log has no entry for version {version} of {cpid} (entries carry no version; "
            "only the current version can be found by number, older ones by digest=)"
        )

    async def inclusion(self, index: int, tree_size: int | None = None) -> dict[str, Any]:
        n = self._size(tree_size)
        if not 0 <= index < n:
            raise NotFoundError(f"leaf index {index} is not below tree size {n}")
        leaf = await self.leaf_bytes(index)
        return {
            "leaf_index": index,
            "tree_size": n,
            "leaf": _b64(leaf),
            "leaf_hash": _b64(self.tree.leaf_hash(index)),
            "proof": [_b64(h) for h in self.tree.inclusion_proof(index, n)],
        }

    def consistency(self, first: int, second: int | None = None) -> dict[str, Any]:
        n = self._size(second)
        if not 0 <= first <= n:
            raise NotFoundError(f"first size {first} is not in 0..{n}")
        return {
            "first": first,
            "second": n,
            "proof": [_b64(h) for h in self.tree.consistency_proof(first, n)],
        }

    async def entries(self, start: int, end: int) -> dict[str, Any]:
        end = min(end, self.tree.size, start + MAX_ENTRIES)
        if not 0 <= start < end:
            raise NotFoundError(f"no entries in [{start}, {end}) (the log has {self.tree.size})")
        values = await asyncio.gather(*(self.leaf_bytes(i) for i in range(start, end)))
        return {
            "tree_size": self.tree.size,
            "entries": [{"index": start + k, "leaf": _b64(v)} for k, v in enumerate(values)],
        }


# =============================================================================
# HTTP
# =============================================================================

LOG_VIEW: Final = web.AppKey("cpi_log_view", LogView)


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


def _int(request: web.Request, name: str, *, required: bool = False) -> int | None:
    raw = request.query.get(name)
    if raw is None:  # an empty value is not a number either: refused below
        if required:
            raise QueryError(f"query parameter {name!r} is required")
        return None
    value = parse_int(raw)
    if value is None:
        raise QueryError(
            f"query parameter {name}={raw!r} must be a non-negative integer "
            "(ASCII digits 0-9 only, at most 20)"
        )
    return value


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


RootIndex = Callable[[web.Application, str], Index | None]
"""A federated app's root -> the index holding that root's log (None: not a root here)."""


class _RootViews:
    """The log views of a federation's roots other than the home one, made on first use
    and kept following their index while it stays the same object."""

    def __init__(self, find: RootIndex, interval: float) -> None:
        self.find = find
        self.interval = interval
        self.views: dict[str, tuple[Index, LogView, asyncio.Task[None]]] = {}

    def view(self, app: web.Application, root: str) -> LogView:
        home = app[LOG_VIEW]
        idx = self.find(app, root)
        if idx is None:
            raise NotFoundError(f"root {root} is not a root of this resolver (or not trusted now)")
        if idx is home._index:
            return home
        known = self.views.get(root)
        if known is not None and known[0] is idx:
            return known[1]
        if known is not None:
            known[2].cancel()
        view = LogView(idx)  # the checkpoint policy of the environment is the home log's
        task = asyncio.create_task(view.follow(self.interval), name=f"log-view-{root}")
        self.views[root] = (idx, view, task)
        return view

    async def close(self) -> None:
        tasks = [t for _, _, t in self.views.values()]
        self.views.clear()
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t


_ROOT_VIEWS: Final = web.AppKey("cpi_log_root_views", _RootViews)


def _view(request: web.Request) -> LogView:
    """The home log's view, or with ``?root=SG`` that root's (federated apps only)."""
    root = request.query.get("root")
    if root is None:
        return request.app[LOG_VIEW]
    views = request.app.get(_ROOT_VIEWS)
    if views is None:
        raise QueryError("this resolver serves one root's log; leave out root=")
    ns = root.strip().upper()
    if not ns.isascii() or not ns.isalnum() or not 1 <= len(ns) <= 32:
        raise QueryError(f"root={root[:40]!r} is not a root name (e.g. root=SG)")
    return views.view(request.app, ns)


def _handler(fn: Callable[[LogView, web.Request], Awaitable[web.StreamResponse]]) -> Handler:
    async def handle(request: web.Request) -> web.StreamResponse:
        try:
            view = _view(request)
            if view.tree.size == 0 and view.checkpoint is None:
                await view.refresh()
            return await fn(view, request)
        except CPIError as exc:
            return _error(exc.http_status, exc.code, str(exc))

    return handle


async def _checkpoint(view: LogView, request: web.Request) -> web.StreamResponse:
    if view.note is None:
        await view.refresh()
    if view.note is None:
        raise NotFoundError("the log has no signed checkpoint yet")
    return web.Response(body=view.note, content_type="text/plain", charset="utf-8")


async def _inclusion(view: LogView, request: web.Request) -> web.StreamResponse:
    tree_size = _int(request, "tree_size")
    index = _int(request, "index")
    if index is None:
        cpid = request.query.get("cpid")
        if not cpid:
            raise QueryError("give index=, or cpid= with digest= or version=")
        digest = request.query.get("digest") or None
        version = _int(request, "version")
        if digest is None and version is None:
            raise QueryError("cpid= needs digest= (sha256 hex of the record envelope) or version=")
        try:
            cpid = parse_cpid(cpid).to_text()
        except CPIError as exc:
            raise QueryError(str(exc)) from exc
        if view.tree.size < (tree_size or 0) or (
            view.checkpoint is not None and view.tree.size < view.checkpoint.size
        ):
            await view.refresh()
        index = await view.find_leaf(cpid, digest=digest, version=version)
        n = view._size(tree_size)
        if index >= n:
            raise NotFoundError(
                f"the entry for {cpid} is leaf {index}, not yet under a checkpoint of size {n}"
            )
    return web.json_response(await view.inclusion(index, tree_size))


async def _consistency(view: LogView, request: web.Request) -> web.StreamResponse:
    first = _int(request, "first", required=True)
    assert first is not None
    return web.json_response(view.consistency(first, _int(request, "second")))


async def _entries(view: LogView, request: web.Request) -> web.StreamResponse:
    start = _int(request, "start", required=True)
    assert start is not None
    end = _int(request, "end")
    return web.json_response(await view.entries(start, start + MAX_ENTRIES if end is None else end))


def add_log_routes(
    app: web.Application,
    *,
    index: Index | web.AppKey[Index] | Callable[[web.Application], Index],
    refresh_interval: float = 1.0,
    policy: CheckpointPolicy | None = None,
    root_index: RootIndex | None = None,
) -> None:
    """Register the ``/v1/log/...`` routes and a task keeping the log view fresh.

    ``index`` is the resolver's :class:`Index`, or the ``AppKey`` under which the app
    stores it, or a function of the app returning it (read at start-up, so an index
    opened in an earlier ``cleanup_ctx`` works).  ``policy`` defaults to the one the
    environment describes (:func:`~resolver.audit.logcheck.policy_from_env`), if any.

    ``root_index`` (a federated resolver) maps a root to the index holding its log:
    every route then takes ``?root=SG`` for that root's log (without it, the home
    log).  The policy applies to the home log only; another root's checkpoints are
    served as that root stores them (an auditor checks them with that root's log key).
    """
    if policy is None:
        policy = policy_from_env()

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        if isinstance(index, Index):
            idx = index
        elif isinstance(index, web.AppKey):
            idx = app[index]
        else:
            idx = index(app)
        view = LogView(idx, policy)
        app[LOG_VIEW] = view
        if root_index is not None:
            app[_ROOT_VIEWS] = _RootViews(root_index, refresh_interval)
        task = asyncio.create_task(view.follow(refresh_interval), name="log-view")
        yield
        task.cancel()
        if root_index is not None:
            await app[_ROOT_VIEWS].close()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    app.cleanup_ctx.append(ctx)
    app.router.add_get("/v1/log/checkpoint", _handler(_checkpoint))
    app.router.add_get("/v1/log/proof/inclusion", _handler(_inclusion))
    app.router.add_get("/v1/log/proof/consistency", _handler(_consistency))
    app.router.add_get("/v1/log/entries", _handler(_entries))
