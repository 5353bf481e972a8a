"""Simulated nodes for demos and load tests: many :class:`~registry.agent.agent.Agent`\\ s, one process.

Each simulated node has a plausible inventory (1-8 cards of H100, H800, H200, H20,
A800, A100, L20, L40S or Huawei Ascend 910B; a matching CPU and memory), a list price
and its site's PUE and grid carbon intensity (the EXAMPLE figures of
``seeds/energy.json``, varied a little per node), its own
Ed25519 key (in memory, or in ``<data_dir>/sim-<n>.key`` so a second run gets the same
CPIDs back) and a region taken from its namespace.  Cards turn busy and free now and
then, so the free capacity in the status changes the way a real cluster's does, but
rarely enough that most heartbeats carry no change.

All agents share one aiohttp session (one connection pool)::

    stop = asyncio.Event()
    report = await run_simulation(100, targets=[Target(url, token, "CN.31.CMCC")], stop=stop)
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import aiohttp

import seeds
from registry import keyfile
from registry.agent.agent import Agent, Backoff, RefusedError, region_of
from registry.agent.probe import GpuReading, Probe
from schemas import _json, chain, keys
from schemas.cpid import parse_namespace
from schemas.errors import InvalidDataError
from schemas.models import CpuInfo, Endpoint

__all__ = [
    "INVENTORY",
    "SimulatedHardware",
    "SimulationReport",
    "SiteFigures",
    "Target",
    "build_agents",
    "load_energy",
    "run_simulation",
    "site_figures",
    "targets_from_up",
]

_log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class _Card:
    vendor: str
    model: str
    memory_mib: int
    kind: str
    tdp_w: float
    weight: int


INVENTORY: Final = (
    _Card("NVIDIA", "H100", 81559, "GPU", 700, 5),
    _Card("NVIDIA", "H800", 81559, "GPU", 700, 5),
    _Card("NVIDIA", "H200", 143771, "GPU", 700, 3),
    _Card("NVIDIA", "H20", 97871, "GPU", 400, 4),
    _Card("NVIDIA", "A800", 81920, "GPU", 400, 4),
    _Card("NVIDIA", "A100", 81920, "GPU", 400, 3),
    _Card("NVIDIA", "L20", 46068, "GPU", 275, 3),
    _Card("NVIDIA", "L40S", 46068, "GPU", 350, 2),
    _Card("Huawei", "910B", 65536, "NPU", 400, 4),
)
"""Accelerators the simulation picks from (memory as ``nvidia-smi`` reports it, in MiB)."""

_CPUS: Final = (
    ("Intel(R) Xeon(R) Platinum 8480+", 112),
    ("Intel(R) Xeon(R) Platinum 8468", 96),
    ("AMD EPYC 9654 96-Core Processor", 192),
    ("HUAWEI Kunpeng 920 7265", 128),
    ("Hygon C86 7390 32-core Processor", 64),
)
_CARD_COUNTS: Final = (1, 2, 4, 8, 8, 8, 8)


class SimulatedHardware:
    """A node's fake hardware; calling it (async) returns a :class:`Probe` like the real one.

    Each reading, with probability ``churn``, one card changes between busy and free.
    """

    def __init__(self, rng: random.Random, *, kind: str | None = None, churn: float = 0.1) -> None:
        cards = [c for c in INVENTORY if kind is None or c.kind == kind]
        if not cards:
            raise InvalidDataError(
                f"no simulated accelerators of kind {kind!r}; kinds: GPU, NPU (or none given)"
            )
        self.card = rng.choices(cards, weights=[c.weight for c in cards])[0]
        self.count = rng.choice(_CARD_COUNTS)
        cpu_model, cores = rng.choice(
            [c for c in _CPUS if (self.card.kind == "NPU") == ("Kunpeng" in c[0])] or _CPUS
        )
        self.cpu = CpuInfo(model=cpu_model, cores=cores)
        self.memory_gib = float(rng.choice((512, 1024, 1024, 2048)))
        self.storage_tib = float(rng.choice((3.84, 7.68, 15.36, 30.72)))
        self.busy = [rng.random() < 0.3 for _ in range(self.count)]
        self.memory_busy = [rng.uniform(0.35, 0.95) for _ in range(self.count)]
        self.churn = churn
        self._rng = rng

    @property
    def kind(self) -> str:
        return self.card.kind

    def reading(self) -> Probe:
        """The current state as a probe reading (no change)."""
        gpus = []
        for i, busy in enumerate(self.busy):
            util = self._rng.uniform(55, 99) if busy else 0.0
            gpus.append(
                GpuReading(
                    index=i,
                    vendor=self.card.vendor,
                    model=self.card.model,
                    memory_total_mib=float(self.card.memory_mib),
                    memory_used_mib=(
                        round(self.card.memory_mib * self.memory_busy[i]) if busy else 0.0
                    ),
                    utilization_pct=round(util, 1),
                    power_w=round(self.card.tdp_w * (0.3 + 0.6 * util / 100 if busy else 0.12), 1),
                    power_limit_w=self.card.tdp_w,
                )
            )
        return Probe(self.cpu, self.memory_gib, self.storage_tib, tuple(gpus))

    async def __call__(self) -> Probe:
        if self._rng.random() < self.churn:
            i = self._rng.randrange(self.count)
            self.busy[i] = not self.busy[i]
        return self.reading()


@dataclass(frozen=True, slots=True)
class Target:
    """Where simulated nodes register: a registry URL, a join token and a namespace."""

    registry: str
    token: str = field(repr=False)
    namespace: str


def targets_from_up(up: Mapping[str, Any], namespaces: Sequence[str] | None = None) -> list[Target]:
    """Targets from an ``up.json`` object (docs/protocol.md §8, "Embedded stack").

    Every namespace with both a registry URL and a token, or only ``namespaces``.
    """
    registries: Mapping[str, str] = up.get("registries", {})
    tokens: Mapping[str, str] = up.get("tokens", {})
    chosen = list(namespaces) if namespaces is not None else sorted(set(registries) & set(tokens))
    out = []
    for ns in chosen:
        if ns not in registries or ns not in tokens:
            raise InvalidDataError(
                f"up.json has no registry URL and join token for {ns!r} "
                f"(it has: {', '.join(sorted(set(registries) & set(tokens))) or 'none'})"
            )
        out.append(Target(registries[ns], tokens[ns], ns))
    return out


@dataclass(frozen=True, slots=True)
class SiteFigures:
    """What a simulated node states about its site and price (EXAMPLE figures)."""

    pue: float | None
    grid_gco2_per_kwh: float | None
    price_cny_per_unit_hour: float | None


def load_energy() -> Mapping[str, Any]:
    """The example figures of ``seeds/energy.json``."""
    data: Mapping[str, Any] = _json.loads(seeds.path(seeds.ENERGY).read_bytes())
    return data


def site_figures(
    energy: Mapping[str, Any], region: str, model: str, rng: random.Random
) -> SiteFigures:
    """A node's figures: its region's (or province's) PUE and grid intensity, and its
    model's price, each varied a little so that nodes of one region differ."""
    regions: Mapping[str, Any] = energy.get("regions", {})
    site = regions.get(region) or regions.get(region[:4]) or regions.get(region[:2]) or {}
    price = energy.get("price_cny_per_unit_hour", {}).get(model)
    pue = site.get("pue")
    grid = site.get("grid_gco2_per_kwh")
    return SiteFigures(
        pue=None if pue is None else round(min(5.0, max(1.0, pue + rng.uniform(-0.04, 0.04))), 2),
        grid_gco2_per_kwh=None if grid is None else float(grid),
        price_cny_per_unit_hour=None
        if price is None
        else round(price * rng.uniform(0.85, 1.15), 1),
    )


def _node_key(data_dir: Path | None, n: int) -> keys.Ed25519PrivateKey:
    if data_dir is None:
        return keys.generate()
    key, _ = keyfile.load_or_create(data_dir / f"sim-{n:05d}.key")
    return key


def build_agents(
    n: int,
    *,
    targets: Sequence[Target],
    session: aiohttp.ClientSession,
    data_dir: str | os.PathLike[str] | None = None,
    seed: int | None = None,
    kind: str | None = None,
    region: str | None = None,
    anchors: chain.TrustAnchors | None = None,
    backoff: Backoff | None = None,
    churn: float = 0.1,
) -> list[Agent]:
    """``n`` agents with simulated hardware, spread round-robin over ``targets``.

    With ``data_dir``, node ``i`` keeps its key in ``<data_dir>/sim-<i>.key`` and draws
    its inventory from a generator seeded by that key, so a second run gets the same
    hardware, kind and CPID back (``seed`` is then unused).  Without it, keys live in
    memory and node ``i`` draws from ``random.Random(seed + i)``.
    """
    if n < 1:
        raise InvalidDataError(f"the number of simulated nodes must be at least 1, got {n}")
    if not targets:
        raise InvalidDataError("no registry to register simulated nodes with")
    d = Path(data_dir) if data_dir is not None else None
    energy = load_energy()
    agents = []
    for i in range(n):
        t = targets[i % len(targets)]
        key = _node_key(d, i)
        if d is not None:  # a kept key keeps its inventory, hence its kind and CPID
            rng = random.Random(int.from_bytes(keys.public_raw(key)[:8], "big"))
        else:
            rng = random.Random(None if seed is None else seed + i)
        hw = SimulatedHardware(rng, kind=kind.upper() if kind else None, churn=churn)
        ns = parse_namespace(t.namespace)
        node_region = region or region_of(ns) or "11"
        figures = site_figures(energy, node_region, hw.card.model, rng)
        agents.append(
            Agent(
                registry=t.registry,
                token=t.token,
                namespace=ns,
                kind=hw.kind,
                key=key,
                region=node_region,
                site=f"sim-{node_region}",
                endpoints=[
                    Endpoint(
                        proto="ssh",
                        host=f"10.{int(node_region[:2])}.{i // 250}.{i % 250 + 1}",
                        port=22,
                        purpose="ssh",
                    ),
                    Endpoint(
                        proto="http",
                        host=f"10.{int(node_region[:2])}.{i // 250}.{i % 250 + 1}",
                        port=8000,
                        purpose="inference",
                    ),
                ],
                labels={"sim": "true", "pool": f"{hw.card.model.lower()}-x{hw.count}"},
                pue=figures.pue,
                grid_gco2_per_kwh=figures.grid_gco2_per_kwh,
                price_cny_per_unit_hour=figures.price_cny_per_unit_hour,
                session=session,
                prober=hw,
                anchors=anchors,
                backoff=backoff,
                name=f"sim-{i:05d}",
                rng=rng,
            )
        )
    return agents


@dataclass(slots=True)
class SimulationReport:
    """What a simulation did; ``refused`` agents had their token or namespace refused."""

    nodes: int
    registered: int = 0
    heartbeats: int = 0
    deregistered: int = 0
    refused: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)


