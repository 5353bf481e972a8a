"""The verified replica against the real etcd: what is served, and what never is."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from registry import ca
from registry.index import Index, Keys, KVPage, Prefix
from resolver import replica as resolver_replica
from resolver import state as resolver_state
from resolver.core import Resolver
from resolver.discovery import Query
from resolver.errors import NotReadyError
from resolver.replica import Replica, SyncSettings
from resolver.state import ReplicaSettings, ReplicaState
from resolver.verify import Verifier
from schemas import dsse, keys
from schemas.errors import InvalidCPIDError, NotFoundError, RetrievalError
from tests.resolver.kit import FAST, Node, Pki, make_resolver, put_record, put_status, signed
from tests.until import until

# -- what is served ----------------------------------------------------------------------


async def test_resolve_after_a_record_is_written(
    index: Index, pki: Pki, resolver: Resolver
) -> None:
    node = Node()
    rev = await put_record(index, pki, node)
    await until(lambda: resolver.get(node.cpid) is not None, what="the record to be served")
    entry = resolver.resolve(node.cpid.lower())  # any case
    assert entry.cpid == node.cpid
    assert entry.kid == pki.kid("CN.31.CMCC")
    assert entry.version == 1 and entry.record_revision == rev and entry.revision == rev
    assert [c.keyid for c in entry.chain] == [pki.kid("CN.31"), keys.kid_of(pki.root)]
    assert entry.endpoints[0].port == 443
    assert (entry.live, entry.status, entry.live_expires_at, entry.live_ttl()) == (
        False,
        None,
        None,
        0,
    )
    assert resolver.revision >= rev

    # a status on a lease: live, with the lease's expiry as the bound for DNS TTLs
    lease = await index.grant_lease(20)
    rev2 = await put_status(index, node, free=5, lease=lease.id)
    await until(lambda: resolver.resolve(node.cpid).live, what="the status")
    await until(lambda: resolver.resolve(node.cpid).live_expires_at is not None, what="lease TTL")
    entry2 = resolver.resolve(node.cpid)
    assert entry2.status is not None and entry2.status.capacity.accelerators_free == 5
    assert entry2.free == 5 and entry2.revision == rev2 and entry2.lease == lease.id
    assert 15 <= entry2.live_ttl() <= 20
    assert entry2 is not entry
    await lease.revoke()


async def test_lookups_of_malformed_and_unknown_cpids(resolver: Resolver) -> None:
    with pytest.raises(InvalidCPIDError, match="check character is 'Y', expected 'Z'"):
        resolver.get("CN.31.CMCC/GPU.4K7Q9M2XH3PT-Y")
    assert resolver.get("CN.31.CMCC/GPU.4K7Q9M2XH3PT-Z") is None
    with pytest.raises(NotFoundError, match="is not in the index"):
        resolver.resolve("cn.31.cmcc/gpu.4k7q9m2xh3pt-z")


async def test_lookups_before_the_first_listing_say_not_ready(index: Index, pki: Pki) -> None:
    r = make_resolver(index, pki)
    with pytest.raises(NotReadyError, match="not finished listing"):
        r.get("CN.31.CMCC/GPU.4K7Q9M2XH3PT-Z")
    with pytest.raises(NotReadyError):
        r.discover(Query())


# -- what is never served ------------------------------------------------------------------


def _forged_with_kid(pki: Pki, rec: Any) -> dsse.Envelope:
    """Signed by a stranger's key, but naming the registry's key id."""
    env = ca.sign_document(rec, keys.generate())
    return dsse.Envelope(
        env.payload_type,
        env.payload,
        (dsse.Signature(pki.kid("CN.31.CMCC"), env.signatures[0].sig),),
    )


def _tampered(pki: Pki, rec: Any) -> dsse.Envelope:
    env = signed(pki, rec)
    return dsse.Envelope(
        env.payload_type, env.payload.replace(b'"count":8', b'"count":9'), env.signatures
    )


def _status_doc(node: Node) -> Any:
    from schemas.models import Status, parse_payload

    env = node.status()
    return parse_payload(env.payload_type, env.payload, Status)


def _extra_field(pki: Pki, node: Node) -> dsse.Envelope:
    payload = node.record().to_json()[:-1] + b',"extra":1}'
    return dsse.sign("application/vnd.cpi.record.v1+json", payload, pki.key_of("CN.31.CMCC"))


def _swapped_key(pki: Pki, node: Node) -> dsse.Envelope:
    other = keys.generate()
    return signed(pki, node.record(public_key=keys.public_to_b64url(other)))


Case = Callable[[Pki, Node], "tuple[str, bytes] | Any"]

NOW = int(time.time())
BAD: list[tuple[str, str, Callable[[Pki, Node], dsse.Envelope | bytes]]] = [
    (
        "forged: a stranger's key",
        "unsigned",
        lambda p, n: ca.sign_document(n.record(), keys.generate()),
    ),
    (
        "forged: a stranger's key naming the registry's kid",
        "bad_signature",
        lambda p, n: _forged_with_kid(p, n.record()),
    ),
    ("tampered payload", "bad_signature", lambda p, n: _tampered(p, n.record())),
    (
        "unsigned: signer's cert not in the index",
        "unsigned",
        lambda p, n: signed(p, n.record(issuer="CN.51"), "CN.51"),
    ),
    (
        "expired",
        "expired",
        lambda p, n: signed(p, n.record(issued_at=NOW - 7200, expires_at=NOW - 3600)),
    ),
    ("not yet valid", "not_yet_valid", lambda p, n: signed(p, n.record(issued_at=NOW + 3600))),
    (
        "outside namespace: CN.3 signs a CN.31 CPID",
        "outside_namespace",
        lambda p, n: signed(p, n.record(issuer="CN.3"), "CN.3"),
    ),
    (
        "issuer mismatch",
        "issuer_mismatch",
        lambda p, n: signed(p, n.record(issuer="CN.31"), "CN.31.CMCC"),
    ),
    ("serial/key mismatch", "key_mismatch", lambda p, n: _swapped_key(p, n)),
    ("kind mismatch", "key_mismatch", lambda p, n: signed(p, n.record(kind="NPU"))),
    (
        "signer without scope issue",
        "scope",
        lambda p, n: signed(p, n.record(issuer="CN.31.DLG"), "CN.31.DLG"),
    ),
    ("not an envelope", "malformed", lambda p, n: b'{"payloadType": 1}'),
    (
        "a status signed by the registry",
        "bad_payload",
        lambda p, n: ca.sign_document(_status_doc(n), p.key_of("CN.31.CMCC")),
    ),
    ("unknown field in the signed record", "bad_payload", lambda p, n: _extra_field(p, n)),
]


@pytest.mark.parametrize(("case", "reason", "build"), BAD, ids=[c[0] for c in BAD])
async def test_bad_records_are_never_served(
    index: Index,
    pki: Pki,
    resolver: Resolver,
    case: str,
    reason: str,
    build: Callable[[Pki, Node], dsse.Envelope | bytes],
) -> None:
    pki.delegate("CN", "CN.51", ["issue"], issuer_key=pki.root)  # never published
    pki.delegate("CN.31", "CN.31.DLG", ["delegate"])
    await pki.publish(index, "CN.31.DLG")
    node = Node(namespace="CN.31.DLG") if reason == "scope" else Node()
    value = build(pki, node)
    rev = await index.put(
        Keys.rec(node.cpid), value if isinstance(value, bytes) else value.to_json()
    )
    await until(lambda: resolver.revision >= rev, what="the write to be applied")
    assert resolver.get(node.cpid) is None
    with pytest.raises(NotFoundError, match=f"fails verification: {reason}"):
        resolver.resolve(node.cpid)
    assert resolver._state.failures[reason] == 1
    assert resolver.health()["rejected"] == {reason: 1}
    assert resolver.discover(Query()).results == []


async def test_a_bulk_load_decides_exactly_like_small_batches(
    index: Index, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first listing of a large index -- ``/rec/`` streamed in batches, envelopes
    parsed by ``raw`` jobs in worker processes, statuses verified alongside, entries
    built as chunks arrive -- serves and rejects exactly what small inline batches do."""
    await pki.publish(index)
    pki.delegate("CN", "CN.51", ["issue"], issuer_key=pki.root)  # never published
    pki.delegate("CN.31", "CN.31.DLG", ["delegate"])
    await pki.publish(index, "CN.31.DLG")
    expected: dict[str, str] = {}
    for _, reason, build in BAD:
        node = Node(namespace="CN.31.DLG") if reason == "scope" else Node()
        value = build(pki, node)
        await index.put(Keys.rec(node.cpid), value if isinstance(value, bytes) else value.to_json())
        await put_status(index, node)
        expected[node.cpid] = reason
    a, b = Node(), Node()
    await index.put(Keys.rec(b.cpid), signed(pki, a.record()).to_json())
    expected[b.cpid] = "wrong_key"
    good = [Node(model=m) for m in ("H100", "H100", "910B", "A800", "L40S", "H200")]
    for node in good:
        await put_record(index, pki, node)
    for node in good[:4]:
        await put_status(index, node, free=3)
    await index.put(Keys.live(good[4].cpid), good[4].status(cpid=good[0].cpid).to_json())

    def seen(r: Resolver) -> tuple[dict[str, Any], dict[str, Any], dict[str, int], Any]:
        # records and statuses held compressed, whether sealed inline or in a worker
        forms = {(type(e.sealed).__name__, type(e.status_sealed).__name__) for e in r.entries()}
        assert forms <= {("Packed", "Packed"), ("Packed", "NoneType")}, forms
        served = {e.cpid: (e.body(), e.status_facts, e.free) for e in r.entries()}
        # the two runs may read the clock in different seconds: "now is <t>" differs
        rejected = {
            c: None if why is None else (why[0], re.sub(r"now is \d+", "now is T", why[1]))
            for c in expected
            for why in [r._state.rejection(c)]
        }
        return served, rejected, dict(r._state.failures), r.health()["rejected"]

    results = []
    for bulk in (False, True):
        if bulk:
            monkeypatch.setattr(resolver_state, "_BULK", 1)
            monkeypatch.setattr(resolver_replica, "_LOAD_BATCH", 4)
        r = make_resolver(index, pki, dataclasses.replace(FAST, verify_workers=2 if bulk else 0))
        r._verifier.pool_min_jobs = 1 if bulk else 10**9
        async with r:
            async with asyncio.timeout(60):
                await r.wait_ready()
            results.append(seen(r))
            # one job per record: /live/ is read beside /rec/ in CPID order, so each
            # status rides along in its record's job
            assert r._verifier.checked_pool == (len(expected) + len(good) if bulk else 0)
    assert results[0] == results[1]
    served, rejected, _, _ = results[1]
    assert set(served) == {n.cpid for n in good}
    assert {c: why[0] for c, why in rejected.items()} == expected


