"""The ``cpi`` command line: one entry point, one module per command group.

Each module in :mod:`cpi.commands` exposes ``register(subparsers)``; handlers return
an exit code.  Whatever a handler raises ends here: one line on stderr and the exit
code of :mod:`cpi.errors` (``-v`` adds the traceback).  No command ends in a traceback.

Options shared by every command are added here to every parser of the tree, so they
are accepted before or after the sub-command: ``-v/--verbose`` and ``--timeout``.
Every option can be set in the environment as ``CPI_<OPTION>`` (:func:`apply_env`).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from collections.abc import Iterator, Sequence
from importlib import metadata
from typing import Any

from cpi import errors, logfmt
from cpi.commands import COMMAND_MODULES

ENV_PREFIX = "CPI_"
DEFAULT_TIMEOUT = 5.0

ENV_NAMES = {
    "--etcd": "CPI_ETCD_ENDPOINTS",
    "--user": "CPI_ETCD_USER",
    "--password-file": "CPI_ETCD_PASSWORD_FILE",
}
"""Options whose variable is not ``CPI_<OPTION>`` (older, documented names)."""

NOT_FROM_ENV = frozenset({"--help", "--version", "--json", "--token"})
"""``--token`` is a secret with its own variables (``CPI_CLAIMS_TOKEN``, ``CPI_JOIN_TOKEN``)."""

SERVICE_COMMANDS = frozenset({("registry", "serve"), ("resolver", "serve")})
"""Services read their own documented variables (``CPI_REGISTRY_*``, ``CPI_RESOLVER_*``)
between their config file and their flags; the generic scheme would change that order."""


def version() -> str:
    try:
        return metadata.version("cpi-registry")
    except metadata.PackageNotFoundError:
        return "unknown"


def walk(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every parser of the tree with its command path, the root first."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            seen: set[int] = set()
            for name, child in action.choices.items():
                if id(child) in seen:
                    continue
                seen.add(id(child))
                yield from walk(child, (*path, name))


def env_name(option: str) -> str:
    return ENV_NAMES.get(option) or ENV_PREFIX + option.lstrip("-").upper().replace("-", "_")


def env_option(longs: Sequence[str]) -> str:
    """The long option whose ``CPI_<OPTION>`` names the variable of an action: the
    ``--etcd-*`` spelling when there is one, so that etcd's ``--cacert/--cert/--key``
    read ``CPI_ETCD_CACERT/CERT/KEY`` and never the HTTP clients' ``CPI_CACERT``."""
    return next((o for o in longs if o.startswith("--etcd-")), longs[0])


def _truthy(text: str) -> bool:
    return text.strip().lower() in ("1", "true", "yes", "on")


def _naming_env(convert: Any, name: str, raw: str) -> Any:
    """``convert``, with a bad value from the environment reported under its variable."""

    def from_env(text: str) -> Any:
        try:
            return convert(text)
        except (TypeError, ValueError, argparse.ArgumentTypeError) as exc:
            if text != raw:
                raise
            raise argparse.ArgumentTypeError(f"${name}={raw!r} is not valid: {exc}") from exc

    from_env.__name__ = getattr(convert, "__name__", "value")
    return from_env


def apply_env(
    parser: argparse.ArgumentParser, path: tuple[str, ...], environ: dict[str, str]
) -> None:
    """Make ``CPI_<OPTION>`` the default of each option of ``parser`` (not required any more)."""
    if path in SERVICE_COMMANDS:
        return
    for action in parser._actions:
        longs = [o for o in action.option_strings if o.startswith("--")]
        if not longs or longs[0] in NOT_FROM_ENV or action.default is argparse.SUPPRESS:
            continue
        if isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            continue
        name = env_name(env_option(longs))
        raw = environ.get(name)
        if raw is None or raw == "":
            continue
        if isinstance(action, argparse._StoreTrueAction):
            value: object = _truthy(raw)
        elif isinstance(action, argparse._StoreConstAction):
            continue
        elif action.choices is not None and raw not in action.choices:
            continue  # e.g. CPI_OUTPUT=name on a command without that format
        elif isinstance(action, argparse._AppendAction):
            value = [raw]
        else:
            value = raw  # a string default: argparse converts it (and reports a bad one)
            # only when this command is the one run
            if callable(action.type):
                action.type = _naming_env(action.type, name, raw)
        action.default = value
        action.required = False


def _common_options(parser: argparse.ArgumentParser, *, root: bool) -> None:
    have = parser._option_string_actions
    kw: dict[str, object] = {} if root else {"default": argparse.SUPPRESS}
    if "-v" not in have and "--verbose" not in have:
        parser.add_argument(
            "-v",
            "--verbose",
            action="store_true",
            help="log debug output; show tracebacks of errors",
            **({"default": False} if root else kw),
        )
    if "--timeout" not in have:
        parser.add_argument(
            "--timeout",
            type=float,
            metavar="S",
            help=f"give up on etcd, a resolver or a registry after S seconds "
            f"(default: {DEFAULT_TIMEOUT:g}; $CPI_TIMEOUT)",
            **({"default": DEFAULT_TIMEOUT} if root else kw),
        )


def build_parser(environ: dict[str, str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cpi",
        description="CPI registry: signed resource identifiers and discovery for a computing power internet.",
        epilog=errors.epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"cpi {version()}")
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
    env = dict(os.environ if environ is None else environ)
    for path, p in walk(parser):
        _common_options(p, root=not path)
        apply_env(p, path, env)
    return parser


def _unwrap(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def _say(text: str) -> None:
    try:
        print(f"cpi: {text}", file=sys.stderr)
        sys.stderr.flush()
    except (BrokenPipeError, ValueError, OSError):
        pass


def _silence_stdout() -> None:
    """After a broken pipe: point stdout at /dev/null so the interpreter's final flush
    does not print another traceback."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def _etcd_endpoints(args: argparse.Namespace) -> str | None:
    from cpi.commands import _etcd

    return _etcd.last_endpoints() or getattr(args, "etcd", None)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    verbose = bool(getattr(args, "verbose", False))
    try:
        fmt = logfmt.log_format(getattr(args, "log_format", None))
    except ValueError as bad:
        parser.error(f"{logfmt.ENV}: {bad}")
    logfmt.configure(level=logging.DEBUG if verbose else logging.INFO, fmt=fmt)
    os.environ[logfmt.ENV] = fmt  # the processes cpi starts (cpi up) log the same way
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return errors.EXIT_USAGE
    try:
        code = int(handler(args) or 0)
        sys.stdout.flush()
        return code
    except SystemExit:
        raise
    except BaseException as raised:  # the safety net: one line and an exit code, never a traceback
        exc = _unwrap(raised)
        if isinstance(exc, BrokenPipeError):
            _silence_stdout()
            return errors.EXIT_PIPE
        if isinstance(exc, KeyboardInterrupt):
            return errors.EXIT_INTERRUPTED
        if isinstance(exc, SystemExit):
            raise exc from None
        code = errors.exit_code(exc)
        if code == errors.EXIT_INTERNAL:
            _say(f"internal error: {type(exc).__name__}: {str(exc)[:300]}")
            if not verbose:
                _say("this is a bug; run again with -v for the traceback and report it")
        else:
            _say(errors.message(exc, etcd=_etcd_endpoints(args)))
        if verbose:
            traceback.print_exception(exc, file=sys.stderr)
        return code


if __name__ == "__main__":
    raise SystemExit(main())
