"""Small helpers shared by the command modules."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from cpi.errors import UsageError


def read_input(path: str) -> bytes:
    """Read a file, or stdin when ``path`` is ``-``."""
    if path == "-":
        return sys.stdin.buffer.read()
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise UsageError(f"{path}: {exc.strerror}") from exc


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def parse_labels(items: list[str], *, colon_alias: bool = True) -> tuple[tuple[str, str], ...]:
    """``--label K=V`` (repeatable) as pairs.  ``K:V`` is a deprecated alias kept for
    ``cpi discover`` and ``cpi claim`` (a warning on stderr says so)."""
    out = []
    for item in items:
        k, sep, v = item.partition("=")
        if not sep and colon_alias and ":" in item:
            k, _, v = item.partition(":")
            print(
                f"cpi: warning: --label {item!r}: K:V is deprecated, write {k}={v}",
                file=sys.stderr,
            )
        elif not sep:
            raise UsageError(f"--label {item!r}: expected KEY=VALUE")
        if not k:
            raise UsageError(f"--label {item!r}: the key is empty")
        out.append((k, v))
    return tuple(out)


def add_filter_arguments(parser: argparse.ArgumentParser, *, live: bool = True) -> None:
    """The discovery filters shared by ``cpi discover``, ``cpi watch`` and ``cpi claim``."""
    parser.add_argument("--kind", help="CPU, GPU, NPU, CLU, STO, NET or SVC")
    parser.add_argument("--within", metavar="NS", help="namespace, e.g. CN.31 (segment-wise)")
    parser.add_argument("--accelerator", metavar="MODEL", help="accelerator model, e.g. H100")
    parser.add_argument("--min-free", type=int, metavar="N", help="at least N free units")
    parser.add_argument("--near", metavar="REGION", help="GB/T 2260 region code, e.g. 31")
    parser.add_argument("--max-latency-ms", type=float, metavar="MS", help="needs --near")
    parser.add_argument(
        "--label",
        action="append",
        default=[],
        metavar="K=V",
        help="label filter K=V (repeatable; K:V still works but is deprecated)",
    )
    if live:
        parser.add_argument(
            "--live", action="store_true", default=None, help="only entries with a live status"
        )
