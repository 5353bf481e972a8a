"""Gang claims and renewals against the real etcd: all or nothing, one transaction, the
refusal's largest gang, renewal without a free window, HTTP and CLI, bad input, and a
randomized contention run checking the invariants after every operation."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import math
import os
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pytest

from cpi.errors import EXIT_REFUSED, EXIT_USAGE
from registry.index import Compacted, Index, Keys, Prefix
from registry.index.layout import ROOT as KEY_ROOT
from registry.logsigner import LogSigner
from resolver.audit.usage import audit_usage
from resolver.claims.gang import GangSpec
from resolver.claims.service import (
    Claim,
    ClaimNotFoundError,
    ClaimService,
    InsufficientCapacityError,
    QuotaExceededError,
)
from resolver.claims.usage import UsageRecorder
from resolver.client import SyncResolverClient
from resolver.discovery import Query
from schemas import keys as _keys
from schemas.errors import CPIError, IndexTimeoutError
from schemas.usage import Usage, sign_usage_signer
from tests.registry.service_kit import dump
from tests.resolver.claims.test_claims import (
    FAST_CLAIMS,
    ROOT,
    Stack,
    bearer,
    live_node,
    stack,
    units_at,
)
from tests.resolver.kit import Node

__all__ = ["stack"]  # the fixture, imported for these tests


async def part_keys(index: Index) -> list[Claim]:
    kvs, _ = await index.get_prefix(Prefix.CLAIM)
    return [Claim.from_kv(kv) for kv in kvs]


async def nodes(stack: Stack, n: int, *, free: int = 8, **kw: Any) -> list[Node]:
    return [
        await live_node(stack.index, stack.pki, stack.resolver, free=free, count=8, **kw)
        for _ in range(n)
    ]


async def patch(stack: Stack, token: str, claim_id: str, body: Any) -> tuple[int, Any]:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with stack.client.patch(
        f"/v1/claims/{claim_id}", data=raw, headers=bearer(token)
    ) as resp:
        return resp.status, await resp.json()


GANG_64 = {
    "query": {"kind": "GPU", "within": "CN.31"},
    "units": 64,
    "gang": {"per_resource": 8, "max_pairwise_latency_ms": 5},
    "ttl_s": 600,
}


# -- the whole life of a gang over HTTP ------------------------------------------------------------


async def test_64_units_over_8_whole_servers_claimed_renewed_released_over_http(
    stack: Stack,
) -> None:
    near = await nodes(stack, 9, region="31")
    far = await nodes(stack, 3, region="11")  # 23 ms from Shanghai: never in this gang
    token = await stack.token("trainer")

    status, made = await stack.post(token, GANG_64)
    assert status == 201, made
    assert made["units"] == 64 and len(made["parts"]) == 8
    assert all(p["units"] == 8 for p in made["parts"])
    used = {p["cpid"] for p in made["parts"]}
    assert used <= {n.cpid for n in near} and not used & {n.cpid for n in far}
    assert made["cpid"] == made["parts"][0]["cpid"] and made["claim_id"].startswith(
        made["cpid"].replace("/", "~")
    )

    # one transaction: every key at one revision, all parts on one lease
    keys = await part_keys(stack.index)
    assert {k.claim_id for k in keys} == {made["claim_id"]} and len(keys) == 8
    assert len({k.revision for k in keys}) == 1 and len({k.lease for k in keys}) == 1
    assert {(k.cpid, k.units) for k in keys} == {(p["cpid"], 8) for p in made["parts"]}
    anchor = next(k for k in keys if k.cpid == made["cpid"])
    assert [{"cpid": c, "units": u} for c, u in anchor.parts] == made["parts"]
    assert all(k.gang_units == 64 and k.gang_parts == 8 for k in keys)
    for c in used:
        assert await units_at(stack.index, Keys.alloc(c)) == 8
    assert await units_at(stack.index, Keys.holder("trainer")) == 64

    async with stack.client.get("/v1/claims", headers=bearer(token)) as r:
        listed = await r.json()
    assert listed["units"] == 64 and len(listed["claims"]) == 1
    assert listed["claims"][0]["parts"] == made["parts"]

    # renewal: new lease, later expiry, units untouched
    alloc_before = {c: await units_at(stack.index, Keys.alloc(c)) for c in used}
    status, renewed = await patch(stack, token, made["claim_id"], {"ttl_s": 3600})
    assert status == 200, renewed
    assert renewed["claim_id"] == made["claim_id"] and renewed["units"] == 64
    assert renewed["parts"] == made["parts"]
    assert renewed["expires_at"] >= made["expires_at"] + 2900
    keys2 = await part_keys(stack.index)
    assert len(keys2) == 8 and len({k.lease for k in keys2}) == 1
    assert keys2[0].lease != keys[0].lease and len({k.revision for k in keys2}) == 1
    assert all(k.expires_at == renewed["expires_at"] for k in keys2)
    assert {c: await units_at(stack.index, Keys.alloc(c)) for c in used} == alloc_before
    assert await stack.index.lease_time_to_live(keys[0].lease) == -1  # the old lease is revoked

    # another holder can neither renew nor release it
    other = await stack.token("mallory")
    status, body = await patch(stack, other, made["claim_id"], {"ttl_s": 60})
    assert status == 403 and body["error"]["code"] == "forbidden"
    async with stack.client.delete(f"/v1/claims/{made['claim_id']}", headers=bearer(other)) as r:
        assert r.status == 403

    async with stack.client.delete(f"/v1/claims/{made['claim_id']}", headers=bearer(token)) as r:
        assert r.status == 204, await r.text()
    assert await part_keys(stack.index) == []
    for c in used:
        assert await units_at(stack.index, Keys.alloc(c)) == 0
    assert await units_at(stack.index, Keys.holder("trainer")) == 0
    status, body = await patch(stack, token, made["claim_id"], {"ttl_s": 60})
    assert status == 404 and body["error"]["code"] == "claim_not_found"


async def test_a_gang_that_cannot_fit_writes_nothing_and_says_what_fits(stack: Stack) -> None:
    five = await nodes(stack, 5, region="31")
    await nodes(stack, 4, region="32", namespace="CN.32")  # 7.4 ms from 31
    token = await stack.token("trainer")
    before_rev = await stack.index.revision()
    before = await dump(stack.index)

    status, body = await stack.post(token, GANG_64)  # CN.31 has 40 units
    assert status == 409, body
    err = body["error"]
    assert err["code"] == "insufficient_capacity" and err["requested"] == 64
    assert err["available"]["total"] == 40 == err["free"]
    assert {p["cpid"] for p in err["available"]["parts"]} == {n.cpid for n in five}
    assert "largest that fits now has 40 units in 5 parts" in err["message"]

    # 72 units exist over CN, but 31 and 32 are 7.4 ms apart: the largest gang is 40
    wide = {**GANG_64, "query": {"kind": "GPU"}, "units": 72}
    status, body = await stack.post(token, wide)
    assert status == 409 and body["error"]["available"]["total"] == 40
    status, body = await stack.post(
        token, {**wide, "gang": {"per_resource": 8, "same_region": True}}
    )
    assert status == 409 and body["error"]["available"]["total"] == 40

    assert await stack.index.revision() == before_rev  # not a single write
    assert await dump(stack.index) == before

    # with a looser bound it fits, over both regions
    status, made = await stack.post(
        token, {**wide, "gang": {"per_resource": 8, "max_pairwise_latency_ms": 10}}
    )
    assert status == 201 and made["units"] == 72 and len(made["parts"]) == 9


async def test_gang_quota_and_per_resource_ranges(stack: Stack) -> None:
    ns = await nodes(stack, 3, free=6, region="31")
    token = await stack.token("small", max_units=10)
    status, body = await stack.post(
        token, {"query": {"kind": "GPU"}, "units": 12, "gang": {"per_resource": {"min": 2}}}
    )
    assert status == 429 and body["error"]["code"] == "quota_exceeded"
    status, made = await stack.post(
        token, {"query": {"kind": "GPU"}, "units": 10, "gang": {"per_resource": {"max": 4}}}
    )
    assert status == 201 and sorted(p["units"] for p in made["parts"]) == [2, 4, 4]
    assert {p["cpid"] for p in made["parts"]} == {n.cpid for n in ns}
    with pytest.raises(QuotaExceededError):
        await stack.service.claim_gang(
            Query(kind="GPU"), spec=GangSpec(units=1), holder="small", max_units=10
        )


# -- bad requests --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ({"cpid": "CN.31.CMCC/GPU.4K7Q9M2XH3PT-Z", "units": 8, "gang": {}}, "needs a"),
        ({"query": {}, "units": 8, "gang": {"per_resource": 16}}, "more than the 8"),
        ({"query": {}, "units": 8, "gang": {"per_resource": 0}}, "between 1"),
        ({"query": {}, "units": 0, "gang": {}}, "between 1"),
        ({"query": {}, "units": 2**70, "gang": {}}, "between 1"),
        ({"query": {}, "units": 64, "gang": {"per_resource": 2**70}}, "between 1"),
        ({"query": {}, "units": 1000, "gang": {"per_resource": 1}}, "need 1000 parts"),
        ({"query": {}, "units": 64, "gang": {"per_resource": 7}}, "cannot be split"),
        ({"query": {}, "units": 8, "gang": {"parts": 2}}, "unknown gang field"),
        ({"query": {}, "units": 8, "gang": {"per_resource": {"min": 1, "avg": 2}}}, "unknown"),
        ({"query": {}, "units": 8, "gang": {"per_resource": {"min": 4, "max": 2}}}, "above max"),
        ({"query": {}, "units": 8, "gang": {"per_resource": "8"}}, "integer"),
        ({"query": {}, "units": 8, "gang": {"max_pairwise_latency_ms": -5}}, "above 0"),
        ({"query": {}, "units": 8, "gang": {"max_pairwise_latency_ms": "5"}}, "number"),
        ({"query": {}, "units": 8, "gang": {"same_region": 1}}, "true or false"),
        ({"query": {}, "units": 8, "gang": []}, "JSON object"),
        ({"query": {}, "units": 8, "gang": {}, "parts": []}, "unknown field"),
        ({"query": {}, "units": 8, "gang": {}, "ttl_s": 0}, "ttl_s"),
    ],
)
async def test_bad_gang_requests_are_400_and_write_nothing(
    stack: Stack, body: dict[str, Any], match: str
) -> None:
    await nodes(stack, 1)
    token = await stack.token()
    before = await stack.index.revision()
    status, answer = await stack.post(token, body)
    assert status == 400, answer
    assert answer["error"]["code"] == "invalid_claim" and match in answer["error"]["message"]
    assert await stack.index.revision() == before


async def test_bad_renewals(stack: Stack) -> None:
    (node,) = await nodes(stack, 1)
    token = await stack.token()
    _, made = await stack.post(token, {"cpid": node.cpid, "units": 2})
    cid = made["claim_id"]
    for body, code, status in [
        ({}, "invalid_claim", 400),
        ({"ttl_s": 0}, "invalid_claim", 400),
        ({"ttl_s": 10**12}, "invalid_claim", 400),
        ({"ttl_s": "60"}, "invalid_claim", 400),
        ({"ttl_s": 60, "units": 3}, "invalid_claim", 400),
        (b"[1]", "invalid_claim", 400),
        (b'{"ttl_s": 1, "ttl_s": 2}', "invalid_claim", 400),
    ]:
        got, answer = await patch(stack, token, cid, body)
        assert (got, answer["error"]["code"]) == (status, code), (body, answer)
    got, answer = await patch(stack, token, "not-a-claim-id", {"ttl_s": 60})
    assert got == 400
    got, answer = await patch(stack, token, cid[:-4] + "AAAA", {"ttl_s": 60})
    assert got == 404
    async with stack.client.patch(f"/v1/claims/{cid}", json={"ttl_s": 60}) as r:
        assert r.status == 401
    got, answer = await patch(stack, token, cid, {"ttl_s": 60})
    assert got == 200 and answer["units"] == 2 and "parts" not in answer


# -- renewal never frees the units -----------------------------------------------------------------


async def test_renewal_keeps_the_units_held_throughout(stack: Stack) -> None:
    (node,) = await nodes(stack, 1, free=4)
    service = stack.service
    claim = await service.claim(node.cpid, units=4, ttl_s=2, holder="alice")
    gang_nodes = await nodes(stack, 2, free=8)
    gang = await service.claim_gang(
        Query(kind="GPU"), spec=GangSpec(units=16, per_min=8, per_max=8), ttl_s=2, holder="alice"
    )
    assert {c for c, _ in gang.parts} == {n.cpid for n in gang_nodes}
    other = ClaimService(index=stack.index, resolver=stack.resolver, settings=FAST_CLAIMS)
    stolen: list[str] = []
    refused = Counter[str]()
    renewing = True

    async def claimer() -> None:
        while renewing:
            for c in (node.cpid, *(n.cpid for n in gang_nodes)):
                try:
                    got = await other.claim(c, units=1, holder="bob")
                    stolen.append(got.claim_id)
                except CPIError as exc:
                    refused[exc.code] += 1
            await asyncio.sleep(0.02)

    async def renewer() -> None:
        nonlocal renewing
        for _ in range(4):  # until well past both original expiries
            await asyncio.sleep(0.8)
            await service.renew(claim.claim_id, holder="alice", ttl_s=3)
            await service.renew(gang.claim_id, holder="alice", ttl_s=3)
        await asyncio.sleep(0.5)
        renewing = False

    await asyncio.gather(claimer(), renewer())
    assert stolen == [] and refused["insufficient_capacity"] > 50
    assert await units_at(stack.index, Keys.alloc(node.cpid)) == 4
    for n in gang_nodes:
        assert await units_at(stack.index, Keys.alloc(n.cpid)) == 8
    assert len(await part_keys(stack.index)) == 3

    # without renewal the claims end: then a renewal is too late
    async def ended() -> bool:
        return await part_keys(stack.index) == []

    await until_true(ended, within=10)
    with pytest.raises(ClaimNotFoundError):
        await service.renew(gang.claim_id, holder="alice", ttl_s=60)
    await until_true(
        lambda: _zero(stack.index, [node.cpid, *(n.cpid for n in gang_nodes)]), within=10
    )


async def _zero(index: Index, cpids: list[str]) -> bool:
    return all([await units_at(index, Keys.alloc(c)) == 0 for c in cpids])


async def until_true(check: Any, *, within: float) -> None:
    end = time.monotonic() + within
    while not await check():
        assert time.monotonic() < end, f"{check} not true within {within} s"
        await asyncio.sleep(0.05)


async def test_an_expired_gang_whose_keys_remain_is_removed_whole(stack: Stack) -> None:
    await nodes(stack, 2)
    clock = [time.time()]
    svc = ClaimService(
        index=stack.index, resolver=stack.resolver, settings=FAST_CLAIMS, clock=lambda: clock[0]
    )
    gang = await svc.claim_gang(Query(kind="GPU"), spec=GangSpec(16, 8, 8), holder="eve")
    clock[0] += 3600  # past expires_at, while the lease still holds the keys
    assert await svc.list_claims("eve") == []
    report = await svc.reconcile()
    assert report.claims == 2
    await until_true(lambda: _no_keys(stack.index), within=5)
    for c, _ in gang.parts:
        assert await units_at(stack.index, Keys.alloc(c)) == 0
    assert await units_at(stack.index, Keys.holder("eve")) == 0


async def _no_keys(index: Index) -> bool:
    return await part_keys(index) == []


# -- the CLI -------------------------------------------------------------------------------


async def cli(*argv: str, env: dict[str, str]) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cpi",
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
        cwd=ROOT,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert b"Traceback" not in err, err.decode()
    return proc.returncode or 0, out.decode(), err.decode()


async def test_64_units_over_8_whole_servers_through_the_cli(stack: Stack) -> None:
    await nodes(stack, 8, region="31")
    token = await stack.token("trainer")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CPI_")}
    env.update(
        PYTHONPATH=str(ROOT),
        CPI_INSECURE="1",
        CPI_CLAIMS_TOKEN=token,
        CPI_RESOLVER=str(stack.client.make_url("")).rstrip("/"),
    )
    gang = ["--within", "CN.31", "--per-resource", "8", "--max-pairwise-latency", "5"]
    rc, out, err = await cli("claim", "--gang", "--units", "64", *gang, "--ttl", "10m", env=env)
    assert rc == 0, err
    claim_id = out.strip()
    assert "claimed 64 units over 8 resources" in err
    assert await units_at(stack.index, Keys.holder("trainer")) == 64

    rc, out, err = await cli("claim", "--gang", "--units", "8", *gang, "--json", env=env)
    assert rc == EXIT_REFUSED and "insufficient_capacity" in err, err
    assert "available now: no gang fits at all" in err

    rc, out, err = await cli("claim", "renew", claim_id, "--ttl", "1h", "--json", env=env)
    assert rc == 0, err
    renewed = json.loads(out)
    assert renewed["units"] == 64 and len(renewed["parts"]) == 8
    assert renewed["expires_at"] >= time.time() + 3500

    rc, out, err = await cli("claim", "list", "-o", "json", env=env)
    assert rc == 0 and json.loads(out)["units"] == 64

    rc, out, err = await cli("claim", "release", claim_id, env=env)
    assert rc == 0, err
    assert await part_keys(stack.index) == []
    assert await units_at(stack.index, Keys.holder("trainer")) == 0

    rc, _, err = await cli("claim", "--per-resource", "8", "--units", "8", "--kind", "GPU", env=env)
    assert rc == EXIT_USAGE and "only with --gang" in err


# -- randomized contention -----------------------------------------------------------------


CAPACITY = 8


@dataclass
class Run:
    """What the randomized run made: claim id -> (holder, {cpid: units}) and what ended."""

    made: dict[str, tuple[str, dict[str, int]]] = field(default_factory=dict)
    released: set[str] = field(default_factory=set)
    created: dict[str, int] = field(default_factory=dict)
    """claim id -> its ``created_at`` (the start of its first usage period)."""
    parts: dict[str, list[tuple[str, int]]] = field(default_factory=dict)
    """claim id -> its ``(cpid, units)`` in order (a gang's anchor first)."""
    released_by: dict[str, int] = field(default_factory=dict)
    """claim id -> the time (s, rounded up) by which the run's release returned."""
    ops: Counter[str] = field(default_factory=Counter)
    checks: int = 0
    with_expired: int = 0
    """Checks that saw claims whose leases had run out (the expiry path was exercised)."""


async def check_invariants(index: Index, run: Run, cpids: list[str]) -> None:
    """At one revision: no partial gang; every /alloc/ (and /holders/) total equals the
    units of the claim keys that exist, plus at most the units of claims whose leases
    ran out and that the reconciler has not yet subtracted; none above capacity."""
    rev = await index.revision()
    claim_kvs, _ = await index.get_prefix(Prefix.CLAIM, revision=rev)
    alloc_kvs, _ = await index.get_prefix(Prefix.ALLOC, revision=rev)
    holder_kvs, _ = await index.get_prefix(Prefix.HOLDERS, revision=rev)
    present: dict[str, list[Claim]] = {}
    on_cpid: Counter[str] = Counter()
    by_holder: Counter[str] = Counter()
    for kv in claim_kvs:
        c = Claim.from_kv(kv)
        present.setdefault(c.claim_id, []).append(c)
        on_cpid[c.cpid] += c.units
        by_holder[c.holder] += c.units
    for claim_id, parts in present.items():
        first = parts[0]
        if first.is_gang:  # all parts or none, one lease, one revision
            assert len(parts) == first.gang_parts, (claim_id, parts)
            assert sum(p.units for p in parts) == first.gang_units
            assert len({p.lease for p in parts}) == 1 and len({p.revision for p in parts}) == 1
            anchor = [p for p in parts if p.parts]
            assert len(anchor) == 1 and set(anchor[0].parts) == {(p.cpid, p.units) for p in parts}
    gone: Counter[str] = Counter()  # units of claims gone by lease, not by release
    gone_holder: Counter[str] = Counter()
    for claim_id, (holder, units) in run.made.items():
        if claim_id not in present and claim_id not in run.released:
            for c, u in units.items():
                gone[c] += u
                gone_holder[holder] += u
    run.with_expired += bool(gone)
    alloc = {kv.key.removeprefix(Prefix.ALLOC): json.loads(kv.value)["units"] for kv in alloc_kvs}
    for c in cpids:
        total = alloc.get(c, 0)
        assert total <= CAPACITY, (c, total)
        assert on_cpid[c] <= total <= on_cpid[c] + gone[c], (c, total, on_cpid[c], gone[c])
    held = {kv.key.removeprefix(Prefix.HOLDERS): json.loads(kv.value)["units"] for kv in holder_kvs}
    for h, total in held.items():
        assert by_holder[h] <= total <= by_holder[h] + gone_holder[h], (h, total)
    run.checks += 1


async def test_randomized_contention_never_over_allocates_nor_leaves_a_partial_gang(
    stack: Stack,
) -> None:
    ns = await nodes(stack, 6, free=CAPACITY, region="31")
    ns += await nodes(stack, 3, free=CAPACITY, region="32", namespace="CN.32")
    cpids = [n.cpid for n in ns]
    # every claim is metered: both services sign usage receipts (each its own audit stream)
    usage_key = _keys.generate()
    now = int(time.time())
    signer_env = sign_usage_signer(
        stack.pki.root, usage_key, subject="CN", not_before=now - 3600, not_after=now + 86400
    )
    await stack.index.put(Keys.usage_signer(_keys.kid_of(usage_key)), signer_env.to_json())
    stack.service.usage = UsageRecorder(stack.index, usage_key)
    # two services: one process's leaders and gates, and another meeting it at the compares
    services = [
        stack.service,
        ClaimService(
            index=stack.index,
            resolver=stack.resolver,
            settings=FAST_CLAIMS,
            usage=UsageRecorder(stack.index, usage_key),
        ),
    ]
    run = Run()
    rng = random.Random(int(os.environ.get("CPI_GANG_SEED", "15")))
    outcomes: Counter[str] = Counter()

    async def worker(w: int) -> None:
        holder = f"h{w % 4}"
        mine: list[str] = []
        svc = services[w % 2]
        for _ in range(45):
            op = rng.choice(["gang", "gang", "single", "single", "release", "renew"])
            ttl = rng.choice([30, 30, 30, 1, 2])
            try:
                if op == "gang":
                    per = rng.choice([(8, 8), (4, 4), (1, 8), (2, 6)])
                    units = (
                        rng.choice([8, 16, 24, 32])
                        if per[0] != per[1]
                        else per[0] * rng.randint(1, 4)
                    )
                    spec = GangSpec(
                        units,
                        *per,
                        max_pairwise_latency_ms=rng.choice([None, 5.0]),
                        same_region=rng.random() < 0.2,
                    )
                    g = await svc.claim_gang(Query(kind="GPU"), spec=spec, ttl_s=ttl, holder=holder)
                    run.made[g.claim_id] = (holder, dict(g.parts))
                    run.created[g.claim_id] = g.created_at
                    run.parts[g.claim_id] = list(g.parts)
                    mine.append(g.claim_id)
                elif op == "single":
                    c = await svc.claim(
                        rng.choice(cpids), units=rng.randint(1, 3), ttl_s=ttl, holder=holder
                    )
                    run.made[c.claim_id] = (holder, {c.cpid: c.units})
                    run.created[c.claim_id] = c.created_at
                    run.parts[c.claim_id] = [(c.cpid, c.units)]
                    mine.append(c.claim_id)
                elif op == "release" and mine:
                    cid = mine.pop(rng.randrange(len(mine)))
                    await svc.release(cid, holder=holder)
                    run.released.add(cid)
                    run.released_by[cid] = math.ceil(time.time())
                elif op == "renew" and mine:
                    await svc.renew(rng.choice(mine), holder=holder, ttl_s=ttl)
                else:
                    op = "noop"
                outcomes[f"{op} ok"] += 1
            except CPIError as exc:
                outcomes[f"{op} {exc.code}"] += 1
            run.ops[op] += 1
            await check_invariants(stack.index, run, cpids)
            await asyncio.sleep(rng.uniform(0.04, 0.1))  # the run outlasts the short TTLs

    await asyncio.gather(*(worker(w) for w in range(8)))
    assert sum(run.ops.values()) == 360 and run.checks == 360
    assert outcomes["gang ok"] >= 3 and outcomes["single ok"] >= 10, outcomes
    assert outcomes["gang insufficient_capacity"] >= 3, outcomes  # there was contention
    assert outcomes["renew ok"] >= 3 and outcomes["release ok"] >= 3, outcomes
    assert not any(k.endswith(("unavailable", "internal")) for k in outcomes), outcomes
    assert run.with_expired > 0  # some claims ended by their leases running out

    # once every claim has ended or is released, the reconciler brings all totals to 0
    for cid, (holder, _) in list(run.made.items()):
        if cid not in run.released:
            with contextlib.suppress(ClaimNotFoundError):
                await stack.service.release(cid, holder=holder)
            run.released.add(cid)
    await check_invariants(stack.index, run, cpids)
    stack.service.trigger_reconcile()

    async def settled() -> bool:
        meters, _ = await stack.index.get_prefix(Prefix.METER)
        return await _zero(stack.index, cpids) and await part_keys(stack.index) == [] and not meters

    await until_true(settled, within=15)
    await check_usage(stack, run, services)
    print(dict(outcomes))


async def check_usage(stack: Stack, run: Run, services: list[ClaimService]) -> None:
    """After every claim ended: each claim's receipts chain from its ``created_at`` without
    gap or overlap (renewals, then one release or expiry) and list its parts; the totals
    of ``cpi usage`` (from the log alone) equal the sum over the claims of units x the
    seconds each was held, per holder and per namespace."""
    log = LogSigner(stack.index, _keys.generate())
    await log.load()
    await log.sign()
    rep = await audit_usage(
        stack.index,
        verifier=log.verifier,
        anchors=stack.pki.anchors,
        since=0,
        until=int(time.time()) + 3600,
    )
    assert rep.ok and not rep.unlogged, (rep.checks, rep.problems, rep.unlogged)
    chains: dict[str, list[Usage]] = {}
    for r in rep.receipts:
        if not chains.get(r.receipt.claim_id) or chains[r.receipt.claim_id][-1] != r.receipt:
            chains.setdefault(r.receipt.claim_id, []).append(r.receipt)
    assert set(chains) == set(run.made)  # every claim made was billed, nothing else
    want_holder: Counter[str] = Counter()
    want_ns: Counter[str] = Counter()
    for cid, (holder, _) in run.made.items():
        chain = sorted(chains[cid], key=lambda u: u.n)
        assert [u.n for u in chain] == list(range(1, len(chain) + 1)), cid
        assert chain[0].start == run.created[cid], cid
        for before, after in itertools.pairwise(chain):
            assert before.reason == "renewal" and after.start == before.end, cid
        assert chain[-1].reason in ("release", "expiry"), cid
        assert all(u.holder == holder and u.split() == run.parts[cid] for u in chain), cid
        end = chain[-1].end
        assert run.created[cid] <= end <= run.released_by.get(cid, end), cid
        for cpid, units in run.parts[cid]:
            want_holder[holder] += units * (end - run.created[cid])
            want_ns[cpid.split("/")[0]] += units * (end - run.created[cid])
    assert {h: t["unit_seconds"] for h, t in rep.totals("holder").items()} == dict(want_holder)
    assert {n: t["unit_seconds"] for n, t in rep.totals("namespace").items()} == dict(want_ns)
    written = sum(s.usage.written for s in services if s.usage is not None)
    assert written == sum(len(c) for c in chains.values())
    print(
        f"usage: {written} receipts for {len(run.made)} claims, {sum(want_holder.values())} unit-s"
    )


async def test_gang_refusal_is_read_from_etcd_not_from_the_replica(stack: Stack) -> None:
    """The replica lags: a gang planned on stale free units is re-planned on fresh ones."""
    ns = await nodes(stack, 3)
    holder = "zed"
    # claims the replica has not seen yet (written through a second service, checked at once)
    other = ClaimService(index=stack.index, resolver=stack.resolver, settings=FAST_CLAIMS)
    await other.claim(ns[0].cpid, units=8, holder="x")
    with pytest.raises(InsufficientCapacityError) as info:
        await stack.service.claim_gang(Query(kind="GPU"), spec=GangSpec(24, 8, 8), holder=holder)
    assert info.value.free == 16 and len(info.value.available or ()) == 2
    got = await stack.service.claim_gang(Query(kind="GPU"), spec=GangSpec(16, 8, 8), holder=holder)
    assert {c for c, _ in got.parts} == {ns[1].cpid, ns[2].cpid}


# -- what a watcher sees ---------------------------------------------------------------------


async def test_a_watcher_sees_a_gang_in_one_revision_or_not_at_all(stack: Stack) -> None:
    ns = await nodes(stack, 4)
    start = await stack.index.revision() + 1
    svc = stack.service
    gang = await svc.claim_gang(Query(kind="GPU"), spec=GangSpec(32, 8, 8), holder="w")
    await svc.renew(gang.claim_id, holder="w", ttl_s=120)
    await svc.release(gang.claim_id, holder="w")
    end = await stack.index.revision()
    await stack.index.put(Keys.holder("sentinel"), '{"units":0}')  # after every event we want
    by_rev: dict[int, list[tuple[str, str]]] = {}
    async with stack.index.watch_prefix(KEY_ROOT, start_revision=start) as watch:
        async for ev in watch:
            assert not isinstance(ev, Compacted)
            if ev.revision > end:
                break
            by_rev.setdefault(ev.revision, []).append((ev.type, ev.kv.key))
    claim_keys = {Keys.claim(n.cpid, gang.claim_id) for n in ns}
    alloc_keys = {Keys.alloc(n.cpid) for n in ns}
    touching = {rev: evs for rev, evs in by_rev.items() if {k for _, k in evs} & claim_keys}
    # grant, renewal, release: three revisions, each with every part (and the totals)
    assert len(touching) == 3, touching
    grant, renewal, release = (touching[r] for r in sorted(touching))
    assert {k for t, k in grant if t == "put"} == claim_keys | alloc_keys | {Keys.holder("w")}
    assert {k for t, k in renewal} == claim_keys  # the totals are not touched
    assert {k for t, k in release if t == "delete"} == claim_keys
    assert {k for t, k in release if t == "put"} == alloc_keys | {Keys.holder("w")}


async def test_the_sync_client_claims_renews_and_releases_a_gang(stack: Stack) -> None:
    """SyncResolverClient (a script's client, in a thread) against the HTTP routes."""
    await nodes(stack, 2)
    token = await stack.token("script")
    url = str(stack.client.make_url("")).rstrip("/")

    def script() -> None:
        with SyncResolverClient(url, claims_token=token) as client:
            gang = client.claim_gang(kind="GPU", units=16, per_resource=8, ttl_s=60)
            assert gang.units == 16 and len(gang.parts) == 2
            renewed = client.renew(gang, ttl_s=600)
            assert renewed.expires_at > gang.expires_at and renewed.parts == gang.parts
            held = client.holdings()
            assert held.units == 16 and held.claims[0].parts == gang.parts
            client.release(gang)
            assert client.holdings().units == 0

    await asyncio.to_thread(script)


# -- an unknown outcome ----------------------------------------------------------------------


@pytest.mark.parametrize("applied", [True, False])
async def test_a_gang_whose_transaction_outcome_is_unknown(
    stack: Stack, monkeypatch: pytest.MonkeyPatch, applied: bool
) -> None:
    """etcd timed out on the gang's transaction: the anchor's key says whether it ran."""
    await nodes(stack, 2)
    index = stack.index
    real = index.txn

    async def flaky(**kw: Any) -> Any:
        writes_claims = any(
            op.kind == "put" and op.key.startswith(Prefix.CLAIM) for op in kw.get("success", ())
        )
        if kw.get("compare") and writes_claims:
            monkeypatch.setattr(index, "txn", real)  # once
            if applied:
                await real(**kw)
            raise IndexTimeoutError("etcd did not answer in time")
        return await real(**kw)

    monkeypatch.setattr(index, "txn", flaky)
    svc = ClaimService(index=index, resolver=stack.resolver, settings=FAST_CLAIMS)
    spec = GangSpec(16, 8, 8)
    if applied:
        gang = await svc.claim_gang(Query(kind="GPU"), spec=spec, holder="u")
        assert len(await part_keys(index)) == 2
        assert all([await units_at(index, Keys.alloc(c)) == 8 for c, _ in gang.parts])
    else:
        with pytest.raises(IndexTimeoutError):
            await svc.claim_gang(Query(kind="GPU"), spec=spec, holder="u")
        await svc.close()  # its lease revocation has run
        assert await part_keys(index) == [] and await units_at(index, Keys.holder("u")) == 0
