"""The witness (resolver/audit/witness.py): cosigns consistent growth, refuses forks,
keeps its state across restarts."""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

import pytest

from resolver.audit.witness import Witness, WitnessState, create_witness_app
from schemas import keys
from schemas.checkpoint import Checkpoint, Note, NoteVerifier, sign_checkpoint
from schemas.cosignature import (
    SIZE_CONTENT_TYPE,
    CosignerVerifier,
    add_signatures,
    format_add_checkpoint,
    open_cosigned_checkpoint,
    parse_signature_lines,
)
from schemas.errors import ConfigError
from schemas.merkle import MerkleTree

ORIGIN = "test.cpi/log"
PUBLISHED = Path(__file__).resolve().parents[3] / "docs" / "openapi" / "witness.json"


class Log:
    """A log in memory: a tree, and the key that signs its checkpoints."""

    def __init__(self, key: keys.Ed25519PrivateKey | None = None, prefix: bytes = b"e") -> None:
        self.key = key or keys.generate()
        self.verifier = NoteVerifier.from_public_key(ORIGIN, self.key)
        self.tree = MerkleTree()
        self.prefix = prefix

    def grow(self, n: int) -> None:
        for _ in range(n):
            self.tree.append(self.prefix + str(self.tree.size).encode())

    def note(self, size: int | None = None) -> bytes:
        size = self.tree.size if size is None else size
        cp = Checkpoint.create(origin=ORIGIN, size=size, root_hash=self.tree.root(size))
        return sign_checkpoint(cp, self.key)

    def request(self, old: int, size: int | None = None) -> bytes:
        size = self.tree.size if size is None else size
        proof = self.tree.consistency_proof(old, size) if old else []
        return format_add_checkpoint(old, proof, self.note(size))


@pytest.fixture
def wkey() -> keys.Ed25519PrivateKey:
    return keys.generate()


def make_witness(tmp: Path, wkey: keys.Ed25519PrivateKey, log: Log) -> Witness:
    return Witness("w1.test", wkey, {ORIGIN: [log.verifier]}, WitnessState(tmp / "state"))


async def post(client: Any, body: bytes) -> tuple[int, str, bytes]:
    resp = await client.post("/add-checkpoint", data=body)
    return resp.status, resp.content_type, await resp.read()


async def test_cosigns_consistent_growth(tmp_path: Path, wkey: Any, aiohttp_client: Any) -> None:
    log = Log()
    witness = make_witness(tmp_path, wkey, log)
    client = await aiohttp_client(create_witness_app(witness))
    wv = CosignerVerifier.from_public_key("w1.test", wkey)
    log.grow(3)
    status, _, body = await post(client, log.request(0))
    assert status == 200, body
    (line,) = parse_signature_lines(body)
    cosigned = add_signatures(log.note(), [line])
    # the line verifies only over this checkpoint's text
    cp, cosigs = open_cosigned_checkpoint(cosigned, log.verifier, [wv], quorum=1)
    assert cp.size == 3 and cosigs[0].witness == "w1.test"
    for step in (1, 4, 9):
        old = log.tree.size
        log.grow(step)
        status, _, body = await post(client, log.request(old))
        assert status == 200, body
    # the same checkpoint again: cosigned again
    assert (await post(client, log.request(log.tree.size)))[0] == 200
    info = await (await client.get("/v1/witness")).json()
    assert info["logs"] == [{"origin": ORIGIN, "size": 17}] and info["vkey"] == wv.to_vkey()
    latest = await (await client.get("/v1/witness/checkpoint", params={"origin": ORIGIN})).read()
    assert open_cosigned_checkpoint(latest, log.verifier, [wv], quorum=1)[0].size == 17
    metrics = await (await client.get("/metrics")).text()
    assert 'cpi_witness_requests_total{outcome="cosigned"} 5.0' in metrics
    assert 'cpi_witness_tree_size{origin="test.cpi/log"} 17.0' in metrics
    # state is 0600 in a 0700 directory
    (state_file,) = (tmp_path / "state").glob("*.json")
    assert stat.S_IMODE(state_file.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "state").stat().st_mode) == 0o700


async def test_refuses_a_fork(tmp_path: Path, wkey: Any, aiohttp_client: Any) -> None:
    """Two checkpoints signed by the same log key that cannot both be true."""
    honest = Log()
    forked = Log(honest.key, prefix=b"x")  # same key, other leaves
    witness = make_witness(tmp_path, wkey, honest)
    client = await aiohttp_client(create_witness_app(witness))
    honest.grow(5)
    forked.grow(5)
    assert (await post(client, honest.request(0)))[0] == 200
    # same size, another root: 409 with the witness's size
    status, ctype, body = await post(client, format_add_checkpoint(5, [], forked.note()))
    assert (status, ctype, body) == (409, SIZE_CONTENT_TYPE, b"5\n")
    # a larger fork with its own (honest-looking) proof from 5: it does not lead from the
    # root the witness holds: 422
    forked.grow(3)
    status, _, body = await post(client, forked.request(5))
    assert status == 422 and json.loads(body)["error"]["code"] == "bad_proof"
    # a wrong old size: 409 and the size to use
    honest.grow(2)
    assert (await post(client, honest.request(3)))[:3:2] == (409, b"5\n")
    # the honest log goes on
    assert (await post(client, honest.request(5)))[0] == 200
    # a rollback (smaller checkpoint) cannot be cosigned: old size above the size
    assert (await post(client, format_add_checkpoint(7, [], honest.note(5))))[0] == 400
    # the refused, validly signed checkpoints are kept as evidence
    assert len(list((tmp_path / "state" / "evidence").iterdir())) == 2
    metrics = await (await client.get("/metrics")).text()
    assert 'cpi_witness_requests_total{outcome="conflict"} 1.0' in metrics
    assert 'cpi_witness_requests_total{outcome="fork"} 1.0' in metrics
    assert 'cpi_witness_requests_total{outcome="bad_proof"} 1.0' in metrics


