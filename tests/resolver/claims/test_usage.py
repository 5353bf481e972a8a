"""Usage receipts: what ends a claim appends a signed receipt to the transparency log in
the same transaction; ``audit_usage`` totals them from the log alone and refuses what
does not verify."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from cpi.commands.usage import parse_time
from cpi.etcdproc import EtcdProcess
from cpi.main import main
from registry import ca, keyfile
from registry.index import Cmp, Index, Keys, Prefix
from registry.index.auditlog import AuditStream, read_entries
from registry.logsigner import LogSigner
from resolver.audit.usage import UsageReport, audit_usage
from resolver.claims.service import Claim, ClaimService
from resolver.claims.usage import ENV_USAGE_KEY, UsageRecorder, recorder_from_env
from resolver.core import Resolver
from schemas import dsse
from schemas import keys as _keys
from schemas.checkpoint import NoteVerifier
from schemas.errors import KeyFileError
from schemas.usage import Usage, sign_usage_signer
from tests.resolver.claims.test_claims import FAST_CLAIMS, live_node, units_at
from tests.resolver.kit import Pki

T0 = 1_767_225_600  # 2026-01-01T00:00:00Z


class Clock:
    def __init__(self, now: int = T0) -> None:
        self.now = float(now)

    def __call__(self) -> float:
        return self.now


class World:
    """A claims service with a usage key, its signer named by the anchor, a log signer."""

    def __init__(self, index: Index, pki: Pki, resolver: Resolver, clock: Clock) -> None:
        self.index, self.pki, self.clock = index, pki, clock
        self.usage_key = _keys.generate()
        self.recorder = UsageRecorder(index, self.usage_key, clock=clock)
        self.claims = ClaimService(
            index=index, resolver=resolver, settings=FAST_CLAIMS, clock=clock, usage=self.recorder
        )
        self.log_key = _keys.generate()
        self.signer = LogSigner(index, self.log_key)
        self.verifier: NoteVerifier = self.signer.verifier

    async def publish_signer(self) -> None:
        env = sign_usage_signer(
            self.pki.root, self.usage_key, subject="CN", not_before=T0 - 86400, not_after=T0 + 10**7
        )
        await self.index.put(Keys.usage_signer(_keys.kid_of(self.usage_key)), env.to_json())

    async def sign_log(self) -> None:
        await self.signer.load()
        await self.signer.sign()

    async def audit(self, **kw: object) -> UsageReport:
        args: dict[str, object] = {"since": T0 - 3600, "until": T0 + 10**6, **kw}
        return await audit_usage(
            self.index,
            verifier=self.verifier,
            anchors=self.pki.anchors,
            **args,  # type: ignore[arg-type]
        )


@pytest.fixture
async def world(index: Index, pki: Pki, resolver: Resolver) -> World:
    w = World(index, pki, resolver, Clock())
    await w.publish_signer()
    return w


async def receipts(index: Index) -> list[Usage]:
    kvs, _ = await index.get_prefix(Prefix.USAGE)
    out = []
    for kv in kvs:
        env = dsse.Envelope.from_json(kv.value)
        out.append(Usage.model_validate_json(env.payload))
    return out


async def test_release_writes_one_receipt_with_the_exact_seconds(
    world: World, index: Index, pki: Pki, resolver: Resolver
) -> None:
    node = await live_node(index, pki, resolver, free=8)
    c = await world.claims.claim(node.cpid, units=4, ttl_s=3600, holder="alice")
    assert c.created_at == T0
    meter = await index.get(Keys.meter(c.claim_id))
    assert meter is not None and json.loads(meter.value)["start"] == T0
    world.clock.now += 1234.9  # a fraction of a second is not billed
    await world.claims.release(c.claim_id, holder="alice")
    (r,) = await receipts(index)
    assert (r.holder, r.cpid, r.units, r.start, r.end, r.reason, r.n) == (
        "alice",
        node.cpid,
        4,
        T0,
        T0 + 1234,
        "release",
        1,
    )
    assert r.claim_id == c.claim_id
    assert await index.get(Keys.meter(c.claim_id)) is None  # closed in the same transaction
    entries = [e for e in await read_entries(index) if e.op == "usage"]
    assert len(entries) == 1
    assert entries[0].receipt == Keys.receipt(c.claim_id, 1)
    assert entries[0].cpid == node.cpid
    # the receipt verifies under the usage key
    kv = await index.get(Keys.usage(c.claim_id, 1))
    assert kv is not None
    dsse.verify(
        dsse.Envelope.from_json(kv.value),
        {world.recorder.kid: world.usage_key.public_key()},
        payload_types=(Usage.media_type(),),
    )
    assert await units_at(index, Keys.alloc(node.cpid)) == 0
    await world.claims.close()


async def test_a_claim_without_a_usage_key_gets_no_receipt(
    index: Index, pki: Pki, resolver: Resolver
) -> None:
    node = await live_node(index, pki, resolver, free=8)
    plain = ClaimService(index=index, resolver=resolver, settings=FAST_CLAIMS)
    c = await plain.claim(node.cpid, units=1, ttl_s=60, holder="bob")
    assert await index.get(Keys.meter(c.claim_id)) is None
    await plain.release(c.claim_id, holder="bob")
    assert await receipts(index) == []
    assert [e.op for e in await read_entries(index)] == []


async def test_expiry_past_expires_at_writes_a_receipt_ending_at_expires_at(
    world: World, index: Index, pki: Pki, resolver: Resolver
) -> None:
    node = await live_node(index, pki, resolver, free=8)
    c = await world.claims.claim(node.cpid, units=2, ttl_s=600, holder="carol")
    world.clock.now += 5000  # long past expires_at; the key remains (its lease has 600 s)
    assert await world.claims.purge_expired([c]) == 1
    (r,) = await receipts(index)
    assert (r.start, r.end, r.reason, r.units) == (T0, T0 + 600, "expiry", 2)
    assert await index.get(Keys.meter(c.claim_id)) is None
    await world.claims.close()


async def test_a_lease_that_ran_out_gets_its_receipt_from_the_reconciler(
    world: World, index: Index, pki: Pki, resolver: Resolver
) -> None:
    node = await live_node(index, pki, resolver, free=8)
    c = await world.claims.claim(node.cpid, units=3, ttl_s=60, holder="dave")
    # etcd deletes the claim key alone (the lease ran out while no resolver was running)
    await index.delete(c.key)
    world.clock.now += 7200
    await world.claims.reconcile()
    (r,) = await receipts(index)
    assert (r.holder, r.start, r.end, r.reason, r.units) == ("dave", T0, T0 + 60, "expiry", 3)
    assert await index.get(Keys.meter(c.claim_id)) is None
    await world.claims.reconcile()  # a second pass writes nothing more
    assert len(await receipts(index)) == 1
    await world.claims.close()


async def test_renewal_parts_close_one_period_and_open_the_next(
    world: World, index: Index, pki: Pki, resolver: Resolver
) -> None:
    """What a renewal (PATCH /v1/claims/{id}) adds to its transaction."""
    node = await live_node(index, pki, resolver, free=8)
    c = await world.claims.claim(node.cpid, units=8, ttl_s=600, holder="erin")
    world.clock.now += 500
    svc = world.claims
    parts = await svc.usage_parts(c, end=T0 + 500, reason="renewal", renew_until=T0 + 1100)
    result = await svc.usage_commit(parts, compare=[Cmp.exists(c.key)])
    assert result.succeeded
    # the same parts again: the meter moved, so nothing is written twice
    again = await svc.usage_commit(parts, compare=[Cmp.exists(c.key)])
    assert not again.succeeded
    world.clock.now += 100
    await svc.release(c.claim_id, holder="erin")
    got = sorted((r.n, r.start, r.end, r.reason) for r in await receipts(index))
    assert got == [(1, T0, T0 + 500, "renewal"), (2, T0 + 500, T0 + 600, "release")]
    await svc.close()


async def test_usage_totals_match_the_claims_to_the_second(
    world: World, index: Index, pki: Pki, resolver: Resolver
) -> None:
    a = await live_node(index, pki, resolver, free=16)
    b = await live_node(index, pki, resolver, free=16, namespace="CN.32")
    svc = world.claims
    c1 = await svc.claim(a.cpid, units=8, ttl_s=86400, holder="alice")
    c2 = await svc.claim(b.cpid, units=2, ttl_s=86400, holder="alice")
    world.clock.now += 3600
    c3 = await svc.claim(a.cpid, units=1, ttl_s=86400, holder="bob")
    await svc.release(c1.claim_id, holder="alice")  # 8 units x 3600 s
    world.clock.now += 1801
    await svc.release(c2.claim_id, holder="alice")  # 2 units x 5401 s
    await svc.release(c3.claim_id, holder="bob")  # 1 unit x 1801 s
    await world.sign_log()

    rep = await world.audit()
    assert rep.ok, (rep.checks, rep.problems)
    alice = 8 * 3600 + 2 * 5401
    assert rep.totals("holder") == {
        "alice": {"receipts": 2, "unit_seconds": alice, "hours": round(alice / 3600, 6)},
        "bob": {"receipts": 1, "unit_seconds": 1801, "hours": round(1801 / 3600, 6)},
    }
    by_ns = rep.totals("namespace")
    assert by_ns[a.cpid.split("/")[0]]["unit_seconds"] == 8 * 3600 + 1801
    assert by_ns["CN.32"]["unit_seconds"] == 2 * 5401

    only_alice = await world.audit(holder="alice")
    assert only_alice.unit_seconds == alice
    in_cn32 = await world.audit(namespace="CN.32")
    assert in_cn32.unit_seconds == 2 * 5401
    # a window cuts receipts at its edges: [T0 + 1800, T0 + 3600) holds 1800 s of c1 and c2
    window = await world.audit(since=T0 + 1800, until=T0 + 3600)
    assert window.unit_seconds == 8 * 1800 + 2 * 1800
    await svc.close()


async def test_a_forged_or_tampered_receipt_is_reported_not_counted(
    world: World, index: Index, pki: Pki, resolver: Resolver
) -> None:
    node = await live_node(index, pki, resolver, free=16)
    svc = world.claims
    c1 = await svc.claim(node.cpid, units=1, ttl_s=86400, holder="alice")
    c2 = await svc.claim(node.cpid, units=1, ttl_s=86400, holder="alice")
    world.clock.now += 100
    await svc.release(c1.claim_id, holder="alice")
    await svc.release(c2.claim_id, holder="alice")
    await world.sign_log()
    assert (await world.audit()).unit_seconds == 200

    # tampered: the stored receipt for c2 rewritten with more units, re-signed by a stranger
    kv = await index.get(Keys.usage(c2.claim_id, 1))
    assert kv is not None
    payload = json.loads(dsse.Envelope.from_json(kv.value).payload)
    payload["units"] = 100
    forged = dsse.sign(Usage.media_type(), json.dumps(payload).encode(), _keys.generate())
    await index.put(Keys.usage(c2.claim_id, 1), forged.to_json())
    rep = await world.audit()
    assert not rep.ok
    assert rep.unit_seconds == 100  # c1 only
    assert any("digest differs" in p for p in rep.problems), rep.problems

    # a receipt nobody logged, signed by the real key, is not counted either
    extra = Usage(
        claim_id=c1.claim_id.rsplit("~", 1)[0] + "~" + "Z" * 16,
        n=1,
        holder="alice",
        cpid=node.cpid,
        units=50,
        start=T0,
        end=T0 + 1000,
        reason="release",
    )
    env = dsse.sign(Usage.media_type(), extra.to_json(), world.usage_key)
    await index.put(Keys.usage(extra.claim_id, 1), env.to_json())
    rep = await world.audit()
    assert rep.unit_seconds == 100
    assert any("no log entry names it" in u for u in rep.unlogged), rep.unlogged


async def test_a_receipt_signed_by_an_unnamed_key_is_refused(
    world: World, index: Index, pki: Pki, resolver: Resolver
) -> None:
    node = await live_node(index, pki, resolver, free=16)
    rogue = UsageRecorder(index, _keys.generate(), clock=world.clock)
    svc = ClaimService(
        index=index, resolver=resolver, settings=FAST_CLAIMS, clock=world.clock, usage=rogue
    )
    c = await svc.claim(node.cpid, units=1, ttl_s=600, holder="mallory")
    world.clock.now += 10
    await svc.release(c.claim_id, holder="mallory")
    await world.sign_log()
    rep = await world.audit()
    assert rep.unit_seconds == 0
    assert any("not a usage signer" in p for p in rep.problems), rep.problems
    await svc.close()


async def test_a_deleted_audit_entry_fails_the_checkpoint_and_nothing_counts(
    world: World, index: Index, pki: Pki, resolver: Resolver
) -> None:
    node = await live_node(index, pki, resolver, free=16)
    svc = world.claims
    cs = [await svc.claim(node.cpid, units=1, ttl_s=600, holder="alice") for _ in range(3)]
    world.clock.now += 60
    for c in cs:
        await svc.release(c.claim_id, holder="alice")
    await world.sign_log()
    assert (await world.audit()).unit_seconds == 180
    entries = await read_entries(index)
    victim = next(e for e in entries if e.receipt == Keys.receipt(cs[1].claim_id, 1))
    await index.delete(Keys.audit(victim.seq))  # a receipt dropped from the log
    rep = await world.audit()
    assert not rep.ok
    assert rep.receipts == []
    assert any("missing" in d for _, ok, d in rep.checks if not ok), rep.checks
    # the last entry deleted instead: the stream is shorter than the checkpoint
    await index.put(Keys.audit(victim.seq), entries[victim.seq - 1].to_json())
    assert (await world.audit()).unit_seconds == 180
    await index.delete(Keys.audit(entries[-1].seq))
    assert not (await world.audit()).ok


async def test_without_a_checkpoint_nothing_is_counted(
    world: World, index: Index, pki: Pki, resolver: Resolver
) -> None:
    node = await live_node(index, pki, resolver, free=16)
    c = await world.claims.claim(node.cpid, units=1, ttl_s=600, holder="alice")
    world.clock.now += 5
    await world.claims.release(c.claim_id, holder="alice")
    rep = await world.audit()
    assert not rep.ok and rep.receipts == []


async def test_concurrent_releases_each_write_exactly_one_receipt(
    world: World, index: Index, pki: Pki, resolver: Resolver
) -> None:
    node = await live_node(index, pki, resolver, free=16)
    svc = world.claims
    cs = [await svc.claim(node.cpid, units=1, ttl_s=600, holder=f"h{i}") for i in range(12)]
    world.clock.now += 30
    await asyncio.gather(*(svc.release(c.claim_id, holder=c.holder) for c in cs))
    got = await receipts(index)
    assert sorted(r.claim_id for r in got) == sorted(c.claim_id for c in cs)
    seqs = [e.seq for e in await read_entries(index)]
    assert seqs == list(range(1, len(seqs) + 1))
    await world.sign_log()
    assert (await world.audit()).unit_seconds == 12 * 30


# -- cpi usage ---------------------------------------------------------------------------------


async def test_cpi_usage_prints_the_totals_and_exits_0(
    world: World,
    index: Index,
    pki: Pki,
    resolver: Resolver,
    etcd_server: EtcdProcess,
    anchor_file: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    node = await live_node(index, pki, resolver, free=16)
    svc = world.claims
    c = await svc.claim(node.cpid, units=8, ttl_s=86400, holder="alice")
    world.clock.now += 4500
    await svc.release(c.claim_id, holder="alice")
    await world.sign_log()
    base = [
        "usage",
        "--etcd",
        etcd_server.endpoint,
        "--anchor",
        str(anchor_file),
        "--log-key",
        world.verifier.to_vkey(),
        "--since",
        "2026-01-01",
        "--until",
        str(T0 + 86400),
    ]
    capsys.readouterr()
    assert await asyncio.to_thread(main, [*base, "--holder", "alice", "-o", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is True
    assert doc["by_holder"] == {"alice": {"receipts": 1, "unit_seconds": 36000, "hours": 10.0}}
    assert doc["by_namespace"] == {
        "CN.31.CMCC": {"receipts": 1, "unit_seconds": 36000, "hours": 10.0}
    }
    assert await asyncio.to_thread(main, [*base, "--receipts"]) == 0
    out = capsys.readouterr().out
    assert "10.000000" in out and "alice" in out and c.claim_id in out
    # tampering shows in the exit status
    await index.put(Keys.usage(c.claim_id, 1), b'{"payloadType":"x","payload":"","signatures":[]}')
    assert await asyncio.to_thread(main, [*base, "-o", "json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["unit_seconds"] == 0 and doc["problems"]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--since", "last tuesday"], "--since 'last tuesday' is not a time"),
        (["--since", "2026-13-01"], "is not a time"),
        (["--since", "2026-01-02", "--until", "2026-01-01"], "must be after --since"),
        (["--since", "7d", "--namespace", "cn..x"], "--namespace"),
    ],
)
def test_cpi_usage_bad_times_are_a_clear_usage_error(
    flags: list[str], message: str, anchor_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["usage", "--etcd", "http://127.0.0.1:1", "--anchor", str(anchor_file), *flags]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


def test_parse_time_forms() -> None:
    assert parse_time("1767225600", flag="--since") == T0
    assert parse_time("2026-01-01", flag="--since") == T0
    assert parse_time("2026-01-01T08:00:00+08:00", flag="--since") == T0
    assert parse_time("24h", flag="--since", now=T0 + 86400) == T0


async def test_receipts_after_the_signer_was_revoked_are_refused(
    world: World, index: Index, pki: Pki, resolver: Resolver
) -> None:
    node = await live_node(index, pki, resolver, free=16)
    svc = world.claims
    before = await svc.claim(node.cpid, units=1, ttl_s=86400, holder="alice")
    world.clock.now += 100
    await svc.release(before.claim_id, holder="alice")  # ends at T0 + 100
    world.clock.now += 900
    after = await svc.claim(node.cpid, units=1, ttl_s=86400, holder="alice")
    world.clock.now += 100
    await svc.release(after.claim_id, holder="alice")  # ends at T0 + 1100
    await world.sign_log()
    kid = _keys.kid_of(world.usage_key)
    revocation = ca.revoke(
        issuer_key=pki.root, subject="CN", kid=kid, reason="key leaked", now=T0 + 500
    )
    await index.put(Keys.revoked(kid), revocation.to_json())
    rep = await world.audit()
    assert rep.unit_seconds == 100  # the receipt signed before the revocation still counts
    assert any("revoked" in p for p in rep.problems), rep.problems
    # a revocation by someone else's key is ignored
    forged = ca.revoke(issuer_key=_keys.generate(), subject="CN", kid=kid, reason="x", now=T0)
    await index.put(Keys.revoked(kid), forged.to_json())
    assert (await world.audit()).unit_seconds == 200


async def test_the_usage_key_comes_from_the_environment_and_must_be_0600(
    index: Index, tmp_path: Path
) -> None:
    assert recorder_from_env(index, {}) is None
    path = tmp_path / "usage.key"
    key = _keys.generate()
    keyfile.write_private(path, key)
    rec = recorder_from_env(index, {ENV_USAGE_KEY: str(path)})
    assert rec is not None and rec.kid == _keys.kid_of(key)
    path.chmod(0o644)
    with pytest.raises(KeyFileError, match="0600"):
        recorder_from_env(index, {ENV_USAGE_KEY: str(path)})
    with pytest.raises(KeyFileError):
        recorder_from_env(index, {ENV_USAGE_KEY: str(tmp_path / "missing.key")})


async def test_several_receipts_in_one_transaction(
    world: World, index: Index, pki: Pki, resolver: Resolver
) -> None:
    """A claim with several parts ended at once (a gang release) writes one receipt per
    part and one audit entry each, all in the caller's one transaction."""
    node = await live_node(index, pki, resolver, free=16)
    svc = world.claims
    a = await svc.claim(node.cpid, units=8, ttl_s=600, holder="gang")
    b = await svc.claim(node.cpid, units=8, ttl_s=600, holder="gang")
    world.clock.now += 42
    parts = [await svc.usage_parts(c, end=T0 + 42, reason="release") for c in (a, b)]
    result = await svc.usage_commit(parts, compare=[Cmp.exists(a.key), Cmp.exists(b.key)])
    assert result.succeeded
    got = sorted((r.claim_id, r.units, r.end - r.start) for r in await receipts(index))
    assert got == sorted([(a.claim_id, 8, 42), (b.claim_id, 8, 42)])
    entries = await read_entries(index)
    assert [e.seq for e in entries] == [1, 2]
    assert {e.receipt for e in entries} == {
        Keys.receipt(a.claim_id, 1),
        Keys.receipt(b.claim_id, 1),
    }