@pytest.mark.parametrize(("answer", "regressed"), [(1, False), (-1, True)])
async def test_a_probe_sees_a_regression_only_below_what_was_applied_when_it_was_sent(
    pki: Pki, answer: int, regressed: bool
) -> None:
    """While a probe is in flight the watch may apply newer revisions: etcd's answer is
    compared with the revision applied when the probe was sent."""
    state = ReplicaState(anchors=pki.anchors)
    state.revision = 10

    class Racing:  # the watch applies two writes while each probe is in flight
        async def revision(self) -> int:
            sent = state.revision
            state.revision += 2
            return sent + answer  # after the first write (or, restored: before the send)

        async def lease_time_to_live(self, lease: int) -> int:
            return 0

    replica = Replica(
        Racing(),  # type: ignore[arg-type]
        state,
        verifier=Verifier(workers=0),
        settings=SyncSettings(probe_interval=0.01),
    )
    replica.ready.set()
    task = asyncio.create_task(replica._probe())
    await asyncio.sleep(0.1)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert state.revision > 14  # several probes ran
    assert replica._relist.is_set() is regressed


async def test_a_first_listing_that_fails_half_way_is_completed_by_the_next(
    index: Index, pki: Pki
) -> None:
    """The streamed first listing applies ``/rec/`` page by page; when reading fails
    after some pages, the next attempt lists everything and applies the difference."""
    await pki.publish(index)
    nodes = [Node() for _ in range(5)]
    for node in nodes:
        await put_record(index, pki, node)

    class Flaky:  # the real index, but the first /rec/ listing breaks after one page
        failures = 1

        def __getattr__(self, name: str) -> Any:
            return getattr(index, name)

        async def iter_prefix(self, prefix: str, **kw: Any) -> AsyncIterator[KVPage]:
            async for page in index.iter_prefix(prefix, **{**kw, "page_size": 2}):
                yield page
                if self.failures:
                    self.failures -= 1
                    raise RetrievalError("etcd went away")

    state = ReplicaState(anchors=pki.anchors)
    flaky = Flaky()
    replica = Replica(
        flaky,  # type: ignore[arg-type]
        state,
        verifier=Verifier(workers=0),
        settings=SyncSettings(probe_interval=0.2, retry_backoff_max=0.2),
    )
    replica.start()
    try:
        async with asyncio.timeout(10):
            await replica.ready.wait()
        assert set(state.served) == {n.cpid for n in nodes}
        assert flaky.failures == 0 and replica.relists["initial"] == 1
    finally:
        await replica.close()


