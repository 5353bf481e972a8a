"""deploy/grafana/cpi.json and deploy/prometheus/: valid dashboard JSON and alert
rules whose every metric exists in the code (registry/, resolver/, schemas/, the log check), and
the log check's textfile output."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "cpi.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yaml"
LOG_CHECK = ROOT / "deploy" / "prometheus" / "cpi_log_check.py"

_CONSTRUCTOR = re.compile(
    r"\b(Counter|Gauge|Histogram|Summary|CounterMetricFamily|GaugeMetricFamily"
    r"|HistogramMetricFamily)\(\s*\"(cpi_[a-z0-9_]+)\"",
)
_SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
}
# families that need not be on the dashboard (each with the reason)
NOT_ON_DASHBOARD = {
    "cpi_resolver_revision": "an etcd revision means little as a graph; the lag panel shows it",
    "cpi_resolver_dns_cached": "cache size: tuning detail",
}


def load_log_check() -> ModuleType:
    spec = importlib.util.spec_from_file_location("cpi_log_check", LOG_CHECK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def dns_counters() -> dict[str, str]:
    """``cpi_resolver_dns_<key>`` for the keys of the DNS front end's ``stats()``."""
    metrics = (ROOT / "resolver" / "metrics.py").read_text()
    assert 'name = f"cpi_resolver_dns_{key}"' in metrics, "the DNS export changed: update this"
    gauges = set(
        re.findall(r"\"(\w+)\"", re.search(r"_DNS_GAUGES = frozenset\(\{(.*?)\}", metrics)[1])  # type: ignore[index]
    )
    keys: set[str] = set()
    for path in (ROOT / "resolver" / "dns").glob("*.py"):
        for body in re.findall(r"def stats\(self\).*?\n\n", path.read_text(), flags=re.S):
            keys |= set(re.findall(r"\"([a-z_]+)\":", body))
            keys |= set(re.findall(r"out\[\"([a-z_]+)\"\]", body))
    assert {"queries", "rrl_limited", "tcp_open"} <= keys
    return {f"cpi_resolver_dns_{k}": "gauge" if k in gauges else "counter" for k in keys}


def families() -> dict[str, str]:
    """Every metric family the code defines: ``{name: type}``."""
    found: dict[str, str] = {}
    for package in ("registry", "resolver", "schemas"):
        for path in (ROOT / package).rglob("*.py"):
            for ctor, name in _CONSTRUCTOR.findall(path.read_text()):
                found[name] = ctor.removesuffix("MetricFamily").lower()
    found |= dns_counters()
    found |= {name: kind for name, (kind, _) in load_log_check().METRICS.items()}
    assert len(found) > 40
    return found


def exposed() -> set[str]:
    """The sample names Prometheus sees for those families."""
    return {name + s for name, kind in families().items() for s in _SUFFIXES[kind]}


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\b(cpi_[a-z0-9_]+)", expr))


def family_of(sample: str, names: dict[str, str]) -> str:
    for suffix in ("_total", "_bucket", "_sum", "_count", "_created", ""):
        base = sample.removesuffix(suffix) if suffix else sample
        if base in names:
            return base
    raise AssertionError(sample)


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    data = json.loads(DASHBOARD.read_text())
    assert isinstance(data, dict)
    return data


def test_dashboard_is_grafana_json(dashboard: dict[str, Any]) -> None:
    assert isinstance(dashboard["schemaVersion"], int) and dashboard["schemaVersion"] >= 36
    assert dashboard["title"] and dashboard["uid"] and dashboard["panels"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)) and all(isinstance(i, int) for i in ids)
    cells: set[tuple[int, int]] = set()
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert all(isinstance(grid[k], int) for k in ("h", "w", "x", "y")), panel["title"]
        assert grid["w"] > 0 and grid["h"] > 0 and grid["x"] + grid["w"] <= 24
        mine = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not mine & cells, f"panel {panel['title']!r} overlaps another"
        cells |= mine
        if panel["type"] == "row":
            continue
        assert panel["type"] in ("timeseries", "stat") and panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}"
        targets = panel["targets"]
        assert targets, panel["title"]
        assert len({t["refId"] for t in targets}) == len(targets)
        for target in targets:
            assert target["expr"].strip() and metric_names(target["expr"]), panel["title"]


