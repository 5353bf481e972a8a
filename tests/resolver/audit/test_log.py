"""The transparency log against a real etcd: the signer, the resolver's routes, ``cpi audit log``."""

from __future__ import annotations

import asyncio
import base64
import json
import stat
from pathlib import Path
from typing import Any

import pytest

from cpi.main import main
from registry.index import Index, Keys, Prefix
from registry.logsigner import LATEST_KEY, LogSigner, init_log_key, load_verifier, vkey_path_for
from resolver.audit.log import LogView, record_digest
from schemas.checkpoint import Checkpoint, open_checkpoint, sign_checkpoint
from schemas.errors import LogConsistencyError
from schemas.keys import Ed25519PrivateKey
from schemas.merkle import MerkleTree, leaf_hash, verify_consistency, verify_inclusion
from tests.resolver.audit.audit_kit import Kit, resolver_app

ORIGIN = "test.cpi/log"


@pytest.fixture
def kit(tmp_path: Path) -> Kit:
    return Kit(tmp_path)


@pytest.fixture
def log_key(tmp_path: Path) -> tuple[Ed25519PrivateKey, Path]:
    key, _, created = init_log_key(tmp_path / "log.key", origin=ORIGIN)
    assert created
    return key, tmp_path / "log.key"


async def register_some(index: Index, kit: Kit, n: int) -> list[str]:
    out = []
    for _ in range(n):
        cpid, env, _ = kit.record()
        await kit.register(index, cpid, env)
        out.append(cpid)
    return out


async def audit_values(index: Index) -> list[bytes]:
    kvs, _ = await index.get_prefix(Prefix.AUDIT)
    return [kv.value for kv in kvs]


async def value(index: Index, key: str) -> bytes:
    kv = await index.get(key)
    assert kv is not None, f"{key} is missing"
    return kv.value


def b64s(values: list[str]) -> list[bytes]:
    return [base64.b64decode(v) for v in values]


# -- keys --------------------------------------------------------------------------------------------


def test_log_key_is_0600_with_a_vkey_beside_it(log_key: tuple[Ed25519PrivateKey, Path]) -> None:
    _, path = log_key
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    verifier = load_verifier(vkey_path_for(path))
    assert verifier.name == ORIGIN
    _, v2, created = init_log_key(path, origin=ORIGIN)
    assert not created and v2 == verifier


# -- the signer ----------------------------------------------------------------------------------------


async def test_signer_signs_the_audit_stream(
    index: Index, kit: Kit, log_key: tuple[Ed25519PrivateKey, Path]
) -> None:
    await kit.publish(index)
    await register_some(index, kit, 5)
    signer = LogSigner(index, log_key[0], origin=ORIGIN)
    await signer.load()
    result = await signer.sign()
    assert result is not None and result.written
    values = await audit_values(index)
    want = MerkleTree.from_leaves(values)  # leaf i = the bytes of audit entry i + 1
    cp = open_checkpoint(await value(index, LATEST_KEY), signer.verifier, origin=ORIGIN)
    assert (cp.size, cp.root_hash) == (5, want.root())
    assert cp.timestamp is not None and abs(cp.timestamp - kit.now) < 60
    assert await value(index, Keys.log_head(5)) == await value(index, LATEST_KEY)
    assert await signer.sign() is None  # nothing new: nothing signed
    await register_some(index, kit, 2)
    fresh = LogSigner(index, log_key[0], origin=ORIGIN)
    await fresh.load()
    assert (await fresh.sign()) is not None
    assert [kv.key for kv in (await index.get_prefix(Keys.log("head") + "/"))[0]] == [
        Keys.log_head(5),
        Keys.log_head(7),
    ]


