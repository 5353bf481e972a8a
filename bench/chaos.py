"""Faults under load: a 3-member etcd cluster, registries and resolvers losing processes
while nodes register and heartbeat and clients make contended claims.

    python bench/chaos.py [--duration 90] [--agents 40] [--claimers 24] [--hot 3] [--seed 1]

Runs the real stack as separate processes: ``cpi up --etcd-members 3 --registries 2
--resolvers 2`` in a temporary directory (every etcd member, registry and resolver its
own process, supervised by ``cpi up``, etcd auth on).  This process is the load and the
fault injector:

* ``--agents`` simulated nodes (``registry.agent``) register, then heartbeat every
  0.5 s; an agent whose registry instance is unreachable moves to the next instance of
  its namespace's registry;
* ``--claimers`` clients claim one unit at a time (HTTP ``POST /v1/claims``) on ``--hot``
  resources (all contended: more claimers than units), hold it briefly and release it
  (each client's last grant is kept, so the end state holds claims); a client whose resolver is unreachable moves to the next resolver;
* faults, at fixed fractions of ``--duration``: SIGTERM to the etcd leader (``cpi up``
  restarts it), SIGSTOP to the new leader for 3 s (past the election timeout, 1 s) then
  SIGCONT, SIGKILL to a registry instance and to a resolver (``cpi up`` restarts both).

Every operation is recorded (kind, invoke time, completion time, outcome).  At the end,
with the load stopped:

* **lost**: acknowledged registrations (200/201) whose record is not in etcd, or not
  served by every resolver;
* **double-allocated**: (a) from the client history, the most units surely held at once
  on a resource (between a grant's acknowledgement and its release's invocation) above
  the resource's capacity; (b) from etcd's own history (a watch from the start
  revision over ``/claim/``), the claimed units on a resource after any revision above
  its capacity; (c) ``/alloc/<cpid>`` at the end differing from the sum of the claims
  that exist;
* **convergence**: every resolver reaches the same revision and serves the same records
  and statuses for every acknowledged CPID.

Prints the counts, the longest unavailability of each component (longest stretch its
probe failed: every etcd member's ``/health``, a quorum read through all members, each
registry's and resolver's ``/readyz``) and of each operation kind (longest stretch
between two acknowledged operations).  ``tests/cpi/test_up_cluster.py`` runs the same
for ~25 s in the test suite.  Everything is https (etcd with mutual TLS): this process trusts
``up.json``'s ``tls.ca`` and presents root's etcd client certificate.  Only loopback
addresses; every loop is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import random
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aiohttp

from registry.agent.agent import Agent, RecordGoneError, RegistryUnavailableError
from registry.agent.simulate import Target, build_agents
from registry.index import Index, Keys, Prefix, WatchEvent
from resolver.claims import tokens as claim_tokens
from resolver.claims.client import ClaimsAPIError, ClaimsClient
from schemas.errors import RetrievalError

HOLDER = "chaos"
CLAIM_TTL_S = 300
HEARTBEAT_S = 0.5
PROBE_S = 0.1


# -- the stack ------------------------------------------------------------------------------


def _free_base() -> int:
    """A base port whose neighbours used by ``cpi up`` (+0 … +96) are free, below the
    ephemeral range so nothing else takes them in the meantime."""
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(10_000, 32_000 - 100)
        ok = True
        for off in range(97):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", base + off))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    raise RuntimeError("no free port range")


def procs_mentioning(*texts: str) -> list[int]:
    """PIDs whose command line contains every one of *texts*."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if all(t in cmd for t in texts):
            pids.append(int(entry.name))
    return pids


