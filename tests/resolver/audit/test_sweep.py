"""The auditor against a real etcd: one bundle, the sweep (clean and with planted faults)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest

from cpi.main import main
from registry import ca, national
from registry.index import Index, Keys
from resolver.audit.bundle import classify, verify_bundle
from resolver.audit.sweep import Sweeper
from schemas import dsse, keys
from schemas.chain import verify_record
from schemas.cpid import derive
from tests.resolver.audit.audit_kit import Kit, resolver_app


@pytest.fixture
def kit(tmp_path: Path) -> Kit:
    return Kit(tmp_path)


async def run_cli(*argv: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run ``cpi ARGV`` in a thread (it runs its own event loop): (exit code, stdout, stderr)."""
    code = await asyncio.to_thread(main, list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def tamper(env: dsse.Envelope, **changes: Any) -> dsse.Envelope:
    """The same signature over a modified payload."""
    obj = json.loads(env.payload)
    obj.update(changes)
    return dsse.Envelope(env.payload_type, json.dumps(obj).encode(), env.signatures)


# -- one bundle ------------------------------------------------------------------------------------


def test_bundle_with_status_verifies(kit: Kit) -> None:
    cpid, env, node = kit.record()
    result = verify_bundle(
        kit.bundle(env, status=kit.status(cpid, node).to_dict()), anchors=kit.anchors
    )
    assert result.ok, result.reason
    assert [c.what for c in result.status_checks] == [
        "status signed by the record's key",
        "status names the record's CPID",
    ]
    # the same checks, in the same order, as schemas.chain gives for the record
    assert result.chain.checks == verify_record(env, kit.chain, anchors=kit.anchors).checks


def test_bundle_status_by_another_key_fails_at_the_status(kit: Kit) -> None:
    cpid, env, _ = kit.record()
    forged = kit.status(cpid, keys.generate())
    result = verify_bundle(kit.bundle(env, status=forged.to_dict()), anchors=kit.anchors)
    assert not result.ok and result.chain.ok
    assert result.failure is not None and result.failure.what == "status signed by the record's key"
    assert "signatures verify" in result.reason


def test_bundle_status_for_another_cpid_fails(kit: Kit) -> None:
    _, env, node = kit.record()
    other = derive("CN.31.CMCC", "CPU", keys.public_raw(node)).to_text()
    result = verify_bundle(
        kit.bundle(env, status=kit.status(other, node).to_dict()), anchors=kit.anchors
    )
    assert result.failure is not None and result.failure.what == "status names the record's CPID"
    assert f"status is for {other}" in result.reason


async def test_cli_verify_file_and_cpid(
    kit: Kit, index: Index, tmp_path: Path, capsys: pytest.CaptureFixture[str], aiohttp_client: Any
) -> None:
    cpid, env, node = kit.record()
    good = tmp_path / "good.json"
    good.write_text(json.dumps(kit.bundle(env, status=kit.status(cpid, node).to_dict())))
    code, out, _ = await run_cli(
        "audit", "verify", str(good), "--anchor", str(kit.anchor_path), capsys=capsys
    )
    assert code == 0, out
    assert out.splitlines()[-1] == "valid"
    assert "ok   status: status signed by the record's key" in out

    _, expired, _ = kit.record(issued_at=kit.now - 10_000, expires_at=kit.now - 1_000)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(kit.bundle(expired)))
    code, out, _ = await run_cli(
        "audit", "verify", str(bad), "--anchor", str(kit.anchor_path), "--json", capsys=capsys
    )
    doc = json.loads(out)
    assert code == 1 and doc["ok"] is False and doc["rule"] == 3 and doc["outcome"] == "expired"
    assert doc["checks"][-1]["ok"] is False  # stops at the first failure

    # by CPID, fetched from a resolver
    await kit.publish(index)
    await kit.register(index, cpid, env)
    await index.put(Keys.live(cpid), kit.status(cpid, node).to_json())
    client = await aiohttp_client(resolver_app(index, kit))
    url = str(client.make_url("")).rstrip("/")
    code, out, _ = await run_cli(
        "audit",
        "verify",
        cpid,
        "--anchor",
        str(kit.anchor_path),
        "--resolver",
        url,
        "--insecure",
        capsys=capsys,
    )
    assert code == 0, out
    assert "ok   status: status names the record's CPID" in out
    code, _, err = await run_cli(
        "audit", "verify", cpid, "--anchor", str(kit.anchor_path), capsys=capsys
    )
    assert code == 2  # usage
    assert "give --resolver" in err


