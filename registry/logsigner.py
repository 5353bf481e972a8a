"""The transparency-log signer: the national node's log key signs checkpoints of the audit stream.

The log's leaves are the audit stream (:mod:`registry.changes`): leaf ``i`` is the exact
bytes stored at ``/cpi/v1/audit/<i + 1>`` (audit sequence numbers start at 1, leaf
indices at 0).  Nothing is copied: the tree is rebuilt from those entries, and the
log stores only its signed checkpoints (C2SP tlog-checkpoint, :mod:`schemas.checkpoint`):

* ``/cpi/v1/log/head/<zero-padded size>`` (:meth:`Keys.log_head`): the checkpoint
  signed at that tree size, written once (compare: absent);
* ``/cpi/v1/log/latest`` (``Keys.log("latest")``): the newest checkpoint, replaced
  only with a compare on its previous ``mod_revision``.

Both are written in one transaction, so two signers racing cannot both move
``latest``, and a size is never signed twice with different roots without the
second signer noticing.

Before every signature the signer checks that the tree it is about to sign extends
the last signed checkpoint (the root at the old size is unchanged), and it watches
``/cpi/v1/audit/`` for any write to an entry it has already read.  A rewritten,
deleted or skipped entry raises :class:`~schemas.errors.LogConsistencyError` and is
logged at CRITICAL: the signer then refuses to sign anything (a log must never sign
a checkpoint inconsistent with one it signed before).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import aiohttp
from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
    start_http_server,
    write_to_textfile,
)

from registry import keyfile
from registry.index import Cmp, Compacted, Index, Keys, Op, Prefix, WatchEvent, parse_key
from schemas import _json
from schemas import checkpoint as cpmod
from schemas.checkpoint import Checkpoint, Note, NoteSignature, NoteVerifier
from schemas.cosignature import (
    CosignerVerifier,
    add_signatures,
    format_add_checkpoint,
    parse_signature_lines,
    parse_size_body,
)
from schemas.errors import (
    CheckpointError,
    CPIError,
    KeyFileError,
    LogConsistencyError,
    RetrievalError,
    SignatureError,
)
from schemas.keys import Ed25519PrivateKey
from schemas.merkle import MerkleTree, leaf_hash

__all__ = [
    "DEFAULT_ORIGIN",
    "LATEST_KEY",
    "LOG_KEY_FILE",
    "LOG_VKEY_FILE",
    "LogSigner",
    "SignResult",
    "SignerMetrics",
    "WitnessClient",
    "WitnessEndpoint",
    "check_entry",
    "init_log_key",
    "load_verifier",
    "read_audit_tree",
    "vkey_path_for",
]

_log = logging.getLogger(__name__)

DEFAULT_ORIGIN: Final = "cpi.national/log"
"""Origin line (and key name) of the log's checkpoints unless configured otherwise."""
LOG_KEY_FILE: Final = "log.key"
LOG_VKEY_FILE: Final = "log.vkey"
LATEST_KEY: Final = Keys.log("latest")
_PAGE: Final = 1000
MAX_ANSWER_BYTES: Final = 64 * 1024
"""A witness's answer is read up to this many bytes (a few signature lines are ~150)."""


def _alarm(message: str, *, kind: str) -> LogConsistencyError:
    """Log a loud, unmistakable alarm and return the error to raise."""
    bar = "!" * 78
    _log.critical(
        "\n%s\nTRANSPARENCY LOG ALARM (%s): %s\nrefusing to sign.\n%s", bar, kind, message, bar
    )
    return LogConsistencyError(message, kind=kind)


# =============================================================================
# Keys
# =============================================================================


def vkey_path_for(key_path: str | os.PathLike[str]) -> Path:
    """Where the verifier key of a log key file lives: beside it, suffix ``.vkey``."""
    return Path(key_path).with_suffix(".vkey")


def init_log_key(
    path: str | os.PathLike[str], *, origin: str = DEFAULT_ORIGIN
) -> tuple[Ed25519PrivateKey, NoteVerifier, bool]:
    """Load the log key at ``path`` or create it (0600); (re)write its ``.vkey`` beside it.

    The verifier key text (``<origin>+<key id>+<base64>``, Go sumdb/note form) is what
    auditors need: give them the ``.vkey`` file with the anchor.  Returns the key, its
    verifier and whether the key was created.
    """
    key, created = keyfile.load_or_create(path)
    verifier = NoteVerifier.from_public_key(origin, key)
    vpath = vkey_path_for(path)
    text = verifier.to_vkey() + "\n"
    if not vpath.exists() or vpath.read_text(encoding="utf-8") != text:
        vpath.write_text(text, encoding="utf-8")
    return key, verifier, created