async def test_a_valid_record_under_another_cpids_key_is_not_served(
    index: Index, pki: Pki, resolver: Resolver
) -> None:
    a, b = Node(), Node()
    rev = await index.put(Keys.rec(b.cpid), signed(pki, a.record()).to_json())
    await until(lambda: resolver.revision >= rev, what="the write")
    assert resolver.get(a.cpid) is None and resolver.get(b.cpid) is None
    assert resolver._state.failures["wrong_key"] == 1


async def test_a_forged_cert_in_the_index_serves_nothing(
    index: Index, pki: Pki, resolver: Resolver
) -> None:
    """A cert for CN.31.EVIL signed by a stranger claiming CN.31's key id."""
    evil = keys.generate()
    cert = ca.issue_cert(
        issuer_key=keys.generate(),
        issuer_subject="CN.31",
        subject="CN.31.EVIL",
        public_key=evil,
        scopes=["issue"],
    )
    cert = dsse.Envelope(
        cert.payload_type, cert.payload, (dsse.Signature(pki.kid("CN.31"), cert.signatures[0].sig),)
    )
    await index.put(Keys.cert(keys.kid_of(evil)), cert.to_json())
    node = Node(namespace="CN.31.EVIL")
    rev = await index.put(Keys.rec(node.cpid), ca.sign_document(node.record(), evil).to_json())
    await until(lambda: resolver.revision >= rev, what="the write")
    assert resolver.get(node.cpid) is None
    assert resolver._state.failures["bad_signature"] == 1


