"""``cpi up``: run etcd, the registries, the log signer and the resolver on this machine."""

from __future__ import annotations

import argparse
from pathlib import Path

import seeds
from cpi.up import UpOptions, up


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
        default=8700,
        help="first of the ports used on first run (default: 8700)",
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
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    return up(
        UpOptions(
            data_dir=Path(args.data_dir),
            base_port=args.base_port,
            demo=args.demo,
            nodes=args.nodes,
            heartbeat_s=args.heartbeat,
            seeds=Path(args.seeds) if args.seeds else seeds.path(seeds.NAMESPACES),
            etcd_members=args.etcd_members,
            registries=args.registries,
            resolvers=args.resolvers,
        )
    )
