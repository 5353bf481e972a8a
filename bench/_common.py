"""Shared bench helpers: interleaved rounds, best-of, ratios against a same-run baseline;
a certified namespace and a registry config for benches that run a registry; the CPU
time of a process tree."""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from registry import ca, keyfile
from registry.index import Index, Keys
from schemas import keys
from schemas.keys import Ed25519PrivateKey


def rate(fn: Callable[[], object], n: int) -> float:
    """Operations per second of ``fn`` run ``n`` times."""
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return n / (time.perf_counter() - t0)


def interleaved(cases: Mapping[str, Callable[[], object]], n: int, rounds: int) -> dict[str, float]:
    """Median rate of each case over ``rounds``, the cases taking turns within every round.

    Turn-taking means a noisy neighbour slows every case alike, so the ratios hold
    even when absolute numbers wander.
    """
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            samples[name].append(rate(fn, n))
    return {name: statistics.median(vals) for name, vals in samples.items()}


async def publish_namespace(
    index: Index, tmp: Path, *, root: Ed25519PrivateKey, namespace: str, key_file: str
) -> Ed25519PrivateKey:
    """Certify a fresh registry key for ``namespace`` under ``root`` (``delegate`` and
    ``issue``), write it to ``tmp / key_file`` (0600) and publish its cert and ``/ns/``
    entry, as ``cpi ns publish`` does: what a bench registry needs to serve.  Returns the
    registry key."""
    regkey = keys.generate()
    keyfile.write_private(tmp / key_file, regkey)
    cert = ca.issue_cert(
        issuer_key=root,
        issuer_subject="CN",
        subject=namespace,
        public_key=regkey,
        scopes=["delegate", "issue"],
    )
    await index.put(Keys.cert(keys.kid_of(regkey)), cert.to_json())
    await index.put(Keys.ns(namespace), json.dumps({"kid": keys.kid_of(regkey), "endpoints": []}))
    return regkey


def registry_config(
    *, port: int, etcd: str, namespace: str, key_file: str, **extra: object
) -> dict[str, object]:
    """A ``cpi registry serve`` config for a bench: one namespace, no rate limit."""
    return {
        "host": "127.0.0.1",
        "port": port,
        "instance_id": "bench",
        "etcd": {"endpoints": [etcd]},
        "namespaces": [{"namespace": namespace, "key_file": key_file}],
        "anchor_file": "anchor.json",
        "registrations_per_s": 1e9,
        "registration_burst": 1_000_000,
        **extra,
    }


def proc_cpu(pid: int) -> float:
    """User + system CPU seconds so far of process ``pid`` and every process below it
    (``--workers N``: the worker processes), from Linux ``/proc``."""
    ticks: dict[int, int] = {}
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        ticks[int(entry.name)] = int(fields[11]) + int(fields[12])
        parents[int(entry.name)] = int(fields[1])

    def below(p: int) -> bool:
        while p > 1:
            if p == pid:
                return True
            p = parents.get(p, 0)
        return False

    return sum(t for p, t in ticks.items() if below(p)) / os.sysconf("SC_CLK_TCK")
