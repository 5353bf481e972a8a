"""Scale benchmark (issue 12): one command, every figure printed next to its target.

    python bench/scale.py [--records 1000000] [--duration 5] [--rounds 3]

What it does:

1. starts a bench etcd with ``--quota-backend-bytes`` sized for the data set (printed),
   and writes ``--records`` signed records, each with a signed status, the way
   registries do: batched transactions of 128 puts, generated in worker processes
   (one Ed25519 key per node, derived from a seed; one issuing key per industry node,
   reused across its records) and written while the next chunk is generated;
2. measures the **floor** of a cold start in this run: the CPU of one record's
   verification job (as the resolver's workers run it), with its status, and of its
   Ed25519 check alone, on 3,000 records like the set-up's, times the records, divided
   by the CPUs (no listing, no filing, perfect parallelism: a cold start cannot be
   faster on this machine with this verifier);
3. starts ``cpi resolver serve`` (with a snapshot directory) on the empty index, then
   on the full one: **cold start to ready** (exec -> ``/readyz`` 200: every record
   verified; at this size the statuses are verified after ready) and to every status
   verified, and **RSS per record** = (RSS full - RSS empty) / records, taken after;
4. stops it (SIGTERM: the snapshot is written on shutdown) and starts it again: **warm
   restart to ready** (``--warm-restarts`` times, the median reported; a resolver that
   loaded the snapshot does not write it again on shutdown unless the revision moved),
   and the RSS after the first;
5. against the warm resolver: **discovery p99 over HTTP**, **register -> watch event
   p99** and **cached GET vs an aiohttp hello-world** (wrk if installed, else an
   aiohttp client loop, printed as such).

The machine is usually shared: figures are noisy, rerun before drawing conclusions.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import multiprocessing
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aiohttp

from bench._common import proc_cpu
from bench.resolve import (
    Server,
    World,
    _gen,
    aiohttp_rate,
    percentile,
    queries,
    start_hello_world,
    watch_latency,
    wrk_rate,
)
from cpi.etcdproc import EtcdProcess
from registry.index import Index, Keys, Op
from resolver.verify import Context, Job, _worker_run
from schemas import dsse, keys
from schemas.bundle import assemble_chain
from schemas.models import Cert, parse_payload

CHUNK = 2000


def _children_cpu() -> float:
    """CPU seconds of this process's ended children (wrk runs, once each ends)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def quota_bytes(records: int) -> int:
    """etcd backend quota for ``records`` records + statuses: ~2 KB of values per record,
    x4 for bbolt pages, the key index and free pages, at least 2 GiB, at most 16 GiB."""
    return min(16 << 30, max(2 << 30, records * 8 * 1024))


def _chunks(world: World, n: int, workers: int) -> Iterator[list[tuple[str, bytes, bytes]]]:
    jobs = [(i, min(CHUNK, n - i), world.signers) for i in range(0, n, CHUNK)]
    spawn = multiprocessing.get_context("spawn")  # not fork: gRPC threads are running
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=spawn) as pool:
        yield from pool.map(_gen, jobs)


