"""Discovery orders: time per query of each ``sort=`` against the default order, one run.

    python bench/ranking.py [--records 20000] [--rounds 5] [--limit 20]

Builds an in-process replica state (no etcd, no HTTP) holding ``--records`` signed
records, each with a signed status carrying the L0 metrics, a price and site energy
figures spread over the regions of ``seeds/namespaces.json``, then times
``DiscoveryIndex.search`` for the default order (the baseline: score groups, early
stop) and for every other order (keys of every match, then a heap), interleaved rounds,
medians.  Printed: milliseconds per query and the ratio to the default order, first with
a cold score-input cache (the first query after a change reads each payload once) and
then warm.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import random
import statistics
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import seeds
from registry import ca
from registry.index import Keys
from resolver import ranking
from resolver.discovery import LatencyTable, Query
from resolver.state import Change, ReplicaState
from resolver.verify import Context, Job, Outcome, run_jobs
from schemas import keys
from schemas.chain import TrustAnchors
from schemas.cpid import derive
from schemas.models import (
    Accelerator,
    Attributes,
    Capacity,
    CpuInfo,
    Location,
    Record,
    Status,
)

REGIONS = ("11", "13", "15", "31", "32", "34", "42", "50", "51", "52", "62")
MODELS = ("H100", "H800", "H200", "H20", "A800", "L20")


async def _inline(ctx: Context, jobs: Sequence[Job]) -> AsyncIterator[list[Outcome]]:
    yield run_jobs(ctx, jobs)


async def build(n: int) -> ReplicaState:
    root = keys.generate()
    ns_key = keys.generate()
    cert = ca.issue_cert(
        issuer_key=root, issuer_subject="CN", subject="CN", public_key=ns_key, scopes=["issue"]
    )
    state = ReplicaState(
        anchors=TrustAnchors([ca.make_anchor("CN", root)]),
        latency=LatencyTable.from_file(seeds.path(seeds.LATENCY)),
    )
    rev = 2
    await state.apply(
        [Change("put", Keys.cert(keys.kid_of(ns_key)), cert.to_json(), rev)], rev, check=_inline
    )
    rng = random.Random(7)
    now = int(time.time())
    changes: list[Change] = []
    for _ in range(n):
        node = keys.generate()
        region = rng.choice(REGIONS)
        cpid = derive("CN", "GPU", keys.public_raw(node)).to_text()
        count = rng.choice((1, 2, 4, 8, 8))
        rec = Record(
            cpid=cpid, kind="GPU", public_key=keys.public_to_b64url(node), issuer="CN",
            version=1, issued_at=now - 10, expires_at=now + 86_400,
            location=Location(
                region=region, pue=round(rng.uniform(1.15, 1.5), 2),
                grid_gco2_per_kwh=float(rng.randrange(100, 900)),
            ),
            attributes=Attributes(
                cpu=CpuInfo(model="x", cores=64),
                accelerators=[Accelerator(vendor="NVIDIA", model=rng.choice(MODELS),
                                          memory_gib=80, count=count)],
                price_cny_per_unit_hour=round(rng.uniform(4, 30), 1),
            ),
        )  # fmt: skip
        free = rng.randrange(count + 1)
        util = round(rng.uniform(0, 100), 1)
        st = Status(
            cpid=cpid, seq=1, observed_at=now * 1000, state="up",
            capacity=Capacity(accelerators_free=free),
            metrics={"gpu_util": util, "gpu_mem_used_mib": util * 819.2 * count,
                     "gpu_mem_total_mib": 81920.0 * count, "power_w": 300.0 * count},
        )  # fmt: skip
        rev += 1
        changes.append(Change("put", Keys.rec(cpid), ca.sign_document(rec, ns_key).to_json(), rev))
        rev += 1
        changes.append(Change("put", Keys.live(cpid), ca.sign_document(st, node).to_json(), rev))
    await state.apply(changes, rev, check=_inline)
    return state


def per_query_ms(fn: Callable[[], object], n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) * 1000 / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--records", type=int, default=20_000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--limit", type=int, default=20)
    args = ap.parse_args()
    t0 = time.perf_counter()
    state = asyncio.run(build(args.records))
    gc.collect()
    gc.freeze()  # as the resolver does after loading its replica (resolver/replica.py)
    print(f"{args.records} records with statuses built in {time.perf_counter() - t0:.1f} s")
    search = state.discovery.search
    queries = {
        "default (baseline)": Query(kind="GPU", near="31", limit=args.limit),
        "sort=free": Query(kind="GPU", near="31", limit=args.limit, sort="free"),
        "sort=latency": Query(kind="GPU", near="31", limit=args.limit, sort="latency"),
        "sort=score": Query(kind="GPU", near="31", limit=args.limit, sort="score"),
        "sort=price": Query(kind="GPU", near="31", limit=args.limit, sort="price"),
        "sort=carbon": Query(kind="GPU", near="31", limit=args.limit, sort="carbon"),
        "weights=latency:2,price:1": Query(
            kind="GPU", near="31", limit=args.limit, weights=(("communication", 2), ("cost", 1))
        ),
    }
    ranking.clear_cache()  # the cold case
    t0 = time.perf_counter()
    search(queries["sort=score"])
    cold = (time.perf_counter() - t0) * 1000
    samples: dict[str, list[float]] = {k: [] for k in queries}
    for _ in range(args.rounds):
        for name, q in queries.items():
            samples[name].append(per_query_ms(functools.partial(search, q), 3))
    base = statistics.median(samples["default (baseline)"])
    print(f"first sort=score query, score inputs read from every payload: {cold:.1f} ms")
    print(f"{'query':32} {'ms/query':>10} {'x default':>10}")
    for name, vals in samples.items():
        ms = statistics.median(vals)
        print(f"{name:32} {ms:10.2f} {ms / base:10.1f}")


if __name__ == "__main__":
    main()
