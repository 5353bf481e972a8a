"""``cpi log init|sign``: the national node's transparency-log key and signer.

``cpi log sign`` is a long-running process (``cpi up`` supervises it): it reads the
audit stream, and every ``--interval`` seconds, when the audit head has moved, signs
a checkpoint into ``/cpi/v1/log/``.  It stops on SIGTERM/SIGINT and exits non-zero,
loudly, if the audit stream was rewritten (it never signs over a rewritten history).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal

from cpi.commands._etcd import etcd_argument, open_index
from cpi.errors import UsageError
from cpi.output import emit, is_json, output_arguments
from registry.logsigner import (
    DEFAULT_ORIGIN,
    LogSigner,
    SignerMetrics,
    WitnessEndpoint,
    init_log_key,
    vkey_path_for,
)
from registry.tls import load_client_context, warn_insecure
from schemas.errors import ConfigError, InvalidDataError
from schemas.tls import check_url


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("log", help="national node: transparency-log key and checkpoint signer")
    acts = p.add_subparsers(dest="log_command", metavar="ACTION", required=True)

    init = acts.add_parser(
        "init",
        help="create the log key (0600) and its verifier key file (.vkey) if missing",
        description=(
            "Create KEY (Ed25519, 0600) unless it exists, and write KEY's verifier key "
            "(<origin>+<key id>+<base64>, the C2SP/sumdb note form) to the same path with "
            "suffix .vkey. Give the .vkey file to auditors with the anchor."
        ),
    )
    init.add_argument("--key", required=True, help="log key file, e.g. national/log.key")
    init.add_argument(
        "--origin", default=DEFAULT_ORIGIN, help=f"log origin (default: {DEFAULT_ORIGIN})"
    )
    output_arguments(init)
    init.set_defaults(handler=run_init)

    sign = acts.add_parser(
        "sign",
        help="sign checkpoints of the audit stream (long-running; --once for one)",
        description=(
            "Read the audit stream from etcd, check it extends the last signed checkpoint, and "
            "sign a new checkpoint whenever the audit head moves. The key is created (0600, "
            "with its .vkey) if missing."
        ),
    )
    sign.add_argument("--key", required=True, help="log key file (created if missing)")
    etcd_argument(sign)  # after --key: its etcd client key is --etcd-key
    sign.add_argument(
        "--origin", default=DEFAULT_ORIGIN, help=f"log origin (default: {DEFAULT_ORIGIN})"
    )
    sign.add_argument(
        "--interval", type=float, default=2.0, help="seconds between checks (default: 2)"
    )
    sign.add_argument(
        "--once", action="store_true", help="sign one checkpoint (if needed) and exit"
    )
    sign.add_argument(
        "--witness",
        action="append",
        default=[],
        metavar="URL=VKEY",
        help="submit every checkpoint to this witness (C2SP tlog-witness) and store its "
        "cosignature with the checkpoint; VKEY is the witness's verifier key or a file "
        "holding it (repeatable)",
    )
    sign.add_argument(
        "--witness-cacert",
        metavar="FILE",
        help="CA certificate (PEM) to verify the witnesses with (default: $CPI_CACERT, "
        "else the system roots)",
    )
    sign.add_argument(
        "--witness-insecure",
        action="store_true",
        help="allow plain http:// witness URLs (tests only; logs a warning)",
    )
    sign.add_argument(
        "--witness-timeout",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="time allowed for each witness's answer (default 5)",
    )
    output_arguments(sign)
    sign.add_argument(
        "--metrics-port",
        metavar="[HOST:]PORT",
        help="serve Prometheus metrics over plain HTTP at http://HOST:PORT/metrics "
        "(HOST defaults to 127.0.0.1; docs/operations.md)",
    )
    sign.add_argument(
        "--metrics-textfile",
        metavar="PATH",
        help="write the metrics to PATH (node_exporter textfile collector) after every round",
    )
    sign.set_defaults(handler=run_sign)


def run_init(args: argparse.Namespace) -> int:
    _, verifier, created = init_log_key(args.key, origin=args.origin)
    info = {
        "key_file": str(args.key),
        "created": created,
        "vkey_file": str(vkey_path_for(args.key)),
        "verifier_key": verifier.to_vkey(),
    }

    def table(wide: bool) -> None:
        print(f"{'created' if created else 'kept existing'} log key {args.key} (0600)")
        print(f"verifier key {info['vkey_file']}: {info['verifier_key']}")

    emit(args, info, table=table)
    return 0


async def _sign(args: argparse.Namespace) -> int:
    key, verifier, created = init_log_key(args.key, origin=args.origin)
    if created and not is_json(args):
        print(f"created log key {args.key}; verifier key {verifier.to_vkey()}", flush=True)
    metrics = SignerMetrics()
    port = getattr(args, "metrics_port", None)
    if port:
        host, _, number = str(port).rpartition(":")
        bound = metrics.serve(int(number), host or "127.0.0.1")
        print(f"log signer metrics at http://{host or '127.0.0.1'}:{bound}/metrics", flush=True)
    textfile = getattr(args, "metrics_textfile", None)
    witnesses = [WitnessEndpoint.parse(spec) for spec in args.witness]
    for w in witnesses:
        check_url(w.url, insecure=args.witness_insecure, what="witness URL")
        if w.url.startswith("http://"):
            warn_insecure(f"submitting checkpoints to {w.url}")
    try:
        witness_ssl = load_client_context(
            args.witness_cacert or os.environ.get("CPI_CACERT") or None
        )
    except ConfigError as exc:
        raise InvalidDataError(str(exc)) from exc
    async with open_index(args.etcd, args=args) as index:
        signer = LogSigner(
            index,
            key,
            origin=args.origin,
            metrics=metrics,
            witnesses=witnesses,
            witness_ssl=witness_ssl,
            witness_timeout=args.witness_timeout,
        )
        if args.once:
            await signer.load()
            try:
                result = await signer.sign()
            finally:
                await signer.aclose()
            cp = signer.signed
            size = cp.size if cp else 0
            info = {
                "size": size,
                "signed": result is not None,
                "written": bool(result is not None and result.written),
            }

            def table(wide: bool) -> None:
                if result is not None:
                    print(f"signed checkpoint {size} ({'new' if result.written else 'existing'})")
                else:
                    print(f"nothing to sign: latest checkpoint is at size {size}")

            emit(args, info, table=table)
            return 0
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
        print(f"log signer {args.origin} running every {args.interval:g} s", flush=True)
        tick = (lambda: metrics.write(textfile)) if textfile else None
        await signer.run(interval=args.interval, stop=stop, on_tick=tick)
    return 0


def run_sign(args: argparse.Namespace) -> int:
    if args.interval <= 0:
        raise UsageError("--interval must be positive")
    return asyncio.run(_sign(args))
