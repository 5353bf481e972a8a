"""schemas/cosignature.py against hand-built vectors (tests/vectors/cosignature.json) and
the witness protocol's bodies."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest

from schemas import keys
from schemas.checkpoint import Note, NoteVerifier, open_checkpoint
from schemas.cosignature import (
    MAX_PROOF_LINES,
    CosignerVerifier,
    QuorumError,
    add_signatures,
    cosign,
    cosigned_message,
    cosigner_key_id,
    format_add_checkpoint,
    open_cosigned_checkpoint,
    parse_add_checkpoint,
    parse_signature_lines,
    parse_size_body,
    verify_cosignatures,
)
from schemas.errors import CheckpointError, InvalidDataError, SignatureError

VEC: dict[str, Any] = json.loads(
    (Path(__file__).resolve().parents[1] / "vectors" / "cosignature.json").read_text("utf-8")
)
W = VEC["witness"]
L = VEC["log"]


def witness_key() -> keys.Ed25519PrivateKey:
    return keys.private_from_seed(bytes.fromhex(W["seed_hex"]))


def test_key_id_and_vkey_match_the_vector() -> None:
    pub = bytes.fromhex(W["public_key_hex"])
    assert keys.public_raw(witness_key()) == pub
    assert f"{cosigner_key_id(W['name'], pub):08x}" == W["key_id_hex"]
    v = CosignerVerifier.from_vkey(W["vkey"])
    assert (v.name, f"{v.key_id:08x}") == (W["name"], W["key_id_hex"])
    assert v.to_vkey() == W["vkey"]
    assert CosignerVerifier.from_public_key(W["name"], witness_key()) == v


def test_signed_message_signature_and_line_are_byte_identical() -> None:
    text, ts = VEC["checkpoint_text"], VEC["timestamp"]
    assert cosigned_message(text, ts) == VEC["signed_message"].encode()
    line = cosign(text, W["name"], witness_key(), timestamp=ts)
    assert line.signature[8:].hex() == VEC["signature_hex"]
    assert line.to_line() == VEC["cosignature_line"]
    log_note = VEC["cosigned_note"].rsplit("\u2014 " + W["name"], 1)[0].encode()
    assert add_signatures(log_note, [line]).decode() == VEC["cosigned_note"]


def test_the_cosigned_note_verifies_for_log_and_witness() -> None:
    note = VEC["cosigned_note"].encode()
    log = NoteVerifier.from_vkey(L["vkey"])
    wit = CosignerVerifier.from_vkey(W["vkey"])
    # the log's verifier ignores the cosignature line (other key id), and vice versa
    assert open_checkpoint(note, log).size == 3
    cp, cosigs = open_cosigned_checkpoint(note, log, [wit], quorum=1, origin=L["name"])
    assert cp.size == 3
    assert [(c.witness, c.timestamp) for c in cosigs] == [(W["name"], VEC["timestamp"])]
    # a cosignature is not a log signature: a note signed only by the witness fails
    only_witness = VEC["checkpoint_text"] + "\n" + VEC["cosignature_line"]
    with pytest.raises(SignatureError):
        open_checkpoint(only_witness.encode(), log)


@pytest.mark.parametrize("case", VEC["invalid_lines"], ids=lambda c: c["why"])
def test_invalid_lines(case: dict[str, Any]) -> None:
    note = Note.from_bytes((VEC["checkpoint_text"] + "\n" + case["line"]).encode())
    wit = CosignerVerifier.from_vkey(W["vkey"])
    if case["expect"] == "ignored":
        assert verify_cosignatures(note, [wit]) == []
    else:
        with pytest.raises(SignatureError):
            verify_cosignatures(note, [wit])


def test_spec_example_layout() -> None:
    ex = VEC["spec_example"]
    (sig,) = parse_signature_lines(ex["line"].encode())
    assert sig.name == "witness.example.com/w1"
    assert f"{sig.key_id:08x}" == ex["key_id_hex"]
    assert len(sig.signature) == 72
    assert int.from_bytes(sig.signature[:8], "big") == ex["timestamp"]


def test_quorum_counts_distinct_known_witnesses() -> None:
    log = NoteVerifier.from_vkey(L["vkey"])
    a, b, c = (keys.generate() for _ in range(3))
    va, vb, vc = (
        CosignerVerifier.from_public_key(f"w{i}.test", k) for i, k in enumerate((a, b, c))
    )
    text = VEC["checkpoint_text"]
    note = VEC["cosigned_note"].rsplit("\u2014 " + W["name"], 1)[0].encode()
    note = add_signatures(note, [cosign(text, "w0.test", a), cosign(text, "w1.test", b)])
    assert len(open_cosigned_checkpoint(note, log, [va, vb, vc], quorum=2)[1]) == 2
    with pytest.raises(QuorumError, match="2 valid cosignature"):
        open_cosigned_checkpoint(note, log, [va, vb, vc], quorum=3)
    # the same line twice counts once
    assert add_signatures(note, [cosign(text, "w0.test", a)]) == note
    # a known witness whose line does not verify rejects the note
    forged = add_signatures(note, [cosign(text + "x\n", "w2.test", c)])
    with pytest.raises(SignatureError, match="does not verify"):
        open_cosigned_checkpoint(forged, log, [va, vb, vc], quorum=1)
    # a cosignature dated far in the future is refused when a clock is given
    late = add_signatures(note, [cosign(text, "w2.test", c, timestamp=2_000_000_000)])
    with pytest.raises(SignatureError, match="future"):
        open_cosigned_checkpoint(late, log, [vc], quorum=1, now=1_800_000_000)


def test_vkey_refuses_the_wrong_type_byte() -> None:
    with pytest.raises(CheckpointError, match="0x04"):
        CosignerVerifier.from_vkey(L["vkey"])  # a note key (0x01) is not a witness key
    bad = W["vkey"].replace(W["key_id_hex"], "00000000")
    with pytest.raises(CheckpointError, match="key id"):
        CosignerVerifier.from_vkey(bad)


def test_add_checkpoint_body_round_trip() -> None:
    proof = [bytes([i]) * 32 for i in range(3)]
    note = VEC["cosigned_note"].encode()
    body = format_add_checkpoint(5, proof, note)
    assert body.startswith(b"old 5\n" + base64.b64encode(proof[0]) + b"\n")
    req = parse_add_checkpoint(body)
    assert (req.old_size, list(req.proof), req.note) == (5, proof, note)
    assert parse_add_checkpoint(format_add_checkpoint(0, [], note)).proof == ()


@pytest.mark.parametrize(
    "body",
    [
        b"old 05\n\nx",
        b"old -1\n\nx",
        b"new 5\n\nx",
        b"old 5\nnot base64!\n\nx",
        b"old 5\n" + base64.b64encode(b"short") + b"\n\nx",
        b"old 5\n" + (base64.b64encode(b"a" * 32) + b"\n") * (MAX_PROOF_LINES + 1) + b"\nx",
        b"old 5\nno empty line",
        b"old 5\xff\n\nx",
    ],
)
def test_bad_request_bodies_are_400(body: bytes) -> None:
    with pytest.raises(InvalidDataError) as err:
        parse_add_checkpoint(body)
    assert err.value.http_status == 400


def test_size_body() -> None:
    assert parse_size_body(b"42\n") == 42
    for bad in (b"42", b"042\n", b"x\n"):
        with pytest.raises(CheckpointError):
            parse_size_body(bad)
