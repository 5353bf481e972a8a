"""``cpi claim`` (claim, gang claim, renew, release, list) and ``cpi claims token create``.

``cpi claim`` talks to a resolver over HTTPS: ``--resolver URL``, else ``$CPI_RESOLVER``,
else ``https://127.0.0.1:8700``, its certificate verified against ``--cacert`` or
``$CPI_CACERT`` (``http://`` needs ``--insecure``); the claims token comes from ``--token``,
``--token-file`` or ``$CPI_CLAIMS_TOKEN``.  ``cpi claims token create`` writes the
token's hash to etcd (``--etcd`` or ``$CPI_ETCD_ENDPOINTS``) and prints the token once.
See ``docs/claims.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from cpi.commands._etcd import etcd_argument, open_index
from cpi.commands._util import add_filter_arguments, parse_labels
from cpi.errors import UsageError
from cpi.output import FORMATS, Column, emit, fmt, output_arguments, print_table, when
from cpi.tls import add_client_arguments, client_ssl
from registry.tokens import parse_duration
from resolver import ranking
from resolver.claims import tokens as claim_tokens
from resolver.claims.client import ClaimsAPIError, ClaimsClient
from resolver.client import default_url
from resolver.discovery import Query

TOKEN_ENV = "CPI_CLAIMS_TOKEN"


def _client_arguments(parser: argparse.ArgumentParser, *, sub: bool = False) -> None:
    """``--resolver``, ``--token``, ``--token-file``, ``--json``; on a sub-command they do
    not clobber what was given before it (``default=SUPPRESS``)."""
    kw: dict[str, Any] = {"default": argparse.SUPPRESS} if sub else {}
    parser.add_argument(
        "--resolver",
        metavar="URL",
        help=f"resolver base URL (default: $CPI_RESOLVER or {default_url()})",
        **kw,
    )
    parser.add_argument(
        "--token",
        help=f"claims token (prefer --token-file or ${TOKEN_ENV}: argv is visible in ps)",
        **kw,
    )
    parser.add_argument("--token-file", help="file holding the claims token", **kw)
    output_arguments(parser, formats=FORMATS, sub=sub)
    add_client_arguments(parser, sub=sub)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "claim",
        help="claim units of a resource (by CPID or the best match of a query); release, list",
        description=(
            "Claim --units of one resource for --ttl: --cpid names it, or the filters (as "
            "for cpi discover, or --query 'kind=GPU&near=31') pick the best-ranked live "
            "resource that can hold all units. Prints the claim id. 'cpi claim release ID' "
            "gives it back, 'cpi claim list' shows the token holder's claims."
        ),
    )
    p.add_argument("--cpid", help="the resource to claim")
    p.add_argument(
        "--query", metavar="QS", help="discovery filters as a URL query, e.g. 'kind=GPU&near=31'"
    )
    add_filter_arguments(p, live=False)
    p.add_argument("--limit", type=int, metavar="N", help="candidates to try (server default 20)")
    p.add_argument(
        "--sort",
        choices=ranking.SORTS,
        help="the order candidates are tried in, as for cpi discover (a gang takes its parts "
        "best first): default, latency (needs --near), free, score, price, carbon",
    )
    p.add_argument(
        "--weights",
        metavar="NAME:W,...",
        help="level 2 weights for --sort score (implied), e.g. latency:2,price:1",
    )
    p.add_argument(
        "--roots",
        metavar="ROOT,...",
        help="a federated resolver: only these roots' index clusters may take the claim "
        "(comma-separated; default: those the filters concern)",
    )
    p.add_argument("--units", type=int, help="units to claim (accelerators, or CPU cores)")
    p.add_argument("--ttl", help="how long to hold them: 90s, 10m, 2h (server default 10m)")
    gang = p.add_argument_group(
        "gang claims",
        "--gang claims --units in total over several resources matching the filters, "
        "all or nothing",
    )
    gang.add_argument("--gang", action="store_true", help="claim a gang (needs filters)")
    gang.add_argument(
        "--per-resource", type=int, metavar="N", help="exactly N units per resource (e.g. 8)"
    )
    gang.add_argument("--per-resource-min", type=int, metavar="N", help="at least N per resource")
    gang.add_argument("--per-resource-max", type=int, metavar="N", help="at most N per resource")
    gang.add_argument("--same-region", action="store_true", help="all parts in one region")
    gang.add_argument(
        "--max-pairwise-latency",
        type=float,
        metavar="MS",
        help="every two parts' regions at most MS apart (the resolver's latency table)",
    )
    _client_arguments(p)
    p.set_defaults(handler=run_claim)
    actions = p.add_subparsers(dest="claim_command", metavar="ACTION")
    ren = actions.add_parser(
        "renew", help="renew a claim or gang (by its id): it then expires --ttl from now"
    )
    ren.add_argument("claim_id")
    ren.add_argument("--ttl", dest="renew_ttl", required=True, help="from now: 90s, 10m, 2h")
    _client_arguments(ren, sub=True)
    ren.set_defaults(handler=run_renew)
    rel = actions.add_parser("release", help="release a claim or a whole gang (by its id)")
    rel.add_argument("claim_id")
    _client_arguments(rel, sub=True)
    rel.set_defaults(handler=run_release)
    lst = actions.add_parser("list", help="list the token holder's active claims")
    _client_arguments(lst, sub=True)
    lst.set_defaults(handler=run_list)

    t = sub.add_parser("claims", help="claims API tokens")
    groups = t.add_subparsers(dest="claims_command", metavar="ACTION", required=True)
    tok = groups.add_parser("token", help="claims tokens")
    tok_actions = tok.add_subparsers(dest="token_command", metavar="ACTION", required=True)
    create = tok_actions.add_parser(
        "create",
        help="create a claims token (printed once; only its SHA-256 is stored)",
        description="Writes /cpi/v1/claimtokens/<sha256> and prints the token on stdout.",
    )
    create.add_argument("--holder", required=True, help="who holds the claims made with it")
    create.add_argument(
        "--max-units", type=int, help="quota: most units the holder may hold at once"
    )
    create.add_argument("--within", metavar="NS", help="only resources at or below NS")
    create.add_argument("--ttl", required=True, help="token lifetime: 1h, 30d, ...")
    output_arguments(create)
    etcd_argument(create)
    create.set_defaults(handler=run_token_create)


# -- helpers --------------------------------------------------------------------------------


def _token(args: argparse.Namespace) -> str:
    token, token_file = getattr(args, "token", None), getattr(args, "token_file", None)
    if token and token_file:
        raise UsageError("give --token or --token-file, not both")
    if token_file:
        try:
            token = Path(token_file).read_text().strip()
        except OSError as exc:
            raise UsageError(f"{token_file}: {exc.strerror}") from exc
    token = token or os.environ.get(TOKEN_ENV, "")
    if not token:
        raise UsageError(f"no claims token: give --token, --token-file or ${TOKEN_ENV}")
    return str(token)


def _client(args: argparse.Namespace) -> ClaimsClient:
    url = getattr(args, "resolver", None) or default_url()
    return ClaimsClient(
        url,
        token=_token(args),
        timeout=float(getattr(args, "timeout", None) or 15.0),
        ssl_context=client_ssl(args, url),
    )


def _query(args: argparse.Namespace) -> Query | None:
    flags = {
        "kind": args.kind.upper() if args.kind else None,
        "within": args.within,
        "accelerator": args.accelerator,
        "min_free": args.min_free,
        "near": args.near,
        "max_latency_ms": args.max_latency_ms,
        "sort": args.sort,
        "weights": ranking.parse_weights(args.weights) if args.weights else None,
    }
    given = {k: v for k, v in flags.items() if v is not None}
    if args.query is not None:
        if given or args.label:
            raise UsageError("give --query or the filter flags, not both")
        try:
            params = parse_qsl(args.query, keep_blank_values=True, strict_parsing=True)
        except ValueError as exc:
            raise UsageError(f"--query {args.query!r}: {exc}") from exc
        q = Query.from_params(params)
        return q if args.limit is None else Query(**{**_fields(q), "limit": args.limit})
    if not given and not args.label:
        return None
    return Query(**given, labels=parse_labels(args.label), limit=args.limit or 20)


def _fields(q: Query) -> dict[str, object]:
    return {name: getattr(q, name) for name in q.__dataclass_fields__}


# -- handlers -------------------------------------------------------------------------------


_GANG_FLAGS = (
    "per_resource",
    "per_resource_min",
    "per_resource_max",
    "max_pairwise_latency",
)


def run_claim(args: argparse.Namespace) -> int:
    if args.units is None:
        raise UsageError("--units is required (or an action: renew, release, list)")
    query = _query(args)
    if (args.cpid is None) == (query is None):
        raise UsageError("give --cpid, or a query (--query or filter flags), not both")
    ttl = parse_duration(args.ttl) if args.ttl else None
    gang_given = [f for f in _GANG_FLAGS if getattr(args, f) is not None] + (
        ["same_region"] if args.same_region else []
    )
    if gang_given and not args.gang:
        flags = ", ".join("--" + f.replace("_", "-") for f in gang_given)
        raise UsageError(f"{flags}: only with --gang")
    if args.gang and query is None:
        raise UsageError("--gang needs filters (--within, --kind, --query, ...), not --cpid")
    roots = [r for r in args.roots.split(",") if r] if args.roots else None
    if roots is not None and query is None:
        raise UsageError("--roots goes with filters (a claim by query), not --cpid")

    async def go() -> dict[str, object]:
        async with _client(args) as client:
            if not args.gang:
                return await client.claim(
                    cpid=args.cpid, query=query, units=args.units, ttl_s=ttl, roots=roots
                )
            assert query is not None
            try:
                return await client.claim_gang(
                    query=query,
                    units=args.units,
                    per_resource=args.per_resource,
                    per_resource_min=args.per_resource_min,
                    per_resource_max=args.per_resource_max,
                    same_region=args.same_region,
                    max_pairwise_latency_ms=args.max_pairwise_latency,
                    ttl_s=ttl,
                    roots=roots,
                )
            except ClaimsAPIError as exc:
                _print_available(exc)
                raise

    made = asyncio.run(go())

    def table(wide: bool) -> None:
        print(made["claim_id"])
        parts = made.get("parts")
        where = (
            f"over {len(parts)} resources ({_parts_text(parts)})"
            if isinstance(parts, list)
            else f"of {made['cpid']}"
        )
        print(
            f"claimed {made['units']} units {where} until {when(int(str(made['expires_at'])))}",
            file=sys.stderr,
        )

    emit(args, made, table=table, names=lambda: [str(made["claim_id"])])
    return 0


def _parts_text(parts: list[Any]) -> str:
    return ", ".join(f"{p.get('units')} of {p.get('cpid')}" for p in parts if isinstance(p, dict))


def _print_available(exc: ClaimsAPIError) -> None:
    """A gang refusal: what could be had now, so the user can decide."""
    available = exc.error.get("available")
    if not isinstance(available, dict):
        return
    parts = available.get("parts")
    if isinstance(parts, list) and parts:
        print(
            f"available now: {available.get('total')} units over {len(parts)} resources "
            f"({_parts_text(parts)})",
            file=sys.stderr,
        )
    else:
        print("available now: no gang fits at all", file=sys.stderr)


def run_renew(args: argparse.Namespace) -> int:
    ttl = parse_duration(args.renew_ttl)

    async def go() -> dict[str, object]:
        async with _client(args) as client:
            c = await client.renew(args.claim_id, ttl_s=ttl)
        out: dict[str, object] = {
            "claim_id": c.claim_id,
            "cpid": c.cpid,
            "units": c.units,
            "expires_at": c.expires_at,
        }
        if c.parts:
            out["parts"] = [{"cpid": p, "units": u} for p, u in c.parts]
        return out

    renewed = asyncio.run(go())

    def table(wide: bool) -> None:
        print(renewed["claim_id"])
        print(
            f"renewed {renewed['units']} units until {when(int(str(renewed['expires_at'])))}",
            file=sys.stderr,
        )

    emit(args, renewed, table=table, names=lambda: [str(renewed["claim_id"])])
    return 0


def run_release(args: argparse.Namespace) -> int:
    async def go() -> None:
        async with _client(args) as client:
            await client.release(args.claim_id)

    asyncio.run(go())
    print(f"released {args.claim_id}", file=sys.stderr)
    return 0


def run_list(args: argparse.Namespace) -> int:
    async def go() -> dict[str, object]:
        async with _client(args) as client:
            return await client.list()

    found = asyncio.run(go())
    claims = found.get("claims") or []
    assert isinstance(claims, list)
    emit(
        args,
        found,
        table=lambda wide: print_table(CLAIM_COLUMNS, claims, wide=wide),
        names=lambda: (str(c["claim_id"]) for c in claims),
    )
    if fmt(args) in ("table", "wide"):
        print(
            f"{found.get('holder')} holds {found.get('units')} units in {len(claims)} claim(s)",
            file=sys.stderr,
        )
    return 0


CLAIM_COLUMNS = (
    Column("CLAIM_ID", lambda c: c["claim_id"]),
    Column("CPID", lambda c: c["cpid"]),
    Column("UNITS", lambda c: c["units"], justify="right"),
    Column("PARTS", lambda c: len(c.get("parts") or ()) or 1, justify="right", wide=True),
    Column("EXPIRES", lambda c: when(c["expires_at"])),
    Column("CREATED", lambda c: when(c.get("created_at")), wide=True),
)


def run_token_create(args: argparse.Namespace) -> int:
    ttl = parse_duration(args.ttl)

    async def go() -> str:
        async with open_index(args.etcd, args=args) as index:
            return await claim_tokens.create_token(
                index, holder=args.holder, ttl_s=ttl, max_units=args.max_units, within=args.within
            )

    token = asyncio.run(go())
    info = {
        "token": token,
        "holder": args.holder,
        "max_units": args.max_units,
        "within": args.within,
        "expires_at": int(time.time()) + ttl,
    }
    emit(args, info, table=lambda wide: print(token))
    return 0
