"""Federation: one resolver over several roots, each with its own index (docs/resolver.md).

An **anchor bundle** (a JSON file, ``anchor-bundle.v1``, docs/protocol.md §10) lists
roots.  Each root has a trust anchor -- given in the bundle, or learned live from an
``endorsement.v1`` that another root of the bundle publishes in its own index at
``/cpi/v1/endorse/<root>`` -- and one or more index clusters (etcd), each serving a set
of namespace prefixes (one cluster per root is the usual case; several is *index
sharding*: one root's namespaces split across clusters by prefix).

:class:`Federation` composes one unchanged :class:`~resolver.core.Resolver` per index
cluster (a *member*), each trusting only its own root's anchor, so a record of ``SG``
found in ``CN``'s index chains to no anchor there and is refused, and a cert from
``CN`` for an ``SG`` namespace fails containment.  On top of the members it:

* routes a CPID to the member whose prefixes contain its namespace (longest prefix of
  the CPID's root); entries a member holds outside its prefixes (or outside an
  endorsement's ``permitted`` namespaces) are never served;
* merges discovery results of the members concerned, by the ranking of
  :mod:`resolver.discovery` (score, then CPID), and restricts them with
  ``within=`` and ``roots=``;
* merges watches; an event id names every member's position,
  ``<member>:<revision>[.<n>]`` joined by ``,`` (see :func:`parse_fed_cursor`);
* follows each endorsement with an etcd watch: a new key starts a member for the
  endorsed root, a deleted, replaced-by-invalid or expired endorsement stops serving
  it at once (lookups check the endorsement's window on every call);
* watches the bundle file (built with :meth:`Federation.from_bundle`) and applies a
  changed one live (:meth:`Federation.reconfigure`).

Everything a member serves has been verified by that member; the federation adds only
routing and the endorsement gate.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import re
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import Annotated, Any, Final, Literal

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from registry.index import ROOT, Compacted, Index
from resolver import ranking
from resolver.config import EtcdSettings
from resolver.core import DiscoveryResult, Resolver, ResolverSettings
from resolver.discovery import LatencyTable, Match, Query
from resolver.entry import Entry
from resolver.errors import ConfigError, NotReadyError, QueryError
from resolver.events import Cursor, Event, format_cursor, parse_cursor
from resolver.metrics import ResolverMetrics
from resolver.state import MassExpiry, NamespaceInfo
from schemas import _json
from schemas.chain import CLOCK_SKEW, TrustAnchors, verify_endorsement
from schemas.cpid import CPID, ns_contains, parse_namespace
from schemas.cpid import parse as parse_cpid
from schemas.dsse import Envelope
from schemas.endorsement import Endorsement
from schemas.errors import InvalidCPIDError, InvalidDataError, NotFoundError
from schemas.models import Anchor

__all__ = [
    "BUNDLE_TYPE",
    "ENDORSE_PREFIX",
    "AnchorBundle",
    "BundleIndex",
    "BundleRoot",
    "FedEvent",
    "Federation",
    "Member",
    "endorse_key",
    "format_fed_cursor",
    "load_bundle",
    "parse_fed_cursor",
    "parse_roots",
]

_log = logging.getLogger("resolver.federation")

BUNDLE_TYPE: Final = "anchor-bundle.v1"
ENDORSE_PREFIX: Final = f"{ROOT}endorse/"
"""``/cpi/v1/endorse/<root>``: the endorsement of ``<root>`` by the root whose index
holds the key (written by that root's national tools, etcd user ``root``)."""
MAX_ROOTS: Final = 64
MAX_INDEXES: Final = 16
MAX_PREFIXES: Final = 64
_NAME: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")
_RETRY_MAX_S: Final = 2.0
_CLOSE_TIMEOUT_S: Final = 10.0


def endorse_key(root: str) -> str:
    """The etcd key of the endorsement of ``root`` (in the endorsing root's index)."""
    return f"{ENDORSE_PREFIX}{parse_root(root)}"


def parse_root(text: str) -> str:
    """A root prefix (one segment, e.g. ``SG``), canonical; QueryError otherwise."""
    try:
        ns = parse_namespace(text)
    except InvalidCPIDError as exc:
        raise QueryError(f"root {text!r}: {exc.reason}") from None
    if "." in ns:
        raise QueryError(f"root {text!r} is a namespace below a root; give the root alone")
    return ns


def parse_roots(text: str) -> frozenset[str]:
    """``roots=CN,SG``: a comma-separated list of 1 to 64 roots, without repeats."""
    parts = text.split(",")
    if not text or len(parts) > MAX_ROOTS:
        raise QueryError(f"roots={text!r}: expected 1 to {MAX_ROOTS} roots, e.g. roots=CN,SG")
    out = [parse_root(p) for p in parts]
    if len(set(out)) != len(out):
        raise QueryError(f"roots={text!r} names a root more than once")
    return frozenset(out)


# -- the bundle -------------------------------------------------------------------------


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class BundleIndex(_Model):
    """One index cluster of a root: its etcd and the prefixes it serves."""

    name: Annotated[str, Field(pattern=_NAME.pattern)] | None = None
    """Member name (in event ids and ``/readyz``); default: the root, then ``<root>-<n>``."""
    prefixes: Annotated[list[str], Field(max_length=MAX_PREFIXES)] = Field(default_factory=list)
    """Namespaces this cluster serves (default: the whole root)."""
    etcd: EtcdSettings


class BundleRoot(_Model):
    """A root: its anchor (inline, in a file, or endorsed by another root) and its indexes."""

    root: str
    anchor: Anchor | None = None
    anchor_file: Path | None = None
    endorsed_by: str | None = None
    indexes: Annotated[list[BundleIndex], Field(min_length=1, max_length=MAX_INDEXES)]


class AnchorBundle(_Model):
    """``anchor-bundle.v1``: the roots a federated resolver trusts (docs/protocol.md §10)."""

    type: Literal["anchor-bundle.v1"]
    roots: Annotated[list[BundleRoot], Field(min_length=1, max_length=MAX_ROOTS)]


@dataclass(frozen=True, slots=True)
class MemberSpec:
    """A checked bundle entry: one index cluster of one root."""

    name: str
    root: str
    prefixes: tuple[str, ...]
    etcd: EtcdSettings
    anchor: Anchor | None
    endorsed_by: str | None


def load_bundle(path: str | Path, *, data: bytes | None = None) -> list[MemberSpec]:
    """Read and check an anchor bundle; every problem is a :class:`ConfigError` naming it.

    Relative paths (anchor files, etcd TLS and password files) are resolved against the
    bundle's directory.  An etcd ``password`` in the bundle is refused: use
    ``password_file`` (0600).
    """
    p = Path(path)
    base = p.resolve().parent
    where = f"anchor bundle {p}"
    try:
        text = p.read_bytes() if data is None else data
    except OSError as exc:
        raise ConfigError(f"{where}: {exc.strerror}") from exc
    try:
        raw = _json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"{where}: not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a JSON object with type {BUNDLE_TYPE!r}")
    for i, r in enumerate(raw.get("roots") or []):
        if not isinstance(r, dict):
            continue
        if isinstance(r.get("anchor_file"), str):
            r["anchor_file"] = str(base / r["anchor_file"])
        for j, ix in enumerate(r.get("indexes") or []):
            etcd = ix.get("etcd") if isinstance(ix, dict) else None
            if not isinstance(etcd, dict):
                continue
            if "password" in etcd:
                raise ConfigError(
                    f"{where}: roots[{i}].indexes[{j}].etcd.password: no secrets in a bundle; "
                    "give password_file (mode 0600) instead"
                )
            for name in EtcdSettings.PATH_FIELDS:
                if isinstance(etcd.get(name), str):
                    etcd[name] = str(base / etcd[name])
    try:
        bundle = AnchorBundle.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(x) for x in e['loc']) or 'bundle'}: {e['msg']}"
            for e in exc.errors()[:5]
        )
        raise ConfigError(f"{where}: {problems}") from None
    return _check_bundle(bundle, where)


