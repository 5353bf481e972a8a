"""DNS front-end benchmark, one command, every figure printed.

    python bench/dns.py [--records 5000] [--duration 3] [--rounds 3]

What it does, in one run, all traffic on 127.0.0.1:

1. starts a bench etcd and writes ``--records`` signed records and, attached to one
   lease, a signed status for each (the way registries do);
2. starts ``cpi resolver serve --dns-port P`` as a process (HTTP and DNS in one
   process, as deployed) and waits for ``/readyz``.  Its config file sets
   ``dns_rrl_responses_per_s`` to ``--rrl`` (default 1,000,000: rate limiting on, so
   its cost is measured, but too high to limit; 0 turns it off): the limit is per
   client prefix and the load comes from one address, so at the default (50/s) nearly
   every query would be limited.  A second resolver with the default limit is measured
   once at the end, and printed as such;
3. builds a query list: TXT of CPID names, SRV of their endpoints, discovery PTR names
   (kind and accelerator within namespaces) and unknown names (NXDOMAIN);
4. asks our server for every name over TCP and writes the answers as a zone file, so
   the other servers serve exactly the same records:
   * a **naive dnspython server** (a process running ``bench/dns.py --naive-server``):
     parses every query, looks the name up in a ``dns.zone`` and renders the answer,
     behind the same UDP front end as ours (so only the answering differs);
   * **NSD** (Debian package ``nsd``, one server process) when installed;
5. measures queries per second against each, in interleaved rounds (medians), with
   ``dnsperf`` (Debian package ``dnsperf``; EDNS0 on, 100 queries outstanding, one
   thread) -- or, if it is missing, an in-process dnspython/asyncio load generator
   (printed as such) -- and prints the ratios: ours / naive (target >= 10) and
   ours / NSD (target >= 0.5);
6. prints the largest UDP amplification (response bytes / query bytes) of our server
   over the query list plus ANY queries, EDNS0 with a 4096-byte payload.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as ``python bench/dns.py``, this file's folder comes first on sys.path, where
# ``import dns`` would find this very file instead of dnspython.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import argparse  # noqa: E402
import asyncio  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

import aiohttp  # noqa: E402
import dns.exception  # noqa: E402
import dns.flags  # noqa: E402
import dns.message  # noqa: E402
import dns.name  # noqa: E402
import dns.query  # noqa: E402
import dns.rcode  # noqa: E402
import dns.rdataclass  # noqa: E402
import dns.rdatatype  # noqa: E402
import dns.rrset  # noqa: E402
import dns.zone  # noqa: E402

ROOT = _HERE.parent
ZONE = "cpi."
HOST = "127.0.0.1"


# -- the naive server (run in its own process) ---------------------------------------------


def naive_server(zone_file: Path, port: int) -> None:
    """Answer from a ``dns.zone``, parsing and rendering every query (no cache)."""
    zone = dns.zone.from_file(str(zone_file), origin=ZONE, relativize=False)
    origin = dns.name.from_text(ZONE)
    soa_set = zone.get_rdataset(origin, "SOA")
    assert soa_set is not None, "the zone file has no SOA"
    soa = dns.rrset.from_rdata(origin, 5, soa_set[0])

    def answer(wire: bytes) -> bytes | None:
        try:
            query = dns.message.from_wire(wire)
        except Exception:
            return None
        response = dns.message.make_response(query, our_payload=1232)
        response.flags |= dns.flags.AA
        q = query.question[0]
        if not q.name.is_subdomain(origin):
            response.flags &= ~dns.flags.AA
            response.set_rcode(dns.rcode.REFUSED)
        else:
            node = zone.get_node(q.name)
            rdataset = node.get_rdataset(dns.rdataclass.IN, q.rdtype) if node else None
            if rdataset is not None:
                response.answer.append(
                    dns.rrset.from_rdata_list(q.name, rdataset.ttl, list(rdataset))
                )
            else:
                if node is None:
                    response.set_rcode(dns.rcode.NXDOMAIN)
                response.authority.append(soa)
        limit = max(512, min(query.payload, 1232)) if query.edns >= 0 else 512
        try:
            return response.to_wire(max_size=limit, want_shuffle=False)
        except dns.exception.TooBig:
            response.answer.clear()
            response.authority.clear()
            response.flags |= dns.flags.TC
            return response.to_wire(max_size=limit)

    async def serve() -> None:
        # the same UDP front end as ours, so only the answering differs
        from resolver.dns.server import _UdpEndpoint

        await _UdpEndpoint.bind(HOST, port, lambda wire, tcp: answer(wire))
        await asyncio.Event().wait()

    asyncio.run(serve())


# -- processes ------------------------------------------------------------------------------


def free_udp_tcp_port() -> int:
    import socket

    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.bind((HOST, 0))
            port = int(u.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
                try:
                    t.bind((HOST, port))
                except OSError:
                    continue
                return port


class Proc:
    """A child process we started, stopped by its own PID."""

    def __init__(self, name: str, cmd: list[str], log: Path) -> None:
        self.name = name
        self.cmd = cmd
        self.log = log
        with open(log, "ab") as out:
            self.popen = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)

    def check(self) -> None:
        if self.popen.poll() is not None:
            tail = self.log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{self.name} exited ({self.popen.returncode}); log:\n{tail}")

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


def wait_dns(proc: Proc, port: int, within: float = 30.0) -> None:
    """Until the server answers the zone's SOA."""
    deadline = time.monotonic() + within
    query = dns.message.make_query(ZONE, "SOA")
    while True:
        proc.check()
        with contextlib.suppress(Exception):
            resp = dns.query.udp(query, HOST, port=port, timeout=0.5)
            if resp.rcode() == dns.rcode.NOERROR and resp.answer:
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{proc.name} does not answer on port {port}")
        time.sleep(0.1)