def load_verifier(path: str | os.PathLike[str]) -> NoteVerifier:
    """Read a verifier key file (one line, ``<name>+<hex key id>+<base64 key>``)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise KeyFileError(f"{p}: cannot read log verifier key: {exc.strerror}") from exc
    try:
        return NoteVerifier.from_vkey(text)
    except CheckpointError as exc:
        raise KeyFileError(f"{p}: {exc}") from exc


# =============================================================================
# Reading the audit stream
# =============================================================================


def _entry_seq(key: str) -> int:
    name = parse_key(key).name
    if not name.isdigit():
        raise ValueError(f"audit key {key!r} does not end in a sequence number")
    return int(name)


def check_entry(seq: int, value: bytes) -> None:
    """An audit entry must be a JSON object whose ``seq`` is its key's sequence number."""
    try:
        obj = _json.loads(value)
        got = obj.get("seq") if isinstance(obj, dict) else None
    except ValueError:
        got = "<not JSON>"
    if got != seq:
        raise _alarm(
            f"audit entry {Keys.audit(seq)} holds seq {got!r}, expected {seq}", kind="rewritten"
        )


async def read_audit_tree(
    index: Index, *, revision: int = 0, page_size: int = _PAGE
) -> tuple[MerkleTree, int]:
    """Every audit entry, in order, as the leaves of a Merkle tree; and the listing's revision.

    Raises :class:`LogConsistencyError` (kind ``gap``) when a sequence number is
    missing, and (kind ``rewritten``) when an entry does not carry its own number.
    """
    tree = MerkleTree()
    rev = revision
    async for page in index.iter_prefix(Prefix.AUDIT, page_size=page_size, revision=revision):
        rev = page.revision
        for kv in page.kvs:
            seq = _entry_seq(kv.key)
            expected = tree.size + 1
            if seq != expected:
                raise _alarm(
                    f"audit stream has entry {seq} where {expected} was expected "
                    f"(entries {expected}..{seq - 1} are missing)",
                    kind="gap",
                )
            check_entry(seq, kv.value)
            tree.append(kv.value)
    if rev == 0:
        rev = await index.revision()
    return tree, rev


# =============================================================================
# Witnesses
# =============================================================================


@dataclass(frozen=True, slots=True)
class WitnessEndpoint:
    """A witness the signer submits checkpoints to: its URL prefix and verifier key."""

    url: str
    verifier: CosignerVerifier

    @classmethod
    def parse(cls, spec: str) -> WitnessEndpoint:
        """``URL=VKEY`` (the vkey as text, or a file holding it)."""
        url, sep, vkey = spec.partition("=")
        if not sep or not url.startswith(("http://", "https://")):
            raise KeyFileError(f"witness {spec[:80]!r} must be URL=VKEY")
        path = Path(vkey)
        try:
            text = path.read_text(encoding="utf-8") if path.is_file() else vkey
            return cls(url.rstrip("/"), CosignerVerifier.from_vkey(text))
        except (OSError, CheckpointError) as exc:
            raise KeyFileError(f"witness {url}: bad verifier key: {exc}") from exc