# -- sweep -----------------------------------------------------------------------------------------


async def _clean(index: Index, kit: Kit, n: int = 6) -> list[str]:
    await kit.publish(index)
    cpids = []
    for i in range(n):
        cpid, env, node = kit.record()
        await kit.register(index, cpid, env)
        if i % 2 == 0:
            await index.put(Keys.live(cpid), kit.status(cpid, node).to_json())
        if i % 3 == 0:
            await index.put(Keys.alloc(cpid), b"2")
        cpids.append(cpid)
    return cpids


async def test_sweep_of_a_clean_index_finds_nothing(index: Index, kit: Kit) -> None:
    await _clean(index, kit)
    # a valid revocation of a key nobody uses is not a failure
    await national.revoke(
        index, issuer_key=kit.cmcc, subject="CN.31.CMCC", kid="0" * 16, reason="test"
    )
    report = await Sweeper(index, kit.anchors).run()
    assert report.ok, report.failures
    assert report.counts["record"] == {"valid": 6}
    assert report.counts["cert"] == {"valid": 2}
    assert report.counts["status"] == {"valid": 3}
    assert report.counts["alloc"] == {"valid": 2}
    assert report.counts["revocation"] == {"valid": 1}
    assert report.counts["ns"] == {"valid": 2}
    assert report.chains_walked == 2  # one per distinct signer, not per record
    assert report.records == 6 and report.records_per_s > 0