# -- data -----------------------------------------------------------------------------------


async def populate(index: Any, world: Any, n: int) -> list[str]:
    """Write ``n`` records and their statuses (on one long lease); return the CPIDs."""
    from registry.index import Keys, Op

    items = world.generate(n)
    lease = await index.grant_lease(3600, revoke_on_exit=False)
    sem = asyncio.Semaphore(8)

    async def txn(ops: list[Any]) -> None:
        async with sem:
            await index.txn(success=ops)

    recs = [Op.put(Keys.rec(c), r) for c, r, _ in items]
    lives = [Op.put(Keys.live(c), s, lease=lease.id) for c, _, s in items]
    for ops in (recs, lives):
        await asyncio.gather(*(txn(ops[i : i + 128]) for i in range(0, len(ops), 128)))
    return [c for c, _, _ in items]


def query_list(cpids: list[str], namespaces: list[str], models: list[str]) -> list[tuple[str, str]]:
    """(name, type) pairs: TXT, SRV, discovery PTR, NXDOMAIN, in a fixed shuffled order."""
    from schemas.cpid import derive
    from schemas.cpid import parse as parse_cpid

    rng = random.Random(7)
    names = [parse_cpid(c).to_dns(ZONE) for c in cpids]
    out: list[tuple[str, str]] = [(n, "TXT") for n in names[:2000]]
    out += [(f"_inference._https.{n}", "SRV") for n in names[:500]]
    scopes = sorted({".".join(reversed(ns.split(".")[: i + 1])).lower() for ns in namespaces
                     for i in range(len(ns.split(".")))})  # fmt: skip
    for scope in scopes:
        out.append((f"_gpu._cpi.{scope}.{ZONE}", "PTR"))
    for model in models:
        out.append((f"_{model.lower()}._gpu._cpi.cn.{ZONE}", "PTR"))
    for i in range(200):
        key = (b"nx-%d" % i).ljust(32, b".")
        out.append((derive("CN.31.CMCC", "GPU", key).to_dns(ZONE), "TXT"))
    rng.shuffle(out)
    return out


def build_zone(port: int, queries: list[tuple[str, str]], path: Path) -> dict[str, int]:
    """Ask our server for every query (TCP) and write the answers as a zone file."""
    lines = [
        f"$ORIGIN {ZONE}",
        f"{ZONE} 5 IN SOA ns.{ZONE} hostmaster.{ZONE} 1 3600 600 86400 5",
        f"{ZONE} 30 IN NS ns.{ZONE}",
    ]
    counts: dict[str, int] = {}
    seen: set[tuple[str, str]] = set()
    for name, rdtype in queries:
        if (name, rdtype) in seen:
            continue
        seen.add((name, rdtype))
        resp = dns.query.tcp(dns.message.make_query(name, rdtype), HOST, port=port, timeout=5)
        rcode = dns.rcode.to_text(resp.rcode())
        counts[f"{rdtype} {rcode}"] = counts.get(f"{rdtype} {rcode}", 0) + 1
        for rrset in resp.answer:
            lines.append(rrset.to_text())
    path.write_text("\n".join(lines) + "\n")
    return counts


