"""``cpi ns publish|list``: namespaces in the index (``/cpi/v1/ns/`` and their certs)."""

from __future__ import annotations

import argparse
import asyncio

from cpi.commands._etcd import etcd_argument, open_index
from cpi.output import FORMATS, Column, emit, output_arguments, print_table
from registry import national
from registry.index import Prefix, parse_key


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("ns", help="publish namespaces (cert and registry endpoints) to the index")
    nss = p.add_subparsers(dest="ns_command", metavar="ACTION", required=True)

    pub = nss.add_parser(
        "publish",
        help="verify a namespace's cert and publish it with its registry endpoints",
        description=(
            "Verify CERT's chain against the anchor using the certs already in the index, then "
            "write /cpi/v1/certs/<kid> (the cert, permanent) and /cpi/v1/ns/<NS> = "
            '{"kid", "endpoints"} in one transaction. Parents must be published first. '
            "Without --cert, NAMESPACE must be the anchor's subject (the root)."
        ),
    )
    pub.add_argument("--namespace", required=True, help="e.g. CN.31.CMCC")
    pub.add_argument("--cert", help="the namespace's cert.v1 file")
    pub.add_argument(
        "--endpoint",
        action="append",
        default=[],
        metavar="URL",
        help="registry URL serving this namespace (repeatable)",
    )
    pub.add_argument("--anchor", required=True, help="trust anchor file (anchor.json)")
    etcd_argument(pub)
    output_arguments(pub)
    pub.set_defaults(handler=run_publish)

    ls = nss.add_parser("list", help="list published namespaces")
    etcd_argument(ls)
    output_arguments(ls, formats=FORMATS)
    ls.set_defaults(handler=run_list)


async def _publish(args: argparse.Namespace) -> int:
    anchors = national.load_anchors(args.anchor)
    cert = national.read_cert(args.cert) if args.cert else None
    async with open_index(args.etcd, args=args) as index:
        result = await national.publish_ns(
            index, namespace=args.namespace, cert=cert, endpoints=args.endpoint, anchors=anchors
        )
    info = {
        "namespace": result.namespace,
        "kid": result.kid,
        "changed": result.changed,
        "cert_written": result.cert_written,
        "revision": result.revision,
    }

    def table(wide: bool) -> None:
        if not result.changed:
            print(f"{result.namespace} already published (kid {result.kid}); nothing changed")
        else:
            what = " and its cert" if result.cert_written else ""
            print(
                f"published {result.namespace}{what} (kid {result.kid}) "
                f"at revision {result.revision}"
            )

    emit(args, info, table=table)
    return 0


def run_publish(args: argparse.Namespace) -> int:
    return asyncio.run(_publish(args))


NS_COLUMNS = (
    Column("NAMESPACE", lambda n: n["namespace"]),
    Column("KID", lambda n: n["kid"]),
    Column("ENDPOINTS", lambda n: " ".join(n["endpoints"]) or "-"),
    Column("MOD_REVISION", lambda n: n["mod_revision"], wide=True, justify="right"),
)


async def _list(args: argparse.Namespace) -> int:
    async with open_index(args.etcd, args=args) as index:
        kvs, revision = await index.get_prefix(Prefix.NS)
    rows = []
    for kv in kvs:
        entry = national.NsEntry.from_json(kv.value)
        rows.append(
            {
                "namespace": parse_key(kv.key).name,
                "kid": entry.kid,
                "endpoints": list(entry.endpoints),
                "mod_revision": getattr(kv, "mod_revision", None),
            }
        )
    emit(
        args,
        {"revision": revision, "namespaces": rows},
        table=lambda wide: print_table(NS_COLUMNS, rows, wide=wide),
        names=lambda: (str(r["namespace"]) for r in rows),
    )
    return 0


def run_list(args: argparse.Namespace) -> int:
    return asyncio.run(_list(args))