@dataclass(slots=True)
class WitnessClient:
    """Submits checkpoints to one witness (C2SP tlog-witness ``add-checkpoint``).

    Remembers the size the witness last cosigned (learnt from its 409 answers), so each
    submission carries the consistency proof from there.
    """

    endpoint: WitnessEndpoint
    known_size: int = 0
    refused: str | None = None
    """Why the witness last refused a checkpoint (it holds another history), if it did."""
    last_error: str | None = field(default=None)

    @property
    def name(self) -> str:
        return self.endpoint.verifier.name

    async def submit(
        self, http: aiohttp.ClientSession, note: bytes, cp: Checkpoint, tree: MerkleTree
    ) -> NoteSignature | None:
        """The witness's verified cosignature line, or None (reason in ``refused``/``last_error``)."""
        text = Note.from_bytes(note).text
        old = self.known_size
        for _ in range(3):
            if old > cp.size:
                self.last_error = f"the witness has cosigned size {old}, above {cp.size}"
                return None
            proof = tree.consistency_proof(old, cp.size) if old else []
            body = format_add_checkpoint(old, proof, note)
            try:
                async with http.post(self.endpoint.url + "/add-checkpoint", data=body) as resp:
                    status, answer = resp.status, await resp.content.read(MAX_ANSWER_BYTES)
            except (aiohttp.ClientError, TimeoutError) as exc:
                self.last_error = f"unreachable: {exc or type(exc).__name__}"
                return None
            if status == 200:
                try:
                    for line in parse_signature_lines(answer):
                        if (line.name, line.key_id) == (self.name, self.endpoint.verifier.key_id):
                            self.endpoint.verifier.verify(text, line)
                            self.known_size, self.refused, self.last_error = cp.size, None, None
                            return line
                except (CheckpointError, SignatureError) as exc:
                    self.last_error = f"bad cosignature: {exc}"
                    return None
                self.last_error = "the answer holds no cosignature by this witness's key"
                return None
            if status == 409:
                try:
                    size = parse_size_body(answer)
                except (CheckpointError, UnicodeDecodeError) as exc:
                    self.last_error = f"409 without a size: {exc}"
                    return None
                if size == old:  # right size, but the witness holds another root there
                    self.known_size = size
                    self.refused = (
                        f"witness {self.name} refuses size {cp.size}: it cosigned another root "
                        f"at size {size}"
                    )
                    return None
                old = size
                continue
            message = answer[:300].decode("utf-8", "replace")
            if status == 422:
                self.known_size = old
                self.refused = (
                    f"witness {self.name} refuses size {cp.size}: not consistent with the size "
                    f"{old} it cosigned ({message})"
                )
            else:
                self.last_error = f"answered {status}: {message}"
            return None
        self.last_error = "the witness's size kept changing"
        return None


# =============================================================================
# The signer
# =============================================================================