# -- load generators ------------------------------------------------------------------------

_QPS = re.compile(r"Queries per second:\s+([0-9.]+)")
_LOST = re.compile(r"Queries lost:\s+(\d+)")


def dnsperf_rate(port: int, qfile: Path, duration: float) -> tuple[float, int]:
    cmd = ["dnsperf", "-s", HOST, "-p", str(port), "-d", str(qfile), "-l", f"{duration:g}",
           "-e", "-c", "1", "-T", "1", "-q", "100", "-t", "2"]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 30).stdout
    m, lost = _QPS.search(out), _LOST.search(out)
    if not m:
        raise RuntimeError(f"dnsperf printed no rate:\n{out}")
    return float(m.group(1)), int(lost.group(1)) if lost else -1


def python_rate(port: int, wires: list[bytes], duration: float) -> tuple[float, int]:
    """Fallback: keep 100 queries outstanding from one asyncio UDP socket."""

    async def run() -> tuple[float, int]:
        loop = asyncio.get_running_loop()
        done = 0
        window = asyncio.Semaphore(100)

        class Client(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: Any) -> None:
                nonlocal done
                done += 1
                window.release()

        transport, _ = await loop.create_datagram_endpoint(Client, remote_addr=(HOST, port))
        sent = 0
        t0 = time.perf_counter()
        end = t0 + duration
        try:
            while time.perf_counter() < end:
                try:
                    async with asyncio.timeout(1.0):
                        await window.acquire()
                except TimeoutError:
                    window.release()  # a lost answer frees its slot
                transport.sendto(wires[sent % len(wires)])
                sent += 1
        finally:
            elapsed = time.perf_counter() - t0
            transport.close()
        return done / elapsed, sent - done

    return asyncio.run(run())


# -- main -----------------------------------------------------------------------------------


def nsd_start(tmp: Path, zone_file: Path, port: int) -> Proc:
    conf = tmp / "nsd.conf"
    conf.write_text(
        f"""server:
    ip-address: {HOST}@{port}
    server-count: 1
    do-ip6: no
    username: ""
    chroot: ""
    zonesdir: "{tmp}"
    pidfile: "{tmp}/nsd.pid"
    xfrdfile: "{tmp}/xfrd.state"
    zonelistfile: "{tmp}/zone.list"
    database: ""
    logfile: "{tmp}/nsd-server.log"
    verbosity: 0
    hide-version: yes
    rrl-ratelimit: 0
    rrl-whitelist-ratelimit: 0
remote-control:
    control-enable: no
zone:
    name: "{ZONE}"
    zonefile: "{zone_file}"
"""
    )
    check = subprocess.run(["nsd-checkconf", str(conf)], capture_output=True, text=True)
    if check.returncode != 0:
        raise RuntimeError(f"nsd-checkconf: {check.stdout}{check.stderr}")
    return Proc("nsd", ["nsd", "-d", "-c", str(conf)], tmp / "nsd.log")


async def wait_ready(proc: Proc, url: str, within: float = 120.0) -> None:
    deadline = time.monotonic() + within
    async with aiohttp.ClientSession() as s:
        while True:
            proc.check()
            with contextlib.suppress(aiohttp.ClientError):
                async with s.get(url + "/readyz") as r:
                    if r.status == 200:
                        return
            if time.monotonic() > deadline:
                raise RuntimeError("the resolver did not get ready")
            await asyncio.sleep(0.1)


async def prepare(args: argparse.Namespace, tmp: Path, procs: list[Proc]) -> tuple[int, Any]:
    from bench.resolve import MODELS, World, namespaces
    from cpi.etcdproc import EtcdProcess
    from registry.index import Index

    etcd = EtcdProcess(data_dir=tmp / "etcd")
    etcd.start()
    etcd.wait_healthy(30)
    world = World(tmp)
    async with Index(endpoints=[etcd.endpoint], timeout=30.0) as index:
        await world.publish(index)
        t0 = time.perf_counter()
        cpids = await populate(index, world, args.records)
        print(
            f"wrote {len(cpids):,} signed records + live statuses in {time.perf_counter() - t0:.1f} s"
        )
    dns_port = await start_resolver(etcd.endpoint, world.anchor_file, tmp, procs, args.rrl)
    queries = query_list(cpids, [ns for ns, _ in namespaces()], [m for _, m in MODELS])
    return dns_port, (etcd, queries, world.anchor_file)


