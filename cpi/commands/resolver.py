"""``cpi resolver serve``: run the resolver's HTTP service until SIGTERM or SIGINT.

The command only loads the config (file, then environment, then flags) and runs the
app of :mod:`resolver.http`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
import signal

from aiohttp import web

from resolver.config import (
    ENV_ANCHOR,
    ENV_ETCD_ENDPOINTS,
    ENV_LISTEN,
    ResolverConfig,
    load_config,
    parse_listen,
)
from resolver.http import create_app

_log = logging.getLogger("cpi.resolver")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("resolver", help="run a resolver (verified lookups, discovery, watches)")
    res = p.add_subparsers(dest="resolver_command", metavar="ACTION", required=True)
    serve = res.add_parser(
        "serve",
        help="serve lookups, discovery and watches over HTTP (until SIGTERM/SIGINT)",
        description=(
            f"Config comes from --config, then the environment ({ENV_ETCD_ENDPOINTS}, "
            f"{ENV_LISTEN}, {ENV_ANCHOR}, CPI_ETCD_PASSWORD, CPI_RESOLVER_ZONE), then these "
            "flags. Without --config, --anchor (or $CPI_RESOLVER_ANCHOR) is required."
        ),
    )
    serve.add_argument("--config", help="resolver config file (JSON)")
    serve.add_argument("--listen", help="HOST:PORT for HTTP (default 127.0.0.1:8700)")
    serve.add_argument("--host", help="HTTP listen address (overrides the config)")
    serve.add_argument("--port", type=int, help="HTTP listen port; 0 picks a free one")
    serve.add_argument("--dns-host", help="DNS listen address (for the DNS front end)")
    serve.add_argument("--dns-port", type=int, help="DNS listen port (UDP and TCP)")
    serve.add_argument("--etcd", help="etcd endpoints, comma-separated")
    serve.add_argument(
        "--anchor", action="append", metavar="FILE", help="trust anchor file (repeatable)"
    )
    serve.add_argument("--zone", help="DNS zone the resolver answers for (e.g. cpi.)")
    serve.add_argument("--latency-table", metavar="FILE", help="region RTT table (JSON)")
    serve.set_defaults(handler=run_serve)


def _endpoints(text: str | None) -> list[str] | None:
    return [e for e in re.split(r"[,\s]+", text) if e] if text else None


def run_serve(args: argparse.Namespace) -> int:
    overrides: dict[str, object] = {
        "etcd.endpoints": _endpoints(args.etcd),
        "anchor_files": args.anchor,
        "zone": args.zone,
        "latency_table": args.latency_table,
        "dns_host": args.dns_host,
        "dns_port": args.dns_port,
    }
    if args.listen:
        overrides["host"], overrides["port"] = parse_listen(args.listen)
    if args.host:
        overrides["host"] = args.host
    if args.port is not None:
        overrides["port"] = args.port
    config = load_config(args.config, overrides=overrides)
    asyncio.run(serve(config))
    return 0


async def serve(config: ResolverConfig) -> None:
    """Run the resolver until SIGTERM or SIGINT; stop cleanly."""
    app = create_app(config)
    runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=5.0)
    await runner.setup()  # starts the replica (the first listing runs in the background)
    try:
        site = web.TCPSite(runner, config.host, config.port)
        await site.start()
        url = config.url
        if config.port == 0:
            host, port = runner.addresses[0][:2]
            url = f"http://{host}:{port}"
        _log.info("%s; serving at %s", config.summary(), url)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            await stop.wait()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
        _log.info("resolver stopping")
    finally:
        await runner.cleanup()
