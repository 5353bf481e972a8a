"""Pure helpers shared by the service config loaders (``registry.config``, ``resolver.config``).

Each loader layers a JSON file, then the environment, then command-line flags, later
ones winning.  Reading the file and ``os.environ`` stays in the loaders; the functions
here only turn those inputs into the raw dictionary a pydantic model validates, and
every problem into a :class:`~schemas.errors.ConfigError`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from schemas import _json
from schemas.errors import ConfigError

__all__ = [
    "apply_overrides",
    "config_object",
    "parse_listen",
    "resolve_path",
    "set_dotted",
    "split_list",
    "validate_config",
]

M = TypeVar("M", bound=BaseModel)


def config_object(data: bytes, *, source: str) -> dict[str, Any]:
    """The JSON object in a config file's bytes (*source* names the file in errors)."""
    try:
        loaded = _json.loads(data)  # the same strict, depth-bounded reader as documents
    except ValueError as exc:
        raise ConfigError(f"{source}: not valid JSON: {exc}") from exc
    if not isinstance(loaded, dict):
        raise ConfigError(f"{source}: expected a JSON object, got {type(loaded).__name__}")
    return loaded


def parse_listen(text: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` -> ``(host, port)``."""
    m = re.fullmatch(r"\[([^\]]+)\]:(\d+)|([^:\[\]]+):(\d+)", text.strip())
    if not m:
        raise ConfigError(f"listen address {text!r}: expected host:port (or [v6-address]:port)")
    host = m.group(1) or m.group(3)
    port = int(m.group(2) or m.group(4))
    if port > 65535:
        raise ConfigError(f"listen address {text!r}: port {port} is above 65535")
    return host, port


def split_list(text: str) -> list[str]:
    """The items of a comma- or space-separated list (as in ``CPI_ETCD_ENDPOINTS``)."""
    return [e for e in re.split(r"[,\s]+", text) if e]


def resolve_path(base: Path, value: Any) -> Any:
    """A relative path from a config file, joined to *base* (the file's directory).

    Absolute paths come back as strings unchanged; anything else that is not a non-empty
    path is returned as it is, for validation to report.
    """
    if isinstance(value, str | os.PathLike) and os.fspath(value):
        p = Path(value)
        return str(p if p.is_absolute() else base / p)
    return value


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """``data["a"]["b"] = value`` for ``"a.b"``, creating (or replacing) non-dict parents."""
    node = data
    *parents, last = dotted.split(".")
    for part in parents:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[last] = value


def apply_overrides(data: dict[str, Any], overrides: Mapping[str, Any] | None) -> None:
    """Set every dotted field of *overrides* (command-line flags) that is not ``None``."""
    for dotted, value in (overrides or {}).items():
        if value is not None:
            set_dotted(data, dotted, value)


def validate_config(model: type[M], data: Mapping[str, Any], *, source: str, what: str) -> M:
    """*data* validated as *model*; a :class:`ConfigError` names *source* and each bad field."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{source}: invalid {what}: {_describe(exc)}") from exc


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:8]:
        where = ".".join(str(p) for p in err["loc"]) or "config"
        msg = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
        parts.append(f"{where}: {msg.removeprefix('Value error, ')}")
    return "; ".join(parts)
