"""The log signer's metrics: in process, and ``cpi --log-format json log sign
--metrics-port --metrics-textfile`` as a real process against a real etcd."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from registry.index import Index, Keys
from registry.logsigner import LogSigner, SignerMetrics, init_log_key
from schemas.errors import LogConsistencyError
from tests.resolver.audit.audit_kit import Kit
from tests.resolver.audit.test_log import ORIGIN, register_some

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture
def kit(tmp_path: Path) -> Kit:
    return Kit(tmp_path)


def values(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.startswith("cpi_log_signer"):
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                out[s.name + (f"{{{labels}}}" if labels else "")] = s.value
    return out


async def test_signer_metrics_follow_signing_and_the_alarm(
    index: Index, kit: Kit, tmp_path: Path
) -> None:
    key, _, _ = init_log_key(tmp_path / "log.key", origin=ORIGIN)
    metrics = SignerMetrics()
    signer = LogSigner(index, key, origin=ORIGIN, metrics=metrics, clock=lambda: 1_700_000_000.0)
    await register_some(index, kit, 2)
    ticks: list[dict[str, float]] = []
    task = asyncio.create_task(
        signer.run(interval=0.05, on_tick=lambda: ticks.append(values(metrics.render().decode())))
    )
    for _ in range(300):
        if ticks and ticks[-1].get("cpi_log_signer_tree_size") == 2:
            break
        await asyncio.sleep(0.02)
    got = values(metrics.render().decode())
    assert got["cpi_log_signer_tree_size"] == 2
    assert got["cpi_log_signer_audit_entries"] == 2
    assert got["cpi_log_signer_checkpoints_total"] == 1
    assert got["cpi_log_signer_last_sign_timestamp_seconds"] == 1_700_000_000
    assert got["cpi_log_signer_alarm"] == 0
    await register_some(index, kit, 3)
    for _ in range(300):
        if values(metrics.render().decode())["cpi_log_signer_tree_size"] == 5:
            break
        await asyncio.sleep(0.02)
    assert values(metrics.render().decode())["cpi_log_signer_checkpoints_total"] == 2
    await index.put(Keys.audit(1), b'{"seq":1,"op":"register","digest":"00","time":0}')
    with pytest.raises(LogConsistencyError):
        await asyncio.wait_for(task, 10)
    got = values(metrics.render().decode())
    assert got["cpi_log_signer_alarm"] == 1
    assert got["cpi_log_signer_errors_total{kind=rewritten}"] == 1
    assert ticks[-1]["cpi_log_signer_alarm"] == 1  # the last tick saw the alarm
    assert "process_cpu_seconds_total" in metrics.render().decode()


async def test_cli_log_sign_serves_metrics_and_logs_json(
    index: Index, kit: Kit, tmp_path: Path, etcd_server: Any
) -> None:
    await register_some(index, kit, 3)
    textfile = tmp_path / "prom" / "cpi_log_signer.prom"
    textfile.parent.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("CPI_LOG_FORMAT", None)
    proc = await asyncio.to_thread(
        subprocess.Popen,
        [
            sys.executable,
            "-m",
            "cpi",
            "--log-format",
            "json",
            "log",
            "sign",
            "--etcd",
            etcd_server.endpoint,
            "--key",
            str(tmp_path / "log.key"),
            "--origin",
            ORIGIN,
            "--interval",
            "0.1",
            "--metrics-port",
            "127.0.0.1:0",
            "--metrics-textfile",
            str(textfile),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=tmp_path,
    )
    try:
        assert proc.stdout is not None
        url = None
        for _ in range(5):
            line = (await asyncio.to_thread(proc.stdout.readline)).decode()
            found = re.search(r"metrics at (http://\S+)", line)
            if found:
                url = found[1]
                break
        assert url is not None and url.startswith("http://127.0.0.1:")

        def scrape() -> dict[str, float]:
            with urllib.request.urlopen(url, timeout=5) as resp:
                return values(resp.read().decode())

        got: dict[str, float] = {}
        for _ in range(200):
            got = await asyncio.to_thread(scrape)
            if got.get("cpi_log_signer_tree_size") == 3:
                break
            await asyncio.sleep(0.05)
        assert got["cpi_log_signer_tree_size"] == 3 and got["cpi_log_signer_audit_entries"] == 3
        assert got["cpi_log_signer_checkpoints_total"] == 1
        assert got["cpi_log_signer_last_sign_timestamp_seconds"] > 1_700_000_000
        for _ in range(100):
            if textfile.exists() and "cpi_log_signer_tree_size 3.0" in textfile.read_text():
                break
            await asyncio.sleep(0.05)
        assert "cpi_log_signer_tree_size 3.0" in textfile.read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.to_thread(proc.communicate, timeout=30)
    assert proc.returncode == 0, err.decode()
    lines = [json.loads(line) for line in err.decode().splitlines() if line.strip()]
    assert lines and all({"time", "level", "logger", "message"} <= set(x) for x in lines)
    assert any("signed checkpoint at size 3" in x["message"] for x in lines), lines