async def test_sweep_finds_every_planted_fault(index: Index, kit: Kit) -> None:
    clean = await _clean(index, kit)
    planted: dict[str, str] = {}

    # forged: signed by a key that no cert certifies
    cpid, env, _ = kit.record(signer=keys.generate())
    await index.put(Keys.rec(cpid), env.to_json())
    planted[Keys.rec(cpid)] = "forged"
    # tampered: a valid record whose payload was edited afterwards
    cpid, env, _ = kit.record()
    await index.put(Keys.rec(cpid), tamper(env, labels={"tier": "platinum"}).to_json())
    planted[Keys.rec(cpid)] = "tampered"
    # expired
    cpid, env, _ = kit.record(issued_at=kit.now - 10_000, expires_at=kit.now - 1_000)
    await index.put(Keys.rec(cpid), env.to_json())
    planted[Keys.rec(cpid)] = "expired"
    # revoked: the node's key, revoked by kid by the namespace that issued its record
    cpid, env, node = kit.record()
    await kit.register(index, cpid, env)
    await national.revoke(
        index, issuer_key=kit.cmcc, subject="CN.31.CMCC", kid=keys.kid_of(node), reason="stolen"
    )
    planted[Keys.rec(cpid)] = "revoked"
    # outside its signer's namespace (CN.31.CMCC signing a CN.32 name)
    cpid, env, _ = kit.record(namespace="CN.32.CMCC")
    await index.put(Keys.rec(cpid), env.to_json())
    planted[Keys.rec(cpid)] = "outside_namespace"
    # serial/key mismatch: the CPID was derived from another key
    wrong = derive("CN.31.CMCC", "GPU", keys.public_raw(keys.generate())).to_text()
    cpid, env, _ = kit.record(cpid=wrong)
    await index.put(Keys.rec(cpid), env.to_json())
    planted[Keys.rec(cpid)] = "key_mismatch"
    # a valid record filed under another CPID
    _, env, _ = kit.record()
    elsewhere = derive("CN.31.CMCC", "NPU", keys.public_raw(keys.generate())).to_text()
    await index.put(Keys.rec(elsewhere), env.to_json())
    planted[Keys.rec(elsewhere)] = "misfiled"
    # orphan live and alloc keys
    ghost, _, ghost_node = kit.record()
    await index.put(Keys.live(ghost), kit.status(ghost, ghost_node).to_json())
    planted[Keys.live(ghost)] = "orphan"
    await index.put(Keys.alloc(ghost), b"1")
    planted[Keys.alloc(ghost)] = "orphan"
    # a status not signed by the record's node
    await index.put(Keys.live(clean[1]), kit.status(clean[1], keys.generate()).to_json())
    planted[Keys.live(clean[1])] = "forged"
    # a revoked cert (by serial, by its issuer) and the record it signed
    cucc = keys.generate()
    cert = ca.issue_cert(
        issuer_key=kit.ns31,
        issuer_subject="CN.31",
        subject="CN.31.CUCC",
        public_key=cucc,
        scopes=["issue"],
        now=kit.now,
    )
    await index.put(Keys.cert(keys.kid_of(cucc)), cert.to_json())
    cpid, env, _ = kit.record(signer=cucc, issuer="CN.31.CUCC", namespace="CN.31.CUCC")
    await index.put(Keys.rec(cpid), env.to_json())
    serial = json.loads(cert.payload)["serial"]
    await national.revoke(
        index, issuer_key=kit.ns31, subject="CN.31.CUCC", serial=serial, reason="retired"
    )
    planted[Keys.cert(keys.kid_of(cucc))] = "revoked"
    planted[Keys.rec(cpid)] = "revoked"
    # a forged cert: claims CN.31.EVIL, signed by a key that is not CN.31's
    evil = keys.generate()
    forged_cert = ca.issue_cert(
        issuer_key=keys.generate(),
        issuer_subject="CN.31",
        subject="CN.31.EVIL",
        public_key=evil,
        scopes=["issue"],
        now=kit.now,
    )
    await index.put(Keys.cert(keys.kid_of(evil)), forged_cert.to_json())
    planted[Keys.cert(keys.kid_of(evil))] = "forged"
    # a revocation signed by nobody in the hierarchy
    rogue = ca.revoke(issuer_key=keys.generate(), subject="CN.31.CMCC", kid="X" * 16, reason="x")
    await index.put(Keys.revoked("X" * 16), rogue.to_json())
    planted[Keys.revoked("X" * 16)] = "forged"

    now = int(time.time())  # one clock for both sweeps: failure details quote it
    report = await Sweeper(index, kit.anchors, now=now).run()
    found = {f.key: f.outcome for f in report.failures}
    assert found == planted
    # the same findings when worker processes verify the records and statuses
    parallel = await Sweeper(index, kit.anchors, jobs=2, page_size=7, now=now).run()
    assert parallel.jobs == 2
    assert {f.key: (f.outcome, f.detail) for f in parallel.failures} == {
        f.key: (f.outcome, f.detail) for f in report.failures
    }
    assert parallel.counts == report.counts
    for f in report.failures:
        assert f.detail, f  # every failure says why
    for cpid in clean:
        assert Keys.rec(cpid) not in found
    assert report.counts["record"]["valid"] == len(clean)
    assert not report.ok