class Stack:
    """``cpi up`` as a child process in *data_dir*."""

    def __init__(
        self,
        data_dir: Path,
        *,
        etcd_members: int = 3,
        registries: int = 2,
        resolvers: int = 2,
        base_port: int | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.base = base_port or _free_base()
        self.args = [
            "--etcd-members", str(etcd_members),
            "--registries", str(registries),
            "--resolvers", str(resolvers),
        ]  # fmt: skip
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = data_dir.parent / f"{data_dir.name}-up.log"

    def start(self, timeout: float = 120.0) -> dict[str, Any]:
        up_json = self.data_dir / "up.json"
        started = time.time()
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "cpi", "up", "--data-dir", str(self.data_dir),
                 "--base-port", str(self.base), *self.args],
                stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"cpi up exited early:\n{self.log_tail()}")
            if up_json.exists() and up_json.stat().st_mtime >= started - 1:
                up = json.loads(up_json.read_text())
                if up.get("tokens") and "Ctrl-C" in self.log_tail():
                    return dict(up)
            time.sleep(0.2)
        raise RuntimeError(f"cpi up did not start in {timeout:.0f} s:\n{self.log_tail()}")

    def up(self) -> dict[str, Any]:
        return dict(json.loads((self.data_dir / "up.json").read_text()))

    def root_password(self) -> str:
        return Path(self.up()["etcd_auth"]["users"]["root"]).read_text().splitlines()[0]

    def ssl_context(self) -> ssl.SSLContext:
        """Trusts up.json's CA and presents root's etcd client certificate (etcd wants
        mutual TLS; the registries and resolvers do not ask for it)."""
        tls = self.up()["tls"]
        ctx = ssl.create_default_context(cafile=tls["ca"])
        ctx.load_cert_chain(tls["etcd_client"]["cert"], tls["etcd_client"]["key"])
        return ctx

    def index(self, endpoints: list[str] | None = None, timeout: float = 3.0) -> Index:
        """An index client as etcd's root over mutual TLS (every member by default)."""
        up = self.up()
        tls = up["tls"]
        return Index(
            endpoints=endpoints or up["etcd"],
            timeout=timeout,
            user="root",
            password=self.root_password(),
            ca_cert=tls["ca"],
            cert_chain=tls["etcd_client"]["cert"],
            cert_key=tls["etcd_client"]["key"],
        )

    def session(self, timeout: aiohttp.ClientTimeout | None = None) -> aiohttp.ClientSession:
        """An HTTP session verifying against up.json's CA."""
        connector = aiohttp.TCPConnector(ssl=self.ssl_context())
        if timeout is None:
            return aiohttp.ClientSession(connector=connector)
        return aiohttp.ClientSession(connector=connector, timeout=timeout)

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        """SIGINT (``cpi up`` stops its children in order), SIGKILL of anything left."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for pid in procs_mentioning(str(self.data_dir)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
                os.kill(pid, signal.SIGKILL)


def member_pid(up: dict[str, Any], client_url: str) -> int | None:
    """PID of the etcd member serving *client_url* (``cpi up`` runs it in its data dir)."""
    for m in up["etcd_members"]:
        if m["client"] == client_url:
            pids = procs_mentioning(m["data_dir"], "--listen-client-urls")
            return pids[0] if pids else None
    return None


def component_pid(data_dir: Path, *texts: str) -> int | None:
    pids = procs_mentioning(str(data_dir), *texts)
    return pids[0] if pids else None


# -- the history -----------------------------------------------------------------------------


@dataclass
class Op:
    """One operation: ``outcome`` is ``ok`` (acknowledged), ``fail`` (refused: surely not
    done) or ``info`` (unknown: timed out or unreachable, may or may not have happened)."""

    kind: str
    invoke: float
    complete: float = 0.0
    outcome: str = "info"
    detail: str = ""
    cpid: str = ""
    claim_id: str = ""
    units: int = 0


@dataclass
class History:
    t0: float = field(default_factory=time.monotonic)
    ops: list[Op] = field(default_factory=list)
    faults: list[tuple[float, str]] = field(default_factory=list)

    def now(self) -> float:
        return time.monotonic() - self.t0

    def begin(self, kind: str, **kw: Any) -> Op:
        op = Op(kind, self.now(), **kw)
        self.ops.append(op)
        return op

    def end(self, op: Op, outcome: str, detail: str = "") -> Op:
        op.complete, op.outcome, op.detail = self.now(), outcome, detail[:200]
        return op

    def fault(self, what: str) -> None:
        self.faults.append((self.now(), what))
        print(f"  t={self.now():6.1f}s  fault: {what}", flush=True)


# -- load ------------------------------------------------------------------------------------


class Load:
    def __init__(
        self,
        stack: Stack,
        up: dict[str, Any],
        history: History,
        stop: asyncio.Event,
        rng: random.Random,
    ) -> None:
        self.stack = stack
        self.up = up
        self.h = history
        self.stop = stop
        self.rng = rng
        self.resolvers = [r["http"] for r in up["resolvers"]]
        self.capacity: dict[str, int] = {}

    async def agent_loop(self, agent: Agent, instances: list[str], deadline: float) -> None:
        """Register (moving to the next instance when one is unreachable), then heartbeat."""
        turn = instances.index(agent.registry) if agent.registry in instances else 0
        registered = False
        while not self.stop.is_set() and time.monotonic() < deadline:
            kind = "heartbeat" if registered else "register"
            op = self.h.begin(kind, cpid=agent.cpid)
            try:
                async with asyncio.timeout(5):
                    if registered:
                        await agent.heartbeat()
                    else:
                        await agent.register_once()
                        registered = True
                self.h.end(op, "ok")
            except RecordGoneError as exc:
                self.h.end(op, "fail", str(exc))
                registered = False
            except (RegistryUnavailableError, TimeoutError) as exc:
                self.h.end(op, "info", str(exc) or type(exc).__name__)
                turn += 1
                agent.registry = instances[turn % len(instances)]
                await self._pause(0.2)
                continue
            except Exception as exc:  # a refusal: surely not done
                self.h.end(op, "fail", f"{type(exc).__name__}: {exc}")
            await self._pause(HEARTBEAT_S)

    async def claim_loop(self, w: int, token: str, hot: list[str], deadline: float) -> None:
        turn = w
        async with self.stack.session() as session:
            clients = [
                ClaimsClient(url, token=token, timeout=5.0, session=session)
                for url in self.resolvers
            ]
            while not self.stop.is_set() and time.monotonic() < deadline:
                client = clients[turn % len(clients)]
                cpid = self.rng.choice(hot)
                op = self.h.begin("claim", cpid=cpid, units=1)
                try:
                    got = await client.claim(cpid=cpid, units=1, ttl_s=CLAIM_TTL_S)
                except ClaimsAPIError as exc:
                    self.h.end(op, "fail", exc.code)  # 409 full / contention, 404 not yet
                    await self._pause(0.02 + self.rng.random() * 0.05)
                    continue
                except (RetrievalError, TimeoutError, aiohttp.ClientError) as exc:
                    self.h.end(op, "info", str(exc) or type(exc).__name__)
                    turn += 1
                    await self._pause(0.1)
                    continue
                op.claim_id = str(got["claim_id"])
                self.h.end(op, "ok")
                await self._pause(self.rng.uniform(0.05, 0.4))
                if self.stop.is_set():
                    break  # the last grant of each client is kept (its lease outlives the run)
                # bounded: an unknown outcome is retried on the next resolver, a lost
                # compare ("contention") on the same one; each attempt is an operation
                for _ in range(8):
                    rel = self.h.begin("release", cpid=cpid, claim_id=op.claim_id, units=1)
                    try:
                        await clients[turn % len(clients)].release(op.claim_id)
                        self.h.end(rel, "ok")
                        break
                    except ClaimsAPIError as exc:
                        # 404: already gone (an earlier attempt did it); still released
                        self.h.end(rel, "ok" if exc.status == 404 else "fail", exc.code)
                        if exc.code != "contention":
                            break
                        await self._pause(0.05)
                    except (RetrievalError, TimeoutError, aiohttp.ClientError) as exc:
                        self.h.end(rel, "info", str(exc) or type(exc).__name__)
                        turn += 1
                        await self._pause(0.2)

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stop.wait(), seconds)


# -- probes ----------------------------------------------------------------------------------


async def _stopped(stop: asyncio.Event, seconds: float) -> bool:
    """Wait *seconds* or until *stop*; whether it is set."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
    return stop.is_set()