async def write_index(index: Index, world: World, n: int) -> tuple[list[str], int, float]:
    """Generate and write ``n`` records + statuses; (sample of CPIDs, bytes, seconds)."""
    t0 = time.perf_counter()
    sem = asyncio.Semaphore(8)
    sample: list[str] = []
    total = 0
    pending: set[asyncio.Task[None]] = set()

    async def one(ops: list[Op]) -> None:
        try:
            await index.txn(success=ops)
        finally:
            sem.release()

    queue: asyncio.Queue[list[tuple[str, bytes, bytes]] | None] = asyncio.Queue(maxsize=4)
    loop = asyncio.get_running_loop()

    def produce() -> None:
        for part in _chunks(world, n, os.cpu_count() or 1):
            asyncio.run_coroutine_threadsafe(queue.put(part), loop).result()
        asyncio.run_coroutine_threadsafe(queue.put(None), loop).result()

    producer = loop.run_in_executor(None, produce)
    done = 0
    last = time.perf_counter()
    while (part := await queue.get()) is not None:
        sample += [c for c, _, _ in part[:: max(1, CHUNK // 20)]]
        for i in range(0, len(part), 64):
            ops = []
            for cpid, rec, st in part[i : i + 64]:
                ops += [Op.put(Keys.rec(cpid), rec), Op.put(Keys.live(cpid), st)]
                total += len(rec) + len(st)
            await sem.acquire()  # at most 8 transactions in flight
            task = asyncio.create_task(one(ops))
            pending.add(task)
            task.add_done_callback(pending.discard)
        done += len(part)
        if time.perf_counter() - last > 30:
            last = time.perf_counter()
            print(f"  ... {done:,} records written ({done / (last - t0):,.0f}/s)", flush=True)
    await producer
    await asyncio.gather(*pending)
    return sample, total, time.perf_counter() - t0


def verification_floor(world: World, n: int = 3000) -> tuple[float, float, float]:
    """CPU per record, in µs, of what a cold start cannot skip, measured here on ``n``
    records of the set-up's kind, in this process (one core, nothing else running):
    the resolver's verification job for a record alone (what its workers run before
    ready: the contract's verifier, the facts, the sealed envelope), the same with its
    status, and the record's Ed25519 signature check alone.  Times the records, divided by
    the CPUs, they bound the cold start from below (no listing, no filing, perfect
    parallelism)."""
    items = _gen((10**9, n, world.signers))  # CPIDs apart from the index's
    by_kid: dict[str, dsse.Envelope] = {}
    for env in world.certs.values():
        cert = parse_payload(env.payload_type, env.payload, Cert)
        by_kid[keys.kid(keys.b64url_decode(cert.public_key))] = env
    anchor_kids = {a.kid for a in world.anchors}
    chains = {k: tuple(assemble_chain(k, by_kid, anchor_kids=anchor_kids)) for k in by_kid}
    ctx = Context(tuple(world.anchors), chains, {}, int(time.time()))
    publics = {
        keys.kid_of(k): keys.public_raw(k)
        for k in (keys.private_from_seed(seed) for _, _, seed in world.signers)
    }

    def per_record(jobs: list[Job]) -> float:
        _worker_run(ctx, jobs[:50])  # the chains walked, as a worker does once per batch
        t0 = time.process_time()
        for i in range(0, len(jobs), 1000):
            out, _ = _worker_run(ctx, jobs[i : i + 1000])
            assert all(o.ok for o in out), next(o for o in out if not o.ok)
        return (time.process_time() - t0) / len(jobs) * 1e6

    record = per_record([("raw", r, None) for _, r, _ in items])
    both = per_record([("raw", r, s) for _, r, s in items])
    envs = [dsse.Envelope.from_json(r) for _, r, _ in items]
    signed = [
        (publics[e.signatures[0].keyid], e.signatures[0].sig, dsse.pae(e.payload_type, e.payload))
        for e in envs
    ]
    t0 = time.process_time()
    assert all(keys.verify_raw(pub, sig, msg) for pub, sig, msg in signed)
    ed25519 = (time.process_time() - t0) / len(signed) * 1e6
    return record, both, ed25519


class SnapServer(Server):
    """``cpi resolver serve`` with a config file naming a snapshot directory."""

    def __init__(self, etcd: str, world: World, tmp: Path, name: str) -> None:
        super().__init__(etcd, world.anchor_file, tmp / f"{name}.log")
        self.snapshot_dir = tmp / f"{name}-data"
        config = tmp / f"{name}.json"
        config.write_text(
            json.dumps(
                {
                    "anchor_files": [str(world.anchor_file)],
                    "snapshot_dir": str(self.snapshot_dir),
                    "max_watchers": 4096,
                    # a page of a million-key listing on a busy etcd can take over the
                    # default 5 s, and a failed page restarts the whole listing
                    "etcd": {"timeout_s": 60.0},
                }
            )
        )
        self.cmd += ["--config", str(config)]

    async def statuses_verified(self, within: float = 900.0) -> float | None:
        """Wait until no status is left to verify after ready (``/readyz``
        ``statuses_pending``); returns seconds from start to the last one verified
        (None: the start verified them all before ready)."""
        deadline = time.monotonic() + within
        async with aiohttp.ClientSession() as s:
            while True:
                async with s.get(self.url + "/readyz") as r:
                    health = await r.json()
                if not health.get("statuses_pending"):
                    got = health.get("statuses_after_ready_s")
                    return None if got is None else float(got)
                if time.monotonic() > deadline:
                    raise TimeoutError("statuses still pending after ready")
                await asyncio.sleep(0.5)

    def stop_timed(self, timeout: float = 600.0) -> float:
        """SIGTERM and wait (the resolver writes its snapshot on the way out)."""
        t0 = time.perf_counter()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        return time.perf_counter() - t0


def _load(avg: tuple[float, float, float]) -> str:
    return "/".join(f"{x:.1f}" for x in avg)


def line(what: str, value: str, target: str, ok: bool | None) -> None:
    mark = "" if ok is None else ("  OK" if ok else "  MISSED")
    print(f"  {what:<44} {value:>14}" + (f"   target {target}{mark}" if target else ""))


async def run(args: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="cpi-bench-scale-"))
    quota = quota_bytes(args.records)
    etcd = EtcdProcess(data_dir=tmp / "etcd", extra_args=["--quota-backend-bytes", str(quota)])
    etcd.start()
    etcd.wait_healthy(30)
    servers: list[Server] = []
    hello: subprocess.Popen[bytes] | None = None
    results: list[tuple[str, str, str, bool | None]] = []
    load_start = load_setup = os.getloadavg()
    t_setup = 0.0
    try:
        print(
            f"bench etcd {etcd.url} (--quota-backend-bytes {quota:,} = {quota / 2**30:.1f} GiB); "
            f"temp dir {tmp}; {os.cpu_count()} CPUs; {args.records:,} records"
        )
        world = World(tmp)
        async with Index(endpoints=[etcd.endpoint], timeout=60.0) as index:
            await world.publish(index)
            empty = SnapServer(etcd.endpoint, world, tmp, "empty")
            servers.append(empty)
            await empty.start()
            await asyncio.sleep(1)
            rss_empty, _ = empty.rss()
            empty.stop()

            print("set-up: generating and writing records + statuses ...", flush=True)
            sample, nbytes, t_setup = await write_index(index, world, args.records)
            load_setup = os.getloadavg()
            print(
                f"set-up: {args.records:,} signed records + statuses generated and written in "
                f"{t_setup:.1f} s ({args.records / t_setup:,.0f} records/s; txns of 128 puts; "
                f"{nbytes / args.records:,.0f} B of values per record)"
            )

            cpus = os.cpu_count() or 1
            per_rec, per_both, per_sig = verification_floor(world)
            floor, floor_both, floor_sig = (
                x * args.records / cpus / 1e6 for x in (per_rec, per_both, per_sig)
            )
            print(
                f"floor (measured now, one process, 3,000 records): a record's verification job "
                f"{per_rec:.0f} µs of CPU ({per_both:.0f} µs with its status), its Ed25519 "
                f"check alone {per_sig:.0f} µs; x {args.records:,} records / {cpus} CPUs = "
                f"{floor:.1f} s ({floor_both:.1f} s with statuses; Ed25519 alone {floor_sig:.1f} s)"
            )

            server = SnapServer(etcd.endpoint, world, tmp, "resolver")
            servers.append(server)
            t_cold = await server.start()
            t_statuses = await server.statuses_verified()
            await asyncio.sleep(1)
            rss_cold, rss_workers = server.rss()
            per_cold = (rss_cold - rss_empty) * 1024 / args.records
            t_stop = server.stop_timed()
            snap = server.snapshot_dir / "replica.snap"
            snap_mb = snap.stat().st_size / 1e6 if snap.exists() else 0.0
            warm = [await server.start()]
            await asyncio.sleep(1)
            rss_warm, _ = server.rss()
            per_warm = (rss_warm - rss_empty) * 1024 / args.records
            for _ in range(args.warm_restarts - 1):  # the same snapshot (nothing changed)
                server.stop_timed()
                warm.append(await server.start())
            t_warm = statistics.median(warm)
            print(
                f"\nresolver: RSS empty {rss_empty / 1024:.0f} MiB, after cold start "
                f"{rss_cold / 1024:.0f} MiB (+{rss_workers / 1024:.0f} MiB in verification "
                f"workers), after warm restart {rss_warm / 1024:.0f} MiB; stop (writes the "
                f"snapshot, {snap_mb:.0f} MB) took {t_stop:.1f} s"
            )
            for text in server.log.read_text(errors="replace").splitlines():
                if any(
                    what in text
                    for what in ("listed the index at revision", "warm start from the", "statuses")
                ):
                    print(f"  resolver log: {text[:400]}")  # where the start-up time went
            results += [
                ("RSS per record (cold, incl. status)", f"{per_cold:,.0f} B", "<= 1.5 KB",
                 per_cold <= 1536),
                ("RSS per record (warm restart)", f"{per_warm:,.0f} B", "same as cold", None),
                ("cold start to ready (records verified)", f"{t_cold:.1f} s", "< 60 s", t_cold < 60),
                ("  floor: verification jobs alone / CPUs", f"{floor:.1f} s", "", None),
                ("  every status verified too (from start)",
                 "before ready" if t_statuses is None else f"{t_statuses:.1f} s", "", None),
                ("  floor: with statuses / CPUs", f"{floor_both:.1f} s", "", None),
                (f"warm restart to ready (median of {len(warm)})", f"{t_warm:.1f} s", "< 10 s",
                 t_warm < 10),
                ("  each", ", ".join(f"{t:.1f}" for t in warm) + " s", "", None),
            ]  # fmt: skip

            # -- discovery over HTTP
            qs = queries(random.Random(7))
            http_t: list[float] = []
            async with aiohttp.ClientSession() as s:
                for _, q in qs[:50]:
                    async with s.get(f"{server.url}/v1/discover", params=q.to_params()) as r:
                        await r.read()
                for _, q in qs[: args.discovery_queries]:
                    t1 = time.perf_counter()
                    async with s.get(f"{server.url}/v1/discover", params=q.to_params()) as r:
                        await r.read()
                        assert r.status == 200, r.status
                    http_t.append(time.perf_counter() - t1)
            p99 = percentile(http_t, 99) * 1e3
            results.append(
                (f"discovery p99 over HTTP ({len(http_t)} queries)", f"{p99:.2f} ms", "< 5 ms",
                 p99 < 5)
            )  # fmt: skip

            # -- register -> watch event
            lat, _ = await watch_latency(index, world, server.url, args.watch_samples)
            w99 = percentile(lat, 99) * 1e3
            results.append(
                (f"register -> watch event p99 ({len(lat)})", f"{w99:.1f} ms", "< 100 ms",
                 w99 < 100)
            )  # fmt: skip

            # -- cached GET vs hello-world
            cpid = sample[len(sample) // 2]
            hello, hello_port = await start_hello_world()
            async with (
                aiohttp.ClientSession() as s,
                s.get(f"{server.url}/v1/resources/{cpid}") as r,
            ):
                assert r.status == 200, await r.text()
            have_wrk = shutil.which("wrk") is not None
            urls = {
                "resolver": f"{server.url}/v1/resources/{cpid}",
                "hello": f"http://127.0.0.1:{hello_port}/",
            }
            samples: dict[str, list[float]] = {k: [] for k in urls}
            # CPU of every process during each target's rounds: what else ran meanwhile
            assert server.proc is not None and etcd.pid is not None
            pids = {"resolver": server.proc.pid, "hello-world": hello.pid, "etcd": etcd.pid}
            cpu: dict[str, dict[str, float]] = {
                k: dict.fromkeys([*pids, "load generator"], 0.0) for k in urls
            }
            walls: dict[str, float] = dict.fromkeys(urls, 0.0)
            for _ in range(args.rounds):
                for name, url in urls.items():
                    before = {k: proc_cpu(pid) for k, pid in pids.items()}
                    load0 = _children_cpu()
                    started = time.monotonic()
                    if have_wrk:
                        rate = await asyncio.to_thread(
                            wrk_rate, url, duration=args.duration, connections=args.connections
                        )
                    else:
                        rate = await aiohttp_rate(
                            url, duration=args.duration, connections=args.connections
                        )
                    walls[name] += time.monotonic() - started
                    for k, pid in pids.items():
                        cpu[name][k] += proc_cpu(pid) - before[k]
                    cpu[name]["load generator"] += _children_cpu() - load0
                    samples[name].append(rate)
            ratios = [a / b for a, b in zip(samples["resolver"], samples["hello"], strict=True)]
            ratio = statistics.median(ratios)
            gen = "wrk -t1" if have_wrk else "aiohttp client loop (no wrk)"
            print(
                f"cached GET ({gen}, {args.connections} connections, {args.rounds} rounds): "
                f"resolver {statistics.median(samples['resolver']):,.0f} req/s, hello-world "
                f"{statistics.median(samples['hello']):,.0f} req/s; per round "
                f"{', '.join(f'{x:.2f}' for x in ratios)}"
            )
            for name in urls:
                print(
                    f"  CPU during the {name} rounds ({walls[name]:.1f} s): "
                    + ", ".join(f"{k} {v:.1f} s" for k, v in cpu[name].items())
                )
            results.append(("cached GET / aiohttp hello-world", f"{ratio:.3f}x", ">= 0.8x",
                            ratio >= 0.8))  # fmt: skip
            server.stop()

        print(f"\nissue 12 figures at {args.records:,} records (shared machine: noisy):")
        line("set-up (generate + write records + statuses)", f"{t_setup:.1f} s", "-", None)
        for what, value, target, ok in results:
            line(what, value, target, ok)
        print(
            f"  load average (1/5/15 min) at start {_load(load_start)}, after set-up "
            f"{_load(load_setup)}, at the end {_load(os.getloadavg())} ({os.cpu_count()} CPUs)"
        )
    finally:
        for srv in servers:
            srv.stop()
        if hello is not None:
            hello.terminate()
            hello.wait()
        etcd.stop()
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per load-generator run")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median reported)")
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--watch-samples", type=int, default=200)
    ap.add_argument("--discovery-queries", type=int, default=600)
    ap.add_argument(
        "--warm-restarts", type=int, default=3, help="warm restarts timed (median reported)"
    )
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (logs, snapshot)")
    asyncio.run(run(ap.parse_args()))


if __name__ == "__main__":
    main()
