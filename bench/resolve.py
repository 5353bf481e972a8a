"""Resolver benchmarks (HTTP side), one command, every figure printed.

    python bench/resolve.py [--records 100000] [--duration 5] [--rounds 3]
                            [--only startup,lookups,discovery,watch]

``--only`` runs some sections (the records, statuses and the server that the later
sections query are always set up); iterate with a smaller ``--records``, but quote
figures at the default 100,000.

What it does, in one run:

1. starts a bench etcd and writes ``--records`` signed records (and, later, a signed
   status for each) with batched transactions, the way registries would;
2. **start to ready**: starts ``cpi resolver serve`` as a process and times it from
   ``exec`` to ``/readyz`` = 200, on the empty index, with the records, and with records
   plus statuses; **resident memory per record** = (RSS full - RSS empty) / records;
3. **cached lookups**: ``GET /v1/resources/{cpid}`` requests per second against the
   resolver, an aiohttp hello-world server and etcd's JSON gateway
   (``POST /v3/kv/range`` of the same record), interleaved rounds, medians, ratios.
   The resolver is measured as one process (the default, compared with the one
   hello-world process) and as ``--workers N`` processes sharing the port
   (``--http-workers``, default 2; etcd serves with every CPU), printed apart.
   Load generator: ``wrk`` (Debian package ``wrk``); without it an aiohttp client
   loop (printed as such);
4. **discovery** p50/p99 over a mix of queries, in-process, on a resolver holding all
   the records (built from the same etcd), plus the same over HTTP;
5. **register-to-watch-event** latency p50/p99: time from writing a new record to etcd
   until the resolver's ``/v1/watch`` stream delivers its put event.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import concurrent.futures
import contextlib
import functools
import gc
import hashlib
import json
import multiprocessing
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aiohttp

import seeds
from cpi.etcdproc import EtcdProcess, free_port
from registry import ca
from registry.index import Index, Keys, Op
from resolver.core import Resolver, ResolverSettings
from resolver.discovery import LatencyTable, Query
from resolver.replica import SyncSettings
from schemas import cpid as cpid_mod
from schemas import dsse, keys
from schemas.chain import TrustAnchors
from schemas.models import Cert, Record, Status, parse_payload

ROOT = Path(__file__).resolve().parents[1]
LATENCY = seeds.path(seeds.LATENCY)
REGIONS = ["11", "13", "1307", "15", "31", "32", "3205", "34", "42", "50", "51", "52", "62"]
OPERATORS = ["CMCC", "CTCC", "CUCC", "ALIYUN"]
MODELS = [
    ("NVIDIA", "H100"),
    ("NVIDIA", "H200"),
    ("NVIDIA", "A800"),
    ("Huawei", "910B"),
    ("NVIDIA", "L40S"),
]
RECORD_TYPE = "application/vnd.cpi.record.v1+json"
STATUS_TYPE = "application/vnd.cpi.status.v1+json"


def namespaces() -> list[tuple[str, str]]:
    """(namespace, region) of the industry nodes the records are spread over."""
    out: list[tuple[str, str]] = []
    for region in REGIONS:
        prefix = f"CN.{region[:2]}" + (f".{region}" if len(region) == 4 else "")
        out.extend((f"{prefix}.{op}", region) for op in OPERATORS)
    return out


def _env_json(payload_type: str, payload: bytes, key: keys.Ed25519PrivateKey, kid: str) -> bytes:
    sig = key.sign(dsse.pae(payload_type, payload))
    return json.dumps(
        {
            "payloadType": payload_type,
            "payload": base64.b64encode(payload).decode(),
            "signatures": [{"keyid": kid, "sig": base64.b64encode(sig).decode()}],
        },
        separators=(",", ":"),
    ).encode()


def _gen(args: tuple[int, int, list[tuple[str, str, bytes]]]) -> list[tuple[str, bytes, bytes]]:
    """Worker: (cpid, record envelope, status envelope) for records start..start+n."""
    start, n, signers = args
    rng = random.Random(start)
    now = int(time.time())
    reg_keys = [(ns, region, keys.private_from_seed(seed)) for ns, region, seed in signers]
    reg_kids = [keys.kid_of(k) for _, _, k in reg_keys]
    out: list[tuple[str, bytes, bytes]] = []
    for i in range(start, start + n):
        j = rng.randrange(len(reg_keys))
        ns, region, reg_key = reg_keys[j]
        node = keys.private_from_seed(hashlib.sha256(b"bench-node-%d" % i).digest())
        raw = keys.public_raw(node)
        kind, vendor_model = (
            ("NPU", MODELS[3]) if rng.random() < 0.15 else ("GPU", rng.choice(MODELS))
        )
        if rng.random() < 0.1:
            kind = "CPU"
        cpid = cpid_mod.derive(ns, kind, raw).to_text()
        count = rng.choice([1, 2, 4, 8, 8, 8, 16])
        attrs: dict[str, Any] = {"cpu": {"model": "Xeon", "cores": 64}, "memory_gib": 1024.0}
        attrs["accelerators"] = (
            []
            if kind == "CPU"
            else [
                {
                    "vendor": vendor_model[0],
                    "model": vendor_model[1],
                    "memory_gib": 80.0,
                    "count": count,
                }
            ]
        )
        rec = {
            "type": "record.v1",
            "cpid": cpid,
            "kind": kind,
            "public_key": keys.b64url_encode(raw),
            "issuer": ns,
            "version": 1,
            "issued_at": now - 60,
            "expires_at": now + 30 * 86_400,
            "endpoints": [
                {"proto": "https", "host": f"n{i}.bench.test", "port": 443, "purpose": "inference"}
            ],
            "location": {"region": region, "site": f"S{i % 7}"},
            "attributes": attrs,
            "labels": {"tier": rng.choice(["gold", "silver", "bronze"]), "rack": f"r{i % 50}"},
        }
        free = rng.randint(0, count) if kind != "CPU" else 0
        status = {
            "type": "status.v1",
            "cpid": cpid,
            "seq": 1,
            "observed_at": now * 1000,
            "state": "up",
            "capacity": {"accelerators_free": free, "cpu_free": rng.randint(0, 64)},
            "metrics": {"gpu_util": round(rng.random(), 3)},
        }
        out.append(
            (
                cpid,
                _env_json(
                    RECORD_TYPE,
                    json.dumps(rec, separators=(",", ":")).encode(),
                    reg_key,
                    reg_kids[j],
                ),
                _env_json(
                    STATUS_TYPE,
                    json.dumps(status, separators=(",", ":")).encode(),
                    node,
                    keys.kid_of(node),
                ),
            )
        )
    return out


class World:
    """The bench PKI: a root, regional delegations and one issuing key per industry node."""

    def __init__(self, directory: Path) -> None:
        self.root = keys.generate()
        self.anchor_file = directory / "anchor.json"
        self.anchor_file.write_bytes(ca.make_anchor("CN", self.root).to_json())
        self.anchors = TrustAnchors([ca.make_anchor("CN", self.root)])
        self.certs: dict[str, dsse.Envelope] = {}
        self.signers: list[tuple[str, str, bytes]] = []
        regional: dict[str, keys.Ed25519PrivateKey] = {}
        for ns, region in namespaces():
            parent = ns.rsplit(".", 1)[0]
            if parent not in regional:
                pk = keys.generate()
                grand = parent.rsplit(".", 1)[0]
                issuer_key = regional.get(grand, self.root) if grand != "CN" else self.root
                self.certs[parent] = ca.issue_cert(
                    issuer_key=issuer_key,
                    issuer_subject=grand,
                    subject=parent,
                    public_key=pk,
                    scopes=["delegate", "issue"],
                )
                regional[parent] = pk
            seed = os.urandom(32)
            k = keys.private_from_seed(seed)
            self.certs[ns] = ca.issue_cert(
                issuer_key=regional[parent],
                issuer_subject=parent,
                subject=ns,
                public_key=k,
                scopes=["issue"],
            )
            self.signers.append((ns, region, seed))

    async def publish(self, index: Index) -> None:
        for env in self.certs.values():
            cert = parse_payload(env.payload_type, env.payload, Cert)
            kid = keys.kid(keys.b64url_decode(cert.public_key))
            await index.put(Keys.cert(kid), env.to_json())

    def generate(self, n: int) -> list[tuple[str, bytes, bytes]]:
        chunk = 2000
        jobs = [(i, min(chunk, n - i), self.signers) for i in range(0, n, chunk)]
        spawn = multiprocessing.get_context("spawn")  # not fork: gRPC threads are running
        with concurrent.futures.ProcessPoolExecutor(os.cpu_count() or 1, mp_context=spawn) as pool:
            parts = list(pool.map(_gen, jobs))
        return [x for part in parts for x in part]


async def write_all(index: Index, items: list[tuple[str, bytes]], parallel: int = 8) -> None:
    """Write key/values in transactions of 128 puts (etcd's default --max-txn-ops)."""
    sem = asyncio.Semaphore(parallel)

    async def one(batch: list[tuple[str, bytes]]) -> None:
        async with sem:
            await index.txn(success=[Op.put(k, v) for k, v in batch])

    await asyncio.gather(*(one(items[i : i + 128]) for i in range(0, len(items), 128)))


# -- processes -----------------------------------------------------------------------------


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def children_rss_kib(pid: int) -> int:
    total = 0
    with contextlib.suppress(OSError):
        for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
            total += rss_kib(int(child))
    return total


class Server:
    """``cpi resolver serve`` as a child process (``workers`` > 1: ``--workers N``)."""

    def __init__(self, etcd: str, anchor: Path, log: Path, *, workers: int = 1) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.workers = workers
        self.cmd = [
            sys.executable, "-m", "cpi", "resolver", "serve",
            "--listen", f"127.0.0.1:{self.port}",
            "--etcd", etcd, "--anchor", str(anchor), "--latency-table", str(LATENCY),
            "--insecure",  # plain HTTP on loopback: the bench measures lookups, not TLS
        ]  # fmt: skip
        if workers > 1:
            self.cmd += ["--workers", str(workers)]
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    async def start(self) -> float:
        """Start and wait for ``/readyz`` = 200; returns seconds from exec to ready.

        With several processes on the port, each new connection may reach another one:
        ready means 20 answers of 200 in a row, each on a new connection.
        """
        t0 = time.perf_counter()
        self.proc = proc = await asyncio.to_thread(self._spawn)
        need = 1 if self.workers == 1 else 20
        ok = 0
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"resolver exited; see {self.log}")
                status = 0
                with contextlib.suppress(aiohttp.ClientError):
                    async with s.get(self.url + "/readyz") as r:
                        status = r.status
                ok = ok + 1 if status == 200 else 0
                if ok >= need:
                    return time.perf_counter() - t0
                if not ok:
                    await asyncio.sleep(0.02)

    def _spawn(self) -> subprocess.Popen[bytes]:
        with open(self.log, "ab") as out:
            return subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def rss(self) -> tuple[int, int]:
        assert self.proc is not None
        return rss_kib(self.proc.pid), children_rss_kib(self.proc.pid)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