def _check_bundle(bundle: AnchorBundle, where: str) -> list[MemberSpec]:
    roots: dict[str, BundleRoot] = {}
    for r in bundle.roots:
        try:
            root = parse_root(r.root)
        except QueryError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        if root in roots:
            raise ConfigError(f"{where}: root {root} is listed twice")
        roots[root] = r
    specs: list[MemberSpec] = []
    names: set[str] = set()
    for root, r in roots.items():
        given = [x for x in (r.anchor, r.anchor_file, r.endorsed_by) if x is not None]
        if len(given) != 1:
            raise ConfigError(
                f"{where}: root {root}: give exactly one of anchor, anchor_file, endorsed_by"
            )
        anchor = r.anchor
        if r.anchor_file is not None:
            anchor = _read_anchor(r.anchor_file, where, root)
        if anchor is not None and anchor.subject != root:
            raise ConfigError(
                f"{where}: root {root}: its anchor's subject is {anchor.subject!r}; a root's "
                f"anchor must have the root itself as subject (roots never vouch for each "
                "other's namespaces)"
            )
        endorser: str | None = None
        if r.endorsed_by is not None:
            try:
                endorser = parse_root(r.endorsed_by)
            except QueryError as exc:
                raise ConfigError(f"{where}: root {root}: endorsed_by: {exc}") from None
            other = roots.get(endorser)
            if other is None or other.endorsed_by is not None or endorser == root:
                raise ConfigError(
                    f"{where}: root {root}: endorsed_by {endorser!r} must name another root "
                    "of the bundle that has its own anchor"
                )
        seen_prefixes: set[str] = set()
        for i, ix in enumerate(r.indexes):
            name = ix.name or (root if i == 0 else f"{root}-{i + 1}")
            if name in names:
                raise ConfigError(f"{where}: index name {name!r} is used twice")
            names.add(name)
            prefixes: list[str] = []
            for text in ix.prefixes or [root]:
                try:
                    ns = parse_namespace(text)
                except InvalidCPIDError as exc:
                    raise ConfigError(
                        f"{where}: index {name}: prefix {text!r}: {exc.reason}"
                    ) from None
                if not ns_contains(root, ns):
                    raise ConfigError(
                        f"{where}: index {name}: prefix {ns} is outside its root {root}"
                    )
                if ns in seen_prefixes:
                    raise ConfigError(
                        f"{where}: root {root}: prefix {ns} is served by two index clusters"
                    )
                seen_prefixes.add(ns)
                prefixes.append(ns)
            specs.append(MemberSpec(name, root, tuple(prefixes), ix.etcd, anchor, endorser))
    return specs