async def test_two_signers_do_not_fork(
    index: Index, kit: Kit, log_key: tuple[Ed25519PrivateKey, Path]
) -> None:
    await register_some(index, kit, 3)
    a = LogSigner(index, log_key[0], origin=ORIGIN)
    b = LogSigner(index, log_key[0], origin=ORIGIN, clock=lambda: kit.now + 5)
    await a.load()
    await b.load()
    ra, rb = await asyncio.gather(a.sign(), b.sign())
    results = [r for r in (ra, rb) if r is not None]
    assert sum(r.written for r in results) == 1
    assert {r.checkpoint.root_hash for r in results} == {
        MerkleTree.from_leaves(await audit_values(index)).root()
    }


@pytest.mark.parametrize("damage", ["rewrite", "delete_middle", "delete_tail"])
async def test_signer_refuses_a_rewritten_audit_stream(
    index: Index,
    kit: Kit,
    log_key: tuple[Ed25519PrivateKey, Path],
    damage: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    await register_some(index, kit, 4)
    signer = LogSigner(index, log_key[0], origin=ORIGIN)
    await signer.load()
    await signer.sign()
    if damage == "rewrite":
        entry = json.loads(await value(index, Keys.audit(2)))
        entry["digest"] = "0" * 64
        await index.put(Keys.audit(2), json.dumps(entry, separators=(",", ":")))
        kind, match = "rewritten", "past audit entries were rewritten"
    elif damage == "delete_middle":
        await index.delete(Keys.audit(2))
        kind, match = "gap", "entries 2..2 are missing"
    else:
        await index.delete(Keys.audit(4))
        kind, match = "rewritten", "has 3 entries but checkpoint 4 was signed"
    again = LogSigner(index, log_key[0], origin=ORIGIN)
    with pytest.raises(LogConsistencyError, match=match) as info:
        await again.load()
    assert info.value.kind == kind
    assert "TRANSPARENCY LOG ALARM" in caplog.text
    assert await value(index, LATEST_KEY) == await value(index, Keys.log_head(4))


async def test_running_signer_follows_appends_and_stops_on_a_rewrite(
    index: Index, kit: Kit, log_key: tuple[Ed25519PrivateKey, Path]
) -> None:
    await register_some(index, kit, 2)
    signer = LogSigner(index, log_key[0], origin=ORIGIN)
    task = asyncio.create_task(signer.run(interval=0.05))

    async def signed_size(n: int) -> None:
        for _ in range(200):
            if signer.signed is not None and signer.signed.size == n:
                return
            await asyncio.sleep(0.02)
        raise AssertionError(f"no checkpoint at {n}; signed: {signer.signed}")

    await signed_size(2)
    await register_some(index, kit, 3)
    await signed_size(5)
    await index.put(Keys.audit(1), b'{"seq":1,"op":"register","digest":"00","time":0}')
    with pytest.raises(LogConsistencyError, match=r"audit entry 1 .* overwritten") as info:
        await asyncio.wait_for(task, 10)
    assert info.value.kind == "rewritten"
    assert signer.signed is not None and signer.signed.size == 5


async def test_cli_log_sign_once(
    index: Index, kit: Kit, tmp_path: Path, etcd_server: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    await register_some(index, kit, 2)
    key = tmp_path / "national" / "log.key"
    argv = [
        "log",
        "sign",
        "--etcd",
        etcd_server.endpoint,
        "--key",
        str(key),
        "--origin",
        ORIGIN,
        "--once",
    ]
    assert await asyncio.to_thread(main, argv) == 0
    assert "signed checkpoint 2" in capsys.readouterr().out
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and vkey_path_for(key).exists()
    cp = open_checkpoint(await value(index, LATEST_KEY), load_verifier(vkey_path_for(key)))
    assert cp.size == 2


# -- the read side -------------------------------------------------------------------------------------


async def test_routes_serve_verifiable_proofs(
    index: Index, kit: Kit, log_key: tuple[Ed25519PrivateKey, Path], aiohttp_client: Any
) -> None:
    await kit.publish(index)
    envs = []
    for _ in range(6):
        cpid, env, _ = kit.record()
        await kit.register(index, cpid, env)
        envs.append((cpid, env))
    signer = LogSigner(index, log_key[0], origin=ORIGIN)
    await signer.load()
    first = (await signer.sign()).checkpoint  # type: ignore[union-attr]
    # an update of the first record, then more registrations
    cpid0, env0 = envs[0]
    _, env0v2, _ = kit.record(cpid=cpid0, version=2)
    await kit.register(index, cpid0, env0v2, op="update")
    await register_some(index, kit, 4)
    await signer.load()
    second = (await signer.sign()).checkpoint  # type: ignore[union-attr]
    assert (first.size, second.size) == (6, 11)

    client = await aiohttp_client(resolver_app(index, kit))
    resp = await client.get("/v1/log/checkpoint")
    assert resp.status == 200 and resp.content_type == "text/plain"
    cp = open_checkpoint(await resp.read(), signer.verifier, origin=ORIGIN)
    assert cp == second

    # inclusion of the current version of record 0, by digest and by version
    for params in ({"digest": record_digest(env0v2)}, {"version": "2"}):
        resp = await client.get("/v1/log/proof/inclusion", params={"cpid": cpid0, **params})
        doc = await resp.json()
        assert resp.status == 200, doc
        leaf = base64.b64decode(doc["leaf"])
        entry = json.loads(leaf)
        assert (doc["leaf_index"], doc["tree_size"]) == (6, 11)
        assert entry["op"] == "update" and entry["digest"] == record_digest(env0v2)
        verify_inclusion(
            leaf=leaf_hash(leaf), index=6, tree_size=11, proof=b64s(doc["proof"]), root=cp.root_hash
        )
    # the first version, by digest (entries carry no version), against the first checkpoint
    resp = await client.get(
        "/v1/log/proof/inclusion",
        params={"cpid": cpid0, "digest": record_digest(env0), "tree_size": "6"},
    )
    doc = await resp.json()
    assert doc["leaf_index"] == 0
    verify_inclusion(
        leaf=leaf_hash(base64.b64decode(doc["leaf"])),
        index=0,
        tree_size=6,
        proof=b64s(doc["proof"]),
        root=first.root_hash,
    )
    resp = await client.get("/v1/log/proof/inclusion", params={"cpid": cpid0, "version": "1"})
    assert resp.status == 404 and "older ones by digest" in (await resp.json())["error"]["message"]
    # by index
    resp = await client.get("/v1/log/proof/inclusion", params={"index": "10"})
    doc = await resp.json()
    verify_inclusion(
        leaf=leaf_hash(base64.b64decode(doc["leaf"])),
        index=10,
        tree_size=11,
        proof=b64s(doc["proof"]),
        root=cp.root_hash,
    )
    # consistency between the two checkpoints
    resp = await client.get("/v1/log/proof/consistency", params={"first": "6", "second": "11"})
    doc = await resp.json()
    verify_consistency(
        first=6,
        second=11,
        first_root=first.root_hash,
        second_root=second.root_hash,
        proof=b64s(doc["proof"]),
    )
    # entries
    resp = await client.get("/v1/log/entries", params={"start": "3", "end": "5"})
    doc = await resp.json()
    values = await audit_values(index)
    assert [base64.b64decode(e["leaf"]) for e in doc["entries"]] == values[3:5]
    # bad queries
    for path, params, status in [
        ("/v1/log/proof/inclusion", {}, 400),
        ("/v1/log/proof/inclusion", {"cpid": cpid0}, 400),
        ("/v1/log/proof/inclusion", {"cpid": "CN.31/GPU.X-1", "version": "1"}, 400),
        ("/v1/log/proof/inclusion", {"index": "11"}, 404),
        ("/v1/log/proof/consistency", {"first": "-1"}, 400),
        ("/v1/log/proof/consistency", {"first": "3", "second": "99"}, 404),
        ("/v1/log/entries", {"start": "50"}, 404),
    ]:
        resp = await client.get(path, params=params)
        assert resp.status == status, (path, params, await resp.text())
        assert "message" in (await resp.json())["error"]


async def test_view_notices_a_history_that_differs_from_the_checkpoint(
    index: Index,
    kit: Kit,
    log_key: tuple[Ed25519PrivateKey, Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    await register_some(index, kit, 3)
    signer = LogSigner(index, log_key[0], origin=ORIGIN)
    await signer.load()
    await signer.sign()
    await index.put(Keys.audit(3), b'{"seq":3,"op":"register","digest":"ff","time":0}')
    view = LogView(index)
    await view.refresh()
    assert view.checkpoint is not None and not view.consistent
    assert "differs from the signed checkpoint" in caplog.text


# -- cpi audit log -------------------------------------------------------------------------------------


async def test_cpi_audit_log_detects_rollback_split_view_and_rewrites(
    index: Index,
    kit: Kit,
    log_key: tuple[Ed25519PrivateKey, Path],
    tmp_path: Path,
    aiohttp_client: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    key, key_path = log_key
    (tmp_path / "log.vkey").write_text(vkey_path_for(key_path).read_text())  # beside the anchor
    await kit.publish(index)
    cpids = await register_some(index, kit, 4)
    signer = LogSigner(index, key, origin=ORIGIN)
    await signer.load()
    await signer.sign()
    client = await aiohttp_client(resolver_app(index, kit))
    url = str(client.make_url("")).rstrip("/")
    state = tmp_path / "auditor" / "state.note"
    base = [
        "audit",
        "log",
        "--resolver",
        url,
        "--anchor",
        str(kit.anchor_path),
        "--state",
        str(state),
        "--insecure",  # the in-process test resolver serves plain HTTP
    ]

    async def cli(*extra: str) -> tuple[int, str, str]:
        code = await asyncio.to_thread(main, [*base, *extra])
        out = capsys.readouterr()
        return code, out.out, out.err

    # first run: trust on first use, with an inclusion proof of a record
    code, out, _ = await cli("--cpid", cpids[2])
    assert code == 0, out
    assert "first checkpoint seen: size 4" in out
    assert f"ok   inclusion of record {cpids[2]}" in out and "envelope digest matches" in out
    stored = state.read_bytes()
    # the log grows: consistent
    more = await register_some(index, kit, 3)
    await signer.load()
    await signer.sign()
    await asyncio.sleep(0.2)  # the view refreshes every 50 ms
    code, out, _ = await cli("--cpid", more[0], "--json")
    doc = json.loads(out)
    assert code == 0 and doc["ok"], doc
    assert doc["checks"][1]["detail"] == "consistent: size 4 -> 7"
    assert state.read_bytes() != stored
    grown = state.read_bytes()

    # rollback: the resolver serves the older checkpoint
    await index.put(LATEST_KEY, await value(index, Keys.log_head(4)))
    await asyncio.sleep(0.2)
    code, out, err = await cli()
    assert code == 1
    assert "TRANSPARENCY LOG ALARM: ROLLBACK" in err and "size 4" in err
    assert state.read_bytes() == grown  # the bad checkpoint is not stored

    # split view: another root signed for the same size
    fake = Checkpoint.create(
        origin=ORIGIN, size=7, root_hash=leaf_hash(b"other"), timestamp=kit.now
    )
    await index.put(LATEST_KEY, sign_checkpoint(fake, key))
    await asyncio.sleep(0.2)
    code, out, err = await cli("--json")
    assert code == 1 and json.loads(out)["alarm"] == "split_view"
    assert "SPLIT VIEW: two signed roots for tree size 7" in err

    # a rewritten past entry, signed over by a compromised signer at a larger size:
    # no consistency proof from the stored checkpoint can lead to the new root
    old = await value(index, Keys.audit(2))
    await index.put(Keys.audit(2), old.replace(b'"register"', b'"update"'))
    await register_some(index, kit, 1)
    values = await audit_values(index)
    rewritten = MerkleTree.from_leaves(values)
    bad = Checkpoint.create(origin=ORIGIN, size=8, root_hash=rewritten.root(), timestamp=kit.now)
    await index.put(LATEST_KEY, sign_checkpoint(bad, key))
    await asyncio.sleep(0.2)
    code, out, err = await cli()
    assert code == 1
    assert (
        "SPLIT VIEW: the checkpoint at size 8 is not consistent with the stored one at size 7"
        in err
    )
    assert state.read_bytes() == grown

    # and a checkpoint signed by another key is refused outright
    from schemas import keys as keymod

    await index.put(LATEST_KEY, sign_checkpoint(bad, keymod.generate()))
    await asyncio.sleep(0.2)
    code, out, _ = await cli()
    assert code == 1 and "none of them is a trusted key" in out


# -- mounted in the real resolver app ------------------------------------------------------------------


async def test_mounted_in_the_resolver_app(
    index: Index,
    kit: Kit,
    log_key: tuple[Ed25519PrivateKey, Path],
    tmp_path: Path,
    etcd_server: Any,
    aiohttp_client: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The resolver app serves the log routes; ``cpi audit log --cpid`` against it."""
    from resolver.http import create_app
    from tests.resolver.kit import resolver_config

    (tmp_path / "log.vkey").write_text(vkey_path_for(log_key[1]).read_text())
    await kit.publish(index)
    cpids = await register_some(index, kit, 3)
    signer = LogSigner(index, log_key[0], origin=ORIGIN)
    await signer.load()
    await signer.sign()
    app = create_app(resolver_config(etcd_server.endpoint, kit.anchor_path))
    client = await aiohttp_client(app)
    for _ in range(200):
        if (await client.get(f"/v1/resources/{cpids[1]}")).status == 200:
            break
        await asyncio.sleep(0.05)
    resp = await client.get("/v1/log/checkpoint")
    assert open_checkpoint(await resp.read(), signer.verifier).size == 3
    argv = [
        "audit", "log", "--resolver", str(client.make_url("")).rstrip("/"),
        "--anchor", str(kit.anchor_path), "--state", str(tmp_path / "state"), "--cpid", cpids[1],
        "--insecure",
    ]  # fmt: skip
    code = await asyncio.to_thread(main, argv)
    out = capsys.readouterr().out
    assert code == 0, out
    assert (
        f"ok   inclusion of record {cpids[1]}: leaf 1 (register) of 3; its envelope digest" in out
    )


async def test_inclusion_lookup_by_digest_reads_no_key_per_version(
    index: Index, kit: Kit, capsys: pytest.CaptureFixture[str]
) -> None:
    """A record with 300 versions: finding its first version by digest reads no audit key
    (the view indexes record leaves by digest as it follows the stream)."""
    await kit.publish(index)
    cpid, env, node = kit.record()
    await kit.register(index, cpid, env)
    first = record_digest(env)
    for v in range(2, 301):
        _, envv, _ = kit.record(node, cpid=cpid, version=v)
        await kit.register(index, cpid, envv, op="update")
    view = LogView(index)
    await view.refresh()
    assert view.tree.size == 300

    reads = 0
    real_get = index.get

    async def counting_get(key: str, *args: Any, **kw: Any) -> Any:
        nonlocal reads
        reads += 1
        return await real_get(key, *args, **kw)

    index.get = counting_get  # type: ignore[method-assign]
    try:
        t0 = asyncio.get_running_loop().time()
        for _ in range(10):
            assert await view.find_leaf(cpid, digest=first) == 0
        elapsed = (asyncio.get_running_loop().time() - t0) / 10
        assert await view.find_leaf(cpid, digest=first.upper()) == 0
        assert await view.find_leaf(cpid, version=300) == 299  # reads /rec/<cpid> only
    finally:
        del index.get
    with capsys.disabled():
        print(f"\nfind_leaf by digest at 300 versions: {elapsed * 1000:.3f} ms, {reads} reads")
    assert reads == 1