HELLO = """
import sys
from aiohttp import web
async def hello(request):
    return web.Response(text="Hello, world")
app = web.Application()
app.router.add_get("/", hello)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)
"""


async def start_hello_world() -> tuple[subprocess.Popen[bytes], int]:
    """The same-run baseline: an aiohttp hello-world process, once it answers; and its port."""
    port = free_port()
    proc = await asyncio.to_thread(subprocess.Popen, [sys.executable, "-c", HELLO, str(port)])
    async with aiohttp.ClientSession() as s:
        for _ in range(200):
            with contextlib.suppress(aiohttp.ClientError):
                async with s.get(f"http://127.0.0.1:{port}/") as r:
                    if r.status == 200:
                        break
            await asyncio.sleep(0.05)
    return proc, port


# -- load generation -----------------------------------------------------------------------


def wrk_run(
    url: str, *, duration: float, connections: int, script: Path | None = None
) -> tuple[float, int]:
    """(requests per second, requests answered) of one wrk run."""
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{duration:g}s", "--latency"]
    if script is not None:
        cmd += ["-s", str(script)]
    out = subprocess.run([*cmd, url], capture_output=True, text=True, check=True).stdout
    line = next(x for x in out.splitlines() if x.startswith("Requests/sec:"))
    done = next(x for x in out.splitlines() if " requests in " in x)
    errors = [x for x in out.splitlines() if "Non-2xx" in x or "Socket errors" in x]
    if errors:
        print(f"    wrk reports for {url}: {'; '.join(e.strip() for e in errors)}")
    return float(line.split()[1]), int(done.split()[0])


