"""``cpi agent run|probe``: the node agent (register, heartbeat, deregister on SIGTERM).

Exit codes of ``cpi agent run`` (those of every command, :mod:`cpi.errors`): 0 done
(stopped by SIGTERM/SIGINT and deregistered, or ``--once``/``--dry-run`` finished); 1 the
registry rejected a request (4xx) or the input is invalid; 2 usage; 4 the join token or
namespace was refused (401/403; restarting will not help: see
``RestartPreventExitStatus=4`` in docs/agent.md); 5 the registry stayed unreachable.

``--drain`` starts the node in state ``draining`` (no new claims); SIGUSR1 switches a
running agent to ``draining``, SIGUSR2 back to ``up``; each sends a status at once.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
from pathlib import Path

import aiohttp

from cpi.commands._util import print_json
from cpi.errors import EXIT_REFUSED, UsageError
from cpi.output import emit, output_arguments, print_fields, size
from cpi.tls import add_client_arguments, client_ssl
from registry import keyfile, national
from registry.agent import (
    USER_AGENT,
    Agent,
    RefusedError,
    parse_endpoint,
    parse_label,
    probe,
    registry_urls,
)
from registry.agent.simulate import Target, run_simulation, targets_from_up
from schemas import _json
from schemas.cpid import KINDS

TOKEN_ENV = "CPI_JOIN_TOKEN"

_log = logging.getLogger("cpi.agent")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("agent", help="node agent: register this machine and keep it live")
    agents = p.add_subparsers(dest="agent_command", metavar="ACTION", required=True)

    run = agents.add_parser(
        "run",
        help="register with a registry, send status every heartbeat_s, deregister on SIGTERM",
        description=(
            "Keeps its key in --key (created 0600 on first start), probes the machine (CPU, "
            "memory, disks, GPUs via nvidia-smi), registers with retry and back-off, sends a "
            "signed status every heartbeat_s, re-registers when the record is gone, and "
            "deregisters on SIGTERM/SIGINT. Exit codes: 0 done, 1 rejected, 2 usage, "
            "4 token or namespace refused, 5 registry unreachable."
        ),
    )
    run.add_argument(
        "--registry",
        help="registry base URL, e.g. https://host:8441; several instances of the "
        "registry separated by commas are tried in order (failover)",
    )
    run.add_argument(
        "--token", help=f"join token (prefer --token-file or ${TOKEN_ENV}: argv is visible in ps)"
    )
    run.add_argument("--token-file", help="file holding the join token")
    run.add_argument("--namespace", help="namespace to register in, e.g. CN.31.CMCC")
    run.add_argument(
        "--up",
        metavar="UP_JSON",
        help="with --simulate: spread the nodes over every registry and token in this "
        "up.json (written by cpi up); --namespace narrows it to one namespace",
    )
    run.add_argument("--kind", help=f"CPID kind: {', '.join(KINDS)} (required unless --simulate)")
    run.add_argument("--key", help="node key file; created (0600) on first start")
    run.add_argument("--region", help="GB/T 2260 region code (default: from the namespace)")
    run.add_argument("--site", help="site name for location.site")
    run.add_argument(
        "--pue", type=float, metavar="X", help="the site's PUE for location.pue (1 to 5)"
    )
    run.add_argument(
        "--grid-carbon",
        type=float,
        metavar="G",
        help="grid carbon intensity, g CO2/kWh, for location.grid_gco2_per_kwh (0 to 2000)",
    )
    run.add_argument(
        "--price",
        type=float,
        metavar="CNY",
        help="list price in yuan per unit-hour (accelerator-hour; core-hour without "
        "accelerators) for attributes.price_cny_per_unit_hour",
    )
    run.add_argument(
        "--endpoint",
        action="append",
        default=[],
        metavar="PROTO://HOST:PORT/PURPOSE",
        help="service endpoint of this node (repeatable), e.g. http://10.0.0.5:8000/inference",
    )
    run.add_argument(
        "--label", action="append", default=[], metavar="K=V", help="label (repeatable)"
    )
    run.add_argument("--anchor", help="verify the returned record and chain against this anchor")
    run.add_argument("--once", action="store_true", help="register, send one status, exit")
    run.add_argument(
        "--drain",
        action="store_true",
        help="report state draining (no new claims); SIGUSR1 drains a running agent, "
        "SIGUSR2 returns it to up",
    )
    run.add_argument(
        "--dry-run",
        action="store_true",
        help="print the register.v1 payload and the CPID it would get; no network",
    )
    run.add_argument(
        "--simulate",
        type=int,
        metavar="N",
        help="run N simulated nodes in this process (demos and load tests)",
    )
    run.add_argument(
        "--data-dir", help="with --simulate: keep the simulated nodes' keys here (stable CPIDs)"
    )
    run.add_argument("--seed", type=int, help="with --simulate: seed for the inventories")
    run.add_argument(
        "--register-attempts",
        type=int,
        help="give up registering after N attempts (default: never; 5 with --once)",
    )
    add_client_arguments(run, cert=True)
    run.set_defaults(handler=run_agent)

    pr = agents.add_parser("probe", help="print what the agent would report about this machine")
    output_arguments(pr)
    pr.set_defaults(handler=run_probe)


def _token(args: argparse.Namespace) -> str:
    if args.token and args.token_file:
        raise UsageError("give --token or --token-file, not both")
    if args.token_file:
        try:
            token = Path(args.token_file).read_text().strip()
        except OSError as exc:
            raise UsageError(f"{args.token_file}: {exc.strerror}") from exc
    else:
        token = args.token or os.environ.get(TOKEN_ENV, "")
    if not token and not args.dry_run:
        raise UsageError(f"no join token: give --token, --token-file or ${TOKEN_ENV}")
    return token


def _install_stop(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()

    def on_signal(sig: signal.Signals) -> None:
        if not stop.is_set():
            _log.info("%s received; deregistering and exiting", sig.name)
        stop.set()

    try:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal, sig)
    except (RuntimeError, ValueError, NotImplementedError) as exc:  # not the main thread
        _log.debug("SIGTERM/SIGINT not handled here (%s)", exc)


def _install_drain(agent: Agent) -> None:
    """SIGUSR1: report ``draining`` (no new claims); SIGUSR2: back to ``up``."""
    loop = asyncio.get_running_loop()
    try:
        loop.add_signal_handler(signal.SIGUSR1, agent.set_state, "draining")
        loop.add_signal_handler(signal.SIGUSR2, agent.set_state, "up")
    except (RuntimeError, ValueError, NotImplementedError, AttributeError) as exc:
        _log.debug("SIGUSR1/SIGUSR2 not handled here (%s)", exc)


def _targets(args: argparse.Namespace, token: str) -> list[Target]:
    if args.up:
        try:
            up = _json.loads(Path(args.up).read_text())
        except (OSError, ValueError) as exc:
            raise UsageError(f"{args.up}: cannot read up.json: {exc}") from exc
        return targets_from_up(up, [args.namespace] if args.namespace else None)
    return [Target(args.registry, token, args.namespace)]


async def _run(args: argparse.Namespace) -> int:
    if args.up and args.simulate is None:
        raise UsageError("--up goes with --simulate")
    if not args.up and not (args.registry and args.namespace):
        raise UsageError("--registry and --namespace are required (or --simulate N --up FILE)")
    token = "" if args.up else _token(args)
    targets = _targets(args, token) if args.simulate is not None else []
    ssl_context = (
        None
        if args.dry_run
        else client_ssl(
            args,
            *sorted({t.registry for t in targets} or set(registry_urls(args.registry))),
            up=args.up,
        )
    )
    endpoints = [parse_endpoint(e) for e in args.endpoint]
    labels = dict(parse_label(lab) for lab in args.label)
    anchors = national.load_anchors(args.anchor) if args.anchor else None
    attempts = args.register_attempts or (5 if args.once else None)
    stop = asyncio.Event()

    if args.simulate is not None:
        if args.dry_run:
            raise UsageError("--simulate and --dry-run do not go together")
        if args.drain:
            raise UsageError("--simulate and --drain do not go together")
        _install_stop(stop)
        agent_log = logging.getLogger("registry.agent.agent")
        level = agent_log.level
        if not args.verbose:  # one line per node and event is too much for N nodes
            agent_log.setLevel(logging.WARNING)
        try:
            report = await run_simulation(
                args.simulate,
                targets=targets,
                ssl_context=ssl_context,
                stop=stop,
                data_dir=args.data_dir,
                seed=args.seed,
                kind=args.kind,
                region=args.region,
                anchors=anchors,
                once=args.once,
            )
        except RefusedError:
            return EXIT_REFUSED
        finally:
            agent_log.setLevel(level)
        print(
            f"simulated {report.nodes} nodes: {report.registered} registered, "
            f"{report.heartbeats} status sent, {report.deregistered} deregistered, "
            f"{report.refused} refused, {report.failed} failed"
        )
        for err in report.errors:
            print(f"  {err}")
        return 0 if report.failed == 0 and report.refused == 0 else 1

    if not args.kind or not args.key:
        raise UsageError("--kind and --key are required (unless --simulate)")
    key, created = keyfile.load_or_create(args.key)
    if created:
        _log.info("created node key %s (0600)", args.key)
    async with aiohttp.ClientSession(
        headers={"User-Agent": USER_AGENT}, connector=aiohttp.TCPConnector(ssl=ssl_context or True)
    ) as session:
        agent = Agent(
            registry=args.registry,
            token=token,
            namespace=args.namespace,
            kind=args.kind,
            key=key,
            region=args.region,
            site=args.site,
            endpoints=endpoints,
            labels=labels,
            pue=args.pue,
            grid_gco2_per_kwh=args.grid_carbon,
            price_cny_per_unit_hour=args.price,
            session=session,
            anchors=anchors,
            register_attempts=attempts,
        )
        if args.dry_run:
            print_json(await agent.dry_run())
            return 0
        _install_stop(stop)
        if args.drain:
            agent.set_state("draining")
        _install_drain(agent)
        try:
            await agent.run(stop, once=args.once)
        except RefusedError:
            return EXIT_REFUSED  # already logged by the agent, with the reason
    if args.once:
        print(agent.cpid)
    return 0


def run_agent(args: argparse.Namespace) -> int:
    return asyncio.run(_run(args))


def run_probe(args: argparse.Namespace) -> int:
    reading = probe.probe()
    attrs = json.loads(reading.attributes().model_dump_json(exclude_none=True))
    out = {
        "attributes": attrs,
        "capacity": json.loads(reading.capacity().model_dump_json(exclude_none=True)),
        "metrics": reading.metrics(),
    }

    def table(wide: bool) -> None:
        cpu = reading.cpu
        fields: list[tuple[str, object]] = [
            ("cpu", cpu.model + f" ({cpu.cores} cores)" if cpu else "unknown"),
            ("memory", f"{reading.memory_gib} GiB"),
            ("storage", f"{reading.storage_tib} TiB (/)"),
        ]
        if not reading.gpus:
            fields.append(("gpus", "none found (nvidia-smi not on PATH or no GPU)"))
        for g in reading.gpus:
            fields.append(
                (
                    f"gpu {g.index}",
                    f"{g.vendor} {g.model}, {size(g.memory_total_mib * 1024 * 1024)}"
                    f"{', busy' if g.busy else ''}",
                )
            )
        print_fields(fields)

    emit(args, out, table=table)
    return 0