def _read_anchor(path: Path, where: str, root: str) -> Anchor:
    try:
        obj = _json.loads(path.read_bytes())
        return Anchor.model_validate(obj)
    except OSError as exc:
        raise ConfigError(f"{where}: root {root}: anchor_file {path}: {exc.strerror}") from exc
    except ValueError as exc:
        raise ConfigError(f"{where}: root {root}: anchor_file {path}: {exc}") from None


# -- event ids ---------------------------------------------------------------------------

FedCursor = dict[str, Cursor]


def format_fed_cursor(cursor: FedCursor) -> str:
    """``{"CN": (12, 0), "SG": (7, 2)}`` -> ``"CN:12,SG:7.2"`` (members sorted by name)."""
    return ",".join(f"{n}:{format_cursor(c)}" for n, c in sorted(cursor.items()))


def parse_fed_cursor(text: str) -> FedCursor:
    """Parse a federated event id; QueryError (400) for anything else."""
    out: FedCursor = {}
    parts = text.strip().split(",")
    if len(parts) > MAX_ROOTS * MAX_INDEXES:
        raise QueryError(f"event id names more than {MAX_ROOTS * MAX_INDEXES} members")
    for part in parts:
        name, colon, pos = part.partition(":")
        if not colon or not _NAME.fullmatch(name) or name in out:
            raise QueryError(
                f"event id {text[:200]!r} is not '<member>:<revision>[.<n>]' joined by ',' "
                "(e.g. CN:12,SG:7.2)"
            )
        out[name] = parse_cursor(pos)
    return out


@dataclass(frozen=True, slots=True)
class FedEvent(Event):
    """An :class:`Event` of one member, carrying the federated event id."""

    fid: str = ""
    member: str = ""
    root: str = ""

    @property
    def id(self) -> str:
        return self.fid

    def to_dict(self) -> dict[str, object]:
        out = Event.to_dict(self)
        if self.root:
            out["root"] = self.root
        if self.member and self.member != self.root:
            out["member"] = self.member  # an index cluster of a sharded root
        return out


# -- members -----------------------------------------------------------------------------


@dataclass(slots=True)
class Member:
    """One index cluster of one root, with the resolver that replicates it."""

    spec: MemberSpec
    resolver: Resolver | None = None
    endorsement: Endorsement | None = None
    envelope: Envelope | None = None
    """The endorsement as stored (served at ``/v1/endorsements``)."""
    endorsement_error: str = ""
    start_error: str = ""
    task: asyncio.Task[None] | None = None
    generation_base: int = 0

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def root(self) -> str:
        return self.spec.root

    def covers(self, ns: str) -> bool:
        """Whether one of this member's prefixes contains ``ns``."""
        return any(ns_contains(p, ns) for p in self.spec.prefixes)

    def depth(self, ns: str) -> int:
        """Segments of the longest of this member's prefixes containing ``ns`` (0: none)."""
        return max((p.count(".") + 1 for p in self.spec.prefixes if ns_contains(p, ns)), default=0)

    def overlaps(self, within: str) -> bool:
        return any(ns_contains(p, within) or ns_contains(within, p) for p in self.spec.prefixes)

    def active(self, now: float) -> bool:
        """Serving: a resolver exists and (for an endorsed root) its endorsement is in window."""
        if self.resolver is None:
            return False
        e = self.endorsement
        if self.spec.endorsed_by is None:
            return True
        return e is not None and e.not_before - CLOCK_SKEW <= now <= e.not_after + CLOCK_SKEW

    def serves(self, ns: str) -> bool:
        """Whether an entry in ``ns`` may be served by this member."""
        if not self.covers(ns):
            return False
        e = self.endorsement
        return e is None or e.permits(ns)


@dataclass(slots=True)
class _Stream:
    member: Member
    task: asyncio.Task[None]


