"""Output of the ``cpi`` command line: ``-o table|wide|json|name`` and ``--json``.

Every command that prints data adds its options with :func:`output_arguments` and
prints through :func:`emit` (or the pieces it uses).  Tables and key/value blocks are
drawn by `rich <https://rich.readthedocs.io/>`_; on a terminal with colour, through a
pipe as plain aligned text without trailing blanks.  ``json`` is the decoded data,
indented; ``name`` prints one identifier per line (CPIDs, claim ids, namespaces) for
scripts: ``cpi discover --kind GPU -o name | head -1``.

Times are shown as dates with a relative part (``2026-12-04 10:00 UTC (in 29 days)``),
sizes in human units (``1.2 KiB``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.table import Table

FORMATS = ("table", "wide", "json", "name")
ENV_OUTPUT = "CPI_OUTPUT"


def output_arguments(
    parser: argparse.ArgumentParser,
    *,
    formats: Sequence[str] = ("table", "wide", "json"),
    sub: bool = False,
) -> None:
    """Add ``-o/--output FORMAT`` and ``--json`` (the same as ``-o json``).

    On a sub-command of a command that has them too, ``sub=True`` keeps what was given
    before the sub-command (``default=SUPPRESS``).
    """
    kw: dict[str, Any] = {"default": argparse.SUPPRESS} if sub else {"default": None}
    parser.add_argument(
        "-o",
        "--output",
        choices=list(formats),
        metavar="FORMAT",
        help=f"output format: {', '.join(formats)} (default: table; ${ENV_OUTPUT})",
        **kw,
    )
    parser.add_argument(
        "--json",
        dest="output",
        action="store_const",
        const="json",
        help="same as -o json",
        **kw,
    )


def fmt(args: argparse.Namespace) -> str:
    """The chosen format: the flag, else ``$CPI_OUTPUT`` (when valid), else ``table``."""
    chosen = getattr(args, "output", None)
    if chosen:
        return str(chosen)
    env = os.environ.get(ENV_OUTPUT, "").strip().lower()
    return env if env in FORMATS else "table"


def is_json(args: argparse.Namespace) -> bool:
    return fmt(args) == "json"


# -- low level ------------------------------------------------------------------------------


def _console(file: Any = None) -> Console:
    file = file or sys.stdout
    tty = hasattr(file, "isatty") and file.isatty()
    if tty:
        return Console(file=file, highlight=False, soft_wrap=False)
    return Console(
        file=file,
        highlight=False,
        width=4096,
        color_system=None,
        force_terminal=False,
        soft_wrap=False,
    )


def _write_plain(renderable: Any) -> None:
    """Render to text and write it without trailing blanks (pipes, files)."""
    console = _console(None)
    if sys.stdout.isatty():
        console.print(renderable)
        return
    with console.capture() as cap:
        console.print(renderable)
    text = "\n".join(line.rstrip() for line in cap.get().splitlines())
    sys.stdout.write(text + "\n" if text else "")


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def print_names(names: Iterable[str]) -> None:
    for name in names:
        sys.stdout.write(f"{name}\n")


@dataclass(frozen=True)
class Column:
    """One column: its header, how to get the cell from a row, and whether only ``wide``
    shows it."""

    header: str
    cell: Callable[[Any], object]
    wide: bool = False
    justify: str = "left"


def print_table(columns: Sequence[Column], rows: Sequence[Any], *, wide: bool = False) -> None:
    """A table with a header line; an empty list prints the header only."""
    table = Table(box=None, pad_edge=False, show_edge=False, header_style="bold")
    shown = [c for c in columns if wide or not c.wide]
    for c in shown:
        table.add_column(c.header, justify=c.justify, no_wrap=True)  # type: ignore[arg-type]
    for row in rows:
        table.add_row(*(_text(c.cell(row)) for c in shown))
    _write_plain(table)


def print_fields(fields: Sequence[tuple[str, object]]) -> None:
    """Key/value lines (a record, a parsed CPID), keys aligned."""
    table = Table(box=None, show_header=False, pad_edge=False, show_edge=False)
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    for key, value in fields:
        table.add_row(key, _text(value))
    _write_plain(table)


def _text(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def emit(
    args: argparse.Namespace,
    data: Any,
    *,
    table: Callable[[bool], None],
    names: Callable[[], Iterable[str]] | None = None,
) -> None:
    """Print ``data`` as JSON, or call ``table(wide)``, or print ``names()``."""
    chosen = fmt(args)
    if chosen == "json":
        print_json(data)
    elif chosen == "name" and names is not None:
        print_names(names())
    else:
        table(chosen == "wide")


# -- human units -------------------------------------------------------------------------------


def ago(seconds: float) -> str:
    """``in 29 days`` / ``3 hours ago`` for a difference in seconds (positive: future)."""
    future = seconds >= 0
    s = abs(seconds)
    for unit, size in (("year", 365 * 86400), ("day", 86400), ("hour", 3600), ("minute", 60)):
        if s >= size:
            n = int(s // size)
            text = f"{n} {unit}{'s' if n != 1 else ''}"
            break
    else:
        n = int(s)
        text = f"{n} second{'s' if n != 1 else ''}"
    return f"in {text}" if future else f"{text} ago"


def when(ts: float | int | None, *, relative: bool = True, now: float | None = None) -> str:
    """A Unix time as ``2026-12-04 10:00:00 UTC (in 29 days)``; ``-`` for None."""
    if ts is None:
        return "-"
    text = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))
    if not relative:
        return text
    return f"{text} ({ago(ts - (time.time() if now is None else now))})"


def size(n: float) -> str:
    """Bytes in human units: ``512 B``, ``1.2 KiB``, ``3.4 GiB``."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def duration(seconds: float) -> str:
    """Seconds in human units: ``850 ms``, ``12.3 s``, ``4 min 5 s``."""
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    m, s = divmod(int(seconds), 60)
    if m < 60:
        return f"{m} min {s} s"
    h, m = divmod(m, 60)
    return f"{h} h {m} min"