async def test_revocations_stop_serving_at_once(index: Index, pki: Pki, resolver: Resolver) -> None:
    a, b = Node(), Node(namespace="CN.31")
    await put_record(index, pki, a)
    await put_record(index, pki, b)
    await until(lambda: resolver.get(a.cpid) and resolver.get(b.cpid), what="both served")
    events: list[Any] = []
    resolver.add_listener(events.append)

    # the node key of `a`, revoked by its registry
    rev = ca.revoke(
        issuer_key=pki.key_of("CN.31.CMCC"),
        subject="CN.31.CMCC",
        kid=keys.kid_of(a.key),
        reason="stolen",
    )
    r1 = await index.put(Keys.revoked(keys.kid_of(a.key)), rev.to_json())
    await until(lambda: resolver.revision >= r1, what="the revocation")
    assert resolver.get(a.cpid) is None and resolver.get(b.cpid) is not None
    assert [(e.type, e.cpid, e.reason, e.revision) for e in events] == [
        ("delete", a.cpid, "revoked", r1)
    ]

    # CN.31's own cert, revoked by the root: everything below it goes
    serial = ca_serial(pki.certs["CN.31"])
    rev2 = ca.revoke(issuer_key=pki.root, subject="CN.31", serial=serial, reason="compromise")
    r2 = await index.put(Keys.revoked(serial), rev2.to_json())
    await until(lambda: resolver.revision >= r2, what="the second revocation")
    assert resolver.get(b.cpid) is None
    assert (
        events[-1].type == "delete" and events[-1].cpid == b.cpid and events[-1].reason == "revoked"
    )


def ca_serial(cert: dsse.Envelope) -> str:
    from schemas.models import Cert, parse_payload

    return parse_payload(cert.payload_type, cert.payload, Cert).serial


async def test_records_wait_for_their_cert(index: Index, pki: Pki) -> None:
    """Records published before their registry's cert are served once the cert arrives."""
    await pki.publish(index, "CN.31")  # not CN.31.CMCC yet
    nodes = [Node() for _ in range(3)]
    for n in nodes:
        await put_record(index, pki, n)
    async with make_resolver(index, pki) as r:
        async with asyncio.timeout(10):
            await r.wait_ready()
        assert [r.get(n.cpid) for n in nodes] == [None] * 3
        assert r.health()["rejected"] == {"unsigned": 3}
        await pki.publish(index, "CN.31.CMCC")
        await until(lambda: all(r.get(n.cpid) for n in nodes), what="the records after the cert")
        assert r.health()["rejected"] == {}