class Outages:
    """Longest stretch each probe failed (seconds)."""

    def __init__(self) -> None:
        self.down_since: dict[str, float | None] = {}
        self.longest: dict[str, float] = defaultdict(float)

    def record(self, name: str, ok: bool, now: float) -> None:
        since = self.down_since.get(name)
        self.longest.setdefault(name, 0.0)
        if ok:
            if since is not None:
                self.longest[name] = max(self.longest[name], now - since)
            self.down_since[name] = None
        elif since is None:
            self.down_since[name] = now

    def close(self, now: float) -> None:
        for name, since in self.down_since.items():
            if since is not None:
                self.longest[name] = max(self.longest[name], now - since)


async def probe_loop(
    stack: Stack,
    up: dict[str, Any],
    index: Index,
    outages: Outages,
    h: History,
    stop: asyncio.Event,
) -> None:
    urls = {f"etcd {m['name']}": f"{m['client']}/health" for m in up["etcd_members"]}
    for ns_urls in (up["registry_instances"]["CN.31"], up["registry_instances"]["CN.31.CMCC"]):
        for u in ns_urls:
            urls[f"registry {u.rsplit(':', 1)[1]}"] = f"{u}/readyz"
    for r in up["resolvers"]:
        urls[f"resolver {r['http'].rsplit(':', 1)[1]}"] = f"{r['http']}/readyz"

    # one loop per component, so a slow probe does not delay the others; a probe counts
    # from when it was sent: a component is down from the first failed probe's start to
    # the next successful probe's start (resolution: the 0.5 s timeout + 0.1 s)
    async def http_probe(session: aiohttp.ClientSession, name: str, url: str) -> None:
        for _ in range(100_000):  # bounded; ends with stop
            sent = h.now()
            try:
                async with session.get(url) as resp:
                    ok = 200 <= resp.status < 300
                    await resp.read()
            except (aiohttp.ClientError, TimeoutError, OSError):
                ok = False
            outages.record(name, ok, sent)
            if await _stopped(stop, PROBE_S):
                return

    async def quorum_probe() -> None:
        for _ in range(100_000):
            sent = h.now()
            try:
                async with asyncio.timeout(1.0):
                    await index.get(Keys.ns("CN"))  # linearizable: needs a quorum
                outages.record("etcd quorum read", True, sent)
            except (RetrievalError, TimeoutError):
                outages.record("etcd quorum read", False, sent)
            if await _stopped(stop, PROBE_S):
                return

    timeout = aiohttp.ClientTimeout(total=0.5)
    async with stack.session(timeout) as session:
        await asyncio.gather(quorum_probe(), *(http_probe(session, n, u) for n, u in urls.items()))
    outages.close(h.now())


