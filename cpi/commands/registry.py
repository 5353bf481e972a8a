"""``cpi registry serve`` and ``cpi registry token create``.

``serve`` only loads the config (file, then environment, then flags) and runs the app
of :mod:`registry.service` until SIGTERM or SIGINT.  With ``--workers N`` (N > 1) it
runs N such processes on one port (``SO_REUSEPORT``, :mod:`cpi.workers`), each a
registry instance of its own (its lease, liveness and audit stream writer; instance id
``<id>-<n>``; 1/N of the limits), as several instances of one registry are
(docs/registry.md "Several processes").  ``token create`` prints a new join token once;
only its hash is stored.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import os
import re
import signal
import sys
import time
from typing import Any

from cpi import logfmt
from cpi.commands._etcd import credential_arguments, open_index
from cpi.output import is_json, output_arguments, print_json, when
from cpi.serving import ServerLimits, Serving
from cpi.tls import add_server_arguments as _tls_arguments
from cpi.workers import parent_sentinel, run_workers, watch_parent
from registry import tokens
from registry.config import RegistryConfig, load_config
from registry.index import Index, endpoints_from_env
from registry.service import create_app
from registry.tls import serving_context
from schemas.errors import ConfigError, InvalidDataError

_log = logging.getLogger("cpi.registry")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("registry", help="run a regional / industry registry, manage join tokens")
    reg = p.add_subparsers(dest="registry_command", metavar="ACTION", required=True)

    serve = reg.add_parser(
        "serve",
        help="serve registrations, status and deregistrations (until SIGTERM/SIGINT)",
        description="Config comes from --config, then the environment "
        "(CPI_ETCD_ENDPOINTS, CPI_REGISTRY_LISTEN, CPI_ETCD_USER, CPI_ETCD_PASSWORD[_FILE]), then these flags.",
    )
    serve.add_argument("--config", required=True, help="registry config file (JSON)")
    serve.add_argument("--host", help="listen address (overrides the config)")
    serve.add_argument("--port", type=int, help="listen port; 0 picks a free one")
    serve.add_argument("--public-url", help="URL clients use to reach this registry")
    serve.add_argument("--etcd", help="etcd endpoints, comma-separated (overrides the config)")
    serve.add_argument("--instance-id", help="name of this instance in logs and metrics")
    serve.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="registry processes sharing the port (SO_REUSEPORT), each an instance of its "
        "own (default 1; needs a fixed port)",
    )
    _tls_arguments(serve)
    serve.add_argument(
        "--tls-client-ca",
        metavar="FILE",
        help="require agents to present a client certificate signed by this CA (mutual TLS)",
    )
    serve.set_defaults(handler=run_serve)

    token = reg.add_parser("token", help="join tokens")
    tok = token.add_subparsers(dest="token_command", metavar="ACTION", required=True)
    create = tok.add_parser(
        "create",
        help="create a join token (printed once; only its hash is stored)",
        description="The namespace must be at or below one the registry holds: the "
        "namespaces of --config, else the subjects of certs with scope 'issue' in the index.",
    )
    create.add_argument("--namespace", required=True, help="e.g. CN.31.CMCC")
    create.add_argument("--kind", help="admit only this kind (CPU, GPU, NPU, ...)")
    create.add_argument("--uses", type=int, help="new CPIDs the token may create (default: any)")
    create.add_argument("--ttl", required=True, help="lifetime, e.g. 10m, 24h, 7d")
    create.add_argument("--config", help="registry config: its etcd and namespaces are used")
    create.add_argument(
        "--etcd",
        default=endpoints_from_env(os.environ),
        help="etcd endpoints, comma-separated (default: $CPI_ETCD_ENDPOINTS or $CPI_ETCD)",
    )
    credential_arguments(create)
    output_arguments(create)
    create.set_defaults(handler=run_token_create)


# -- serve ------------------------------------------------------------------------------


def _endpoints(text: str | None) -> list[str] | None:
    return [e for e in re.split(r"[,\s]+", text) if e] if text else None


def run_serve(args: argparse.Namespace) -> int:
    config = load_config(
        args.config,
        overrides={
            "host": args.host,
            "port": args.port,
            "public_url": args.public_url,
            "etcd.endpoints": _endpoints(args.etcd),
            "instance_id": args.instance_id,
            "tls_cert": args.tls_cert,
            "tls_key": args.tls_key,
            "tls_client_ca": args.tls_client_ca,
            "insecure": True if args.insecure else None,
            "workers": args.workers,
        },
    )
    if config.workers > 1:
        return _run_workers(config)
    asyncio.run(serve(config))
    return 0


def _run_workers(config: RegistryConfig) -> int:
    """``config.workers`` registry processes on one port until SIGTERM or SIGINT."""
    if config.port == 0:
        raise ConfigError("--workers N needs a fixed port: the processes share it")
    # refuse to start without TLS material (or --insecure) before starting the workers
    serving_context(
        cert=config.tls_cert,
        key=config.tls_key,
        client_ca=config.tls_client_ca,
        insecure=config.insecure,
        what="registry",
    )
    # the processes log as this one does (--log-format is not in their environment)
    json_log = any(
        isinstance(h.formatter, logfmt.JsonFormatter) for h in logging.getLogger().handlers
    )
    fmt = "json" if json_log else "text"
    target = functools.partial(_worker, config, fmt)
    return run_workers(target, config.workers, name="registry", where=config.url)


def _worker(config: RegistryConfig, fmt: str, number: int, verbose: bool) -> None:
    """One process of ``--workers N`` (the target of a spawned process): an instance
    of its own, with its share of the limits (:meth:`RegistryConfig.one_of`)."""
    logfmt.configure(level=logging.DEBUG if verbose else logging.INFO, fmt=fmt)
    asyncio.run(serve(config.one_of(number), reuse_port=True, parent=parent_sentinel()))


async def serve(
    config: RegistryConfig, *, reuse_port: bool = False, parent: int | None = None
) -> None:
    """Run the registry until SIGTERM or SIGINT; stop cleanly.  ``reuse_port``: bind with
    ``SO_REUSEPORT`` (one of several processes on the port); ``parent``: also stop when
    this sentinel of the parent process becomes readable (:mod:`cpi.workers`)."""
    ssl_context = serving_context(
        cert=config.tls_cert,
        key=config.tls_key,
        client_ca=config.tls_client_ca,
        insecure=config.insecure,
        what="registry",
    )
    app = create_app(config)
    serving = Serving(
        app,
        config.host,
        config.port,
        ServerLimits.of(config),
        reuse_port=reuse_port or None,
        ssl_context=ssl_context,
    )
    await serving.setup()  # runs the start-up: etcd, certificates, lease
    try:
        await serving.start()
        url = config.url
        if config.port == 0 and not config.public_url:
            url = serving.url
        names = ", ".join(n.namespace for n in config.namespaces)
        _log.info(
            "registry %s serving %s at %s (etcd %s)",
            config.instance_id,
            names,
            url,
            ",".join(config.etcd.endpoints),
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        unwatch = watch_parent(parent, stop)
        try:
            await stop.wait()
        finally:
            unwatch()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
        _log.info("registry %s stopping", config.instance_id)
    finally:
        await serving.close()


# -- token create -----------------------------------------------------------------------


async def _create_token(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    within: list[str] | None
    index: Index
    if args.config:
        config = load_config(args.config, overrides={"etcd.endpoints": _endpoints(args.etcd)})
        index = config.etcd.open_index()
        within = [n.namespace for n in config.namespaces]
    else:
        if not args.etcd:
            raise InvalidDataError(
                "no etcd endpoints: give --etcd, --config or set CPI_ETCD_ENDPOINTS"
            )
        index = open_index(args.etcd, args=args)
        within = None
    ttl = tokens.parse_duration(args.ttl)
    async with index:
        if within is None:
            within = await tokens.held_namespaces_in_index(index)
        token = await tokens.create_token(
            index,
            namespace=args.namespace,
            kind=args.kind,
            uses=args.uses,
            ttl_s=ttl,
            within=within,
        )
    info = {
        "namespace": args.namespace.upper(),
        "kind": args.kind.upper() if args.kind else None,
        "uses": args.uses,
        "expires_at": int(time.time()) + ttl,
    }
    return token, info


def run_token_create(args: argparse.Namespace) -> int:
    token, info = asyncio.run(_create_token(args))
    if is_json(args):
        print_json({"token": token, **info})
    else:
        print(token)
        scope = info["namespace"] + (f", kind {info['kind']}" if info["kind"] else "")
        uses = f"{info['uses']} new CPIDs" if info["uses"] else "any number of CPIDs"
        print(
            f"join token for {scope}: {uses}, valid until {when(info['expires_at'])}; "
            "it is shown only this once",
            file=sys.stderr,
        )
    return 0
