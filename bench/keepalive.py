"""A long busy-and-idle run of a registry and a resolver against one etcd, counting
gRPC ``GOAWAY`` frames (``ENHANCE_YOUR_CALM`` / ``too_many_pings``).

    python bench/keepalive.py [--minutes 10] [--busy 60] [--idle 90] [--nodes 200]
                              [--provoke]

Starts etcd (``cpi.etcdproc``, ``--log-level debug`` so its gRPC server logs what it
refuses), writes ``--records`` signed records with statuses (``bench/scale.py``'s
writer), and runs the real ``cpi registry serve`` and ``cpi resolver serve`` as
processes, with ``GRPC_VERBOSITY=debug`` so the gRPC core of each logs every GOAWAY it
receives.  Then it alternates phases for ``--minutes``:

* **busy** (``--busy`` s): the resolver is restarted (a cold start: the full listing,
  where the original GOAWAYs were seen), ``--nodes`` nodes heartbeat every second over
  HTTP (a capacity change now and then, so live writes reach etcd), a few
  re-register, and lookups go to the resolver (which follows every write on its
  watch);
* **idle** (``--idle`` s): nothing at all: only the registry's lease keep-alive and
  the resolver's watch stay open, which is when a client that pings too often is told
  off.

At the end it scans the registry's, the resolver's and etcd's logs for ``GOAWAY``,
``too_many_pings`` and ``too many pings`` and prints the count per log (target: 0).
``--provoke`` also runs, for 12 s of the first busy phase, a gRPC client that pings
every second without an open call (what etcd punishes), logging to ``provoke.log``: the
scan must then find GOAWAYs, which shows it would see them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aiohttp

from bench._common import publish_namespace, registry_config
from bench.heartbeat import Node
from bench.register import start_registry, wait_ready
from bench.resolve import Server, World
from bench.scale import write_index
from cpi.etcdproc import EtcdProcess, free_port
from registry import tokens
from registry.index import Index

NAMESPACE = "CN.99"  # the registry's own; the written records are under bench.resolve's

PROVOKE = """
import asyncio, sys, grpc.aio
async def main():
    options = [("grpc.keepalive_time_ms", 1000), ("grpc.keepalive_permit_without_calls", 1),
               ("grpc.http2.max_pings_without_data", 0)]
    channel = grpc.aio.insecure_channel(sys.argv[1], options=options)
    await channel.channel_ready()
    await asyncio.sleep(12)
    await channel.close()
