"""Log formats of the ``cpi`` processes: text (the default) or one JSON object per line.

``cpi --log-format json`` (or ``CPI_LOG_FORMAT=json``) writes each record as
``{"time", "level", "logger", "message"}`` plus, when known, ``request_id`` (from the
services' request context, :data:`schemas.observe.REQUEST_ID`), ``cpid``, ``route``, ``status`` and ``outcome``
(given by the code as ``extra=``).  Text lines carry the same fields as ``key=value``
after the message.  Nothing here adds request headers or bodies: a token or password
appears in a log line only if code puts it in a message, which the tests look for.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
from typing import Final

from schemas.observe import REQUEST_ID

__all__ = ["FORMATS", "JsonFormatter", "TextFormatter", "configure", "log_format"]

FORMATS: Final = ("text", "json")
ENV: Final = "CPI_LOG_FORMAT"
_FIELDS: Final = ("cpid", "route", "status", "outcome")


def _context(record: logging.LogRecord) -> dict[str, object]:
    out: dict[str, object] = {}
    rid = getattr(record, "request_id", None)
    if rid is None:
        rid = REQUEST_ID.get()
    if rid is not None:
        out["request_id"] = rid
    for name in _FIELDS:
        value = getattr(record, name, None)
        if value is not None:
            out[name] = value
    return out


class TextFormatter(logging.Formatter):
    """``time LEVEL logger: message key=value ...`` (the fields known for the record)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = _context(record)
        if not fields:
            return text
        head, sep, tail = text.partition("\n")  # fields on the first line, before a traceback
        return head + "".join(f" {k}={v}" for k, v in fields.items()) + sep + tail


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, fields."""

    def format(self, record: logging.LogRecord) -> str:
        when = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
        obj: dict[str, object] = {
            "time": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        obj.update(_context(record))
        if record.exc_info:
            obj["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            obj["exception"] = record.exc_text
        if record.stack_info:
            obj["stack"] = self.formatStack(record.stack_info)
        return json.dumps(obj, ensure_ascii=False, default=str)


def log_format(given: str | None) -> str:
    """The format to use: ``given`` (the ``--log-format`` option), else ``$CPI_LOG_FORMAT``,
    else text.  Raises ``ValueError`` for an unknown name."""
    name = (given or os.environ.get(ENV) or "text").strip().lower()
    if name not in FORMATS:
        raise ValueError(f"unknown log format {name!r} (use one of: {', '.join(FORMATS)})")
    return name


def configure(*, level: int, fmt: str) -> None:
    """Send the root logger's records to stderr in ``fmt``, like :func:`logging.basicConfig`:
    nothing happens when the root logger already has handlers (a test's capture, an
    earlier call in the same process)."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    logging.basicConfig(level=level, handlers=[handler])
