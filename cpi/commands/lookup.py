"""``cpi resolve``, ``cpi discover``, ``cpi watch``: ask a resolver over HTTP.

The resolver is ``--resolver URL``, else ``$CPI_RESOLVER``, else
``https://127.0.0.1:8700``; its certificate is verified against ``--cacert`` or
``$CPI_CACERT`` (plain ``http://`` needs ``--insecure``).  Output is a readable table;
``-o json`` (or ``--json``) prints the decoded data (one object per line for ``watch``),
``-o name`` the CPIDs only.  ``cpi resolve --anchor FILE``
also verifies the returned record and chain offline, trusting only the anchor.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from cpi.commands._util import add_filter_arguments, parse_labels
from cpi.output import FORMATS, Column, emit, fmt, output_arguments, print_fields, print_table, when
from cpi.tls import add_client_arguments, client_ssl
from resolver import ranking
from resolver.client import ResolverClient, WatchMessage, decode_payload, default_url
from resolver.config import load_anchor_files
from resolver.discovery import Query
from resolver.errors import ResolverUnavailableError
from schemas import chain, dsse


def _resolver_argument(parser: argparse.ArgumentParser, *, names: bool = True) -> None:
    parser.add_argument(
        "--resolver",
        metavar="URL",
        default=None,
        help=f"resolver base URL (default: $CPI_RESOLVER or {default_url()})",
    )
    output_arguments(parser, formats=FORMATS if names else ("table", "wide", "json"))
    add_client_arguments(parser)


def _client(args: argparse.Namespace) -> ResolverClient:
    url = args.resolver or default_url()
    return ResolverClient(
        url,
        timeout=float(getattr(args, "timeout", None) or 10.0),
        ssl_context=client_ssl(args, url),
    )


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    res = sub.add_parser(
        "resolve",
        help="look up a CPID at a resolver (verified record, chain, status)",
        description="Print the verified record of CPID. With --anchor, verify it again "
        "locally against the anchor (exit 1 if it does not verify).",
    )
    res.add_argument("cpid")
    res.add_argument("--anchor", action="append", metavar="FILE", help="verify offline too")
    res.add_argument(
        "--envelope",
        action="store_true",
        help="with -o json: add the raw signed envelopes (base64 payloads) under 'envelopes'",
    )
    _resolver_argument(res, names=False)
    res.set_defaults(handler=run_resolve)

    dis = sub.add_parser("discover", help="find resources by kind, namespace, accelerator, ...")
    add_filter_arguments(dis)
    dis.add_argument("--limit", type=int, default=20, help="at most this many results (20)")
    dis.add_argument(
        "--sort",
        choices=ranking.SORTS,
        help="order: default (0.6 latency + 0.4 free), latency (needs --near), free, "
        "score (CATS level 2, cpi-cats-v1), price, carbon",
    )
    dis.add_argument(
        "--weights",
        metavar="NAME:W,...",
        help="level 2 weights for --sort score (implied), e.g. latency:2,price:1; names: "
        "compute|free, communication|latency, cost|price, energy|carbon",
    )
    dis.add_argument(
        "--roots",
        metavar="CN,SG",
        help="a federated resolver: only these roots (comma-separated; default: all)",
    )
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
    wat.add_argument(
        "--roots",
        metavar="CN,SG",
        help="a federated resolver: only these roots (comma-separated; default: all)",
    )
    _resolver_argument(wat)
    wat.set_defaults(handler=run_watch)


def _query(args: argparse.Namespace, *, limit: int = 20) -> Query:
    labels = parse_labels(args.label)
    return Query(
        kind=args.kind.upper() if args.kind else None,
        within=args.within,
        accelerator=args.accelerator,
        min_free=args.min_free,
        near=args.near,
        max_latency_ms=args.max_latency_ms,
        labels=labels,
        live=args.live,
        limit=limit,
        sort=getattr(args, "sort", None),
        weights=ranking.parse_weights(args.weights) if getattr(args, "weights", None) else (),
    )


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


def decoded_bundle(bundle: dict[str, Any], *, envelopes: bool = False) -> dict[str, Any]:
    """The resolver's answer with the signed payloads decoded: ``record``, ``chain``
    (the certs), ``status``; with *envelopes* the raw envelopes under ``envelopes``."""
    out: dict[str, Any] = {
        k: v for k, v in bundle.items() if k not in ("record", "chain", "status")
    }
    record = decode_payload(bundle["record"])
    out = {"cpid": record.get("cpid"), **out, "record": record}
    out["chain"] = [decode_payload(c) for c in bundle.get("chain", [])]
    out["status"] = decode_payload(bundle["status"]) if bundle.get("status") else None
    if envelopes:
        out["envelopes"] = {
            "record": bundle["record"],
            "chain": bundle.get("chain", []),
            "status": bundle.get("status"),
        }
    return out


def _resolve_fields(bundle: dict[str, Any], verdict: chain.ChainResult | None) -> list[Any]:
    rec = decode_payload(bundle["record"])
    status = decode_payload(bundle["status"]) if bundle.get("status") else None
    chain_subjects = " <- ".join(
        decode_payload(c).get("subject", "?") for c in bundle.get("chain", [])
    )
    rows: list[tuple[str, object]] = [
        ("cpid", rec["cpid"]),
        ("kind", f"{rec['kind']}   version {rec['version']}   revision {bundle.get('revision')}"),
        ("issuer", f"{rec['issuer']} (key {bundle['record']['signatures'][0]['keyid']})"),
        ("chain", f"{chain_subjects} <- anchor" if chain_subjects else "-"),
        ("issued", when(rec.get("issued_at"))),
        ("expires", when(rec.get("expires_at"))),
        (
            "location",
            " / ".join(
                str(rec["location"][k]) for k in ("region", "site") if k in rec.get("location", {})
            )
            or "-",
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
        observed = status.get("observed_at")
        rows.append(
            (
                "live",
                f"{'yes' if bundle.get('live') else 'no'}: {status.get('state')}, "
                f"{cap.get('accelerators_free', 0)} accelerators free, observed "
                f"{when(observed / 1000 if observed else None)}{held}",
            )
        )
    if bundle.get("stale"):
        rows.append(("stale", "yes: the resolver cannot reach etcd; this may be out of date"))
    if verdict is not None:
        rows.append(
            ("verified", "offline: OK" if verdict.ok else f"offline: FAILED: {verdict.reason}")
        )
    return rows


def run_resolve(args: argparse.Namespace) -> int:
    bundle = asyncio.run(_resolve(args))
    verdict = _verify_offline(bundle, args.anchor) if args.anchor else None
    out = decoded_bundle(bundle, envelopes=args.envelope)
    if verdict is not None:
        out["offline_verification"] = verdict.to_dict()
    emit(args, out, table=lambda wide: print_fields(_resolve_fields(bundle, verdict)))
    if verdict is not None and not verdict.ok:
        print(f"cpi: offline verification failed: {verdict.reason}", file=sys.stderr)
        return 1
    return 0


# -- discover ---------------------------------------------------------------------------


async def _discover(args: argparse.Namespace) -> dict[str, Any]:
    async with _client(args) as client:
        return await client.discover(_query(args, limit=args.limit), roots=args.roots)


def _l2(r: dict[str, Any]) -> str:
    value = ((r.get("rank") or {}).get("score") or {}).get("l2")
    return "-" if value is None else f"{value:.2f}"


def _figure(r: dict[str, Any], section: str, name: str) -> str:
    value = r["record"].get(section, {}).get(name)
    return "-" if value is None else f"{value:g}"


def _carbon(r: dict[str, Any]) -> str:
    loc = r["record"].get("location", {})
    figure = ranking.carbon_figure(loc.get("grid_gco2_per_kwh"), loc.get("pue"))
    return "-" if figure is None else f"{figure:.0f}"


DISCOVER_COLUMNS = (
    Column("SCORE", lambda r: f"{r['score']:.3f}", justify="right"),
    Column("L2", _l2, justify="right"),
    Column("CPID", lambda r: r["cpid"]),
    Column("FREE", lambda r: r.get("free"), justify="right"),
    Column(
        "LAT_MS",
        lambda r: "-" if r.get("latency_ms") is None else f"{r['latency_ms']:g}",
        justify="right",
    ),
    Column("REGION", lambda r: r["record"].get("location", {}).get("region")),
    Column("ACCELERATORS", lambda r: _accelerators(r["record"])),
    Column("LIVE", lambda r: bool(r.get("live"))),
    Column("CNY/H", lambda r: _figure(r, "attributes", "price_cny_per_unit_hour"), justify="right"),
    Column("GCO2/KWH", _carbon, justify="right", wide=True),
    Column("ISSUER", lambda r: r["record"].get("issuer"), wide=True),
    Column("EXPIRES", lambda r: when(r["record"].get("expires_at")), wide=True),
    Column(
        "LABELS",
        lambda r: (
            ",".join(f"{k}={v}" for k, v in sorted(r["record"].get("labels", {}).items())) or "-"
        ),
        wide=True,
    ),
)


def run_discover(args: argparse.Namespace) -> int:
    found = asyncio.run(_discover(args))
    results = list(found.get("results") or [])
    emit(
        args,
        found,
        table=lambda wide: print_table(DISCOVER_COLUMNS, results, wide=wide),
        names=lambda: (r["cpid"] for r in results),
    )
    if fmt(args) in ("table", "wide"):
        stale = " (stale: etcd unreachable)" if found.get("stale") else ""
        order = found.get("ranking") or {}
        how = f", sort={order.get('sort')} ({order.get('function')})" if order else ""
        print(
            f"{len(results)} result(s) at revision {found.get('revision')}{how}{stale}",
            file=sys.stderr,
        )
    return 0


# -- watch ------------------------------------------------------------------------------


def _describe(data: dict[str, Any]) -> str:
    if data.get("type") == "put":
        live = f"live, {data.get('free', 0)} free" if data.get("live") else "not live"
        return f"{live} ({data.get('reason', '')})"
    return f"({data.get('reason', '')})"


def _print_event(args: argparse.Namespace, msg: WatchMessage) -> None:
    if fmt(args) == "json":
        print(json.dumps({"type": msg.type, "id": msg.id, **msg.data}), flush=True)
    elif fmt(args) == "name":
        if msg.type in ("put", "delete") and msg.data.get("cpid"):
            print(msg.data["cpid"], flush=True)
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


async def _watch(args: argparse.Namespace) -> int:
    """Follow the stream; a resolver that cannot be reached at the start is an error
    (exit 5), a stream dropped later is resumed from the last event id."""
    seen = 0
    last = args.since
    connected = False
    query = _query(args)
    async with _client(args) as client:
        while True:
            try:
                async for msg in client.watch(query, since=last, reconnect=False, roots=args.roots):
                    connected = True
                    if msg.id is not None:
                        last = msg.id
                    if msg.type == "progress":
                        continue
                    _print_event(args, msg)
                    if msg.type in ("put", "delete"):
                        seen += 1
                        if args.count is not None and seen >= args.count:
                            return 0
            except ResolverUnavailableError as exc:
                if not connected:
                    raise
                print(f"cpi: watch: {exc}; reconnecting", file=sys.stderr, flush=True)
            await asyncio.sleep(1.0)


def run_watch(args: argparse.Namespace) -> int:
    return asyncio.run(_watch(args))