async def start_resolver(
    etcd: str, anchor: Path, tmp: Path, procs: list[Proc], rrl: int | None
) -> int:
    """``cpi resolver serve`` with DNS; ``rrl`` sets ``dns_rrl_responses_per_s`` (None: default)."""
    from cpi.etcdproc import free_port

    dns_port, http_port = free_udp_tcp_port(), free_port()
    conf = tmp / f"resolver-{dns_port}.json"
    settings: dict[str, Any] = {"anchor_files": [str(anchor)]}
    if rrl is not None:
        settings["dns_rrl_responses_per_s"] = rrl
    conf.write_text(json.dumps(settings))
    cmd = [sys.executable, "-m", "cpi", "resolver", "serve", "--config", str(conf),
           "--etcd", etcd, "--listen", f"{HOST}:{http_port}",
           "--dns-port", str(dns_port), "--zone", ZONE, "--insecure"]  # fmt: skip
    ours = Proc("cpi resolver serve", cmd, tmp / f"resolver-{dns_port}.log")
    procs.append(ours)
    t0 = time.perf_counter()
    await wait_ready(ours, f"http://{HOST}:{http_port}")
    limit = (
        "default (50/s per prefix, slip 2)"
        if rrl is None
        else f"{rrl:,}/s per prefix (on, not limiting this load)"
        if rrl
        else "off"
    )
    print(
        f"resolver ready in {time.perf_counter() - t0:.1f} s (DNS on {HOST}:{dns_port}; "
        f"response rate limiting {limit})"
    )
    return dns_port


