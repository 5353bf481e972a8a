"""``cpi witness serve|init``: a transparency-log witness (C2SP tlog-witness).

The witness cosigns a log's checkpoints, each only after checking it is consistent
with the last one it cosigned (:mod:`resolver.audit.witness`).  Its key is an Ed25519
PEM file (0600, created if missing); the verifier key that auditors and log signers
are given (``<name>+<key id>+<base64(0x04 || key)>``) is written beside it as
``<key>.vkey``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
from pathlib import Path

from cpi.output import emit, output_arguments
from cpi.serving import ServerLimits, Serving
from cpi.tls import add_server_arguments
from registry import keyfile
from registry.logsigner import load_verifier
from registry.tls import serving_context
from resolver.audit.witness import Witness, WitnessState, create_witness_app
from resolver.config import parse_listen
from schemas.checkpoint import NoteVerifier
from schemas.cosignature import CosignerVerifier
from schemas.errors import CheckpointError, KeyFileError
from schemas.keys import Ed25519PrivateKey

_log = logging.getLogger("cpi.witness")

DEFAULT_NAME = "cpi.witness/w1"
DEFAULT_LISTEN = "127.0.0.1:8750"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("witness", help="transparency-log witness: cosign consistent checkpoints")
    acts = p.add_subparsers(dest="witness_command", metavar="ACTION", required=True)

    init = acts.add_parser(
        "init",
        help="create the witness key (0600) and its verifier key file (.vkey) if missing",
    )
    init.add_argument("--key", required=True, help="witness key file")
    init.add_argument("--name", default=DEFAULT_NAME, help=f"witness name (default {DEFAULT_NAME})")
    output_arguments(init)
    init.set_defaults(handler=run_init)

    serve = acts.add_parser(
        "serve",
        help="serve POST /add-checkpoint (until SIGTERM/SIGINT)",
        description=(
            "Cosign checkpoints of the logs given with --log, each only when a consistency "
            "proof links it to the last one cosigned for that log (state kept in --state). "
            "TLS unless --insecure."
        ),
    )
    serve.add_argument("--key", required=True, help="witness key file (created 0600 if missing)")
    serve.add_argument(
        "--name", default=DEFAULT_NAME, help=f"witness name (default {DEFAULT_NAME})"
    )
    serve.add_argument("--state", required=True, metavar="DIR", help="state directory (0700)")
    serve.add_argument(
        "--log",
        action="append",
        required=True,
        metavar="[ORIGIN=]VKEY",
        help="a log to witness: its verifier key (text or file); ORIGIN defaults to the "
        "key's name (repeatable)",
    )
    serve.add_argument("--listen", default=DEFAULT_LISTEN, help=f"HOST:PORT ({DEFAULT_LISTEN})")
    add_server_arguments(serve)
    serve.set_defaults(handler=run_serve)


def vkey_path(key_path: str | os.PathLike[str]) -> Path:
    return Path(key_path).with_suffix(".vkey")


def init_witness_key(path: str, name: str) -> tuple[Ed25519PrivateKey, CosignerVerifier, bool]:
    """Load or create the witness key (0600) and (re)write its ``.vkey`` beside it."""
    key, created = keyfile.load_or_create(path)
    verifier = CosignerVerifier.from_public_key(name, key)
    vpath = vkey_path(path)
    text = verifier.to_vkey() + "\n"
    if not vpath.exists() or vpath.read_text(encoding="utf-8") != text:
        vpath.write_text(text, encoding="utf-8")
    return key, verifier, created


def parse_log_spec(spec: str) -> tuple[str, NoteVerifier]:
    """``[ORIGIN=]VKEY``, the vkey as text or as a file: (origin, verifier)."""
    text = spec
    origin: str | None = None
    try:
        return _verifier_of(text, None)
    except KeyFileError:
        pass
    if "=" in spec:
        origin, _, text = spec.partition("=")
    return _verifier_of(text, origin)


def _verifier_of(text: str, origin: str | None) -> tuple[str, NoteVerifier]:
    if os.path.isfile(text):
        v = load_verifier(text)
    else:
        try:
            v = NoteVerifier.from_vkey(text)
        except CheckpointError as exc:
            raise KeyFileError(
                f"--log {text[:80]!r}: not a verifier key file or text: {exc}"
            ) from exc
    return (origin or v.name), v


def run_init(args: argparse.Namespace) -> int:
    _, verifier, created = init_witness_key(args.key, args.name)
    info = {
        "key_file": str(args.key),
        "created": created,
        "vkey_file": str(vkey_path(args.key)),
        "verifier_key": verifier.to_vkey(),
    }

    def table(wide: bool) -> None:
        print(f"{'created' if created else 'kept existing'} witness key {args.key} (0600)")
        print(f"verifier key {info['vkey_file']}: {info['verifier_key']}")

    emit(args, info, table=table)
    return 0


async def _serve(args: argparse.Namespace) -> None:
    ssl_context = serving_context(
        cert=args.tls_cert, key=args.tls_key, insecure=args.insecure, what="witness"
    )
    key, verifier, _ = init_witness_key(args.key, args.name)
    logs: dict[str, list[NoteVerifier]] = {}
    for spec in args.log:
        origin, v = parse_log_spec(spec)
        logs.setdefault(origin, []).append(v)
    state = WitnessState(args.state)
    witness = Witness(args.name, key, logs, state)
    host, port = parse_listen(args.listen)
    serving = Serving(
        create_witness_app(witness), host, port, ServerLimits(), ssl_context=ssl_context,
        shutdown_timeout=5.0,
    )  # fmt: skip
    async with serving:
        _log.info(
            "witness %s (%s) for %s; serving at %s",
            args.name,
            verifier.to_vkey(),
            ", ".join(sorted(logs)),
            serving.url,
        )
        print(f"witness {verifier.to_vkey()} serving at {serving.url}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()


def run_serve(args: argparse.Namespace) -> int:
    asyncio.run(_serve(args))
    return 0
