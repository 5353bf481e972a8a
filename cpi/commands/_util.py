"""Small helpers shared by the command modules."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from schemas.errors import InvalidDataError


def read_input(path: str) -> bytes:
    """Read a file, or stdin when ``path`` is ``-``."""
    if path == "-":
        return sys.stdin.buffer.read()
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise InvalidDataError(f"{path}: {exc.strerror}") from exc


def print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, ensure_ascii=False))


def add_filter_arguments(parser: argparse.ArgumentParser, *, live: bool = True) -> None:
    """The discovery filters shared by ``cpi discover``, ``cpi watch`` and ``cpi claim``."""
    parser.add_argument("--kind", help="CPU, GPU, NPU, CLU, STO, NET or SVC")
    parser.add_argument("--within", metavar="NS", help="namespace, e.g. CN.31 (segment-wise)")
    parser.add_argument("--accelerator", metavar="MODEL", help="accelerator model, e.g. H100")
    parser.add_argument("--min-free", type=int, metavar="N", help="at least N free units")
    parser.add_argument("--near", metavar="REGION", help="GB/T 2260 region code, e.g. 31")
    parser.add_argument("--max-latency-ms", type=float, metavar="MS", help="needs --near")
    parser.add_argument(
        "--label", action="append", default=[], metavar="K:V", help="label filter (repeatable)"
    )
    if live:
        parser.add_argument(
            "--live", action="store_true", default=None, help="only entries with a live status"
        )
