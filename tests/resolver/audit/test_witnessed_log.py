"""A witnessed log against a real etcd: the signer gets cosignatures from witnesses, the
auditor requires k of n, and a forked log is refused by every witness and reported by
``cpi audit log`` with both checkpoints."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from cpi.main import main
from registry.index import Index, Keys
from registry.logsigner import LATEST_KEY, LogSigner, WitnessEndpoint, init_log_key, vkey_path_for
from resolver.audit.witness import Witness, WitnessState, create_witness_app
from schemas import keys
from schemas.checkpoint import Checkpoint, Note, sign_checkpoint
from schemas.cosignature import CosignerVerifier, QuorumError, open_cosigned_checkpoint
from schemas.merkle import MerkleTree
from tests.resolver.audit.audit_kit import Kit, resolver_app
from tests.resolver.audit.test_log import ORIGIN, audit_values, register_some, value


class Witnesses:
    """n in-process witnesses of the test log."""

    def __init__(self) -> None:
        self.keys: list[keys.Ed25519PrivateKey] = []
        self.witnesses: list[Witness] = []
        self.endpoints: list[WitnessEndpoint] = []
        self.clients: list[Any] = []

    @property
    def verifiers(self) -> list[CosignerVerifier]:
        return [e.verifier for e in self.endpoints]

    def vkeys(self) -> list[str]:
        return [v.to_vkey() for v in self.verifiers]


@pytest.fixture
def kit(tmp_path: Path) -> Kit:
    return Kit(tmp_path)


async def start_witnesses(
    n: int, tmp_path: Path, log_signer: LogSigner, aiohttp_client: Any
) -> Witnesses:
    ws = Witnesses()
    for i in range(n):
        key = keys.generate()
        name = f"w{i}.test/witness"
        w = Witness(name, key, {ORIGIN: [log_signer.verifier]}, WitnessState(tmp_path / f"w{i}"))
        client = await aiohttp_client(create_witness_app(w))
        ws.keys.append(key)
        ws.witnesses.append(w)
        ws.clients.append(client)
        ws.endpoints.append(WitnessEndpoint(str(client.make_url("")).rstrip("/"), w.verifier))
    return ws


async def test_signer_stores_cosignatures_and_the_auditor_requires_a_quorum(
    index: Index,
    kit: Kit,
    tmp_path: Path,
    aiohttp_client: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    key, _, _ = init_log_key(tmp_path / "log.key", origin=ORIGIN)
    (tmp_path / "log.vkey").write_text(vkey_path_for(tmp_path / "log.key").read_text())
    await kit.publish(index)
    await register_some(index, kit, 3)
    plain = LogSigner(index, key, origin=ORIGIN)
    ws = await start_witnesses(3, tmp_path, plain, aiohttp_client)
    down = WitnessEndpoint(
        "http://127.0.0.1:9", CosignerVerifier.from_public_key("gone/w", keys.generate())
    )
    signer = LogSigner(
        index, key, origin=ORIGIN, witnesses=[*ws.endpoints, down], witness_timeout=1
    )
    await signer.load()
    result = await signer.sign()
    assert result is not None and result.written
    note = await value(index, LATEST_KEY)
    assert note == await value(index, Keys.log_head(3))
    cp, cosigs = open_cosigned_checkpoint(note, signer.verifier, ws.verifiers, quorum=3)
    assert cp.size == 3 and sorted(c.witness for c in cosigs) == [w.name for w in ws.witnesses]
    # grow: each witness gets a consistency proof from the size it cosigned
    await register_some(index, kit, 4)
    await signer.load()
    await signer.sign()
    note = await value(index, LATEST_KEY)
    assert open_cosigned_checkpoint(note, signer.verifier, ws.verifiers, quorum=3)[0].size == 7
    assert [w.state.get(ORIGIN).size for w in ws.witnesses] == [7, 7, 7]  # type: ignore[union-attr]
    assert signer.witnesses[-1].last_error is not None  # the unreachable one
    await signer.aclose()

    # the auditor: k of n through the resolver's route
    client = await aiohttp_client(resolver_app(index, kit))
    url = str(client.make_url("")).rstrip("/")
    base = ["audit", "log", "--resolver", url, "--anchor", str(kit.anchor_path), "--insecure"]
    wargs = [a for v in ws.vkeys() for a in ("--witness", v)]
    stranger = CosignerVerifier.from_public_key("x.test/w", keys.generate()).to_vkey()

    async def cli(*extra: str) -> tuple[int, str]:
        code = await asyncio.to_thread(main, [*base, *extra])
        return code, capsys.readouterr().out

    await asyncio.sleep(0.2)
    code, out = await cli("--state", str(tmp_path / "a1"), *wargs, "--json")
    doc = json.loads(out)
    assert code == 0 and doc["ok"], doc
    assert sorted(doc["cosigners"]) == sorted(w.name for w in ws.witnesses)
    # 3 of 4 trusted witnesses cosigned: a quorum of 3 passes, 4 does not
    code, out = await cli(
        "--state", str(tmp_path / "a2"), *wargs, "--witness", stranger, "--quorum", "3"
    )
    assert code == 0, out
    code, out = await cli("--state", str(tmp_path / "a3"), *wargs, "--witness", stranger)
    assert code == 1
    assert "FAIL witness cosignatures: 3 of 4 witnesses cosigned" in out and "4 required" in out
    assert not (tmp_path / "a3").exists()  # not accepted, not stored
    # a bad --quorum is a usage error
    assert (await cli("--state", str(tmp_path / "a4"), *wargs, "--quorum", "5"))[0] == 2


async def test_a_late_witness_is_added_to_latest(
    index: Index, kit: Kit, tmp_path: Path, aiohttp_client: Any
) -> None:
    """A witness that was down when a checkpoint was signed cosigns it later."""
    key, _, _ = init_log_key(tmp_path / "log.key", origin=ORIGIN)
    await register_some(index, kit, 2)
    plain = LogSigner(index, key, origin=ORIGIN)
    ws = await start_witnesses(1, tmp_path, plain, aiohttp_client)
    await plain.load()
    await plain.sign()  # signed without witnesses
    signer = LogSigner(index, key, origin=ORIGIN, witnesses=ws.endpoints)
    await signer.load()
    assert await signer.cosign_latest()
    note = await value(index, LATEST_KEY)
    assert open_cosigned_checkpoint(note, signer.verifier, ws.verifiers, quorum=1)[0].size == 2
    assert not await signer.cosign_latest()  # nothing missing any more
    await signer.aclose()


async def test_a_forked_log_is_refused_by_every_witness_and_reported(
    index: Index,
    kit: Kit,
    tmp_path: Path,
    aiohttp_client: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    key, _, _ = init_log_key(tmp_path / "log.key", origin=ORIGIN)
    (tmp_path / "log.vkey").write_text(vkey_path_for(tmp_path / "log.key").read_text())
    await kit.publish(index)
    await register_some(index, kit, 4)
    plain = LogSigner(index, key, origin=ORIGIN)
    ws = await start_witnesses(3, tmp_path, plain, aiohttp_client)
    signer = LogSigner(index, key, origin=ORIGIN, witnesses=ws.endpoints)
    await signer.load()
    await signer.sign()
    honest = await value(index, LATEST_KEY)
    client = await aiohttp_client(resolver_app(index, kit))
    url = str(client.make_url("")).rstrip("/")
    state = tmp_path / "auditor.state"
    wargs = [a for v in ws.vkeys() for a in ("--witness", v)]
    argv = ["audit", "log", "--resolver", url, "--anchor", str(kit.anchor_path), "--insecure",
            "--state", str(state), *wargs]  # fmt: skip
    await asyncio.sleep(0.2)
    assert await asyncio.to_thread(main, argv) == 0
    capsys.readouterr()

    # the log key signs another history: the same 4 entries but one rewritten
    leaves = await audit_values(index)
    forked_leaves = [*leaves[:2], leaves[2].replace(b'"register"', b'"update"'), leaves[3]]
    fork = MerkleTree.from_leaves(forked_leaves)
    same_size = sign_checkpoint(
        Checkpoint.create(origin=ORIGIN, size=4, root_hash=fork.root(), timestamp=kit.now), key
    )
    leaf5 = b'{"seq":5,"op":"register","digest":"ee","time":0}'
    fork.append(leaf5)
    larger = sign_checkpoint(
        Checkpoint.create(origin=ORIGIN, size=5, root_hash=fork.root(), timestamp=kit.now), key
    )
    # every witness refuses both: 409 for the same size, 422 for the larger one
    forger = LogSigner(index, key, origin=ORIGIN, witnesses=ws.endpoints)
    forger.tree = fork
    for note, size in ((same_size, 4), (larger, 5)):
        cp = Checkpoint.from_text(Note.from_bytes(note).text)
        for w in forger.witnesses:
            w.known_size = 4
        assert await forger._cosign(note, cp) == note  # no witness added a line
        assert all(w.refused is not None for w in forger.witnesses)
        assert all(f"refuses size {size}" in (w.refused or "") for w in forger.witnesses)
    await forger.aclose()
    await signer.aclose()
    assert [w.state.get(ORIGIN).root_hash for w in ws.witnesses] == [  # type: ignore[union-attr]
        MerkleTree.from_leaves(leaves).root()
    ] * 3
    for w in ws.witnesses:
        assert len(list((w.state.dir / "evidence").iterdir())) == 2
    with pytest.raises(QuorumError):
        open_cosigned_checkpoint(larger, signer.verifier, ws.verifiers, quorum=1)

    # the resolver is made to serve the fork: the auditor reports both checkpoints
    for forked_note, kind in ((same_size, "two signed roots"), (larger, "not consistent")):
        if forked_note is larger:  # the resolver must have 5 entries to serve a proof
            await index.put(Keys.audit(5), leaf5)
        await index.put(LATEST_KEY, forked_note)
        await asyncio.sleep(0.2)
        # without witnesses the stored checkpoint still catches the split view
        plain_argv = [a for a in argv if a not in wargs]
        code = await asyncio.to_thread(main, [*plain_argv, "--json"])
        captured = capsys.readouterr()
        doc = json.loads(captured.out)
        assert code == 1 and doc["alarm"] == "split_view", doc
        assert kind in captured.err
        notes = {e["role"]: e["note"] for e in doc["evidence"]}
        assert notes == {"stored": honest.decode(), "served": forked_note.decode()}
        assert honest.decode() in captured.err and forked_note.decode() in captured.err
        # with the witnesses, the forked checkpoint is not even cosigned
        code = await asyncio.to_thread(main, argv)
        out = capsys.readouterr().out
        assert code == 1 and "FAIL witness cosignatures: 0 of 3" in out
    assert state.read_bytes() == honest  # never replaced by a forked checkpoint

    # an auditor with no history of its own compares with what a witness cosigned
    fresh = [a for a in argv if a not in wargs]
    fresh[fresh.index("--state") + 1] = str(tmp_path / "fresh.state")
    fresh += ["--compare-witness", ws.endpoints[0].url]
    code = await asyncio.to_thread(main, [*fresh, "--json"])
    captured = capsys.readouterr()
    doc = json.loads(captured.out)
    assert code == 1 and doc["alarm"] == "split_view", doc
    assert {e["role"] for e in doc["evidence"]} == {"witness", "served"}
    assert "a witness cosigned" in captured.err and "SPLIT VIEW" in captured.err
    assert not (tmp_path / "fresh.state").exists()
    await index.put(LATEST_KEY, honest)
    await asyncio.sleep(0.2)
    code = await asyncio.to_thread(main, fresh)
    out = capsys.readouterr().out
    assert code == 0 and "the witness holds size 4: consistent" in out


async def test_resolver_serves_only_cosigned_checkpoints_with_a_policy(
    index: Index, kit: Kit, tmp_path: Path, aiohttp_client: Any
) -> None:
    from resolver.audit.log import LogView
    from resolver.audit.logcheck import policy_from_env
    from schemas.errors import CheckpointError

    key, verifier, _ = init_log_key(tmp_path / "log.key", origin=ORIGIN)
    await register_some(index, kit, 2)
    plain = LogSigner(index, key, origin=ORIGIN)
    ws = await start_witnesses(2, tmp_path, plain, aiohttp_client)
    (tmp_path / "w0.vkey").write_text(ws.vkeys()[0] + "\n")
    env = {
        "CPI_RESOLVER_LOG_VKEY": str(tmp_path / "log.vkey"),
        "CPI_RESOLVER_LOG_WITNESSES": f"{tmp_path / 'w0.vkey'},{ws.vkeys()[1]}",
        "CPI_RESOLVER_LOG_QUORUM": "2",
    }
    policy = policy_from_env(env)
    assert policy is not None and policy.quorum == 2 and policy.log == verifier
    assert policy_from_env({}) is None
    for bad in ({**env, "CPI_RESOLVER_LOG_QUORUM": "3"}, {**env, "CPI_RESOLVER_LOG_VKEY": ""}):
        with pytest.raises(CheckpointError):
            policy_from_env(bad)
    await plain.load()
    await plain.sign()  # no witnesses: not served under the policy
    view = LogView(index, policy)
    await view.refresh()
    assert view.note is None and view.tree.size == 2
    # one witness cosigns: still short of 2
    one = LogSigner(index, key, origin=ORIGIN, witnesses=ws.endpoints[:1])
    await one.load()
    assert await one.cosign_latest()
    await view.refresh()
    assert view.note is None
    both = LogSigner(index, key, origin=ORIGIN, witnesses=ws.endpoints)
    await both.load()
    assert await both.cosign_latest()
    await view.refresh()
    assert view.note == await value(index, LATEST_KEY) and view.checkpoint is not None
    # the log grows, signed without witnesses: the cosigned checkpoint stays served
    await register_some(index, kit, 1)
    await plain.load()
    await plain.sign()
    await view.refresh()
    assert view.checkpoint.size == 2 and view.tree.size == 3
    for s in (one, both):
        await s.aclose()


async def test_running_signer_asks_a_witness_again_until_it_cosigns(
    index: Index, kit: Kit, tmp_path: Path, aiohttp_client: Any
) -> None:
    key, _, _ = init_log_key(tmp_path / "log.key", origin=ORIGIN)
    await register_some(index, kit, 2)
    plain = LogSigner(index, key, origin=ORIGIN)
    ws = await start_witnesses(1, tmp_path, plain, aiohttp_client)
    logs = ws.witnesses[0].logs
    ws.witnesses[0].logs = {}  # the witness does not know the log yet: 404
    signer = LogSigner(index, key, origin=ORIGIN, witnesses=ws.endpoints, witness_retry_s=0.1)
    stop = asyncio.Event()
    task = asyncio.create_task(signer.run(interval=0.05, stop=stop))
    try:
        for _ in range(100):
            if (kv := await index.get(LATEST_KEY)) is not None:
                break
            await asyncio.sleep(0.05)
        assert b"w0.test/witness" not in (await value(index, LATEST_KEY))
        assert "404" in (signer.witnesses[0].last_error or "")
        ws.witnesses[0].logs = logs  # configured now
        for _ in range(100):
            note = await value(index, LATEST_KEY)
            if b"w0.test/witness" in note:
                break
            await asyncio.sleep(0.05)
        cp, _ = open_cosigned_checkpoint(note, signer.verifier, ws.verifiers, quorum=1)
        assert cp.size == 2
        assert await value(index, Keys.log_head(2)) != note  # head keeps what it had
    finally:
        stop.set()
        await task
    assert kv is not None