class Federation:
    """One resolver over the roots of an anchor bundle (see the module doc).

    It offers what the front ends use of a :class:`Resolver`: ``get``, ``resolve``,
    ``discover``, ``watch``, ``add_listener``, ``health``, ``ready``, ``stale``,
    ``revision``, ``generation``; :attr:`home` is the member whose log the log routes
    serve without ``root=`` (the first cluster of the first root with its own anchor).
    Claims go to each resource's own cluster (:class:`resolver.claims.http.ClaimRouter`,
    through :meth:`member_for` and :meth:`members_for`).
    """

    def __init__(
        self,
        specs: Iterable[MemberSpec],
        *,
        latency: LatencyTable | None = None,
        settings: ResolverSettings | None = None,
        metrics: ResolverMetrics | None = None,
        index_options: dict[str, Any] | None = None,
        endorsement_retry_s: float = 0.5,
        bundle_poll_s: float = 1.0,
    ) -> None:
        self.bundle_path: Path | None = None
        """The bundle file, watched for changes (set by :meth:`from_bundle`)."""
        self._bundle_stamp: tuple[int, int] | None = None
        self._bundle_poll = bundle_poll_s
        self.bundle_error = ""
        """Why the last change of the bundle file was not applied ("" when it was)."""
        self._started = False
        self.settings = settings or ResolverSettings()
        self.latency = latency or LatencyTable()
        self.metrics = metrics or ResolverMetrics()
        self._index_options = dict(index_options or {})
        self._retry = endorsement_retry_s
        self.members: list[Member] = [Member(s) for s in specs]
        if not self.members:
            raise ConfigError("a federation needs at least one root")
        self._by_root: dict[str, list[Member]] = {}
        for m in self.members:
            self._by_root.setdefault(m.root, []).append(m)
        static = [m for m in self.members if m.spec.endorsed_by is None]
        if not static:
            raise ConfigError("at least one root of the bundle needs its own anchor")
        self.home_member = static[0]
        self._listeners: list[Callable[[Event], None]] = []
        self._epoch = 0
        self._changed = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False
        self._closing_tasks: set[asyncio.Task[None]] = set()
        self._bundle_task: asyncio.Task[None] | None = None
        self.revocations: list[tuple[str, float]] = []
        """(root, time.monotonic()) of each endorsement withdrawn: for measurements."""
        for m in static:
            m.resolver = self._new_resolver(m, m.spec.anchor)  # type: ignore[arg-type]
        with contextlib.suppress(ValueError):  # already registered (a second federation)
            self.metrics.registry.register(_FederationCollector(self))

    @classmethod
    def from_bundle(
        cls,
        path: str | Path,
        *,
        latency: LatencyTable | None = None,
        settings: ResolverSettings | None = None,
        metrics: ResolverMetrics | None = None,
    ) -> Federation:
        f = cls(load_bundle(path), latency=latency, settings=settings, metrics=metrics)
        f.bundle_path = Path(path)
        f._bundle_stamp = _stamp(f.bundle_path)
        return f

    def _new_resolver(self, m: Member, anchor: Anchor) -> Resolver:
        s = self.settings
        if s.snapshot_dir is not None:
            s = replace(s, snapshot_dir=s.snapshot_dir / m.name)
        return Resolver(
            index=m.spec.etcd.open_index(**self._index_options),
            anchors=TrustAnchors([anchor]),
            latency=self.latency,
            settings=s,
            own_index=True,
            metrics=self.metrics,  # the first member's replica figures are exported
        )

    # -- life cycle -------------------------------------------------------------------

    @property
    def home(self) -> Resolver:
        r = self.home_member.resolver
        assert r is not None
        return r

    @property
    def index(self) -> Index:
        """The home root's index (claims and the transparency-log routes use it)."""
        return self.home.index

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        # connect every member now (the claims and log routes use the home index at once);
        # a member whose etcd is down keeps trying in the background, the others serve
        starting = [m for m in self.members if m.resolver is not None]
        outcomes = await asyncio.gather(
            *(m.resolver.start() for m in starting if m.resolver is not None),
            return_exceptions=True,
        )
        for m, outcome in zip(starting, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                m.start_error = str(outcome) or type(outcome).__name__
                self._start_member(m)
        self._start_followers()
        if self.bundle_path is not None:
            self._bundle_task = asyncio.create_task(self._watch_bundle(), name="bundle")

    def _start_followers(self) -> None:
        for root, ms in self._by_root.items():
            endorser = ms[0].spec.endorsed_by
            if endorser is not None:
                self._tasks.append(
                    asyncio.create_task(self._follow(root, endorser), name=f"endorse-{root}")
                )

    # -- the bundle file, live ----------------------------------------------------------

    async def _watch_bundle(self) -> None:
        """Apply the bundle file again whenever it changes (checked every poll interval)."""
        assert self.bundle_path is not None
        while not self._closing:
            await asyncio.sleep(self._bundle_poll)
            stamp = _stamp(self.bundle_path)
            if stamp == self._bundle_stamp:
                continue
            self._bundle_stamp = stamp
            try:
                specs = load_bundle(self.bundle_path)
                await self.reconfigure(specs)
            except ConfigError as exc:
                self.bundle_error = str(exc)
                _log.error("anchor bundle not applied, the previous one stays: %s", exc)
                continue
            self.bundle_error = ""
            _log.info("anchor bundle %s applied: %s", self.bundle_path, self._describe())

    def _describe(self) -> str:
        return ", ".join(f"{m.name} ({m.root} {'/'.join(m.spec.prefixes)})" for m in self.members)

    async def reconfigure(self, specs: Iterable[MemberSpec]) -> None:
        """Serve ``specs`` from now on: members whose spec is unchanged keep running;
        changed or removed ones are retired (at once), new ones started.

        The home member (claims, log routes) must stay as it is: a bundle that changes
        or removes it is refused (ConfigError; that needs a restart)."""
        new = list(specs)
        static = [s for s in new if s.endorsed_by is None]
        if not static or static[0] != self.home_member.spec:
            raise ConfigError(
                f"the first root with its own anchor ({self.home_member.name}) carries claims "
                "and the log routes and must stay unchanged and first; restart to change it"
            )
        old = {m.name: m for m in self.members}
        keep = {s.name for s in new if s.name in old and old[s.name].spec == s}
        tasks, self._tasks = self._tasks, []
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks)
        for name, m in old.items():
            if name not in keep:
                self._retire(m)
        members: list[Member] = []
        for spec_ in new:
            if spec_.name in keep:
                members.append(old[spec_.name])
                continue
            m = Member(spec_)
            if spec_.endorsed_by is None:
                assert spec_.anchor is not None
                m.resolver = self._new_resolver(m, spec_.anchor)
                for cb in self._listeners:
                    m.resolver.add_listener(cb)
                self._start_member(m)
            members.append(m)
        self.members = members
        self._by_root = {}
        for m in members:
            self._by_root.setdefault(m.root, []).append(m)
        self._start_followers()  # they re-read each endorsement (same key: no re-listing)
        self._membership_changed()

    def _start_member(self, m: Member) -> None:
        r = m.resolver
        assert r is not None

        async def run() -> None:
            delay = 0.1
            while True:
                try:
                    await r.start()
                    m.start_error = ""
                    return
                except Exception as exc:  # etcd down at start: keep trying, serve the rest
                    m.start_error = str(exc) or type(exc).__name__
                    _log.warning("index %s (root %s) not reachable: %s", m.name, m.root, exc)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, _RETRY_MAX_S)

        m.task = asyncio.create_task(run(), name=f"member-{m.name}")

    def _retire(self, m: Member) -> None:
        """Stop serving ``m`` now; close its resolver in the background (bounded).

        The gate is what stops a withdrawn root's records (``m.resolver`` is None from
        here on); closing the replica, its watch and its etcd connection is clean-up, so
        the endorsement follower never waits on it."""
        r, m.resolver = m.resolver, None
        task, m.task = m.task, None
        if task is not None:
            task.cancel()
        if r is None:
            return
        m.generation_base += r.generation + 1
        r.end_watches()
        closing = asyncio.create_task(self._close_resolver(m.name, r, task))
        self._closing_tasks.add(closing)
        closing.add_done_callback(self._closing_tasks.discard)

    async def _close_resolver(
        self, name: str, r: Resolver, starter: asyncio.Task[None] | None
    ) -> None:
        try:
            async with asyncio.timeout(_CLOSE_TIMEOUT_S):
                if starter is not None:
                    await asyncio.wait({starter})
                await r.close()
        except TimeoutError:
            _log.warning("index %s: closing its resolver took over %g s", name, _CLOSE_TIMEOUT_S)
        except Exception as exc:
            _log.warning("index %s: closing its resolver failed: %s", name, exc)

    async def _drain(self) -> None:
        pending = set(self._closing_tasks)
        if pending:
            await asyncio.wait(pending)

    async def wait_ready(self) -> None:
        """Wait until every member that has a resolver has done its first listing."""
        while True:
            pending = [m.resolver for m in self.members if m.resolver and not m.resolver.ready]
            if not pending:
                return
            await pending[0].wait_ready()

    async def close(self) -> None:
        self._closing = True
        self._changed.set()
        tasks, self._tasks = self._tasks, []
        if self._bundle_task is not None:
            tasks.append(self._bundle_task)
            self._bundle_task = None
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks)  # never swallows a cancellation of close() itself
        for m in self.members:
            self._retire(m)
        await self._drain()

    def end_watches(self) -> None:
        self._closing = True
        self._changed.set()
        for m in self.members:
            if m.resolver is not None:
                m.resolver.end_watches()

    async def __aenter__(self) -> Federation:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- endorsements -------------------------------------------------------------------

    async def _follow(self, root: str, endorser: str) -> None:
        """Keep the members of ``root`` in step with its endorsement in ``endorser``'s index."""
        ms = self._by_root[endorser]
        source = next((m for m in ms if endorser in m.spec.prefixes), ms[0])
        anchor = source.spec.anchor
        assert anchor is not None and source.resolver is not None
        anchors = TrustAnchors([anchor])
        key = endorse_key(root)
        while not self._closing:
            idx = source.resolver.index
            try:
                rev = await idx.revision()
                kv = await idx.get(key)
                await self._apply(root, anchors, None if kv is None else kv.value)
                async for ev in idx.watch_key(key, start_revision=rev + 1):
                    if isinstance(ev, Compacted):
                        break
                    await self._apply(root, anchors, ev.kv.value if ev.type == "put" else None)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                _log.debug("endorsement of %s: %s; retrying", root, exc)
                await asyncio.sleep(self._retry)

    async def _apply(self, root: str, anchors: TrustAnchors, value: bytes | None) -> None:
        doc: Endorsement | None = None
        env: Envelope | None = None
        error = ""
        if value is None:
            error = "no endorsement published"
        else:
            try:
                env = Envelope.from_json(value)
                doc = verify_endorsement(env, anchors=anchors)
                if doc.subject != root:
                    raise InvalidDataError(f"endorsement is for {doc.subject}, not {root}")
            except InvalidDataError as exc:
                doc, error = None, f"endorsement refused: {exc}"
                _log.warning("root %s: %s", root, error)
        members = self._by_root[root]
        if doc is None:
            was = any(m.resolver is not None for m in members)
            for m in members:
                m.endorsement, m.envelope, m.endorsement_error = None, None, error
            if was:
                self.revocations.append((root, time.monotonic()))
                self._membership_changed()
                for m in members:
                    self._retire(m)
            return
        for m in members:
            same_key = m.endorsement is not None and m.endorsement.public_key == doc.public_key
            # a renewed or re-scoped endorsement of the same key only moves the gate (the
            # window and the permitted names are checked by the federation on every
            # answer); a new key needs a replica verified under it
            m.endorsement, m.envelope, m.endorsement_error = doc, env, ""
            if m.resolver is not None and same_key:
                continue
            if m.resolver is not None:
                self._retire(m)
            anchor = Anchor(subject=root, public_key=doc.public_key)
            m.resolver = self._new_resolver(m, anchor)
            for cb in self._listeners:
                m.resolver.add_listener(cb)
            self._start_member(m)
        self._membership_changed()

    def _membership_changed(self) -> None:
        self._epoch += 1
        self._changed.set()
        self._changed = asyncio.Event()

    # -- status -----------------------------------------------------------------------

    def _serving(self, now: float | None = None) -> list[Member]:
        t = time.time() if now is None else now
        return [m for m in self.members if m.active(t)]

    @property
    def ready(self) -> bool:
        """True once every serving member has done its first listing."""
        ms = self._serving()
        return bool(ms) and all(m.resolver is not None and m.resolver.ready for m in ms)

    @property
    def stale(self) -> bool:
        return any(m.resolver is not None and m.resolver.stale for m in self._serving())

    @property
    def revision(self) -> int:
        """The sum of the members' revisions (grows with any of them)."""
        return sum(m.resolver.revision for m in self._serving() if m.resolver is not None)

    @property
    def generation(self) -> int:
        """Grows whenever a served entry of any member changes, or a member comes or goes."""
        total = self._epoch
        for m in self.members:
            total += m.generation_base + (m.resolver.generation if m.resolver else 0)
        return total

    @property
    def mass_expiry(self) -> list[MassExpiry]:
        return [x for m in self._serving() if m.resolver for x in m.resolver.mass_expiry]

    def health(self) -> dict[str, Any]:
        """``/readyz``: the home member's figures summed over members, and ``roots``: each
        member's state; ``not_ready`` names the members that are not ready."""
        now = time.time()
        roots: dict[str, Any] = {}
        not_ready: list[str] = []
        totals = {"served": 0, "records": 0, "held": 0}
        listed = True
        stale = False
        for m in self.members:
            info: dict[str, Any] = {"root": m.root, "prefixes": list(m.spec.prefixes)}
            active = m.active(now)
            info["trusted"] = active
            if m.spec.endorsed_by is not None:
                e = m.endorsement
                info["endorsed_by"] = m.spec.endorsed_by
                info["endorsement"] = (
                    None
                    if e is None
                    else {"serial": e.serial, "not_before": e.not_before, "not_after": e.not_after}
                )
                if m.endorsement_error:
                    info["endorsement_error"] = m.endorsement_error
            r = m.resolver
            if r is None or not active:
                info["ready"] = False
                roots[m.name] = info
                continue
            h = r.health()
            for k in totals:
                totals[k] += int(h[k])
            info.update(
                {
                    k: h[k]
                    for k in ("ready", "listed", "stale", "revision", "served", "records")
                    if k in h
                }
            )
            if "etcd_error" in h:
                info["etcd_error"] = h["etcd_error"]
            if m.start_error:
                info["etcd_error"] = m.start_error
            if not h["ready"]:
                not_ready.append(m.name)
            listed = listed and bool(h["listed"])
            stale = stale or bool(h["stale"])
            roots[m.name] = info
        home = self.home.health()
        out = dict(home)
        out.update(totals)
        out["ready"] = not not_ready and bool(self._serving())
        out["listed"] = listed
        out["stale"] = stale
        out["revision"] = self.revision
        out["roots"] = roots
        if self.bundle_error:
            out["bundle_error"] = self.bundle_error
        if not_ready:
            out["not_ready"] = not_ready
        return out

    def endorsements(self) -> list[dict[str, Any]]:
        """``/v1/endorsements``: each endorsed root trusted now, its endorser and envelope."""
        now = time.time()
        out: dict[str, dict[str, Any]] = {}
        for m in self.members:
            if m.envelope is not None and m.spec.endorsed_by and m.active(now):
                out.setdefault(
                    m.root,
                    {
                        "root": m.root,
                        "endorsed_by": m.spec.endorsed_by,
                        "envelope": m.envelope.to_dict(),
                    },
                )
        return list(out.values())

    # -- lookups ------------------------------------------------------------------------

    def _route(self, ns: str) -> Member | None:
        """The member serving namespace ``ns`` (longest prefix of its root), if trusted."""
        ms = self._by_root.get(ns.partition(".")[0])
        if not ms:
            return None
        best = max(ms, key=lambda m: m.depth(ns))
        if best.depth(ns) == 0 or not best.active(time.time()) or not best.serves(ns):
            return None
        return best

    def _member_for(self, cpid: CPID) -> Member:
        m = self._route(cpid.prefix)
        if m is None:
            root = cpid.prefix.partition(".")[0]
            why = (
                "is not a root of this resolver"
                if root not in self._by_root
                else "is not trusted now (no valid endorsement)"
                if any(x.spec.endorsed_by for x in self._by_root[root])
                else "has no index cluster for this namespace"
            )
            raise NotFoundError(f"{cpid.to_text()}: root {root} {why}")
        return m

    def member_for(self, cpid: str | CPID) -> Member:
        """The trusted member serving ``cpid`` (claims go to its index cluster);
        NotFoundError naming why when there is none, InvalidCPIDError for bad text."""
        return self._member_for(cpid if isinstance(cpid, CPID) else parse_cpid(cpid))

    def members_for(self, query: Query | None, roots: frozenset[str] | None) -> list[Member]:
        """The trusted members a query concerns (``within``, ``roots``), bundle order."""
        return self._targets(query, roots)

    def root_member(self, root: str) -> Member | None:
        """The member holding ``root``'s transparency log: the cluster serving the root
        itself (its first cluster when none does); None for a root not in the bundle."""
        ms = self._by_root.get(root)
        if not ms:
            return None
        return next((m for m in ms if root in m.spec.prefixes), ms[0])

    def _whole(self, m: Member) -> bool:
        """``m`` alone serves its entire root: every entry its resolver verifies is its
        to serve (a member trusts only its root's anchor, so its entries are inside the
        root), and no per-entry routing check is needed."""
        e = m.endorsement
        return (
            m.spec.prefixes == (m.root,)
            and len(self._by_root[m.root]) == 1
            and (e is None or e.permitted == [m.root])
        )

    def _fast(self, cpid: str) -> Resolver | None:
        """The resolver of a CPID's root when that root is served whole (the usual case),
        found from the text's first two characters without parsing it; else None."""
        ms = self._by_root.get(cpid[:2].upper())
        if ms is None or len(ms) != 1 or cpid[2:3] not in (".", "/"):
            return None
        m = ms[0]
        if m.resolver is None or not m.active(time.time()) or not self._whole(m):
            return None
        return m.resolver

    def get(self, cpid: str | CPID) -> Entry | None:
        if isinstance(cpid, str):
            r = self._fast(cpid)
            if r is not None:
                return r.get(cpid)
        p = cpid if isinstance(cpid, CPID) else parse_cpid(cpid)
        m = self._route(p.prefix)
        if m is None or m.resolver is None:
            return None
        return m.resolver.get(p)

    def resolve(self, cpid: str | CPID) -> Entry:
        if isinstance(cpid, str):
            r = self._fast(cpid)
            if r is not None:
                return r.resolve(cpid)  # its own fast path, parsing and errors
        p = cpid if isinstance(cpid, CPID) else parse_cpid(cpid)
        m = self._member_for(p)
        assert m.resolver is not None
        return m.resolver.resolve(p)

    def entries(self) -> Iterator[Entry]:
        for m in self._serving():
            if m.resolver is not None and m.resolver.ready:
                for e in m.resolver.entries():
                    if self._route(e.namespace) is m:
                        yield e

    def namespaces(self) -> list[NamespaceInfo]:
        out: list[NamespaceInfo] = []
        for m in self._serving():
            if m.resolver is not None:
                out.extend(n for n in m.resolver.namespaces() if m.covers(n.prefix))
        return out

    def _targets(self, query: Query | None, roots: frozenset[str] | None) -> list[Member]:
        out = []
        for m in self._serving():
            if roots is not None and m.root not in roots:
                continue
            if query is not None and query.within is not None and not m.overlaps(query.within):
                continue
            out.append(m)
        return out

    def discover(self, query: Query, roots: frozenset[str] | None = None) -> DiscoveryResult:
        """Discovery over the members concerned, each list in the query's order, merged
        by the same keys (:func:`_merge_key`)."""
        started = time.perf_counter()
        lists: list[list[Match]] = []
        revision = 0
        stale = False
        targets = self._targets(query, roots)
        ready = [m for m in targets if m.resolver is not None and m.resolver.ready]
        if targets and not ready:
            raise NotReadyError("no root of this query has finished listing its index yet")
        for m in ready:
            assert m.resolver is not None
            res = m.resolver.discover(query)
            if self._whole(m):
                lists.append(res.results)
            else:
                lists.append([x for x in res.results if self._route(x.entry.namespace) is m])
            revision += res.revision
            stale = stale or res.stale
        if len(lists) == 1:
            merged = lists[0][: query.limit]
        else:
            merged = list(heapq.merge(*lists, key=_merge_key(query)))[: query.limit]
        self.metrics.discover_seconds.observe(time.perf_counter() - started)
        order = {
            "sort": query.order,
            "function": ranking.FUNCTION,
            "weights": dict(query.weight_map),
        }
        return DiscoveryResult(merged, revision, stale, order)

    # -- change notification ------------------------------------------------------------

    def add_listener(self, callback: Callable[[Event], None]) -> Callable[[], None]:
        self._listeners.append(callback)
        removers = [m.resolver.add_listener(callback) for m in self.members if m.resolver]

        def remove() -> None:
            if callback in self._listeners:
                self._listeners.remove(callback)
            for r in removers:
                r()
            for m in self.members:
                if m.resolver is not None:
                    m.resolver.add_listener(callback)()  # removes a later registration too

        return remove

    async def watch(
        self,
        query: Query | None = None,
        *,
        since: str | FedCursor | None = None,
        heartbeat: float | None = None,
        roots: frozenset[str] | None = None,
    ) -> AsyncIterator[Event]:
        """Events of every member concerned, merged; ids are federated cursors.

        Each member's events keep their order; members interleave.  A member named in
        ``since`` resumes from its position there; one that is not (a root that became
        trusted since, or a fresh watch) starts from now, and with ``since`` given a
        ``relist`` event for that member comes first.  When the set of trusted members
        changes (an endorsement added or withdrawn) a ``relist`` event says so.
        """
        if isinstance(since, str):
            since = parse_fed_cursor(since)
        pos: FedCursor = {}
        queue: asyncio.Queue[tuple[str, Event | None]] = asyncio.Queue(maxsize=1024)
        streams: dict[str, _Stream] = {}

        def fid() -> str:
            return format_fed_cursor(pos)

        async def pump(m: Member, start: Cursor | None) -> None:
            r = m.resolver
            assert r is not None
            try:
                async for ev in r.watch(query, since=start):
                    await queue.put((m.name, ev))
            finally:
                with contextlib.suppress(asyncio.QueueFull):
                    queue.put_nowait((m.name, None))

        def open_streams(resuming: bool) -> set[str]:
            fresh: set[str] = set()
            wanted = {m.name: m for m in self._targets(query, roots)}
            for name in list(streams):
                if wanted.get(name) is not streams[name].member:  # gone, or rebuilt
                    streams.pop(name).task.cancel()
                    pos.pop(name, None)
            for name, m in wanted.items():
                if name in streams:
                    continue
                start = None if since is None or not resuming else since.get(name)
                if resuming and start is None:
                    fresh.add(name)
                streams[name] = _Stream(m, asyncio.create_task(pump(m, start)))
            return fresh

        changed = self._changed
        fresh = open_streams(since is not None)
        if since is not None:
            for name, c in since.items():
                if name in streams:
                    pos[name] = c
        try:
            while not self._closing:
                if changed.is_set():
                    changed = self._changed
                    open_streams(False)
                    yield FedEvent(
                        "relist", "", (0, 0), reason="the set of trusted roots changed", fid=fid()
                    )
                    continue
                getter = asyncio.ensure_future(queue.get())
                waiter = asyncio.ensure_future(changed.wait())
                try:
                    done, _ = await asyncio.wait(
                        (getter, waiter), timeout=heartbeat, return_when=asyncio.FIRST_COMPLETED
                    )
                finally:
                    waiter.cancel()
                if getter not in done:
                    getter.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await getter
                    if not done and heartbeat is not None:
                        yield FedEvent("progress", "", (0, 0), fid=fid())
                    continue
                name, ev = getter.result()
                if ev is None or name not in streams:
                    continue
                if ev.type == "progress":  # a stream's first event when it starts from now
                    first = name not in pos
                    pos[name] = ev.cursor
                    if first and name in fresh:
                        fresh.discard(name)
                        yield FedEvent(
                            "relist",
                            "",
                            ev.cursor,
                            reason=f"member {name} is not in the given event id",
                            fid=fid(),
                            member=name,
                            root=streams[name].member.root,
                        )
                    elif first and since is None:
                        yield FedEvent("progress", "", ev.cursor, fid=fid())
                    continue
                if ev.type == "relist" or ev.final:
                    pos[name] = ev.cursor
                m = streams[name].member
                if (
                    ev.cpid
                    and not self._whole(m)
                    and self._route(ev.cpid.partition("/")[0]) is not m
                ):
                    continue
                yield _fed(ev, fid(), m)
        finally:
            for st in streams.values():
                st.task.cancel()
            for st in streams.values():
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await st.task


