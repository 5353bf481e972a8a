"""``cpi usage``: accelerator-hours per holder and per namespace, from the transparency log alone.

Reads the index (etcd) at one revision, verifies the latest checkpoint with the log's
verifier key, rebuilds the tree of the audit stream and checks its root, verifies every
usage receipt the log names against the usage signers the anchor names, and totals the
verified receipts over ``[--since, --until)`` (:mod:`resolver.audit.usage`).  Exit 0
when everything verified, 1 when the log or a receipt did not (what was refused is
listed; it is never counted), 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import time
from datetime import UTC, datetime
from typing import Any

from cpi.commands._etcd import etcd_argument, open_index
from cpi.commands.audit import _anchors, _verifier
from cpi.errors import UsageError
from cpi.output import Column, emit, output_arguments, print_table
from registry.logsigner import LOG_VKEY_FILE
from resolver.audit.usage import Receipt, UsageReport, audit_usage
from schemas.cpid import parse_namespace
from schemas.errors import InvalidDataError

_RELATIVE = re.compile(r"^(\d{1,9})([smhd])$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_time(text: str, *, flag: str, now: float | None = None) -> int:
    """Unix seconds from ``1767225600``, ``2026-01-01``, ``2026-01-01T08:00:00+08:00``
    (no zone: UTC) or a duration ago (``90m``, ``24h``, ``7d``).  UsageError otherwise."""
    t = text.strip()
    if t.isdigit():
        return int(t)
    m = _RELATIVE.fullmatch(t)
    if m:
        base = time.time() if now is None else now
        return int(base) - int(m.group(1)) * _UNIT[m.group(2)]
    try:
        dt = datetime.fromisoformat(t)
    except ValueError:
        raise UsageError(
            f"{flag} {text!r} is not a time: give Unix seconds (1767225600), an ISO 8601 date "
            "or time (2026-01-01, 2026-01-01T08:00:00+08:00; no zone means UTC) or a duration "
            "ago (90m, 24h, 7d)"
        ) from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return int(dt.timestamp())


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "usage",
        help="accelerator-hours per holder and namespace, verified from the transparency log",
        description=(
            "Total the usage receipts in the transparency log over [--since, --until): per "
            "holder and per namespace, in accelerator-hours (units x seconds / 3600; units "
            "are CPU cores for resources without accelerators). Reads etcd directly and "
            "trusts only the anchor and the log's verifier key: the checkpoint's signature, "
            "the audit stream's root and every receipt's digest and signature are checked, "
            "and a receipt that fails is listed and not counted (exit 1)."
        ),
    )
    p.add_argument("--holder", help="only this holder's receipts (default: every holder)")
    p.add_argument("--namespace", help="only resources in this namespace or below it")
    p.add_argument(
        "--since",
        required=True,
        help="start: Unix seconds, ISO 8601 (2026-01-01, 2026-01-01T08:00+08:00) or ago (7d)",
    )
    p.add_argument("--until", help="end, exclusive (same forms; default: now)")
    p.add_argument(
        "--anchor",
        required=True,
        help="anchor file (names the usage signers' issuer); its directory holds log.vkey",
    )
    p.add_argument(
        "--log-key",
        help=f"log verifier key: a file or the text itself (default: <anchor dir>/{LOG_VKEY_FILE})",
    )
    p.add_argument(
        "--receipts", action="store_true", help="also list every counted receipt (table output)"
    )
    etcd_argument(p)
    output_arguments(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    now = time.time()
    since = parse_time(args.since, flag="--since", now=now)
    until = parse_time(args.until, flag="--until", now=now) if args.until else int(now)
    if until <= since:
        raise UsageError(f"--until ({until}) must be after --since ({since})")
    namespace = None
    if args.namespace:
        try:
            namespace = parse_namespace(args.namespace)
        except InvalidDataError as exc:
            raise UsageError(f"--namespace: {exc}") from exc
    anchors = _anchors([args.anchor])
    verifier = _verifier(args)

    async def go() -> UsageReport:
        async with open_index(args.etcd, args=args) as index:
            return await audit_usage(
                index,
                verifier=verifier,
                anchors=anchors,
                since=since,
                until=until,
                holder=args.holder,
                namespace=namespace,
            )

    rep = asyncio.run(go())
    emit(args, rep.to_dict(), table=lambda wide: _table(rep, wide or args.receipts))
    return 0 if rep.ok else 1


def _when(t: int) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _totals_table(title: str, totals: dict[str, dict[str, Any]]) -> None:
    print(title)
    print_table(
        [
            Column(title.split()[1].upper(), lambda r: r[0]),
            Column("RECEIPTS", lambda r: r[1]["receipts"], justify="right"),
            Column("UNIT-SECONDS", lambda r: r[1]["unit_seconds"], justify="right"),
            Column("ACCEL-HOURS", lambda r: f"{r[1]['hours']:.6f}", justify="right"),
        ],
        list(totals.items()),
    )


def _table(rep: UsageReport, wide: bool) -> None:
    for what, ok, detail in rep.checks:
        print(f"{'ok  ' if ok else 'FAIL'} {what}" + (f": {detail}" if detail else ""))
    print(f"window {_when(rep.since)} .. {_when(rep.until)}")
    print()
    _totals_table("per holder", rep.totals("holder"))
    print()
    _totals_table("per namespace", rep.totals("namespace"))
    print(f"\ntotal {rep.unit_seconds} unit-seconds = {rep.unit_seconds / 3600:.6f} hours")
    if wide and rep.receipts:
        print()
        cols = [
            Column("LEAF", lambda r: r.leaf, justify="right"),
            Column("HOLDER", lambda r: r.receipt.holder),
            Column("CPID", lambda r: r.cpid),
            Column("UNITS", lambda r: r.units, justify="right"),
            Column("START", lambda r: _when(r.receipt.start)),
            Column("END", lambda r: _when(r.receipt.end)),
            Column("SECONDS", lambda r: r.seconds, justify="right"),
            Column("REASON", lambda r: r.receipt.reason),
            Column("CLAIM", lambda r: f"{r.receipt.claim_id}/{r.receipt.n}"),
        ]
        rows: list[Receipt] = rep.receipts
        print_table(cols, rows, wide=True)
    for p in rep.problems:
        print(f"REFUSED {p}")
    for u in rep.unlogged:
        print(f"not counted: {u}")
