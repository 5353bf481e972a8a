"""``cpi id parse|check|derive``: work with CPIDs."""

from __future__ import annotations

import argparse
import sys

from cpi.commands._util import print_json
from registry import keyfile
from schemas import cpid, keys
from schemas.errors import InvalidCPIDError

_KIND_NAMES = {
    "CPU": "CPU server",
    "GPU": "GPU server",
    "NPU": "NPU server",
    "CLU": "cluster",
    "STO": "storage pool",
    "NET": "network link",
    "SVC": "service endpoint",
}


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("id", help="parse, check or derive CPIDs")
    ids = p.add_subparsers(dest="id_command", metavar="ACTION", required=True)

    parse = ids.add_parser("parse", help="explain each part of a CPID")
    parse.add_argument("cpid")
    parse.add_argument("--json", action="store_true", help="machine-readable output")
    parse.add_argument("--zone", default="cpi.", help="DNS zone for the DNS form (default: cpi.)")
    parse.set_defaults(handler=run_parse)

    check = ids.add_parser("check", help="exit 0 when valid, 1 with the reason on stderr when not")
    check.add_argument("cpid")
    check.set_defaults(handler=run_check)

    derive = ids.add_parser("derive", help="derive a node's CPID from namespace, kind and key")
    derive.add_argument("--namespace", required=True, help="e.g. CN.31.CMCC")
    derive.add_argument("--kind", required=True, help=", ".join(cpid.KINDS))
    derive.add_argument(
        "--pubkey", required=True, help="public key file (PEM, base64url, or a private key)"
    )
    derive.set_defaults(handler=run_derive)


def explain(c: cpid.CPID, zone: str) -> dict[str, object]:
    return {
        "cpid": c.to_text(),
        "prefix": c.prefix,
        "segments": list(c.segments),
        "root": c.root,
        "kind": c.kind,
        "kind_name": _KIND_NAMES[c.kind],
        "serial": c.serial,
        "check": c.check,
        "dns": c.to_dns(zone),
    }


def run_parse(args: argparse.Namespace) -> int:
    c = cpid.parse(args.cpid)
    info = explain(c, args.zone)
    if args.json:
        print_json(info)
        return 0
    print(f"cpid     {c}")
    print(f"prefix   {c.prefix}  (naming authority, delegated segment by segment)")
    for i, seg in enumerate(c.segments, start=1):
        role = (
            "root (ISO 3166-1)"
            if i == 1
            else ("region (GB/T 2260)" if seg.isdigit() else "node / site")
        )
        print(f"  segment {i}: {seg:<16} {role}")
    print(f"kind     {c.kind}  ({_KIND_NAMES[c.kind]})")
    print(f"serial   {c.serial}  (first 12 Crockford base32 chars of sha256(node public key))")
    print(f"check    {c.check}  (ISO/IEC 7064 MOD 37,36)")
    print(f"dns      {info['dns']}")
    return 0


def run_check(args: argparse.Namespace) -> int:
    try:
        c = cpid.parse(args.cpid)
    except InvalidCPIDError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    print(c)
    return 0


def run_derive(args: argparse.Namespace) -> int:
    pub = keyfile.load_public(args.pubkey)
    c = cpid.derive(args.namespace, args.kind, keys.public_raw(pub))
    print(c)
    return 0