async def test_sweep_cli_json_and_exit_codes(
    index: Index, kit: Kit, capsys: pytest.CaptureFixture[str], etcd_server: Any
) -> None:
    await _clean(index, kit, n=3)
    args = ["audit", "sweep", "--etcd", etcd_server.endpoint, "--anchor", str(kit.anchor_path)]
    code, out, _ = await run_cli(*args, capsys=capsys)
    assert code == 0, out
    assert "index is valid" in out and "records/s" in out
    cpid, env, _ = kit.record()
    await index.put(Keys.rec(cpid), tamper(env, version=2).to_json())
    code, out, _ = await run_cli(*args, "--json", capsys=capsys)
    doc = json.loads(out)
    assert code == 1 and doc["ok"] is False
    assert doc["counts"]["record"] == {"tampered": 1, "valid": 3}
    assert doc["failures"] == [
        {
            "kind": "record",
            "key": Keys.rec(cpid),
            "outcome": "tampered",
            "detail": doc["failures"][0]["detail"],
        }
    ]
    assert "not validly signed" in doc["failures"][0]["detail"]


def test_classify_covers_the_chain_rules(kit: Kit) -> None:
    _, env, _ = kit.record()
    assert classify(verify_record(env, kit.chain, anchors=kit.anchors)) == "valid"
    assert classify(verify_record(env, [], anchors=kit.anchors)) == "forged"
    assert classify(verify_record(env, kit.chain[1:], anchors=kit.anchors)) == "tampered"
    no_issue = ca.issue_cert(
        issuer_key=kit.ns31,
        issuer_subject="CN.31",
        subject="CN.31.CMCC",
        public_key=kit.cmcc,
        scopes=["delegate"],
        now=kit.now,
    )
    assert (
        classify(verify_record(env, [no_issue, kit.cert31], anchors=kit.anchors)) == "unauthorized"
    )


# -- hostile values (DESIGN.md section 8: the index is not trusted input) ------------------------


def _hostile_values(kit: Kit, live_cpid: str) -> dict[str, bytes]:
    """A bad value under every collection the sweep reads, by key."""
    deep = b"[" * 10_000
    kid = keys.kid_of(keys.generate())
    other = kit.record()[0]
    return {
        Keys.rec(other): deep,
        Keys.rec(kit.record()[0]): b"[]",
        Keys.rec(kit.record()[0]): b"\xff\xfe\x00",
        Keys.rec(kit.record()[0]): b"[" * (1 << 20),
        Keys.live(live_cpid): deep,
        Keys.alloc(live_cpid): b'{"units": true}',
        Keys.claim(live_cpid, "c1" + kid): deep,
        Keys.cert(kid): deep,
        Keys.revoked(kid): b"1e999",
        Keys.ns("CN.99"): deep,
        Keys.ns("CN.98"): b'"x"',
    }


async def test_sweep_names_every_unreadable_key(index: Index, kit: Kit) -> None:
    clean = await _clean(index, kit, n=3)
    planted = _hostile_values(kit, clean[0])
    for key, value in planted.items():
        await index.put(key, value)
    report = await Sweeper(index, kit.anchors).run()
    found = {f.key: f.outcome for f in report.failures}
    assert found == dict.fromkeys(planted, "unreadable"), found
    for f in report.failures:
        assert f.detail and len(f.detail) < 400, f
    assert not report.ok
    # the good keys are still checked
    assert report.counts["record"]["valid"] == 3


async def test_sweep_cli_on_hostile_values_exits_1_without_a_traceback(
    index: Index, kit: Kit, etcd_server: Any
) -> None:
    import subprocess
    import sys

    clean = await _clean(index, kit, n=2)
    planted = _hostile_values(kit, clean[0])
    for key, value in planted.items():
        await index.put(key, value)
    base = [sys.executable, "-m", "cpi", "audit", "sweep", "--etcd", etcd_server.endpoint]
    base += ["--anchor", str(kit.anchor_path)]
    for extra in ([], ["--json"]):
        proc = await asyncio.to_thread(
            subprocess.run, base + extra, capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 1, (proc.stdout, proc.stderr)
        assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr
        for key in planted:
            assert key in proc.stdout, key
        if extra:
            doc = json.loads(proc.stdout)
            assert {f["key"] for f in doc["failures"] if f["outcome"] == "unreadable"} == set(
                planted
            )
        else:
            assert "unreadable" in proc.stdout
