"""A small process supervisor: start children in order, wait until each is ready,
restart a child that dies (with back-off, a bounded number of times), and stop all of
them in reverse order on shutdown.

The restart budget (``max_restarts``) is for a child that keeps dying: once a child has
stayed up for ``stable_s`` (60 s) its count starts again from 0.  A child that used up
its budget is **dead**: an ERROR line names it and its log file, :meth:`Supervisor.components`
(and the ``on_change`` callback, which ``cpi up`` uses to rewrite ``up.json``) shows
``"state": "dead"``, and when the child is ``required`` :meth:`Supervisor.run` stops and
returns 1 (the stack cannot run without it).

``cpi up`` runs etcd, the registries, the resolver and the log signer this way, each as
its own process with its own log file, the way production runs them under systemd or
Kubernetes.  Nothing here knows what the children are.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Child", "Supervisor", "http_ready", "python_argv"]

_log = logging.getLogger(__name__)


def python_argv(*args: str) -> list[str]:
    """Command line running ``cpi ARGS`` with this interpreter (works inside any venv)."""
    return [sys.executable, "-m", "cpi", *args]


def http_ready(url: str, context: ssl.SSLContext | None = None) -> Callable[[], bool]:
    """A readiness probe: ``GET url`` answers 2xx (over TLS with ``context``)."""

    def probe() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=1.0, context=context) as resp:
                return 200 <= int(resp.status) < 300
        except (urllib.error.URLError, OSError, ValueError):
            return False

    return probe


@dataclass
class Child:
    """One supervised process."""

    name: str
    argv: Sequence[str]
    log_file: Path
    ready: Callable[[], bool] | None = None
    env: dict[str, str] = field(default_factory=dict)
    max_restarts: int = 5
    required: bool = True
    """The stack cannot run without it: :meth:`Supervisor.run` stops when it is dead."""
    stable_s: float = 60.0
    """Up this long after a (re)start, the restart budget is renewed."""
    backoff_s: float = 0.5
    """The n-th restart in a row waits ``backoff_s * 2**n`` (at most 30 s) after the previous one."""
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    dead: bool = False
    _next_restart: float = 0.0
    _started: float = 0.0

    @property
    def state(self) -> str:
        """``running``, ``restarting`` (exited, a restart is due), ``dead`` or ``stopped``."""
        if self.dead:
            return "dead"
        if self.running:
            return "running"
        return "restarting" if self.proc is not None else "stopped"

    def describe(self) -> dict[str, object]:
        return {"state": self.state, "restarts": self.restarts, "log": str(self.log_file)}

    def start(self) -> None:
        self._started = time.monotonic()
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_file, "ab") as log:
            log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} starting {self.name}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                list(self.argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **self.env},
                start_new_session=True,  # Ctrl-C reaches the supervisor only; it stops children
            )

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.running:
                raise RuntimeError(f"{self.name} exited during start-up:\n{self.log_tail()}")
            if self.ready is None or self.ready():
                return
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                _log.warning("%s did not stop in %.0f s; killing it", self.name, timeout)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_file.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(text[-lines:])


class Supervisor:
    """Owns children; :meth:`run` blocks until SIGINT/SIGTERM, then stops them in reverse."""

    def __init__(
        self, *, on_change: Callable[[dict[str, dict[str, object]]], None] | None = None
    ) -> None:
        self.children: list[Child] = []
        self._stopping = False
        self.on_change = on_change
        """Called with :meth:`components` when a child is started, restarted or dead."""

    def components(self) -> dict[str, dict[str, object]]:
        """``{name: {"state", "restarts", "log"}}`` for every child."""
        return {c.name: c.describe() for c in self.children}

    def _changed(self) -> None:
        if self.on_change is None:
            return
        try:
            self.on_change(self.components())
        except Exception:  # a status file that cannot be written must not stop supervision
            _log.exception("supervisor: reporting the components' state failed")

    def start(self, child: Child, *, ready_timeout: float = 60.0) -> Child:
        child.start()
        self.children.append(child)
        child.wait_ready(ready_timeout)
        _log.info("%s ready (pid %s)", child.name, child.proc.pid if child.proc else "?")
        self._changed()
        return child

    def _on_signal(self, signum: int, _frame: object) -> None:
        self._stopping = True

    def run(self, *, poll_s: float = 0.5) -> int:
        """Watch the children until told to stop; restart one that dies.

        Returns 0 when stopped by SIGINT/SIGTERM, 1 when a required child is dead.
        """
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            while not self._stopping:
                time.sleep(poll_s)
                for child in self.children:
                    self._check(child)
                dead = [c for c in self.children if c.dead and c.required]
                if dead:
                    _log.error(
                        "the stack cannot run without %s; stopping",
                        ", ".join(c.name for c in dead),
                    )
                    return 1
            return 0
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    def _check(self, child: Child) -> None:
        if self._stopping or child.dead:
            return
        now = time.monotonic()
        if child.running:
            if child.restarts and now - child._started >= child.stable_s:
                _log.info(
                    "%s has been up for %.0f s; its restart budget is renewed",
                    child.name,
                    child.stable_s,
                )
                child.restarts = 0
                self._changed()
            return
        if child.restarts >= child.max_restarts:
            child.dead = True
            _log.error(
                "%s is dead: it exited %d times in a row, each time within %.0f s of its start; "
                "not restarting it (log: %s):\n%s",
                child.name,
                child.restarts + 1,
                child.stable_s,
                child.log_file,
                child.log_tail(),
            )
            self._changed()
            return
        if now < child._next_restart:
            return
        code = child.proc.returncode if child.proc else None
        child.restarts += 1
        delay = min(30.0, child.backoff_s * 2**child.restarts)
        child._next_restart = now + delay
        _log.warning(
            "%s exited (code %s); restart %d/%d",
            child.name,
            code,
            child.restarts,
            child.max_restarts,
        )
        child.start()
        self._changed()

    def stop_all(self) -> None:
        self._stopping = True
        for child in reversed(self.children):
            child.stop()
            _log.info("%s stopped", child.name)
        self.children.clear()