# -- faults ----------------------------------------------------------------------------------


async def leader_url(index: Index) -> str | None:
    for _ in range(50):
        with contextlib.suppress(RetrievalError, TimeoutError):
            status = await index.status()
            if status.leader_id:
                for m in await index.member_list():
                    if m.id == status.leader_id and m.client_urls:
                        return m.client_urls[0]
        await asyncio.sleep(0.2)
    return None


async def fault_loop(
    stack: Stack, up: dict[str, Any], index: Index, h: History, duration: float
) -> None:
    async def at(fraction: float) -> None:
        await asyncio.sleep(max(0.0, fraction * duration - h.now()))

    await at(0.15)
    url = await leader_url(index)
    pid = member_pid(up, url) if url else None
    if pid:
        h.fault(f"SIGTERM etcd leader {url} (pid {pid}); cpi up restarts it")
        os.kill(pid, signal.SIGTERM)

    await at(0.38)
    url = await leader_url(index)
    pid = member_pid(up, url) if url else None
    if pid:
        h.fault(f"SIGSTOP etcd leader {url} (pid {pid}) for 3 s")
        os.kill(pid, signal.SIGSTOP)
        try:
            await asyncio.sleep(3.0)
        finally:
            os.kill(pid, signal.SIGCONT)
        h.fault(f"SIGCONT {url} (pid {pid})")

    await at(0.55)
    pid = component_pid(stack.data_dir, "registry serve", "regional.json")
    if pid:
        h.fault(f"SIGKILL registry-regional (pid {pid}); cpi up restarts it")
        os.kill(pid, signal.SIGKILL)

    await at(0.7)
    port = up["resolvers"][0]["http"].rsplit(":", 1)[1]
    pid = component_pid(stack.data_dir, "resolver serve", "--port", port)
    if pid:
        h.fault(f"SIGKILL resolver :{port} (pid {pid}); cpi up restarts it")
        os.kill(pid, signal.SIGKILL)