async def test_receipts_and_another_writer_racing_for_the_audit_head(
    world: World, index: Index, pki: Pki, resolver: Resolver, etcd_server: EtcdProcess
) -> None:
    """A registry appending on its own connection while releases append receipts: no
    receipt lost or written twice, the stream stays gapless."""
    node = await live_node(index, pki, resolver, free=16)
    svc = world.claims
    cs = [await svc.claim(node.cpid, units=1, ttl_s=600, holder=f"r{i}") for i in range(10)]
    world.clock.now += 7
    env = dsse.sign("application/vnd.cpi.x+json", b"{}", _keys.generate())
    async with Index(endpoints=[etcd_server.endpoint]) as other:
        registry = AuditStream(other)

        async def revoke_many() -> None:
            for i in range(20):
                await registry.commit(op="revoke", envelope=env, subject=f"CN.{i}")

        await asyncio.gather(revoke_many(), *(svc.release(c.claim_id, holder=c.holder) for c in cs))
    entries = await read_entries(index)
    assert [e.seq for e in entries] == list(range(1, 31))
    assert sorted(e.op for e in entries).count("usage") == 10
    assert len(await receipts(index)) == 10
    await world.sign_log()
    assert (await world.audit()).unit_seconds == 70


async def test_hostile_values_cost_their_key_only(
    world: World, index: Index, pki: Pki, resolver: Resolver
) -> None:
    node = await live_node(index, pki, resolver, free=16)
    svc = world.claims
    c = await svc.claim(node.cpid, units=2, ttl_s=600, holder="alice")
    world.clock.now += 30
    await svc.release(c.claim_id, holder="alice")
    await index.put(Keys.meter("CN.3~X~" + "a" * 16), b"not json")
    await index.put(Keys.meter("CN.3~Y~" + "b" * 16), b'{"claim_id": 7}')
    await index.put(Keys.usage("CN.3~X~" + "a" * 16, 1), b"\xff\xfe")
    await index.put(Keys.usage_signer("ABCDEFGH12345678"), b"[]")
    await svc.reconcile()  # unreadable meters are skipped, not fatal
    await world.sign_log()
    rep = await world.audit()
    assert rep.unit_seconds == 60
    assert any("usage signer" in p for p in rep.problems)
    assert any("no log entry names it" in u for u in rep.unlogged)
    await svc.close()


async def test_a_claim_extended_without_moving_its_meter_bills_to_its_real_end(
    world: World, index: Index, pki: Pki, resolver: Resolver
) -> None:
    node = await live_node(index, pki, resolver, free=16)
    svc = world.claims
    c = await svc.claim(node.cpid, units=1, ttl_s=60, holder="alice")
    longer = Claim(c.claim_id, c.cpid, c.holder, c.units, c.created_at, c.expires_at + 600)
    kv = await index.get(c.key)
    assert kv is not None
    await index.put(c.key, longer.to_json(), lease=kv.lease)  # a renewal that forgot the meter
    world.clock.now += 300
    await svc.release(c.claim_id, holder="alice")
    (r,) = await receipts(index)
    assert r.end - r.start == 300
    await svc.close()