async def run_simulation(
    n: int,
    *,
    targets: Sequence[Target],
    stop: asyncio.Event,
    data_dir: str | os.PathLike[str] | None = None,
    seed: int | None = None,
    kind: str | None = None,
    region: str | None = None,
    anchors: chain.TrustAnchors | None = None,
    ramp_s: float = 2.0,
    once: bool = False,
    churn: float = 0.1,
    ssl_context: ssl.SSLContext | None = None,
) -> SimulationReport:
    """Run ``n`` simulated nodes until ``stop`` is set, then deregister them all.

    Start times are spread over ``ramp_s`` seconds.  With ``once`` every node
    registers, sends one status and the call returns (records stay).  When every
    node was refused (bad token), :class:`~registry.agent.agent.RefusedError` is raised.
    ``ssl_context`` verifies the registries' certificates (default: the system roots).
    """
    connector = aiohttp.TCPConnector(limit=256, ssl=ssl_context or True)
    async with aiohttp.ClientSession(connector=connector) as session:
        agents = build_agents(
            n,
            targets=targets,
            session=session,
            data_dir=data_dir,
            seed=seed,
            kind=kind,
            region=region,
            anchors=anchors,
            churn=churn,
        )
        spread = random.Random(seed)

        async def one(agent: Agent) -> None:
            await asyncio.sleep(spread.uniform(0, ramp_s) if ramp_s > 0 else 0)
            if stop.is_set():
                return
            await agent.run(stop, once=once)

        _log.info("simulating %d nodes across %d registries", n, len({t.registry for t in targets}))
        results = await asyncio.gather(*(one(a) for a in agents), return_exceptions=True)
    report = SimulationReport(nodes=n)
    first_refusal: RefusedError | None = None
    for agent, res in zip(agents, results, strict=True):
        report.registered += agent.registrations > 0
        report.heartbeats += agent.heartbeats_sent
        report.deregistered += agent.registrations > 0 and agent.registration is None
        if isinstance(res, RefusedError):
            report.refused += 1
            first_refusal = first_refusal or res
        elif isinstance(res, BaseException):
            if isinstance(res, asyncio.CancelledError):
                raise res
            report.failed += 1
            if len(report.errors) < 10:
                report.errors.append(f"{agent.name}: {res}")
    _log.info(
        "simulation done: %d/%d registered, %d status sent, %d deregistered, %d refused, %d failed",
        report.registered,
        n,
        report.heartbeats,
        report.deregistered,
        report.refused,
        report.failed,
    )
    if first_refusal is not None and report.refused == n:
        raise first_refusal
    return report
