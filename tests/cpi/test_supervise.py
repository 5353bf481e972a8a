"""The supervisor behind ``cpi up``: restart budget, dead components, exit status."""

from __future__ import annotations

import logging
import sys
import threading
import time
from pathlib import Path

import pytest

from cpi.supervise import Child, Supervisor


def _child(tmp_path: Path, name: str, code: str, **kw: object) -> Child:
    return Child(name, [sys.executable, "-c", code], tmp_path / f"{name}.log", **kw)  # type: ignore[arg-type]


def test_a_component_that_keeps_dying_is_dead_logged_reported_and_fails_run(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[dict[str, dict[str, object]]] = []
    sup = Supervisor(on_change=seen.append)
    sup.start(_child(tmp_path, "steady", "import time; time.sleep(60)"))
    bad = _child(tmp_path, "resolver", "import time; time.sleep(0.3)", max_restarts=3)
    bad.backoff_s = 0.01
    sup.start(bad)
    try:
        with caplog.at_level(logging.ERROR, logger="cpi.supervise"):
            t0 = time.monotonic()
            rc = sup.run(poll_s=0.05)
        assert rc == 1
        assert time.monotonic() - t0 < 20
        comps = sup.components()
        assert comps["resolver"] == {
            "state": "dead",
            "restarts": 3,
            "log": str(tmp_path / "resolver.log"),
        }
        assert comps["steady"]["state"] == "running"
        assert seen and seen[-1]["resolver"]["state"] == "dead"
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert any("resolver is dead" in m and str(tmp_path / "resolver.log") in m for m in errors)
        assert any("cannot run without resolver" in m for m in errors)
    finally:
        sup.stop_all()


def _run_for(sup: Supervisor, seconds: float) -> int:
    """``sup.run()`` in this (the main) thread, told to stop after ``seconds``."""
    timer = threading.Timer(seconds, lambda: setattr(sup, "_stopping", True))
    timer.start()
    try:
        return sup.run(poll_s=0.05)
    finally:
        timer.cancel()


def test_an_optional_dead_component_does_not_stop_the_stack(tmp_path: Path) -> None:
    sup = Supervisor()
    sup.start(
        _child(
            tmp_path,
            "demo",
            "import time; time.sleep(0.2)",
            max_restarts=1,
            required=False,
            backoff_s=0.01,
        )
    )
    try:
        assert _run_for(sup, 3.0) == 0  # ran until told to stop
        assert sup.components()["demo"]["state"] == "dead"
    finally:
        sup.stop_all()


def test_the_restart_budget_is_renewed_after_a_stable_period(tmp_path: Path) -> None:
    # dies 0.6 s after each start: with stable_s=0.4 each run counts as stable, so the
    # budget of 2 restarts is renewed every time and the child is never given up
    child = _child(
        tmp_path,
        "flaky",
        "import time; time.sleep(0.6)",
        max_restarts=2,
        stable_s=0.4,
        backoff_s=0.01,
    )
    sup = Supervisor()
    sup.start(child)
    try:
        assert _run_for(sup, 4.0) == 0
        assert not child.dead
        assert child.restarts <= 1
        assert (tmp_path / "flaky.log").read_text().count("starting flaky") >= 4
    finally:
        sup.stop_all()


def test_cpi_up_writes_components_to_up_json(tmp_path: Path) -> None:
    import json
    import stat

    from cpi.up import _report_components

    sup = Supervisor()
    path = tmp_path / "up.json"
    up_json: dict[str, object] = {"etcd": ["http://127.0.0.1:1"]}
    try:
        sup.start(_child(tmp_path, "etcd", "import time; time.sleep(60)"))
        _report_components(sup, up_json, path)
        sup.start(
            _child(tmp_path, "demo", "import time; time.sleep(0.3)", max_restarts=0, required=False)
        )
        doc = json.loads(path.read_text())
        assert doc["etcd"] == ["http://127.0.0.1:1"]
        assert doc["components"]["etcd"]["state"] == "running"
        assert set(doc["components"]) == {"etcd", "demo"}
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert _run_for(sup, 1.0) == 0
        doc = json.loads(path.read_text())
        assert doc["components"]["demo"] == {
            "state": "dead",
            "restarts": 0,
            "log": str(tmp_path / "demo.log"),
        }
    finally:
        sup.stop_all()