def test_dashboard_metrics_exist_and_cover_the_code(dashboard: dict[str, Any]) -> None:
    names = families()
    known = exposed()
    used: set[str] = set()
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            for sample in metric_names(target["expr"]):
                assert sample in known, f"{panel['title']!r}: no metric {sample} in the code"
                used.add(family_of(sample, names))
    # every family the code defines is on the dashboard (or listed above with a reason);
    # the DNS rcode counters are many and shown as the query total
    missing = {
        n for n in names if n not in used and not n.startswith("cpi_resolver_dns_rcode_")
    } - set(NOT_ON_DASHBOARD)
    assert not missing, f"metrics not on deploy/grafana/cpi.json: {sorted(missing)}"


@pytest.fixture(scope="module")
def rules() -> list[dict[str, Any]]:
    data = yaml.safe_load(ALERTS.read_text())
    return [rule for group in data["groups"] for rule in group["rules"]]


def test_alert_rules_are_complete(rules: list[dict[str, Any]]) -> None:
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names))
    for rule in rules:
        assert set(rule) == {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
        assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]
        assert rule["labels"]["severity"] in ("critical", "warning")
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
        assert str(rule["expr"]).count("(") == str(rule["expr"]).count(")")
    # the conditions docs/operations.md tells operators to watch
    for wanted in (
        "CPIResolverReplicaStale",
        "CPIVerificationFailures",
        "CPIRegistryCannotSign",
        "CPIEtcdUnreachable",
        "CPILogNotAdvancing",
    ):
        assert wanted in names
    operations = (ROOT / "docs" / "operations.md").read_text()
    assert all(name in operations for name in names), "every alert explained in operations.md"


def test_alert_metrics_exist(rules: list[dict[str, Any]]) -> None:
    known = exposed()
    for rule in rules:
        used = metric_names(rule["expr"])
        assert used or "up{" in rule["expr"], rule["alert"]
        assert used <= known, f"{rule['alert']}: unknown {sorted(used - known)}"


def test_promtool_check_rules() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (optional: apt-get install prometheus)")
    run = subprocess.run(
        [promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stdout + run.stderr


def test_log_check_textfile(tmp_path: Path) -> None:
    module = load_log_check()
    ok = {
        "ok": True,
        "alarm": None,
        "checkpoint": {"origin": "o", "size": 42, "root": "ab", "timestamp": 1_700_000_000},
        "checks": [],
    }
    parsed = {
        s.name: s.value
        for f in text_string_to_metric_families(module.render(ok, now=1_700_000_100.5))
        for s in f.samples
    }
    assert parsed == {
        "cpi_log_check_success": 1,
        "cpi_log_check_alarm": 0,
        "cpi_log_check_timestamp_seconds": 1_700_000_100.5,
        "cpi_log_tree_size": 42,
        "cpi_log_checkpoint_timestamp_seconds": 1_700_000_000,
    }
    alarm = {**ok, "ok": False, "alarm": "split view"}
    text = module.render(alarm, now=1.0)
    assert "cpi_log_check_alarm 1" in text and "cpi_log_tree_size" not in text
    assert "cpi_log_check_success 0" in module.render(None, now=1.0)

    # the script end to end, with a stand-in for cpi that prints a report
    fake = tmp_path / "cpi"
    fake.write_text(f"#!/bin/sh\necho '{json.dumps(ok)}'\n")
    fake.chmod(0o755)
    out = tmp_path / "cpi_log.prom"
    assert module.main(["--out", str(out), "--cpi", str(fake), "--", "--state", "s"]) == 0
    assert "cpi_log_tree_size 42" in out.read_text()
    assert oct(out.stat().st_mode & 0o777) == "0o644"
    missing = tmp_path / "no-such-cpi"
    assert module.main(["--out", str(out), "--cpi", str(missing)]) == 1
    assert "cpi_log_check_success 0" in out.read_text()
