"""``cpi id parse|check|derive``: work with CPIDs."""

from __future__ import annotations

import argparse
import sys

from cpi.output import FORMATS, emit, is_json, output_arguments, print_fields, print_json
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
    output_arguments(parse)
    parse.add_argument("--zone", default="cpi.", help="DNS zone for the DNS form (default: cpi.)")
    parse.set_defaults(handler=run_parse)

    check = ids.add_parser("check", help="exit 0 when valid, 1 with the reason on stderr when not")
    check.add_argument("cpid")
    output_arguments(check, formats=FORMATS)
    check.set_defaults(handler=run_check)

    derive = ids.add_parser("derive", help="derive a node's CPID from namespace, kind and key")
    derive.add_argument("--namespace", required=True, help="e.g. CN.31.CMCC")
    derive.add_argument("--kind", required=True, help=", ".join(cpid.KINDS))
    derive.add_argument(
        "--pubkey", required=True, help="public key file (PEM, base64url, or a private key)"
    )
    output_arguments(derive, formats=FORMATS)
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

    def table(wide: bool) -> None:
        fields: list[tuple[str, object]] = [
            ("cpid", c),
            ("prefix", f"{c.prefix}  (naming authority, delegated segment by segment)"),
        ]
        for i, seg in enumerate(c.segments, start=1):
            role = (
                "root (ISO 3166-1)"
                if i == 1
                else ("region (GB/T 2260)" if seg.isdigit() else "node / site")
            )
            fields.append((f"segment {i}", f"{seg:<16} {role}"))
        fields += [
            ("kind", f"{c.kind}  ({_KIND_NAMES[c.kind]})"),
            ("serial", f"{c.serial}  (first 12 Crockford base32 chars of sha256(node public key))"),
            ("check", f"{c.check}  (ISO/IEC 7064 MOD 37,36)"),
            ("dns", info["dns"]),
        ]
        print_fields(fields)

    emit(args, info, table=table)
    return 0


def run_check(args: argparse.Namespace) -> int:
    try:
        c = cpid.parse(args.cpid)
    except InvalidCPIDError as exc:
        if is_json(args):
            print_json({"cpid": args.cpid, "valid": False, "reason": exc.reason})
        print(str(exc), file=sys.stderr)
        return 1
    emit(args, {"cpid": str(c), "valid": True}, table=lambda wide: print(c), names=lambda: [str(c)])
    return 0


def run_derive(args: argparse.Namespace) -> int:
    pub = keyfile.load_public(args.pubkey)
    c = cpid.derive(args.namespace, args.kind, keys.public_raw(pub))
    info = {"cpid": str(c), "kid": keys.kid_of(pub), "dns": c.to_dns("cpi.")}
    emit(args, info, table=lambda wide: print(c), names=lambda: [str(c)])
    return 0
