"""``cpi resolve``, ``cpi discover``, ``cpi watch``: ask a resolver over HTTP.

The resolver is ``--resolver URL``, else ``$CPI_RESOLVER``, else
``https://127.0.0.1:8700``; its certificate is verified against ``--cacert`` or
``$CPI_CACERT`` (plain ``http://`` needs ``--insecure``).  Output is a readable table;
``--json`` prints the resolver's JSON (one object per line for ``watch``).  ``cpi resolve --anchor FILE``
also verifies the returned record and chain offline, trusting only the anchor.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

from cpi.commands._util import add_filter_arguments, print_json
from cpi.tls import add_client_arguments, client_ssl
from resolver.client import ResolverClient, decode_payload, default_url
from resolver.config import load_anchor_files
from resolver.discovery import Query
from schemas import chain, dsse
from schemas.errors import InvalidDataError


def _resolver_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--resolver",
        metavar="URL",
        default=None,
        help=f"resolver base URL (default: $CPI_RESOLVER or {default_url()})",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_client_arguments(parser)


def _client(args: argparse.Namespace) -> ResolverClient:
    url = args.resolver or default_url()
    return ResolverClient(url, ssl_context=client_ssl(args, url))


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    res = sub.add_parser(
        "resolve",
        help="look up a CPID at a resolver (verified record, chain, status)",
        description="Print the verified record of CPID. With --anchor, verify it again "
        "locally against the anchor (exit 1 if it does not verify).",
    )
    res.add_argument("cpid")
    res.add_argument("--anchor", action="append", metavar="FILE", help="verify offline too")
    _resolver_argument(res)
    res.set_defaults(handler=run_resolve)

    dis = sub.add_parser("discover", help="find resources by kind, namespace, accelerator, ...")
    add_filter_arguments(dis)
    dis.add_argument("--limit", type=int, default=20, help="at most this many results (20)")
    _resolver_argument(dis)
    dis.set_defaults(handler=run_discover)

    wat = sub.add_parser(
        "watch",
        help="follow put/delete events of matching resources",
        description="Print events as they arrive (reconnecting with Last-Event-ID after a "
        "dropped connection). --since ID replays from an event id.",
    )
    add_filter_arguments(wat)
    wat.add_argument("--since", metavar="ID", help="resume after this event id")
    wat.add_argument("--count", type=int, metavar="N", help="exit after N put/delete events")
    _resolver_argument(wat)
    wat.set_defaults(handler=run_watch)


def _query(args: argparse.Namespace, *, limit: int = 20) -> Query:
    labels = []
    for item in args.label:
        k, sep, v = item.partition(":")
        if not sep:
            raise InvalidDataError(f"--label {item!r}: expected key:value")
        labels.append((k, v))
    return Query(
        kind=args.kind.upper() if args.kind else None,
        within=args.within,
        accelerator=args.accelerator,
        min_free=args.min_free,
        near=args.near,
        max_latency_ms=args.max_latency_ms,
        labels=tuple(labels),
        live=args.live,
        limit=limit,
    )


def _when(ts: int | float | None) -> str:
    if ts is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def _accelerators(record: dict[str, Any]) -> str:
    accs = record.get("attributes", {}).get("accelerators", [])
    return ", ".join(f"{a['count']}x {a['model']}" for a in accs) or "-"


# -- resolve ----------------------------------------------------------------------------


async def _resolve(args: argparse.Namespace) -> dict[str, Any]:
    async with _client(args) as client:
        return await client.resolve(args.cpid)


def _verify_offline(bundle: dict[str, Any], anchor_files: list[str]) -> chain.ChainResult:
    from pathlib import Path

    anchors = load_anchor_files([Path(p) for p in anchor_files])
    record = dsse.Envelope.from_dict(bundle["record"])
    certs = [dsse.Envelope.from_dict(c) for c in bundle["chain"]]
    return chain.verify_record(record, certs, anchors=anchors)


def run_resolve(args: argparse.Namespace) -> int:
    bundle = asyncio.run(_resolve(args))
    verdict = _verify_offline(bundle, args.anchor) if args.anchor else None
    if args.json:
        out = dict(bundle)
        if verdict is not None:
            out["offline_verification"] = verdict.to_dict()
        print_json(out)
    else:
        rec = decode_payload(bundle["record"])
        status = decode_payload(bundle["status"]) if bundle.get("status") else None
        chain_subjects = " <- ".join(
            decode_payload(c).get("subject", "?") for c in bundle.get("chain", [])
        )
        rows = [
            ("cpid", rec["cpid"]),
            ("kind", f"{rec['kind']}   version {rec['version']}   revision {bundle['revision']}"),
            ("issuer", f"{rec['issuer']} (key {bundle['record']['signatures'][0]['keyid']})"),
            ("chain", f"{chain_subjects} <- anchor" if chain_subjects else "-"),
            ("valid", f"{_when(rec['issued_at'])} .. {_when(rec['expires_at'])}"),
            (
                "location",
                " / ".join(
                    str(rec["location"][k]) for k in ("region", "site") if k in rec["location"]
                ),
            ),
            ("accelerators", _accelerators(rec)),
        ]
        for ep in rec.get("endpoints", []):
            rows.append(
                ("endpoint", f"{ep['proto']}://{ep['host']}:{ep['port']}  {ep.get('purpose', '')}")
            )
        if rec.get("labels"):
            rows.append(("labels", " ".join(f"{k}={v}" for k, v in sorted(rec["labels"].items()))))
        if status is None:
            rows.append(("live", "no (no status)"))
        else:
            cap = status.get("capacity", {})
            held = " (held: mass-expiry protection)" if bundle.get("live_held") else ""
            rows.append(
                (
                    "live",
                    f"{'yes' if bundle['live'] else 'no'}: {status['state']}, "
                    f"{cap.get('accelerators_free', 0)} accelerators free, observed "
                    f"{_when(status['observed_at'] / 1000)}{held}",
                )
            )
        if bundle.get("stale"):
            rows.append(("stale", "yes: the resolver cannot reach etcd; this may be out of date"))
        if verdict is not None:
            rows.append(
                ("verified", "offline: OK" if verdict.ok else f"offline: FAILED: {verdict.reason}")
            )
        width = max(len(k) for k, _ in rows)
        for k, v in rows:
            print(f"{k:<{width}}  {v}")
    if verdict is not None and not verdict.ok:
        print(f"cpi: offline verification failed: {verdict.reason}", file=sys.stderr)
        return 1
    return 0


# -- discover ---------------------------------------------------------------------------


async def _discover(args: argparse.Namespace) -> dict[str, Any]:
    async with _client(args) as client:
        return await client.discover(_query(args, limit=args.limit))


def run_discover(args: argparse.Namespace) -> int:
    found = asyncio.run(_discover(args))
    if args.json:
        print_json(found)
        return 0
    results = found["results"]
    header = ("SCORE", "CPID", "FREE", "LAT_MS", "REGION", "ACCELERATORS", "LIVE")
    rows = [
        (
            f"{r['score']:.3f}",
            r["cpid"],
            str(r["free"]),
            "-" if r["latency_ms"] is None else f"{r['latency_ms']:g}",
            r["record"]["location"]["region"],
            _accelerators(r["record"]),
            "yes" if r.get("live") else "no",
        )
        for r in results
    ]
    widths = [max([len(h), *(len(row[i]) for row in rows)]) for i, h in enumerate(header)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip())
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    stale = " (stale: etcd unreachable)" if found.get("stale") else ""
    print(f"{len(results)} result(s) at revision {found['revision']}{stale}", file=sys.stderr)
    return 0


# -- watch ------------------------------------------------------------------------------


def _describe(data: dict[str, Any]) -> str:
    if data.get("type") == "put":
        live = f"live, {data.get('free', 0)} free" if data.get("live") else "not live"
        return f"{live} ({data.get('reason', '')})"
    return f"({data.get('reason', '')})"


async def _watch(args: argparse.Namespace) -> int:
    seen = 0
    async with _client(args) as client:
        async for msg in client.watch(_query(args), since=args.since):
            if msg.type == "progress":
                continue
            if args.json:
                print(json.dumps({"type": msg.type, "id": msg.id, **msg.data}), flush=True)
            elif msg.type == "relist":
                print(
                    f"{msg.data.get('id', '')}  relist  (history gone: re-list with cpi discover)",
                    flush=True,
                )
            else:
                print(
                    f"{msg.data.get('id', msg.id or '')}  {msg.type:<6}  {msg.data.get('cpid', '')}  "
                    f"{_describe(msg.data)}",
                    flush=True,
                )
            if msg.type in ("put", "delete"):
                seen += 1
                if args.count is not None and seen >= args.count:
                    return 0
    return 0


def run_watch(args: argparse.Namespace) -> int:
    return asyncio.run(_watch(args))
