"""``cpi --log-format`` / ``CPI_LOG_FORMAT``: the formatters and the option, through the
real command line."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cpi import logfmt
from schemas.observe import REQUEST_ID

ROOT = Path(__file__).resolve().parents[2]


def record(msg: str = "hello %s", *args: object, **extra: object) -> logging.LogRecord:
    rec = logging.LogRecord(
        "registry.service", logging.INFO, __file__, 1, msg, args or ("x",), None
    )
    rec.__dict__.update(extra)
    return rec


def test_json_lines_carry_the_known_fields() -> None:
    token = REQUEST_ID.set("req-7")
    try:
        line = logfmt.JsonFormatter().format(
            record(
                cpid="CN.31.CMCC/GPU.X", route="/v1/registrations", status=201, outcome="created"
            )
        )
    finally:
        REQUEST_ID.reset(token)
    obj = json.loads(line)
    assert obj["message"] == "hello x" and obj["level"] == "INFO"
    assert obj["logger"] == "registry.service" and obj["time"].endswith("Z")
    assert obj["request_id"] == "req-7" and obj["status"] == 201
    assert obj["cpid"] == "CN.31.CMCC/GPU.X" and obj["outcome"] == "created"
    plain = json.loads(logfmt.JsonFormatter().format(record()))
    assert set(plain) == {"time", "level", "logger", "message"}  # outside a request
    try:
        raise ValueError("boom")
    except ValueError:
        rec = record()
        rec.exc_info = sys.exc_info()
    assert "ValueError: boom" in json.loads(logfmt.JsonFormatter().format(rec))["exception"]
    text = logfmt.TextFormatter().format(record(route="/healthz", status=200))
    assert text.endswith("registry.service: hello x route=/healthz status=200")


def test_format_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(logfmt.ENV, raising=False)
    assert logfmt.log_format(None) == "text"
    monkeypatch.setenv(logfmt.ENV, "JSON")
    assert logfmt.log_format(None) == "json"
    assert logfmt.log_format("text") == "text"  # the option wins
    monkeypatch.setenv(logfmt.ENV, "xml")
    with pytest.raises(ValueError, match="unknown log format"):
        logfmt.log_format(None)


def run_cpi(*argv: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if k != logfmt.ENV}
    full.update(PYTHONPATH=str(ROOT), **env)
    return subprocess.run(
        [sys.executable, "-m", "cpi", *argv], capture_output=True, text=True, env=full, timeout=60
    )


def test_cli_env_and_option(tmp_path: Path) -> None:
    # (tests/resolver/audit/test_log_metrics.py reads a running signer's JSON lines)
    bad = run_cpi("demo", env={"CPI_LOG_FORMAT": "yaml"})
    assert bad.returncode == 2 and "unknown log format 'yaml'" in bad.stderr
    bad = run_cpi("--log-format", "yaml", "demo", env={})
    assert bad.returncode == 2 and "invalid choice" in bad.stderr
    ok = run_cpi("demo", env={"CPI_LOG_FORMAT": "json"})
    assert ok.returncode == 0, ok.stderr
    for line in ok.stderr.splitlines():  # whatever it logs is JSON
        assert {"time", "level", "logger", "message"} <= set(json.loads(line))