def amplification(port: int, queries: list[tuple[str, str]]) -> tuple[float, str]:
    """The largest response/query size ratio over UDP (EDNS0, 4096), and for which query."""
    names = sorted({n for n, t in queries if t == "TXT"})[:50]
    asked = sorted(set(queries)) + [(n, "ANY") for n in names] + [(ZONE, "ANY")]
    worst, which = 0.0, ""
    for name, rdtype in asked:
        wire = dns.message.make_query(name, rdtype, use_edns=0, payload=4096).to_wire()
        out = dns.query.udp(dns.message.from_wire(wire), HOST, port=port, timeout=2).to_wire()
        ratio = len(out) / len(wire)
        if ratio > worst:
            worst, which = ratio, f"{name} {rdtype}: {len(wire)} -> {len(out)} bytes"
    return worst, which


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--records", type=int, default=5000)
    ap.add_argument("--duration", type=float, default=3.0, help="seconds per load run")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median reported)")
    ap.add_argument(
        "--rrl",
        type=int,
        default=1_000_000,
        help="dns_rrl_responses_per_s of the measured server (default 1,000,000: on but "
        "never limiting, as the load comes from one client prefix; 0: off); the "
        "default limit (50) is measured once at the end",
    )
    ap.add_argument(
        "--naive-server", nargs=2, metavar=("ZONE_FILE", "PORT"), help=argparse.SUPPRESS
    )
    args = ap.parse_args()
    if args.naive_server:
        naive_server(Path(args.naive_server[0]), int(args.naive_server[1]))
        return
    if not 1 <= args.duration <= 30 or not 1 <= args.rounds <= 9:
        ap.error("--duration 1..30 s and --rounds 1..9 keep the run bounded")

    tmp = Path(tempfile.mkdtemp(prefix="cpi-bench-dns-"))
    procs: list[Proc] = []
    etcd: Any = None
    try:
        print(f"temp dir {tmp}; {os.cpu_count()} CPUs; all traffic on {HOST}")
        our_port, (etcd, queries, anchor) = asyncio.run(prepare(args, tmp, procs))
        qfile = tmp / "queries.txt"
        qfile.write_text("".join(f"{n} {t}\n" for n, t in queries))
        zone_file = tmp / "cpi.zone"
        counts = build_zone(our_port, queries, zone_file)
        print(
            f"{len(queries):,} queries in the list ({len(set(queries)):,} distinct): "
            + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
        )

        naive_port = free_udp_tcp_port()
        naive = Proc("naive dnspython server",
                     [sys.executable, str(Path(__file__).resolve()), "--naive-server",
                      str(zone_file), str(naive_port)], tmp / "naive.log")  # fmt: skip
        procs.append(naive)
        wait_dns(naive, naive_port)
        targets: dict[str, int] = {"ours": our_port, "naive": naive_port}
        if shutil.which("nsd"):
            nsd_port = free_udp_tcp_port()
            nsd = nsd_start(tmp, zone_file, nsd_port)
            procs.append(nsd)
            wait_dns(nsd, nsd_port)
            targets["nsd"] = nsd_port
            print(
                "NSD: "
                + subprocess.run(["nsd", "-v"], capture_output=True, text=True).stderr.splitlines()[
                    0
                ]
            )
        else:
            print("NSD: not installed (apt-get install nsd); that comparison is skipped")

        same = check_same_answers(targets, queries)
        print(f"answers compared across servers on {same} sample queries: identical records")

        rate: Callable[[int, float], tuple[float, int]]
        if shutil.which("dnsperf"):
            help_out = subprocess.run(["dnsperf", "-h"], capture_output=True, text=True)
            version = help_out.stdout + help_out.stderr
            ver = next((ln for ln in version.splitlines() if ln.startswith("Version")), "")
            print(f"load generator: dnsperf {ver.removeprefix('Version ')} "
                  "(UDP, EDNS0, 1 thread, 100 outstanding)")  # fmt: skip

            def rate(port: int, duration: float) -> tuple[float, int]:
                return dnsperf_rate(port, qfile, duration)
        else:
            print("load generator: dnsperf not installed; in-process dnspython/asyncio UDP "
                  "generator (100 outstanding) -- it, not the servers, may be the limit")  # fmt: skip
            wires = [dns.message.make_query(n, t, use_edns=0).to_wire() for n, t in queries]

            def rate(port: int, duration: float) -> tuple[float, int]:
                return python_rate(port, wires, duration)

        for port in targets.values():  # warm-up: fills our cache, wakes the others
            rate(port, 1.0)
        samples: dict[str, list[float]] = {name: [] for name in targets}
        for r in range(args.rounds):
            row = []
            for name, port in targets.items():
                qps, lost = rate(port, args.duration)
                samples[name].append(qps)
                row.append(f"{name} {qps:,.0f} q/s (lost {lost})")
            print(f"round {r + 1}: " + "; ".join(row))
        med = {name: statistics.median(v) for name, v in samples.items()}
        print()
        for name in targets:
            print(f"{name:>6}: median {med[name]:,.0f} queries/s over {args.rounds} rounds")
        ratio = med["ours"] / med["naive"]
        print(
            f"ours / naive dnspython = {ratio:.1f}x (target >= 10) {'OK' if ratio >= 10 else 'BELOW TARGET'}"
        )
        if "nsd" in med:
            r2 = med["ours"] / med["nsd"]
            print(
                f"ours / NSD             = {r2:.2f} (target >= 0.5) {'OK' if r2 >= 0.5 else 'BELOW TARGET'}"
            )
        worst, which = amplification(our_port, queries)
        print(f"largest UDP amplification of ours: {worst:.1f}x ({which})")
        print()
        print("with response rate limiting at its default (one client prefix, so it is limited):")
        rrl_port = asyncio.run(start_resolver(etcd.endpoint, anchor, tmp, procs, None))
        qps, lost = rate(rrl_port, args.duration)
        print(
            f"  ours, RRL default: {qps:,.0f} answers/s (lost {lost}: dropped by the limit; "
            "the rest are mostly slipped TC=1 answers)"
        )
    finally:
        for proc in reversed(procs):
            proc.stop()
        if etcd is not None:
            etcd.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def check_same_answers(targets: dict[str, int], queries: list[tuple[str, str]]) -> int:
    """Every server gives the same records (and rcode) for a sample of the queries."""
    sample = random.Random(3).sample(sorted(set(queries)), min(200, len(set(queries))))
    for name, rdtype in sample:
        seen: dict[str, Any] = {}
        for server, port in targets.items():
            q = dns.message.make_query(name, rdtype, use_edns=0)
            resp = dns.query.udp(q, HOST, port=port, timeout=2)
            if resp.flags & dns.flags.TC:  # ours: more than 10x the query; as a client would
                resp = dns.query.tcp(q, HOST, port=port, timeout=2)
            seen[server] = (
                resp.rcode(),
                sorted(sorted(r.to_text() for r in rrset) for rrset in resp.answer),
            )
        if len({repr(v) for v in seen.values()}) != 1:
            raise RuntimeError(f"servers disagree on {name} {rdtype}: {seen}")
    return len(sample)


if __name__ == "__main__":
    main()