asyncio.run(main())
"""

PATTERNS = {
    "GOAWAY": re.compile(rb"goaway", re.IGNORECASE),
    "too_many_pings": re.compile(rb"too_many_pings|too many pings", re.IGNORECASE),
}


def start_provoke(endpoint: str, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-c", PROVOKE, endpoint], stdout=out, stderr=subprocess.STDOUT
        )


def scan(path: Path) -> Counter[str]:
    counts: Counter[str] = Counter()
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        return counts
    for line in text.splitlines():
        hit = False
        for name, pattern in PATTERNS.items():
            if pattern.search(line):
                counts[name] += 1
                hit = True
        counts["any"] += hit
    return counts


async def busy_phase(
    session: aiohttp.ClientSession,
    registry: str,
    resolver: str,
    token: str,
    nodes: list[Node],
    seconds: float,
) -> Counter[str]:
    outcomes: Counter[str] = Counter()
    end = time.monotonic() + seconds

    async def node_loop(node: Node) -> None:
        await asyncio.sleep(random.random())
        while time.monotonic() < end:
            if random.random() < 0.01:
                url, body = f"{registry}/v1/registrations", node.register()
                headers = {"Authorization": f"Bearer {token}"}
                async with session.post(url, data=body, headers=headers) as resp:
                    await resp.read()
                    outcomes[f"register {resp.status}"] += 1
            else:
                url = f"{registry}/v1/resources/{node.cpid}/status"
                async with session.put(url, data=node.status(0.05)) as resp:
                    await resp.read()
                    outcomes[f"status {resp.status}"] += 1
            async with session.get(f"{resolver}/v1/resources/{node.cpid}") as resp:
                await resp.read()
                outcomes[f"lookup {resp.status}"] += 1
            await asyncio.sleep(1.0)

    await asyncio.gather(*(node_loop(n) for n in nodes))
    return outcomes


async def run(args: argparse.Namespace) -> int:
    os.environ["GRPC_VERBOSITY"] = "debug"  # inherited by the registry and resolver
    with tempfile.TemporaryDirectory(prefix="cpi-bench-ka-") as tmp_name:
        tmp = Path(tmp_name)
        etcd = EtcdProcess(data_dir=tmp / "etcd", extra_args=["--log-level", "debug"])
        etcd.start()
        registry_proc: subprocess.Popen[bytes] | None = None
        provoke: subprocess.Popen[bytes] | None = None
        resolver: Server | None = None
        try:
            etcd.wait_healthy(30)
            world = World(tmp)  # writes tmp/anchor.json
            async with Index(endpoints=[etcd.endpoint], timeout=30) as index:
                await world.publish(index)
                _, _, took = await write_index(index, world, args.records)
                print(f"set-up: {args.records:,} signed records + statuses written in {took:.1f} s")
                await publish_namespace(
                    index, tmp, root=world.root, namespace=NAMESPACE, key_file="cn99.key"
                )
                token = await tokens.create_token(
                    index, namespace=NAMESPACE, ttl_s=int(args.minutes * 60) + 3600
                )
            port = free_port()
            config = registry_config(
                port=port,
                etcd=etcd.endpoint,
                namespace=NAMESPACE,
                key_file="cn99.key",
                heartbeat_s=10,
            )
            (tmp / "registry.json").write_text(json.dumps(config))
            registry_proc = start_registry(tmp, workers=1)
            registry = f"http://127.0.0.1:{port}"
            await wait_ready(registry, registry_proc, tmp / "registry.log")
            resolver = Server(etcd.endpoint, tmp / "anchor.json", tmp / "resolver.log")
            took = await resolver.start()
            print(f"resolver ready in {took:.1f} s")
            nodes = [Node(NAMESPACE) for _ in range(args.nodes)]
            print(
                f"keepalive run: {args.minutes:g} min, busy {args.busy:g} s / idle "
                f"{args.idle:g} s, {args.nodes} nodes heartbeating every 1 s when busy"
                + ("; PROVOKE: a client pinging every 1 s without a call" if args.provoke else "")
            )
            t_end = time.monotonic() + args.minutes * 60
            total: Counter[str] = Counter()
            t0 = time.monotonic()
            async with aiohttp.ClientSession() as session:
                for node in nodes:
                    async with session.post(
                        f"{registry}/v1/registrations",
                        data=node.register(),
                        headers={"Authorization": f"Bearer {token}"},
                    ) as resp:
                        await resp.read()
                        total[f"register {resp.status}"] += 1
                phase = 0
                while time.monotonic() < t_end:
                    left = t_end - time.monotonic()
                    if phase % 2 == 0:
                        if phase > 0:  # a cold start under load: the full listing again
                            resolver.stop()
                            took = await resolver.start()
                            print(f"  resolver restarted, ready in {took:.1f} s", flush=True)
                        if args.provoke and phase == 0:
                            provoke = start_provoke(etcd.endpoint, tmp / "provoke.log")
                        got = await busy_phase(
                            session, registry, resolver.url, token, nodes, min(args.busy, left)
                        )
                        total.update(got)
                        what = "busy"
                    else:
                        await asyncio.sleep(min(args.idle, left))
                        what = "idle"
                    for proc, name in ((registry_proc, "registry"), (resolver.proc, "resolver")):
                        if proc is None or proc.poll() is not None:
                            raise SystemExit(f"the {name} exited; logs in {tmp}")
                    print(
                        f"  {time.monotonic() - t0:6.0f} s  {what} phase done; GOAWAY lines so "
                        f"far: registry {scan(tmp / 'registry.log')['GOAWAY']}, resolver "
                        f"{scan(tmp / 'resolver.log')['GOAWAY']}, etcd "
                        f"{scan(etcd.log_file)['GOAWAY']}",
                        flush=True,
                    )
                    phase += 1
            print(f"  requests: {dict(sorted(total.items()))}")
            found = 0
            logs = [
                ("registry", tmp / "registry.log"),
                ("resolver", tmp / "resolver.log"),
                ("etcd", etcd.log_file),
            ]
            if args.provoke:
                logs.append(("provoke", tmp / "provoke.log"))
            for name, path in logs:
                counts = scan(path)
                found += counts["any"]
                print(
                    f"  {name:8s} log: GOAWAY lines {counts['GOAWAY']}, too_many_pings lines "
                    f"{counts['too_many_pings']}"
                )
                for line in path.read_bytes().splitlines():
                    if any(p.search(line) for p in PATTERNS.values()):
                        print(f"    e.g. {line[:200].decode(errors='replace')}")
                        break
            print(f"lines with GOAWAY or too_many_pings: {found}   (target 0)")
            return found
        finally:
            if provoke is not None:
                provoke.wait()
            if resolver is not None:
                resolver.stop()
            if registry_proc is not None and registry_proc.poll() is None:
                registry_proc.send_signal(signal.SIGTERM)
                try:
                    registry_proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    registry_proc.kill()
                    registry_proc.wait()
            etcd.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--busy", type=float, default=60.0, help="seconds of each busy phase")
    p.add_argument("--idle", type=float, default=90.0, help="seconds of each idle phase")
    p.add_argument("--nodes", type=int, default=200)
    p.add_argument("--records", type=int, default=20_000, help="records written before the run")
    p.add_argument(
        "--provoke",
        action="store_true",
        help="also run a client that pings too often: the scan must then find GOAWAYs",
    )
    args = p.parse_args()
    found = asyncio.run(run(args))
    sys.exit(0 if args.provoke or found == 0 else 1)


if __name__ == "__main__":
    main()
