"""Check the transparency log with ``cpi audit log`` and publish the verdict as
Prometheus metrics through node_exporter's textfile collector.

The log signer serves no metrics of its own, and the log is best watched from outside
anyway, as an auditor sees it: through a resolver, against the log's verifier key.
``deploy/systemd/cpi-log-check.timer`` runs this every minute; the alerts
``CPILogAlarm``, ``CPILogCheckFailing`` and ``CPILogNotAdvancing`` of
``deploy/prometheus/alerts.yaml`` read what it writes::

    python cpi_log_check.py --out /var/lib/prometheus/node-exporter/cpi_log.prom -- \\
        --resolver http://127.0.0.1:8700 --anchor /etc/cpi/anchor.json --state STATE

Arguments after ``--`` go to ``cpi audit log`` (``--json`` is added).  The exit code is
``cpi audit log``'s: 0 verified, 1 failed (alarm or unreachable).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

METRICS = {
    "cpi_log_check_success": ("gauge", "1 when the last check verified the log, else 0"),
    "cpi_log_check_alarm": (
        "gauge",
        "1 when the last check found a rollback or a split view (TRANSPARENCY LOG ALARM)",
    ),
    "cpi_log_check_timestamp_seconds": ("gauge", "when the last check ran (Unix seconds)"),
    "cpi_log_tree_size": ("gauge", "entries in the latest verified checkpoint"),
    "cpi_log_checkpoint_timestamp_seconds": (
        "gauge",
        "when the log signed the latest verified checkpoint (cpi-timestamp, Unix seconds)",
    ),
}


def render(report: dict[str, Any] | None, *, now: float) -> str:
    """The textfile for a ``cpi audit log --json`` report (``None``: no report)."""
    values: dict[str, float] = {
        "cpi_log_check_success": 1 if report and report.get("ok") is True else 0,
        "cpi_log_check_alarm": 1 if report and report.get("alarm") else 0,
        "cpi_log_check_timestamp_seconds": round(now, 3),
    }
    checkpoint = (report or {}).get("checkpoint") or {}
    if report and report.get("ok") is True and checkpoint:
        values["cpi_log_tree_size"] = int(checkpoint["size"])
        if checkpoint.get("timestamp") is not None:
            values["cpi_log_checkpoint_timestamp_seconds"] = int(checkpoint["timestamp"])
    lines = []
    for name, value in values.items():
        kind, text = METRICS[name]
        shown = repr(value) if isinstance(value, float) else str(value)
        lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}", f"{name} {shown}"]
    return "\n".join(lines) + "\n"


def write_atomically(path: Path, text: str) -> None:
    """Replace ``path`` at once (the collector never reads half a file)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="the .prom file to write")
    parser.add_argument("--cpi", default="cpi", help="the cpi command (default: on PATH)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds (120)")
    parser.add_argument("audit_args", nargs="*", help="arguments of cpi audit log, after --")
    args = parser.parse_args(argv)
    try:
        run = subprocess.run(
            [args.cpi, "audit", "log", "--json", *args.audit_args],
            capture_output=True,
            text=True,
            timeout=args.timeout,
            check=False,
        )
        code, out, err = run.returncode, run.stdout, run.stderr
    except (OSError, subprocess.TimeoutExpired) as exc:
        code, out, err = 1, "", str(exc)
    try:
        report = json.loads(out)
        report = report if isinstance(report, dict) else None
    except ValueError:
        report = None
    write_atomically(args.out, render(report, now=time.time()))
    if code != 0:
        sys.stderr.write(err)
    return code


if __name__ == "__main__":
    sys.exit(main())