def wrk_rate(url: str, *, duration: float, connections: int, script: Path | None = None) -> float:
    return wrk_run(url, duration=duration, connections=connections, script=script)[0]


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` and its live children (Linux)."""
    total = 0.0
    pids = [pid]
    with contextlib.suppress(OSError):
        pids += [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    for p in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


async def aiohttp_rate(
    url: str, *, duration: float, connections: int, body: bytes | None = None
) -> float:
    count = 0
    deadline = time.perf_counter() + duration
    conn = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=conn) as s:

        async def worker() -> None:
            nonlocal count
            while time.perf_counter() < deadline:
                if body is None:
                    async with s.get(url) as r:
                        await r.read()
                else:
                    async with s.post(url, data=body) as r:
                        await r.read()
                count += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(connections)))
        return count / (time.perf_counter() - t0)


def percentile(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]


def queries(rng: random.Random) -> list[tuple[str, Query]]:
    """A mix of discovery queries, from narrow to broad."""
    out: list[tuple[str, Query]] = []
    for _ in range(200):
        region = rng.choice(REGIONS)
        model = rng.choice(MODELS)[1]
        ns = rng.choice(namespaces())[0]
        out += [
            ("accelerator+near+min_free", Query(accelerator=model, near=region, min_free=4)),
            ("kind+within+near", Query(kind="GPU", within=ns.rsplit(".", 1)[0], near=region)),
            (
                "kind+accelerator+label",
                Query(kind="GPU", accelerator=model, labels=(("tier", "gold"),)),
            ),
            ("near+max_latency+min_free", Query(near=region, max_latency_ms=10, min_free=8)),
            ("kind only (broad)", Query(kind="GPU", limit=20)),
            ("everything near (broadest)", Query(near=region, limit=50)),
        ]
    rng.shuffle(out)
    return out


# -- main ----------------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="cpi-bench-resolve-"))
    etcd = EtcdProcess(data_dir=tmp / "etcd", extra_args=["--quota-backend-bytes", str(8 << 30)])
    etcd.start()
    etcd.wait_healthy(30)
    servers: list[Server] = []
    hello: subprocess.Popen[bytes] | None = None
    try:
        print(f"bench etcd {etcd.url}; temp dir {tmp}; {os.cpu_count()} CPUs")
        world = World(tmp)
        async with Index(endpoints=[etcd.endpoint], timeout=30.0) as index:
            await world.publish(index)

            only = args.only
            # -- empty index: baseline start-up and memory
            t_empty, rss_empty = 0.0, 0
            if "startup" in only:
                empty = Server(etcd.endpoint, world.anchor_file, tmp / "resolver-empty.log")
                servers.append(empty)
                t_empty = await empty.start()
                rss_empty, _ = empty.rss()
                empty.stop()

            t0 = time.perf_counter()
            items = world.generate(args.records)
            t_gen = time.perf_counter() - t0
            sample = dsse.Envelope.from_json(items[0][1])
            parse_payload(sample.payload_type, sample.payload, Record)
            sample = dsse.Envelope.from_json(items[0][2])
            parse_payload(sample.payload_type, sample.payload, Status)
            t0 = time.perf_counter()
            await write_all(index, [(Keys.rec(c), r) for c, r, _ in items])
            t_write = time.perf_counter() - t0
            size = sum(len(r) for _, r, _ in items) / len(items)
            print(
                f"generated {args.records:,} signed records in {t_gen:.1f} s; wrote them in "
                f"{t_write:.1f} s ({args.records / t_write:,.0f}/s, txns of 128); record "
                f"envelope {size:.0f} B"
            )

            # -- start to ready with the records
            if "startup" in only:
                full = Server(etcd.endpoint, world.anchor_file, tmp / "resolver-records.log")
                servers.append(full)
                t_records = await full.start()
                rss_records, rss_workers = full.rss()
                full.stop()

            await write_all(index, [(Keys.live(c), s) for c, _, s in items])
            server = Server(etcd.endpoint, world.anchor_file, tmp / "resolver.log")
            servers.append(server)
            t_full = await server.start()
            rss_full, rss_full_workers = server.rss()
            if "startup" not in only:
                print(f"\nresolver with records + statuses ready in {t_full:.2f} s")
            else:
                print("\nstart to ready (process exec -> /readyz 200):")
                print(
                    f"  empty index                     {t_empty:6.2f} s   RSS {rss_empty / 1024:7.1f} MiB"
                )
                print(
                    f"  {args.records:,} records            {t_records:6.2f} s   RSS {rss_records / 1024:7.1f} MiB"
                    f"  (+{rss_workers / 1024:.0f} MiB in verification workers)   target < 10 s"
                )
                print(
                    f"  {args.records:,} records + statuses {t_full:6.2f} s   RSS {rss_full / 1024:7.1f} MiB"
                    f"  (+{rss_full_workers / 1024:.0f} MiB in verification workers)"
                )
                print(
                    f"  resident memory per record: {(rss_records - rss_empty) * 1024 / args.records:,.0f} B "
                    f"(records only), {(rss_full - rss_empty) * 1024 / args.records:,.0f} B (with statuses)"
                )

            if "lookups" in only:
                # -- cached lookups: resolver vs hello-world vs etcd gateway
                cpid = items[len(items) // 2][0]
                hello, hello_port = await start_hello_world()
                async with aiohttp.ClientSession() as s:
                    async with s.get(f"{server.url}/v1/resources/{cpid}") as r:
                        assert r.status == 200, await r.text()
                        resolved = await r.read()
                    gw_body = json.dumps(
                        {"key": base64.b64encode(Keys.rec(cpid).encode()).decode()}
                    )
                    async with s.post(f"{etcd.url}/v3/kv/range", data=gw_body) as r:
                        gw = await r.json()
                        assert gw["kvs"][0]["value"], gw
                lua = tmp / "range.lua"
                lua.write_text(
                    f"wrk.method = \"POST\"\nwrk.body = '{gw_body}'\n"
                    'wrk.headers["Content-Type"] = "application/json"\n'
                )
                have_wrk = shutil.which("wrk") is not None
                one = "resolver GET /v1/resources/{cpid}"
                urls: dict[str, tuple[str, Path | None]] = {
                    one: (f"{server.url}/v1/resources/{cpid}", None),
                    "aiohttp hello-world": (f"http://127.0.0.1:{hello_port}/", None),
                    "etcd JSON gateway /v3/kv/range": (f"{etcd.url}/v3/kv/range", lua),
                }
                multi = f"same, --workers {args.http_workers} (own replicas)"
                if args.http_workers > 1:
                    # cpi resolver serve --workers N: N processes on the port (SO_REUSEPORT),
                    # each with its own replica (N times the memory and start-up work)
                    wide = Server(
                        etcd.endpoint,
                        world.anchor_file,
                        tmp / "resolver-workers.log",
                        workers=args.http_workers,
                    )
                    servers.append(wide)
                    t_wide = await wide.start()
                    print(f"\n{args.http_workers} resolver processes ready in {t_wide:.2f} s")
                    urls[multi] = (f"{wide.url}/v1/resources/{cpid}", None)

                # CPU time per answer of each server process (its own children too): the
                # throughput ratio it implies holds on a busy machine too, where a req/s
                # ratio swings with what else runs during each load-generator run
                pids = {
                    one: server.pid,
                    "aiohttp hello-world": hello.pid,
                    "etcd JSON gateway /v3/kv/range": etcd.pid or 0,
                }
                if multi in urls:
                    pids[multi] = wide.pid
                cpu_us: dict[str, list[float]] = {name: [] for name in urls}

                async def measure(name: str, url: str, script: Path | None) -> float:
                    c0 = cpu_seconds(pids[name])
                    if have_wrk:
                        rate, done = await asyncio.to_thread(
                            wrk_run,
                            url,
                            duration=args.duration,
                            connections=args.connections,
                            script=script,
                        )
                    else:
                        body = gw_body.encode() if script is not None else None
                        rate = await aiohttp_rate(
                            url, duration=args.duration, connections=args.connections, body=body
                        )
                        done = round(rate * args.duration)
                    cpu_us[name].append((cpu_seconds(pids[name]) - c0) / max(done, 1) * 1e6)
                    return rate

                gen = (
                    f"wrk -t1 -c{args.connections} -d{args.duration:g}s"
                    if have_wrk
                    else "aiohttp client loop (wrk not installed: apt-get install wrk)"
                )
                targets: dict[str, Callable[[], Awaitable[float]]] = {
                    name: functools.partial(measure, name, u, sc) for name, (u, sc) in urls.items()
                }
                samples: dict[str, list[float]] = {name: [] for name in targets}
                for _ in range(args.rounds):
                    for name, fn in targets.items():
                        samples[name].append(await fn())
                rates = {name: statistics.median(v) for name, v in samples.items()}

                def ratio(base: str, of: str = one) -> tuple[float, str]:
                    per_round = [a / b for a, b in zip(samples[of], samples[base], strict=True)]
                    return statistics.median(per_round), ", ".join(f"{x:.2f}" for x in per_round)

                print(
                    f"\ncached lookups ({len(resolved)} B body; {gen}; {args.rounds} interleaved rounds, median):"
                )
                for name, rate in rates.items():
                    print(
                        f"  {name:<36} {rate:>10,.0f} req/s   rounds: {', '.join(f'{x:,.0f}' for x in samples[name])}"
                        f"   CPU {statistics.median(cpu_us[name]):.1f} us/request"
                    )
                hw, hw_rounds = ratio("aiohttp hello-world")
                gw, gw_rounds = ratio("etcd JSON gateway /v3/kv/range")
                print(
                    f"  resolver / hello-world  = {hw:.2f} (median of rounds: {hw_rounds})   target >= 0.8"
                )
                per_cpu = [
                    h / r for h, r in zip(cpu_us["aiohttp hello-world"], cpu_us[one], strict=True)
                ]
                print(
                    f"  hello-world / resolver CPU per request = {statistics.median(per_cpu):.2f} "
                    f"(median of rounds: {', '.join(f'{x:.2f}' for x in per_cpu)}; the req/s "
                    "ratio of two CPU-bound servers, less swayed by other load)"
                )
                print(
                    f"  resolver / etcd gateway = {gw:.2f} (median of rounds: {gw_rounds})   target >= 2.5"
                )
                if multi in samples:
                    n = args.http_workers
                    for base, label in (
                        ("aiohttp hello-world", "hello-world"),
                        ("etcd JSON gateway /v3/kv/range", "etcd gateway"),
                    ):
                        multi_ratio, rounds = ratio(base, multi)
                        print(
                            f"  resolver ({n} processes) / {label:<12} = {multi_ratio:.2f} "
                            f"(median of rounds: {rounds})"
                        )
                    wide.stop()

            if "discovery" in only:
                # -- discovery, in-process on a resolver built from the same etcd
                settings = ResolverSettings(sync=SyncSettings(probe_interval=1.0))
                lib = Resolver(
                    index=index,
                    anchors=world.anchors,
                    latency=LatencyTable.from_file(LATENCY),
                    settings=settings,
                )
                async with lib:
                    t0 = time.perf_counter()
                    await lib.wait_ready()
                    t_lib = time.perf_counter() - t0
                    n_served = len(list(lib.entries()))
                    print(
                        f"\ndiscovery over {n_served:,} served records (library resolver ready in {t_lib:.1f} s):"
                    )
                    qs = queries(random.Random(7))
                    for _, q in qs[:50]:
                        lib.discover(q)
                    by_kind: dict[str, list[float]] = {}
                    all_t: list[float] = []
                    hits = 0
                    for label, q in qs:
                        t1 = time.perf_counter()
                        d = lib.discover(q)
                        dt = time.perf_counter() - t1
                        hits += len(d.results)
                        all_t.append(dt)
                        by_kind.setdefault(label, []).append(dt)
                    print(
                        f"  in-process, {len(qs)} queries: p50 {percentile(all_t, 50) * 1e3:.3f} ms  "
                        f"p99 {percentile(all_t, 99) * 1e3:.3f} ms  max {max(all_t) * 1e3:.3f} ms   "
                        f"(target p99 < 5 ms; {hits / len(qs):.1f} results per query)"
                    )
                    for label, ts in sorted(by_kind.items()):
                        print(
                            f"    {label:<28} p50 {percentile(ts, 50) * 1e3:7.3f} ms  p99 {percentile(ts, 99) * 1e3:7.3f} ms"
                        )
                http_t: list[float] = []
                async with aiohttp.ClientSession() as s:
                    for _, q in qs[:600]:
                        t1 = time.perf_counter()
                        async with s.get(f"{server.url}/v1/discover", params=q.to_params()) as resp:
                            await resp.read()
                            assert resp.status == 200
                        http_t.append(time.perf_counter() - t1)
                print(
                    f"  over HTTP (one client, {len(http_t)} queries): p50 {percentile(http_t, 50) * 1e3:.3f} ms  "
                    f"p99 {percentile(http_t, 99) * 1e3:.3f} ms"
                )
                del lib

            if "watch" in only:
                # -- register to watch event (a full collection first, so that dropping the
                # in-process resolver above does not pause this process mid-sample)
                items.clear()
                gc.collect()
                gc.freeze()
                lat, puts = await watch_latency(index, world, server.url, args.watch_samples)
                print(
                    f"\nregister-to-watch-event ({len(lat)} records written to etcd one at a time, "
                    f"until the put event arrives on /v1/watch): p50 {percentile(lat, 50) * 1e3:.2f} ms  "
                    f"p99 {percentile(lat, 99) * 1e3:.2f} ms  max {max(lat) * 1e3:.2f} ms   (target p99 < 100 ms)"
                )
                print(
                    f"  of which the etcd write itself (put until acknowledged): p50 "
                    f"{percentile(puts, 50) * 1e3:.2f} ms  p99 {percentile(puts, 99) * 1e3:.2f} ms  "
                    f"max {max(puts) * 1e3:.2f} ms"
                )
    finally:
        for srv in servers:
            srv.stop()
        if hello is not None:
            hello.terminate()
            hello.wait()
        etcd.stop()
        shutil.rmtree(tmp, ignore_errors=True)


async def watch_latency(
    index: Index, world: World, url: str, n: int
) -> tuple[list[float], list[float]]:
    """(write-to-event seconds, write-to-acknowledgement seconds) per new record."""
    fresh = _gen((10_000_000, n, world.signers))
    out: list[float] = []
    puts: list[float] = []
    async with aiohttp.ClientSession() as s, s.get(url + "/v1/watch") as resp:
        assert resp.status == 200

        async def next_put() -> str:
            data: list[str] = []
            while True:
                line = (await resp.content.readline()).decode().rstrip("\n")
                if line.startswith("data: "):
                    data.append(line[6:])
                elif not line and data:
                    obj = json.loads("".join(data))
                    data = []
                    if obj.get("type") == "put":
                        return str(obj["cpid"])

        async def write(key: str, value: bytes) -> float:
            await index.put(key, value)
            return time.perf_counter()

        for cpid, rec, _ in fresh:
            t0 = time.perf_counter()
            put = asyncio.create_task(write(Keys.rec(cpid), rec))
            async with asyncio.timeout(10):
                while await next_put() != cpid:
                    pass
            out.append(time.perf_counter() - t0)
            puts.append(await put - t0)
    return out, puts


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--records", type=int, default=100_000)
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per load-generator run")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median reported)")
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--watch-samples", type=int, default=200)
    ap.add_argument(
        "--http-workers",
        type=int,
        default=2,
        help="also measure lookups on `cpi resolver serve --workers N` (1: skip)",
    )
    ap.add_argument(
        "--only",
        type=lambda v: set(v.split(",")),
        default={"startup", "lookups", "discovery", "watch"},
        help="comma-separated sections to run: startup,lookups,discovery,watch (default all)",
    )
    args = ap.parse_args()
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