async def test_bad_requests(tmp_path: Path, wkey: Any, aiohttp_client: Any) -> None:
    log = Log()
    witness = make_witness(tmp_path, wkey, log)
    client = await aiohttp_client(create_witness_app(witness))
    log.grow(2)
    # unknown log: 404
    other = Log()
    other_note = sign_checkpoint(
        Checkpoint.create(origin="other/log", size=2, root_hash=log.tree.root()), other.key
    )
    assert (await post(client, format_add_checkpoint(0, [], other_note)))[0] == 404
    # signed by another key: 403
    assert (await post(client, format_add_checkpoint(0, [], Log().note(0))))[0] == 403
    # a tampered signature by the trusted key: 403
    note = Note.from_bytes(log.note())
    bad = Note(note.text.replace("\n2\n", "\n1\n"), note.signatures).to_bytes()
    assert (await post(client, format_add_checkpoint(0, [], bad)))[0] == 403
    # garbage: 400, JSON error
    for body in (b"", b"old x\n\n", b"old 0\n\nnot a note", b"\xff" * 100):
        status, ctype, answer = await post(client, body)
        assert (status, ctype) == (400, "application/json"), body
        assert json.loads(answer)["error"]["code"] == "bad_request"
    # a proof from size 0 must be empty: 422
    proof_from_zero = format_add_checkpoint(0, [b"a" * 32], log.note())
    assert (await post(client, proof_from_zero))[0] == 422
    # too large: 413
    assert (await post(client, b"old 0\n\n" + b"a" * 200_000))[0] == 413
    # aiohttp's own refusals are JSON too
    for resp in (await client.get("/add-checkpoint"), await client.get("/nothing")):
        assert resp.status in (404, 405) and resp.content_type == "application/json"
        assert (await resp.json())["error"]["code"] in ("not_found", "method_not_allowed")
    # nothing was stored by any of these
    assert witness.state.get(ORIGIN) is None
    assert (await client.get("/v1/witness/checkpoint", params={"origin": ORIGIN})).status == 404


async def test_state_survives_a_restart(tmp_path: Path, wkey: Any, aiohttp_client: Any) -> None:
    honest = Log()
    forked = Log(honest.key, prefix=b"x")
    witness = make_witness(tmp_path, wkey, honest)
    honest.grow(4)
    assert (await witness.add_checkpoint(honest.request(0))).status == 200
    # a second process on the same state directory is refused
    with pytest.raises(ConfigError, match="in use"):
        WitnessState(tmp_path / "state")
    witness.state.close()
    # restarted: it remembers size 4 and its root
    again = make_witness(tmp_path, wkey, honest)
    forked.grow(4)
    answer = await again.add_checkpoint(format_add_checkpoint(0, [], forked.note()))
    assert (answer.status, answer.body) == (409, b"4\n")
    answer = await again.add_checkpoint(format_add_checkpoint(4, [], forked.note()))
    assert answer.status == 409
    honest.grow(1)
    assert (await again.add_checkpoint(honest.request(4))).status == 200
    again.state.close()
    # a damaged state file stops the witness instead of resetting it
    (state_file,) = (tmp_path / "state").glob("*.json")
    state_file.write_text("{not json")
    with pytest.raises(ConfigError, match="refusing to start"):
        WitnessState(tmp_path / "state")


async def test_concurrent_submissions_never_roll_back(tmp_path: Path, wkey: Any) -> None:
    """Requests for N and N+K from the same old size: one wins, the other gets 409."""
    import asyncio

    log = Log()
    witness = make_witness(tmp_path, wkey, log)
    log.grow(2)
    assert (await witness.add_checkpoint(log.request(0))).status == 200
    log.grow(6)
    a, b = await asyncio.gather(
        witness.add_checkpoint(log.request(2, 5)), witness.add_checkpoint(log.request(2, 8))
    )
    assert sorted((a.status, b.status)) == [200, 409]
    st = witness.state.get(ORIGIN)
    assert st is not None and st.size in (5, 8)
    witness.state.close()


async def test_openapi_describes_every_route(
    tmp_path: Path, wkey: Any, aiohttp_client: Any
) -> None:
    client = await aiohttp_client(create_witness_app(make_witness(tmp_path, wkey, Log())))
    served = await (await client.get("/openapi.json")).json()
    assert served == json.loads(PUBLISHED.read_text())
    assert set(served["paths"]) == {
        "/add-checkpoint", "/v1/witness", "/v1/witness/checkpoint",
        "/healthz", "/readyz", "/metrics", "/openapi.json",
    }  # fmt: skip
    assert set(served["paths"]["/add-checkpoint"]["post"]["responses"]) == {
        "200", "400", "403", "404", "408", "409", "413", "422", "503",
    }  # fmt: skip


async def test_a_state_that_cannot_be_written_gives_no_cosignature(
    tmp_path: Path, wkey: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = Log()
    witness = make_witness(tmp_path, wkey, log)
    log.grow(2)

    def full(*args: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(witness.state, "put", full)
    answer = await witness.add_checkpoint(log.request(0))
    assert answer.status == 503 and b"state_unavailable" in answer.body
    assert witness.state.get(ORIGIN) is None
    witness.state.close()