class _FederationCollector(Collector):
    """Per index cluster, at every scrape: ``cpi_resolver_federation_records`` (records
    served), ``..._ready`` and ``..._trusted`` (1 or 0), labelled ``root`` and ``member``."""

    def __init__(self, fed: Federation) -> None:
        self._fed = fed

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        labels = ["root", "member"]
        records = GaugeMetricFamily(
            "cpi_resolver_federation_records",
            "Records a federated resolver serves, per root and index cluster",
            labels=labels,
        )
        ready = GaugeMetricFamily(
            "cpi_resolver_federation_ready",
            "1 when the index cluster's replica has listed and its root is trusted now",
            labels=labels,
        )
        trusted = GaugeMetricFamily(
            "cpi_resolver_federation_trusted",
            "1 when the root is trusted now (own anchor, or an endorsement in its window)",
            labels=labels,
        )
        now = time.time()
        for m in self._fed.members:
            key = [m.root, m.name]
            active = m.active(now)
            r = m.resolver
            trusted.add_metric(key, int(active))
            ready.add_metric(key, int(active and r is not None and r.ready))
            served = r.health()["served"] if active and r is not None else 0
            records.add_metric(key, int(served))
        yield records
        yield ready
        yield trusted


def _stamp(path: Path) -> tuple[int, int] | None:
    """(mtime in ns, size) of ``path``, None when it cannot be read."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


def _fed(ev: Event, fid: str, m: Member) -> FedEvent:
    return FedEvent(
        ev.type,
        ev.cpid,
        ev.cursor,
        ev.entry,
        ev.prev,
        ev.reason,
        ev.final,
        fid=fid,
        member=m.name,
        root=m.root,
    )


def _merge_key(query: Query) -> Callable[[Match], Any]:
    """The key that orders matches of ``query`` across members: (score desc, CPID) for
    the default order, else the keys each result's ``rank`` shows (the keys that ordered
    it within its member, :meth:`resolver.ranking.Ranked.sort_key`)."""
    if query.order == "default":
        return lambda m: (-m.score, m.cpid)
    near = query.near is not None
    weights = query.weight_map

    def key(m: Match) -> tuple[Any, ...]:
        facts = ranking.entry_facts(m.entry)
        r = ranking.explain(
            m.cpid,
            m.free,
            m.latency_ms,
            facts,
            sort=query.order,
            near=near,
            weights=weights,
            blended=m.score,
        )
        return r.sort_key()

    return key
