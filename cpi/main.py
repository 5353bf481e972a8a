"""The ``cpi`` command line: one entry point, one module per command group.

Each module in :mod:`cpi.commands` exposes ``register(subparsers)``; handlers return
an exit code.  Errors of the project's tree become one line on stderr and exit 1;
retrieval errors (etcd down) exit 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from cpi import logfmt
from cpi.commands import COMMAND_MODULES
from schemas.errors import InvalidDataError, RetrievalError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cpi",
        description="CPI registry: signed resource identifiers and discovery for a computing power internet.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug output")
    parser.add_argument(
        "--log-format",
        choices=logfmt.FORMATS,
        default=None,
        help="log lines as text (default) or one JSON object per line "
        f"(default: ${logfmt.ENV}, else text)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMAND_MODULES:
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        fmt = logfmt.log_format(args.log_format)
    except ValueError as exc:
        parser.error(f"{logfmt.ENV}: {exc}")
    logfmt.configure(level=logging.DEBUG if args.verbose else logging.INFO, fmt=fmt)
    os.environ[logfmt.ENV] = fmt  # the processes cpi starts (cpi up) log the same way
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    try:
        return int(handler(args) or 0)
    except InvalidDataError as exc:
        print(f"cpi: {exc}", file=sys.stderr)
        return 1
    except RetrievalError as exc:
        print(f"cpi: {exc}", file=sys.stderr)
        if "user name is empty" in str(exc):
            print(
                "cpi: etcd has authentication on: give --user and --password-file, or set "
                "CPI_ETCD_USER and CPI_ETCD_PASSWORD_FILE (cpi up keeps root's password in "
                "DATA_DIR/etcd-auth/root.password)",
                file=sys.stderr,
            )
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
