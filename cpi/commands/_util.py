"""Small helpers shared by the command modules."""

from __future__ import annotations

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