# -- checks ----------------------------------------------------------------------------------


@dataclass
class Report:
    duration_s: float = 0.0
    ops: dict[str, dict[str, int]] = field(default_factory=dict)
    refusals: dict[str, dict[str, int]] = field(default_factory=dict)
    acknowledged_registrations: int = 0
    lost: list[str] = field(default_factory=list)
    not_served: list[str] = field(default_factory=list)
    double_allocated_history: list[str] = field(default_factory=list)
    double_allocated_etcd: list[str] = field(default_factory=list)
    alloc_mismatch: list[str] = field(default_factory=list)
    converged: bool = False
    resolver_revisions: list[int] = field(default_factory=list)
    outages: dict[str, float] = field(default_factory=dict)
    op_gaps: dict[str, float] = field(default_factory=dict)
    faults: list[tuple[float, str]] = field(default_factory=list)
    claim_events: int = 0

    @property
    def operations(self) -> int:
        return sum(sum(v.values()) for v in self.ops.values())

    @property
    def acknowledged(self) -> int:
        return sum(v.get("ok", 0) for v in self.ops.values())

    @property
    def double_allocated(self) -> int:
        return (
            len(self.double_allocated_history)
            + len(self.double_allocated_etcd)
            + len(self.alloc_mismatch)
        )

    def ok(self) -> bool:
        return not (self.lost or self.not_served or self.double_allocated) and self.converged

    def print(self) -> None:
        print(f"chaos run: {self.duration_s:.1f} s of load, faults:")
        for t, what in self.faults:
            print(f"  t={t:6.1f}s  {what}")
        print(
            f"operations {self.operations}, acknowledged {self.acknowledged}, "
            f"lost {len(self.lost)}, double-allocated {self.double_allocated}"
        )
        for kind, counts in sorted(self.ops.items()):
            print(f"  {kind:10s} " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
            codes = self.refusals.get(kind)
            if codes:
                print(
                    "             refused: "
                    + ", ".join(f"{c} {n}" for c, n in sorted(codes.items(), key=lambda i: -i[1]))
                )
        print(
            f"  acknowledged registrations {self.acknowledged_registrations}: lost "
            f"{len(self.lost)}, not served by every resolver {len(self.not_served)}"
        )
        print(
            f"  double allocation: client history {len(self.double_allocated_history)}, "
            f"etcd history {len(self.double_allocated_etcd)} ({self.claim_events} claim "
            f"events replayed), /alloc/ vs claims {len(self.alloc_mismatch)}"
        )
        for line in self.double_allocated_history + self.double_allocated_etcd:
            print(f"    {line}")
        for line in self.alloc_mismatch:
            print(f"    {line}")
        print(f"  resolvers converged: {self.converged} (revisions {self.resolver_revisions})")
        print("longest unavailability per component (probe every 0.1 s):")
        for name, s in sorted(self.outages.items()):
            print(f"  {name:24s} {s:5.1f} s")
        print("longest gap between acknowledged operations:")
        for name, s in sorted(self.op_gaps.items()):
            print(f"  {name:24s} {s:5.1f} s")


def check_history(h: History, capacity: dict[str, int], report: Report) -> None:
    """Most units surely held at once per resource, from the client's view: a granted
    claim is surely held from its grant's acknowledgement until its release was
    invoked (until the end when it was never released)."""
    released: dict[str, float] = {}
    for op in h.ops:
        if op.kind == "release" and op.claim_id and op.claim_id not in released:
            released[op.claim_id] = op.invoke
    events: dict[str, list[tuple[float, int]]] = defaultdict(list)
    for op in h.ops:
        if op.kind == "claim" and op.outcome == "ok":
            end = released.get(op.claim_id, float("inf"))
            if end > op.complete:
                events[op.cpid] += [(op.complete, op.units), (end, -op.units)]
    for cpid, evs in events.items():
        held = 0
        for t, delta in sorted(evs, key=lambda e: (e[0], e[1])):  # releases first at a tie
            held += delta
            if held > capacity[cpid]:
                report.double_allocated_history.append(
                    f"{cpid}: {held} units surely held at t={t:.2f}s, capacity {capacity[cpid]}"
                )
                break


async def check_etcd(
    index: Index, start_rev: int, capacity: dict[str, int], report: Report
) -> None:
    """Replay every ``/claim/`` event since *start_rev*: units per resource after each
    revision never above capacity; then ``/alloc/`` equals the claims that exist."""
    # a sentinel put under /claim/ marks where the replay stops (no claim is written
    # at a known revision otherwise); it is not a claim and is deleted again
    sentinel = Prefix.CLAIM + "~chaos-end"
    end_rev = await index.put(sentinel, b"{}")
    await index.delete(sentinel)
    held: dict[str, int] = defaultdict(int)
    units_of: dict[str, tuple[str, int]] = {}
    watch = index.watch_prefix(Prefix.CLAIM, start_revision=start_rev)
    events: list[WatchEvent] = []
    try:
        async with asyncio.timeout(60):
            async for item in watch:
                if not isinstance(item, WatchEvent):
                    raise RuntimeError(f"claim history compacted: {item}")
                if item.revision >= end_rev:
                    break
                events.append(item)
                if len(events) > 2_000_000:
                    break
    finally:
        await watch.aclose()
    report.claim_events = len(events)
    by_rev: dict[int, list[WatchEvent]] = defaultdict(list)
    for e in events:
        by_rev[e.revision].append(e)
    for rev in sorted(by_rev):
        for e in by_rev[rev]:
            key = e.kv.key
            if e.type == "put":
                body = json.loads(e.kv.value)
                if key not in units_of:
                    units_of[key] = (body["cpid"], int(body["units"]))
                    held[body["cpid"]] += int(body["units"])
            elif key in units_of:
                cpid, units = units_of.pop(key)
                held[cpid] -= units
        for cpid, units in held.items():
            cap = capacity.get(cpid)
            if cap is not None and units > cap:
                report.double_allocated_etcd.append(
                    f"{cpid}: {units} units claimed at revision {rev}, capacity {cap}"
                )
    claims, rev = await index.get_prefix(Prefix.CLAIM)
    allocs, _ = await index.get_prefix(Prefix.ALLOC)
    total: dict[str, int] = defaultdict(int)
    for kv in claims:
        body = json.loads(kv.value)
        total[body["cpid"]] += int(body["units"])
    alloc = {kv.key.removeprefix(Prefix.ALLOC): int(json.loads(kv.value)["units"]) for kv in allocs}
    for cpid in sorted(set(total) | set(alloc)):
        if total.get(cpid, 0) != alloc.get(cpid, 0):
            report.alloc_mismatch.append(
                f"{cpid}: /alloc/ says {alloc.get(cpid, 0)}, claims sum to {total.get(cpid, 0)}"
            )
        if total.get(cpid, 0) > capacity.get(cpid, 1 << 30):
            report.double_allocated_etcd.append(f"{cpid}: {total[cpid]} claimed at the end")


async def check_resolvers(
    stack: Stack, up: dict[str, Any], cpids: list[str], report: Report
) -> None:
    """Every resolver at the same revision and serving the same record and status for
    every acknowledged CPID (bounded wait: 60 s)."""
    urls = [r["http"] for r in up["resolvers"]]
    deadline = time.monotonic() + 60
    async with stack.session(aiohttp.ClientTimeout(total=5)) as s:

        async def fetch(url: str) -> tuple[int | None, dict[str, Any]]:
            try:
                async with s.get(f"{url}/readyz") as r:
                    health = await r.json()
                    rev = int(health["revision"]) if r.status == 200 else None
            except (aiohttp.ClientError, TimeoutError, ValueError, KeyError):
                return None, {}
            seen: dict[str, Any] = {}
            for c in cpids:
                try:
                    async with s.get(f"{url}/v1/resources/{c}") as r:
                        seen[c] = (await r.json()) if r.status == 200 else None
                except (aiohttp.ClientError, TimeoutError, ValueError):
                    seen[c] = None
            return rev, seen

        while True:
            got = [await fetch(u) for u in urls]
            revs = [g[0] for g in got]
            report.resolver_revisions = [r or 0 for r in revs]
            contents = [
                {c: (v["record"], v.get("status")) if v else None for c, v in g[1].items()}
                for g in got
            ]
            missing = sorted({c for content in contents for c, v in content.items() if v is None})
            same = all(c == contents[0] for c in contents)
            if None not in revs and len(set(revs)) == 1 and same and not missing:
                report.converged = True
                report.not_served = []
                return
            report.not_served = missing
            if time.monotonic() > deadline:
                return
            await asyncio.sleep(0.5)


def op_gaps(h: History, end: float) -> dict[str, float]:
    out = {}
    for kind in ("heartbeat", "claim", "release"):
        times = sorted(op.complete for op in h.ops if op.kind == kind and op.outcome == "ok")
        if not times:
            continue
        gaps = [b - a for a, b in itertools.pairwise(times)]
        out[kind] = max([*gaps, 0.0])
    return out


# -- the run ---------------------------------------------------------------------------------


async def run_chaos(
    stack: Stack,
    *,
    duration: float = 90.0,
    agents: int = 40,
    claimers: int = 24,
    hot: int = 3,
    seed: int = 1,
    faults: Callable[[Stack, dict[str, Any], Index, History, float], Coroutine[Any, Any, None]]
    | None = fault_loop,
) -> Report:
    """Load, faults and checks against a running *stack* (see the module docstring)."""
    up = stack.up()
    rng = random.Random(seed)
    report = Report()
    async with stack.index() as index:
        token = await claim_tokens.create_token(
            index, holder=HOLDER, ttl_s=86_400, max_units=1_000_000
        )
        start_rev = await index.revision() + 1
        h = History()
        stop = asyncio.Event()
        load = Load(stack, up, h, stop, rng)
        outages = Outages()
        async with stack.session() as session:
            targets = []
            instances: dict[str, list[str]] = {}
            for i, ns in enumerate(["CN.31.CMCC", "CN.11.CTCC", "CN.31", "CN.44.CUCC"]):
                if ns not in up["tokens"]:
                    continue
                urls = up["registry_instances"][ns]
                instances[ns] = urls
                targets.append(Target(urls[i % len(urls)], up["tokens"][ns], ns))
            nodes = build_agents(agents, targets=targets, session=session, seed=seed, kind="GPU")
            for a in nodes:
                hw = a._prober
                hw.churn = 0.0  # type: ignore[attr-defined]
                hw.busy = [False] * hw.count  # type: ignore[attr-defined]
                load.capacity[a.cpid] = hw.count  # type: ignore[attr-defined]
            deadline = time.monotonic() + duration + 30
            t_end = time.monotonic() + duration
            probe = asyncio.create_task(probe_loop(stack, up, index, outages, h, stop))
            agent_tasks = [
                asyncio.create_task(load.agent_loop(a, instances[a.namespace], deadline))
                for a in nodes
            ]
            # claims go to the first `hot` nodes once they are registered and served
            hot_cpids = [a.cpid for a in nodes[:hot]]
            for _ in range(200):
                ok = {o.cpid for o in h.ops if o.kind == "heartbeat" and o.outcome == "ok"}
                if all(c in ok for c in hot_cpids):
                    break
                await asyncio.sleep(0.1)
            claim_tasks = [
                asyncio.create_task(load.claim_loop(w, token, hot_cpids, deadline))
                for w in range(claimers)
            ]
            fault_task = (
                asyncio.create_task(faults(stack, up, index, h, duration)) if faults else None
            )
            await asyncio.sleep(max(0.0, t_end - time.monotonic()))
            stop.set()
            tasks = [*agent_tasks, *claim_tasks, probe]
            if fault_task is not None:
                tasks.append(fault_task)
            done, pending = await asyncio.wait(tasks, timeout=30)
            for t in pending:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for t in done:
                if not t.cancelled() and t.exception() is not None:
                    raise t.exception()  # type: ignore[misc]
        report.duration_s = h.now()
        report.faults = h.faults
        for op in h.ops:
            report.ops.setdefault(op.kind, {}).setdefault(op.outcome, 0)
            report.ops[op.kind][op.outcome] += 1
            if op.outcome == "fail":
                code = op.detail.split(":")[0][:60]
                report.refusals.setdefault(op.kind, {}).setdefault(code, 0)
                report.refusals[op.kind][code] += 1
        report.outages = dict(outages.longest)
        report.op_gaps = op_gaps(h, report.duration_s)

        acked = sorted({o.cpid for o in h.ops if o.kind == "register" and o.outcome == "ok"})
        report.acknowledged_registrations = len(acked)
        for c in acked:
            if await index.get(Keys.rec(c)) is None:
                report.lost.append(c)
        check_history(h, load.capacity, report)
        await check_etcd(index, start_rev, load.capacity, report)
    await check_resolvers(stack, up, acked, report)
    return report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=90.0, help="seconds of load (default 90)")
    p.add_argument("--agents", type=int, default=40)
    p.add_argument("--claimers", type=int, default=24)
    p.add_argument("--hot", type=int, default=3, help="contended resources (default 3)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--keep", metavar="DIR", help="run in DIR and keep it (default: a temp dir)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="cpi-chaos-") as tmp:
        base = Path(args.keep) if args.keep else Path(tmp)
        stack = Stack(base / "state")
        t0 = time.monotonic()
        try:
            stack.start()
            print(
                f"cpi up --etcd-members 3 --registries 2 --resolvers 2 ready in "
                f"{time.monotonic() - t0:.1f} s ({stack.data_dir})",
                flush=True,
            )
            report = asyncio.run(
                run_chaos(
                    stack,
                    duration=args.duration,
                    agents=args.agents,
                    claimers=args.claimers,
                    hot=args.hot,
                    seed=args.seed,
                )
            )
        finally:
            stack.stop()
        report.print()
        print(f"total {time.monotonic() - t0:.1f} s; {'OK' if report.ok() else 'FAILED'}")
        raise SystemExit(0 if report.ok() else 1)


if __name__ == "__main__":
    main()
