"""``cpi resolver serve``: run the resolver's HTTP service until SIGTERM or SIGINT.

The command only loads the config (file, then environment, then flags) and runs the
app of :mod:`resolver.http`.  With ``--workers N`` (N > 1) it runs N such processes on
one port (``SO_REUSEPORT``: the kernel spreads connections over them), each with its
own replica of the index; the first also runs the DNS front end and the claims
reconciler.  The default is one process.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import re
import signal

from cpi import workers
from cpi.serving import ServerLimits, Serving
from cpi.tls import add_server_arguments
from cpi.workers import watch_parent
from registry.tls import serving_context
from resolver.config import (
    ENV_ANCHOR,
    ENV_ETCD_ENDPOINTS,
    ENV_LISTEN,
    ResolverConfig,
    load_config,
    parse_listen,
)
from resolver.errors import ConfigError
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
            f"{ENV_LISTEN}, {ENV_ANCHOR}, CPI_ETCD_USER, CPI_ETCD_PASSWORD[_FILE], CPI_RESOLVER_ZONE), then these "
            "flags. Without --config, --anchor (or $CPI_RESOLVER_ANCHOR) or --anchor-bundle is "
            "required."
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
    serve.add_argument(
        "--anchor-bundle",
        metavar="FILE",
        help="anchor bundle: several roots, each with its own anchor and index (federation, "
        "docs/resolver.md); instead of --anchor and --etcd",
    )
    serve.add_argument("--zone", help="DNS zone the resolver answers for (e.g. cpi.)")
    serve.add_argument("--latency-table", metavar="FILE", help="region RTT table (JSON)")
    serve.add_argument(
        "--snapshot-dir",
        metavar="DIR",
        help="keep an integrity-protected snapshot of the verified replica here for warm "
        "restarts (docs/resolver.md)",
    )
    serve.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="HTTP worker processes sharing the port (SO_REUSEPORT), each with its own "
        "replica of the index (default 1; needs a fixed port)",
    )
    add_server_arguments(serve)
    serve.set_defaults(handler=run_serve)


def _endpoints(text: str | None) -> list[str] | None:
    return [e for e in re.split(r"[,\s]+", text) if e] if text else None


def run_serve(args: argparse.Namespace) -> int:
    overrides: dict[str, object] = {
        "etcd.endpoints": _endpoints(args.etcd),
        "anchor_files": args.anchor,
        "anchor_bundle": args.anchor_bundle,
        "zone": args.zone,
        "latency_table": args.latency_table,
        "snapshot_dir": args.snapshot_dir,
        "dns_host": args.dns_host,
        "dns_port": args.dns_port,
        "workers": args.workers,
        "tls_cert": args.tls_cert,
        "tls_key": args.tls_key,
        "insecure": True if args.insecure else None,
    }
    if args.listen:
        overrides["host"], overrides["port"] = parse_listen(args.listen)
    if args.host:
        overrides["host"] = args.host
    if args.port is not None:
        overrides["port"] = args.port
    config = load_config(args.config, overrides=overrides)
    if config.workers > 1:
        return run_workers(config)
    asyncio.run(serve(config))
    return 0


def _worker(config: ResolverConfig, number: int, verbose: bool) -> None:
    """One process of ``--workers N`` (the target of a spawned process)."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format=f"%(asctime)s %(levelname)s %(name)s[{number}]: %(message)s",
    )
    asyncio.run(
        serve(
            config, reuse_port=True, primary=number == 0, parent_sentinel=workers.parent_sentinel()
        )
    )


def run_workers(config: ResolverConfig) -> int:
    """Run ``config.workers`` resolver processes on one port until SIGTERM or SIGINT
    (:mod:`cpi.workers`).

    Each is a complete resolver (its own replica, verification and caches); the kernel
    hands each new connection to one of them.  If one of them exits, the others are
    stopped too and the exit code is 1.
    """
    if config.port == 0:
        raise ConfigError("--workers N needs a fixed port: the processes share it")
    # refuse to start without TLS material (or --insecure) before starting the workers
    serving_context(
        cert=config.tls_cert, key=config.tls_key, insecure=config.insecure, what="resolver"
    )
    target = functools.partial(_worker, config)
    return workers.run_workers(target, config.workers, name="resolver", where=config.url)


async def serve(
    config: ResolverConfig,
    *,
    reuse_port: bool = False,
    primary: bool = True,
    parent_sentinel: int | None = None,
) -> None:
    """Run the resolver until SIGTERM or SIGINT; stop cleanly.

    ``reuse_port``: bind with ``SO_REUSEPORT`` (one of several processes on the port);
    ``primary``: run the DNS front end and the claims reconciler; ``parent_sentinel``:
    also stop when this descriptor becomes readable, i.e. when the parent process is
    gone (:attr:`multiprocessing.process.BaseProcess.sentinel`; see :func:`run_workers`).
    """
    ssl_context = serving_context(
        cert=config.tls_cert, key=config.tls_key, insecure=config.insecure, what="resolver"
    )
    app = create_app(config, primary=primary)
    serving = Serving(
        app,
        config.host,
        config.port,
        ServerLimits.of(config),
        reuse_port=reuse_port or None,
        ssl_context=ssl_context,
        shutdown_timeout=5.0,
    )
    await serving.setup()  # starts the replica (the first listing runs in the background)
    try:
        await serving.start()
        url = config.url
        if config.port == 0:
            url = serving.url
        _log.info("%s; serving at %s", config.summary(), url)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        unwatch = watch_parent(parent_sentinel, stop)
        try:
            await stop.wait()
        finally:
            unwatch()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
        _log.info("resolver stopping")
    finally:
        await serving.close()
