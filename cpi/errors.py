"""Exit codes of the ``cpi`` command line, and the one place errors are mapped to them.

========  ============================================================================
code      meaning
========  ============================================================================
0         ok
1         verification failed, the index or the data is invalid
2         usage: a bad flag or value (argparse), a missing or unreadable file
3         not found: no such CPID, claim, namespace or key
4         refused: authentication, authorisation, conflict, quota, rate limit
5         unreachable: etcd, the resolver or a registry did not answer (or timed out)
70        internal error (a bug: please report it; ``-v`` shows the traceback)
130       interrupted (Ctrl-C)
141       stdout was closed early (``cpi ... | head``), as for SIGPIPE
========  ============================================================================
"""

from __future__ import annotations

import re
from typing import Final

from registry.index import IndexAccessDeniedError
from schemas.errors import (
    ConflictError,
    IndexTimeoutError,
    IndexUnavailableError,
    InvalidDataError,
    NotFoundError,
    OutsideNamespaceError,
    RetrievalError,
)

EXIT_OK: Final = 0
EXIT_INVALID: Final = 1
EXIT_USAGE: Final = 2
EXIT_NOT_FOUND: Final = 3
EXIT_REFUSED: Final = 4
EXIT_UNREACHABLE: Final = 5
EXIT_INTERNAL: Final = 70
EXIT_INTERRUPTED: Final = 130
EXIT_PIPE: Final = 141

EXIT_CODES: Final = (
    (EXIT_OK, "ok"),
    (EXIT_INVALID, "verification failed, or the index or data is invalid"),
    (EXIT_USAGE, "usage: bad flag or value, missing or unreadable file"),
    (EXIT_NOT_FOUND, "not found (CPID, claim, namespace, key)"),
    (EXIT_REFUSED, "refused: auth, conflict, quota, rate limited"),
    (EXIT_UNREACHABLE, "unreachable: etcd, resolver or registry down or timed out"),
    (EXIT_INTERNAL, "internal error (a bug; -v shows the traceback)"),
    (EXIT_INTERRUPTED, "interrupted (Ctrl-C)"),
    (EXIT_PIPE, "stdout closed early (cpi ... | head)"),
)

_REFUSED_STATUSES: Final = frozenset({401, 403, 409, 413, 429})


class UsageError(InvalidDataError):
    """The command line asks for something impossible: flags that do not go together, a
    file that does not exist or cannot be read.  Exit 2, like an argparse error."""

    code = "usage"


def epilog() -> str:
    """The exit-code table for ``cpi --help``."""
    lines = ["exit codes:"]
    lines += [f"  {code:<4} {text}" for code, text in EXIT_CODES]
    lines.append("")
    lines.append(
        "Every option can also be set in the environment as CPI_<OPTION> (e.g. --timeout: "
        "CPI_TIMEOUT, --output: CPI_OUTPUT); see docs/cli.md."
    )
    return "\n".join(lines)


def _http_status(exc: BaseException) -> int | None:
    status = getattr(exc, "status", None)
    return status if isinstance(status, int) else None


def _file_error(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) is a file that is missing or unreadable."""
    seen: BaseException | None = exc
    for _ in range(5):
        if seen is None:
            return False
        if isinstance(seen, (FileNotFoundError, PermissionError, IsADirectoryError)):
            return True
        if isinstance(seen, UsageError):
            return True
        seen = seen.__cause__
    return False


def exit_code(exc: BaseException) -> int:
    """The exit code for an error of the project's tree (or an ``OSError`` on a file)."""
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(exc, BrokenPipeError):
        return EXIT_PIPE
    if isinstance(exc, IndexAccessDeniedError):
        return EXIT_REFUSED  # etcd refused the credentials or a permission
    if isinstance(exc, RetrievalError):
        return EXIT_UNREACHABLE
    if isinstance(exc, (TimeoutError, ConnectionError)):
        return EXIT_UNREACHABLE
    if isinstance(exc, NotFoundError):
        return EXIT_NOT_FOUND
    status = _http_status(exc)
    if status == 404:
        return EXIT_NOT_FOUND
    if isinstance(exc, (ConflictError, OutsideNamespaceError)) or status in _REFUSED_STATUSES:
        return EXIT_REFUSED
    if type(exc).__name__ == "RefusedError":  # registry.agent: 401/403 on registration
        return EXIT_REFUSED
    if _file_error(exc) or isinstance(exc, OSError):
        return EXIT_USAGE
    if isinstance(exc, InvalidDataError):
        return EXIT_INVALID
    return EXIT_INTERNAL


def _reason(text: str) -> str:
    low = text.lower()
    if "connection refused" in low:
        return "connection refused"
    if "deadline" in low or "did not finish" in low or "timed out" in low or "timeout" in low:
        return "timed out"
    if "name resolution" in low or "dns resolution" in low or "name or service" in low:
        return "host name does not resolve"
    if "user name is empty" in low or "authentication" in low or "permission denied" in low:
        return "authentication failed"
    m = re.search(r"\(([^()]{1,120})\)\)?\s*$", text)
    return m.group(1) if m else text[:200]


def _no_repr(text: str) -> str:
    """``<Prefix.NS: '/cpi/v1/ns/'>`` -> ``/cpi/v1/ns/``: no Python repr in a message."""
    return re.sub(r"<\w+(?:\.\w+)+: '([^']*)'>", r"\1", text)


def message(exc: BaseException, *, etcd: str | None = None) -> str:
    """One line (or two) a person can act on, without a Python repr."""
    text = _no_repr(str(exc) or type(exc).__name__)
    if isinstance(exc, (IndexUnavailableError, IndexTimeoutError)):
        where = etcd or "the configured endpoints"
        reason = _reason(text)
        if reason == "authentication failed":
            return (
                f"etcd at {where} refused the credentials; give --user and --password-file, "
                "or set CPI_ETCD_USER and CPI_ETCD_PASSWORD_FILE (cpi up keeps root's password "
                "in DATA_DIR/etcd-auth/root.password)"
            )
        return (
            f"cannot reach etcd at {where}: {reason}; is it running? "
            "check --etcd / CPI_ETCD_ENDPOINTS (and --timeout)"
        )
    if isinstance(exc, IndexAccessDeniedError) or (
        isinstance(exc, RetrievalError) and "user name is empty" in text
    ):
        return (
            f"{text}\ncpi: etcd has authentication on: give --user and --password-file, or set "
            "CPI_ETCD_USER and CPI_ETCD_PASSWORD_FILE (cpi up keeps root's password in "
            "DATA_DIR/etcd-auth/root.password)"
        )
    if type(exc).__name__ == "ResolverUnavailableError" and any(
        w in text.lower() for w in ("cannot reach", "connect", "did not answer", "unreachable")
    ):
        return f"{text}; is it running? check --resolver / CPI_RESOLVER (and --timeout)"
    if isinstance(exc, OSError) and exc.strerror:
        name = f"{exc.filename}: " if exc.filename else ""
        return f"{name}{exc.strerror}"
    return text