class SignerMetrics:
    """The signer's Prometheus metrics, on a private registry (``cpi log sign`` has no HTTP
    service: :meth:`serve` starts prometheus_client's exposition server, :meth:`write`
    writes a node_exporter textfile)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            r.register(collector)
        self.signed = Counter(
            "cpi_log_signer_checkpoints",
            "Checkpoints written by this signer (a peer's identical head is not counted)",
            registry=r,
        )
        self.tree_size = Gauge(
            "cpi_log_signer_tree_size",
            "Tree size of the newest signed checkpoint this signer knows (its own or a peer's)",
            registry=r,
        )
        self.audit_entries = Gauge(
            "cpi_log_signer_audit_entries",
            "Entries of the audit stream read so far (the size the next checkpoint will have)",
            registry=r,
        )
        self.last_sign = Gauge(
            "cpi_log_signer_last_sign_timestamp_seconds",
            "Unix time of this signer's last written checkpoint (0: none since start)",
            registry=r,
        )
        self.errors = Counter(
            "cpi_log_signer_errors",
            "Failed signing rounds by kind (etcd, or the alarm: rewritten, gap, split_view)",
            ["kind"],
            registry=r,
        )
        self.cosignatures = Counter(
            "cpi_log_signer_cosignatures",
            "Checkpoint submissions to witnesses by witness and outcome (cosigned, refused: "
            "the witness holds another history, error: unreachable or a bad answer)",
            ["witness", "outcome"],
            registry=r,
        )
        self.alarm = Gauge(
            "cpi_log_signer_alarm",
            "1 once the signer refuses to sign (the audit stream was rewritten), else 0",
            registry=r,
        )

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Serve ``/metrics`` over plain HTTP on ``host:port`` (a thread); the port bound."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return int(server.server_address[1])

    def write(self, path: str | os.PathLike[str]) -> None:
        """Write the text exposition to ``path`` atomically (node_exporter's textfile collector)."""
        write_to_textfile(os.fspath(path), self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)


@dataclass(frozen=True, slots=True)
class SignResult:
    """What :meth:`LogSigner.sign` did."""

    checkpoint: Checkpoint
    note: bytes
    written: bool
    """False when another signer had already written the same tree head."""


class LogSigner:
    """Signs checkpoints of the audit stream into ``/cpi/v1/log/``.

    Use :meth:`run` for the long-running process (``cpi log sign``), or
    :meth:`load` then :meth:`sign` for one checkpoint.
    """

    def __init__(
        self,
        index: Index,
        key: Ed25519PrivateKey,
        *,
        origin: str = DEFAULT_ORIGIN,
        clock: Callable[[], float] = time.time,
        metrics: SignerMetrics | None = None,
        witnesses: Sequence[WitnessEndpoint] = (),
        witness_ssl: ssl.SSLContext | None = None,
        witness_timeout: float = 5.0,
        witness_retry_s: float = 5.0,
    ) -> None:
        self._index = index
        self.witnesses = [WitnessClient(w) for w in witnesses]
        self._witness_ssl = witness_ssl
        self._witness_timeout = witness_timeout
        self._witness_retry_s = witness_retry_s
        self._http: aiohttp.ClientSession | None = None
        self._last_amend = 0.0
        self.metrics = metrics
        self._key = key
        self.origin = origin
        self.verifier = NoteVerifier.from_public_key(origin, key)
        self._clock = clock
        self.tree = MerkleTree()
        self.revision = 0
        """Store revision up to which the audit stream has been read."""
        self.signed: Checkpoint | None = None
        """The newest checkpoint seen in the index (ours or a peer's), verified."""
        self._latest_rev = 0
        self._failure: LogConsistencyError | None = None

    # -- state -------------------------------------------------------------------------------

    async def _read_latest(self) -> tuple[Checkpoint | None, int]:
        kv = await self._index.get(LATEST_KEY)
        if kv is None:
            return None, 0
        try:
            cp = cpmod.open_checkpoint(kv.value, self.verifier, origin=self.origin)
        except (CheckpointError, SignatureError) as exc:
            raise _alarm(
                f"{LATEST_KEY} holds a checkpoint this log's key ({self.verifier.to_vkey()}) "
                f"did not sign for origin {self.origin!r}: {exc}",
                kind="rewritten",
            ) from exc
        return cp, kv.mod_revision

    def _check_extends(self, cp: Checkpoint, *, authoritative: bool) -> bool:
        """Is our tree consistent with ``cp``?  False when we have not read that far yet."""
        if cp.size > self.tree.size:
            if authoritative:
                raise _alarm(
                    f"the audit stream has {self.tree.size} entries but checkpoint "
                    f"{cp.size} was signed: entries were deleted",
                    kind="rewritten",
                )
            return False
        root = self.tree.root(cp.size)
        if root != cp.root_hash:
            raise _alarm(
                f"the audit stream's first {cp.size} entries hash to {root.hex()}, but the "
                f"signed checkpoint at {cp.size} has root {cp.root_hash.hex()}: past audit "
                "entries were rewritten",
                kind="rewritten",
            )
        return True

    async def load(self) -> None:
        """Read the whole audit stream and check it against the latest signed checkpoint."""
        self.tree, self.revision = await read_audit_tree(self._index)
        cp, rev = await self._read_latest()
        if cp is not None:
            self._check_extends(cp, authoritative=True)
        self.signed, self._latest_rev = cp, rev
        _log.info(
            "log %s: %d audit entries read; latest checkpoint %s",
            self.origin,
            self.tree.size,
            "none" if cp is None else f"at size {cp.size}",
        )

    def apply(self, event: WatchEvent) -> None:
        """Take one watch event on ``/cpi/v1/audit/``: an append, or an alarm."""
        if self._failure is not None:
            raise self._failure
        try:
            seq = _entry_seq(event.kv.key)
        except ValueError as exc:
            self._failure = _alarm(f"unexpected key in the audit stream: {exc}", kind="gap")
            raise self._failure from exc
        n = self.tree.size
        if event.type == "delete":
            if seq <= n:
                self._failure = _alarm(
                    f"audit entry {seq} (leaf {seq - 1}) was deleted at revision {event.revision}",
                    kind="rewritten",
                )
                raise self._failure
            return
        if seq <= n:
            if leaf_hash(event.kv.value) == self.tree.leaf_hash(seq - 1):
                _log.warning("audit entry %d was rewritten with identical bytes", seq)
                return
            self._failure = _alarm(
                f"audit entry {seq} (leaf {seq - 1}) was overwritten at revision "
                f"{event.revision} with different content",
                kind="rewritten",
            )
            raise self._failure
        if seq != n + 1:
            self._failure = _alarm(
                f"audit entry {seq} appeared while the stream ends at {n}", kind="gap"
            )
            raise self._failure
        try:
            check_entry(seq, event.kv.value)
        except LogConsistencyError as exc:
            self._failure = exc
            raise
        self.tree.append(event.kv.value)
        self.revision = max(self.revision, event.revision)

    # -- signing -------------------------------------------------------------------------------

    def _checkpoint(self) -> Checkpoint:
        return Checkpoint.create(
            origin=self.origin,
            size=self.tree.size,
            root_hash=self.tree.root(),
            timestamp=int(self._clock()),
        )

    @property
    def pending(self) -> bool:
        """True when the tree has grown past the newest checkpoint (or none exists)."""
        return self.signed is None or self.tree.size > self.signed.size

    async def sign(self, *, force: bool = False) -> SignResult | None:
        """Sign the current tree if it grew (or ``force``); ``None`` when nothing to do.

        Re-reads ``latest`` first and checks our tree extends it.  Raises
        :class:`LogConsistencyError` instead of signing when history was rewritten.
        """
        if self._failure is not None:
            raise self._failure
        latest, latest_rev = await self._read_latest()
        if latest is not None and not self._check_extends(latest, authoritative=False):
            _log.info("latest checkpoint is ahead of our view (%d); catching up", latest.size)
            return None
        self.signed, self._latest_rev = latest, latest_rev
        if not force and not self.pending:
            return None
        cp = self._checkpoint()
        note = await self._cosign(cpmod.sign_checkpoint(cp, self._key), cp)
        head = Keys.log_head(cp.size)
        result = await self._index.txn(
            compare=[Cmp.mod_revision(LATEST_KEY, "==", latest_rev), Cmp.absent(head)],
            success=[Op.put(head, note), Op.put(LATEST_KEY, note)],
            failure=[Op.get(head)],
        )
        if result.succeeded:
            self.signed, self._latest_rev = cp, result.revision
            _log.info("log %s: signed checkpoint at size %d", self.origin, cp.size)
            if self.metrics is not None:
                self.metrics.signed.inc()
                self.metrics.last_sign.set(self._clock())
            return SignResult(cp, note, True)
        existing = result.responses[0].kvs
        if existing:
            other = cpmod.open_checkpoint(existing[0].value, self.verifier, origin=self.origin)
            if other.root_hash != cp.root_hash:
                raise _alarm(
                    f"{head} already holds a checkpoint with root {other.root_hash.hex()}, "
                    f"but the audit stream's root at that size is {cp.root_hash.hex()}",
                    kind="split_view",
                )
            _log.info("checkpoint at size %d was already signed by a peer", cp.size)
            return SignResult(other, existing[0].value, False)
        _log.info("latest checkpoint moved under us; will retry")
        return None

    # -- witnesses -------------------------------------------------------------------------------

    def _session(self) -> aiohttp.ClientSession:
        if self._http is None or self._http.closed:
            self._http = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self._witness_timeout),
                connector=aiohttp.TCPConnector(ssl=self._witness_ssl or True),
            )
        return self._http

    async def aclose(self) -> None:
        """Close the HTTP session to the witnesses (if one was opened)."""
        if self._http is not None:
            await self._http.close()
            self._http = None

    async def _cosign(
        self, note: bytes, cp: Checkpoint, clients: Sequence[WitnessClient] | None = None
    ) -> bytes:
        """``note`` with the cosignatures of the witnesses that accept it appended."""
        clients = self.witnesses if clients is None else clients
        if not clients:
            return note
        http = self._session()
        lines = await asyncio.gather(*(w.submit(http, note, cp, self.tree) for w in clients))
        got = []
        for w, line in zip(clients, lines, strict=True):
            if line is not None:
                got.append(line)
                outcome = "cosigned"
            elif w.refused is not None:
                outcome = "refused"
                _log.critical(
                    "WITNESS REFUSED checkpoint %d of %s: %s. This log key has signed a "
                    "history the witness holds and this audit stream does not (split view?)",
                    cp.size,
                    self.origin,
                    w.refused,
                )
            else:
                outcome = "error"
                _log.warning("witness %s: no cosignature for %d: %s", w.name, cp.size, w.last_error)
            if self.metrics is not None:
                self.metrics.cosignatures.labels(w.name, outcome).inc()
        return add_signatures(note, got) if got else note

    async def cosign_latest(self) -> bool:
        """Ask the witnesses whose cosignature ``/log/latest`` lacks, and add what they give.

        Rewrites only ``latest`` (compare: its ``mod_revision``); the signed text is
        unchanged.  True when cosignatures were added.
        """
        if not self.witnesses:
            return False
        kv = await self._index.get(LATEST_KEY)
        if kv is None:
            return False
        cp = cpmod.open_checkpoint(kv.value, self.verifier, origin=self.origin)
        if cp.size > self.tree.size:
            return False
        have = {(s.name, s.key_id) for s in Note.from_bytes(kv.value).signatures}
        missing = [
            w
            for w in self.witnesses
            if (w.name, w.endpoint.verifier.key_id) not in have and w.refused is None
        ]
        if not missing:
            return False
        note = await self._cosign(kv.value, cp, missing)
        if note == kv.value:
            return False
        result = await self._index.txn(
            compare=[Cmp.mod_revision(LATEST_KEY, "==", kv.mod_revision)],
            success=[Op.put(LATEST_KEY, note)],
            failure=[],
        )
        if result.succeeded:
            self._latest_rev = result.revision
        return bool(result.succeeded)

    # -- the long-running loop ------------------------------------------------------------------

    async def _follow(self) -> None:
        """Apply audit-stream events until compaction (then return) or an alarm (raise)."""
        watch = self._index.watch_prefix(Prefix.AUDIT, start_revision=self.revision + 1)
        async with watch:
            async for event in watch:
                if isinstance(event, Compacted):
                    _log.info("audit watch compacted at %d; re-reading", event.compact_revision)
                    return
                self.apply(event)

    def _observe(self) -> None:
        """Bring the gauges of :attr:`metrics` up to date."""
        m = self.metrics
        if m is None:
            return
        m.audit_entries.set(self.tree.size)
        m.tree_size.set(self.signed.size if self.signed is not None else 0)

    def _count_error(self, exc: BaseException) -> None:
        m = self.metrics
        if m is None:
            return
        if isinstance(exc, LogConsistencyError):
            m.errors.labels(exc.kind).inc()
            m.alarm.set(1)
        elif isinstance(exc, CPIError):
            m.errors.labels("etcd" if isinstance(exc, RetrievalError) else exc.code).inc()
        else:
            m.errors.labels("other").inc()

    async def run(
        self,
        *,
        interval: float = 2.0,
        stop: asyncio.Event | None = None,
        on_tick: Callable[[], None] | None = None,
    ) -> None:
        """Load, then sign whenever the audit head has moved, every ``interval`` seconds.

        Returns when ``stop`` is set; raises :class:`LogConsistencyError` on an alarm.
        ``on_tick`` is called after every round (and once after a failing one), with
        :attr:`metrics` up to date (``cpi log sign --metrics-textfile`` writes them).
        """
        stop = stop or asyncio.Event()
        follower: asyncio.Task[None] | None = None
        try:
            await self.load()
            await self.sign()
            self._observe()
            if on_tick is not None:
                on_tick()
            follower = asyncio.create_task(self._follow(), name="translog-follow")
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), interval)
                if follower.done():
                    follower.result()  # raises the alarm, if any
                    await self.load()  # compacted: start over from a fresh listing
                    follower = asyncio.create_task(self._follow(), name="translog-follow")
                if self.pending:
                    await self.sign()
                elif self.witnesses and self._clock() - self._last_amend >= self._witness_retry_s:
                    self._last_amend = self._clock()
                    try:
                        await self.cosign_latest()
                    except CPIError as exc:  # a witness round is worth no crash
                        _log.warning("asking the witnesses again failed: %s", exc)
                self._observe()
                if on_tick is not None:
                    on_tick()
        except Exception as exc:
            self._count_error(exc)
            self._observe()
            if on_tick is not None:
                with contextlib.suppress(Exception):
                    on_tick()
            raise
        finally:
            if follower is not None:
                follower.cancel()
                with contextlib.suppress(asyncio.CancelledError, LogConsistencyError):
                    await follower
            await self.aclose()
