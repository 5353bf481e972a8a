"""Several processes of one service on one port (``--workers N``, ``SO_REUSEPORT``).

:func:`run_workers` starts ``N`` spawned processes running ``target(number, verbose,
parent_sentinel)``; the kernel hands each new connection to one of them.  SIGTERM or
SIGINT stops them all cleanly; if one exits on its own, the others are stopped too and
the result is 1.  Each process watches the parent's sentinel (:func:`watch_parent`), so
a killed parent does not leave them serving.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import multiprocessing.connection
import signal
from collections.abc import Callable
from types import FrameType

__all__ = ["parent_sentinel", "run_workers", "watch_parent"]

_log = logging.getLogger("cpi.workers")

Target = Callable[[int, bool], None]


def run_workers(target: Target, count: int, *, name: str, where: str) -> int:
    """Run ``count`` processes of ``target(number, verbose)`` until SIGTERM or SIGINT;
    0 after a signal, 1 when a process exited by itself (the others are then stopped).
    ``name``: the processes' name prefix; ``where``: the URL, for the log."""
    ctx = multiprocessing.get_context("spawn")
    verbose = logging.getLogger().isEnabledFor(logging.DEBUG)
    procs = [
        ctx.Process(target=target, args=(i, verbose), name=f"{name}-{i}") for i in range(count)
    ]
    stopping = False

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for p in procs:
            if p.is_alive():
                p.terminate()  # SIGTERM: each stops cleanly

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        for p in procs:
            p.start()
        _log.info("%d %s processes on %s", len(procs), name, where)
        multiprocessing.connection.wait([p.sentinel for p in procs])
        if not stopping:
            failed = [p for p in procs if p.exitcode is not None]
            _log.error(
                "%s exited (code %s); stopping the others", failed[0].name, failed[0].exitcode
            )
            stop(signal.SIGTERM, None)
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0 if stopping else 1


def parent_sentinel() -> int | None:
    """The parent's sentinel when this is a process of :func:`run_workers`, else None."""
    parent = multiprocessing.parent_process()
    return parent.sentinel if parent is not None else None


def watch_parent(sentinel: int | None, stop: asyncio.Event) -> Callable[[], None]:
    """Set ``stop`` when the parent is gone (``sentinel`` readable); returns the undo."""
    if sentinel is None:
        return lambda: None
    loop = asyncio.get_running_loop()

    def gone() -> None:
        if not stop.is_set():
            _log.warning("the parent process is gone (killed?); stopping")
            stop.set()

    loop.add_reader(sentinel, gone)

    def undo() -> None:
        loop.remove_reader(sentinel)

    return undo
