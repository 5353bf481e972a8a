"""``cpi up``: run etcd, the registries, the log signer and the resolver on this machine."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import seeds
from cpi.errors import UsageError
from cpi.up import UpOptions, up

DEFAULT_BASE_PORT = 8700


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "up",
        help="start the whole stack locally (etcd, registries, resolver), each as its own process",
        description=(
            "Start etcd with authentication on (one etcd user per component, passwords in "
            "DATA_DIR/etcd-auth/, 0600), create the national root and the seeded 1+M+N "
            "delegations, start the registries, the log signer and the resolver, write "
            "DATA_DIR/up.json, and supervise them until Ctrl-C. A second run on the same data "
            "dir reuses keys, tokens, etcd passwords and index."
        ),
    )
    p.add_argument("--data-dir", default=".cpi", help="state directory (default: ./.cpi)")
    p.add_argument(
        "--base-port",
        type=int,
        default=None,
        help=f"first of the ports used on first run (default: {DEFAULT_BASE_PORT}); a data dir "
        "keeps its ports (DATA_DIR/ports.json): another --base-port on it is refused",
    )
    p.add_argument(
        "--demo", action="store_true", help="also run simulated nodes across the regions"
    )
    p.add_argument(
        "--nodes", type=int, default=60, help="simulated nodes with --demo (default: 60)"
    )
    p.add_argument(
        "--heartbeat", type=float, default=10.0, help="heartbeat interval for nodes, seconds"
    )
    p.add_argument(
        "--seeds",
        metavar="FILE",
        help="namespace tree (default: namespaces.json of the installed seeds package)",
    )
    p.add_argument(
        "--etcd-members",
        type=int,
        default=1,
        metavar="N",
        help="run the index as an N-member etcd cluster on loopback (default: 1; 3 or 5 "
        "survive the loss of 1 or 2 members; docs/cluster.md)",
    )
    p.add_argument(
        "--registries",
        type=int,
        default=1,
        metavar="N",
        help="instances of each registry process, each on its own port (default: 1)",
    )
    p.add_argument(
        "--resolvers",
        type=int,
        default=1,
        metavar="N",
        help="resolvers, each on its own HTTP and DNS ports (default: 1)",
    )
    p.add_argument(
        "--witnesses",
        type=int,
        default=0,
        metavar="N",
        help="start N transparency-log witnesses; the log signer publishes each checkpoint "
        "with their cosignatures (default: 0; docs/audit.md)",
    )
    p.add_argument(
        "--roots",
        type=int,
        default=1,
        metavar="N",
        help="2: also run a second root (SG) with its own etcd, registry and log signer; "
        "the resolvers serve both through an anchor bundle (docs/resolver.md, Federation)",
    )
    p.set_defaults(handler=run)


def _check_base_port(data_dir: Path, base_port: int | None) -> None:
    """A data dir keeps the ports of its first run (etcd's member URLs are in its data):
    refuse a different ``--base-port`` rather than ignore it."""
    path = data_dir / "ports.json"
    if base_port is None or not path.exists():
        return
    try:
        kept = int(json.loads(path.read_text())["resolver_http"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"{path}: unreadable ({exc}); remove it or the data dir") from exc
    if kept != base_port:
        raise UsageError(
            f"--base-port {base_port}: {data_dir} was set up with base port {kept} "
            f"({path}); run without --base-port (or with --base-port {kept}), or use another "
            "--data-dir for a second stack"
        )


def run(args: argparse.Namespace) -> int:
    _check_base_port(Path(args.data_dir), args.base_port)
    return up(
        UpOptions(
            data_dir=Path(args.data_dir),
            base_port=DEFAULT_BASE_PORT if args.base_port is None else args.base_port,
            demo=args.demo,
            nodes=args.nodes,
            heartbeat_s=args.heartbeat,
            seeds=Path(args.seeds) if args.seeds else seeds.path(seeds.NAMESPACES),
            etcd_members=args.etcd_members,
            registries=args.registries,
            resolvers=args.resolvers,
            witnesses=args.witnesses,
            roots=args.roots,
        )
    )