async def test_statuses_must_verify_under_the_records_key(
    index: Index, pki: Pki, resolver: Resolver
) -> None:
    node, stranger, other = Node(), Node(), Node()
    await put_record(index, pki, node)
    await put_record(index, pki, other)
    await until(lambda: resolver.get(node.cpid) and resolver.get(other.cpid), what="served")
    # signed by another node's key
    r1 = await index.put(Keys.live(node.cpid), stranger.status(cpid=node.cpid).to_json())
    await until(lambda: resolver.revision >= r1, what="the first status")
    assert resolver.resolve(node.cpid).live is False
    # the node's own signature, but about another CPID
    r2 = await index.put(Keys.live(node.cpid), node.status(cpid=other.cpid).to_json())
    await until(lambda: resolver.revision >= r2, what="the second status")
    assert resolver.resolve(node.cpid).live is False
    assert resolver._state.failures["status_bad_signature"] == 1
    assert resolver._state.failures["status_wrong_key"] == 1
    await put_status(index, node, free=4)
    await until(lambda: resolver.resolve(node.cpid).live, what="the genuine status")


async def test_records_expire_on_the_clock(index: Index, pki: Pki) -> None:
    settings = dataclasses.replace(FAST, replica=ReplicaSettings(skew=0))
    await pki.publish(index)
    node, lasting = Node(), Node()
    now = int(time.time())
    await put_record(index, pki, node, issued_at=now - 5, expires_at=now + 2)
    await put_record(index, pki, lasting)
    async with make_resolver(index, pki, settings) as r:
        async with asyncio.timeout(10):
            await r.wait_ready()
        assert r.get(node.cpid) is not None
        events: list[Any] = []
        r.add_listener(events.append)
        await until(lambda: r.get(node.cpid) is None, within=6, what="expiry")
        await until(lambda: events, what="the expiry event")
        assert [(e.type, e.cpid, e.reason) for e in events] == [("delete", node.cpid, "expired")]
        assert events[0].id == f"{r.revision}.1"
        assert r.get(lasting.cpid) is not None


# -- watch (library) -----------------------------------------------------------------------------


async def test_watch_filters_and_reports_entries_leaving_the_query(
    index: Index, pki: Pki, resolver: Resolver
) -> None:
    node, elsewhere = Node(), Node(namespace="CN.32", region="32")
    got: list[Any] = []

    async def consume() -> None:
        async for ev in resolver.watch(Query(within="CN.31", min_free=4)):
            got.append(ev)

    task = asyncio.create_task(consume())
    await until(lambda: got, what="the start of the watch")
    assert got[0].type == "progress"
    await put_record(index, pki, node)
    await put_record(index, pki, elsewhere)
    await put_status(index, elsewhere, free=8)
    r1 = await put_status(index, node, free=8)
    r2 = await put_status(index, node, free=2)
    r3 = await put_status(index, node, free=6)
    r4 = await index.delete(Keys.rec(node.cpid)) and await index.revision()
    await until(lambda: len(got) >= 5, what="four events")
    await asyncio.sleep(0.2)
    task.cancel()
    assert [(e.type, e.cpid, e.reason, e.revision) for e in got[1:]] == [
        ("put", node.cpid, "status", r1),
        ("delete", node.cpid, "query", r2),
        ("put", node.cpid, "status", r3),
        ("delete", node.cpid, "deleted", r4),
    ]


async def test_a_failed_page_of_the_first_listing_is_read_again_not_the_whole_listing(
    index: Index, pki: Pki
) -> None:
    """Each failure costs one page: the listing resumes after the last key read, at the
    same revision, and the replica does not start the listing over."""
    await pki.publish(index)
    nodes = [Node() for _ in range(7)]
    for node in nodes:
        await put_record(index, pki, node)
    resumed: list[str] = []

    class Flaky:  # the real index, but /rec/ pages fail after the 1st, 2nd and 3rd page
        failures = 3

        def __getattr__(self, name: str) -> Any:
            return getattr(index, name)

        async def iter_prefix(self, prefix: str, **kw: Any) -> AsyncIterator[KVPage]:
            if "after" in kw:
                resumed.append(kw["after"])
            async for page in index.iter_prefix(prefix, **{**kw, "page_size": 2}):
                yield page
                if prefix == Prefix.REC and self.failures:
                    self.failures -= 1
                    raise RetrievalError("etcd went away")

    state = ReplicaState(anchors=pki.anchors)
    replica = Replica(
        Flaky(),  # type: ignore[arg-type]
        state,
        verifier=Verifier(workers=0),
        settings=SyncSettings(probe_interval=0.2, retry_backoff_max=0.05),
    )
    replica.start()
    try:
        async with asyncio.timeout(10):
            await replica.ready.wait()
        assert set(state.served) == {n.cpid for n in nodes}
        keys = sorted(Keys.rec(n.cpid) for n in nodes)
        assert resumed == [keys[1], keys[3], keys[5]]  # after each page that was read
        assert replica.page_retries == 3 and replica.relists["initial"] == 1
    finally:
        await replica.close()
