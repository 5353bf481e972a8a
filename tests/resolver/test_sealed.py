"""Envelopes held compactly (resolver.sealed): records and statuses kept compressed with
a preset dictionary per payload type, given back byte for byte."""

from __future__ import annotations

import concurrent.futures
import json
import multiprocessing
import os
import pickle
import zlib

import pytest

from resolver.sealed import DICTIONARIES, DICTIONARIES_DIGEST, Packed, Sealed, _Whole, seal
from resolver.snapshot import FORMAT
from schemas import dsse
from schemas.dsse import MAX_ENVELOPE_BYTES, Envelope, Signature
from schemas.models import Record, Status, parse_payload
from tests.resolver.kit import Node, Pki, signed

RECORD = Record.media_type()
STATUS = Status.media_type()


def _unpacked(s: Sealed) -> Sealed:
    """The same envelope in the uncompressed form."""
    return Sealed(s.payload_type, s.keyid, s.blob[:64] + s.payload)


def _non_ascii_record(pki: Pki) -> Envelope:
    node = Node()
    doc = node.record().model_dump(mode="json", exclude_none=True)
    doc["attributes"] = {"memory_gib": 512, "cpu": {"model": "鲲鹏 920", "cores": 64}}
    doc["location"] = {"region": "31", "site": "上海 S1"}
    payload = json.dumps(doc, ensure_ascii=False).encode()
    return dsse.sign(RECORD, payload, pki.key_of("CN.31.CMCC"))


def test_records_and_statuses_are_kept_compressed_and_given_back_exactly(pki: Pki) -> None:
    node = Node()
    envs = [
        signed(pki, node.record()),
        node.status(free=3),
        _non_ascii_record(pki),
        # written with spaces and another key order: still the bytes received
        dsse.sign(RECORD, json.dumps(json.loads(signed(pki, node.record()).payload)).encode(),
                  pki.key_of("CN.31.CMCC")),
    ]  # fmt: skip
    for i, env in enumerate(envs):
        s = seal(env)
        assert type(s) is Packed
        # the payloads as registries and agents write them: at least halved
        assert len(s.blob) - 64 < len(env.payload) // (2 if i < 2 else 1)
        assert s.payload == env.payload
        assert s.envelope() == env
        assert s.envelope().to_json() == env.to_json()
    rec = seal(envs[2])
    assert parse_payload(RECORD, rec.payload, Record).location.site == "上海 S1"


def test_other_payload_types_and_payloads_that_do_not_shrink_are_kept_as_they_are(
    pki: Pki,
) -> None:
    key = pki.key_of("CN.31.CMCC")
    other = dsse.sign("application/vnd.cpi.cert.v1+json", b'{"type":"cert.v1"}' * 20, key)
    assert type(seal(other)) is Sealed and seal(other).payload == other.payload
    noise = dsse.sign(RECORD, os.urandom(300), key)  # does not compress: kept raw
    s = seal(noise)
    assert type(s) is Sealed and s.blob == noise.signatures[0].sig + noise.payload
    assert s.envelope() == noise


def test_payloads_that_are_not_json_round_trip(pki: Pki) -> None:
    """Sealing happens before (or whatever) verification says: any bytes come back."""
    key = pki.key_of("CN.31.CMCC")
    for payload in (b"", b"\x00" * 500, b"not json " * 40, "状态".encode() * 50, b"\xff\xfe" * 99):
        env = dsse.sign(STATUS, payload, key)
        s = seal(env)
        assert s.envelope() == env and s.payload == payload


def test_a_huge_payload_is_not_compressed(pki: Pki) -> None:
    env = dsse.sign(RECORD, b"x" * (MAX_ENVELOPE_BYTES + 1), pki.key_of("CN.31.CMCC"))
    s = seal(env)
    assert type(s) is Sealed and s.payload == env.payload


def test_decompression_is_bounded_and_refuses_a_broken_blob() -> None:
    """Only blobs this resolver compressed are read back, but a blob that would inflate
    past the largest payload, or does not end where it should, is refused, not
    inflated."""
    sig = b"s" * 64
    c = zlib.compressobj(9, zlib.DEFLATED, -15, 8, zlib.Z_DEFAULT_STRATEGY, DICTIONARIES[RECORD])
    bomb = c.compress(b"\0" * (100 * MAX_ENVELOPE_BYTES)) + c.flush()
    assert len(bomb) < 10_000
    with pytest.raises(ValueError, match="does not end"):
        _ = Packed(RECORD, "K", sig + bomb).payload
    good = seal(Envelope(STATUS, b'{"type":"status.v1"}' * 5, (Signature("K", sig),)))
    assert type(good) is Packed
    for broken in (good.blob[:-2], good.blob + b"tail", sig + b"\xff" * 40):
        with pytest.raises(ValueError, match="compressed payload that does not"):
            _ = Packed(STATUS, "K", broken).payload
    with pytest.raises(ValueError, match="no dictionary"):
        _ = Packed("application/x", "K", good.blob).payload
    # the largest payload kept compressed comes back whole
    big = Envelope(STATUS, b"{}" + b" " * (MAX_ENVELOPE_BYTES - 2), (Signature("K", sig),))
    assert type(seal(big)) is Packed and seal(big).payload == big.payload


def test_equal_envelopes_are_equal_and_hash_alike_whichever_form(pki: Pki) -> None:
    node = Node()
    env = signed(pki, node.record())
    packed = seal(env)
    plain = _unpacked(packed)
    assert type(packed) is Packed and type(plain) is Sealed
    assert packed == plain and plain == packed and packed == seal(env)
    assert hash(packed) == hash(plain) == hash(seal(env))
    assert len({packed, plain, seal(env)}) == 1
    # the same payload compressed otherwise (another zlib build, say): still equal
    c = zlib.compressobj(1, zlib.DEFLATED, -15, 8, zlib.Z_DEFAULT_STRATEGY, DICTIONARIES[RECORD])
    other = Packed(RECORD, packed.keyid, packed.blob[:64] + c.compress(env.payload) + c.flush())
    assert other.blob != packed.blob and other == packed and hash(other) == hash(packed)
    # anything different is not equal
    renewed = seal(signed(pki, node.record(version=2)))
    forged = Packed(RECORD, packed.keyid, renewed.blob[:64] + packed.blob[64:])
    assert renewed != packed and renewed != plain
    assert forged != packed and forged != plain and plain != forged
    assert Packed(RECORD, "OTHER", packed.blob) != packed
    assert Sealed(STATUS, packed.keyid, plain.blob) != plain
    # an envelope that is not one 64-byte signature stays whole, and equals itself only
    whole = seal(Envelope(RECORD, env.payload, ()))
    assert (
        type(whole) is _Whole
        and whole != packed
        and whole == seal(Envelope(RECORD, env.payload, ()))
    )
    assert packed != env.payload  # not an envelope at all


def test_pickling_keeps_the_form_and_the_bytes(pki: Pki) -> None:
    node = Node()
    for s in (
        seal(signed(pki, node.record())),
        seal(node.status()),
        _unpacked(seal(node.status())),
    ):
        back = pickle.loads(pickle.dumps(s))
        assert type(back) is type(s) and back.blob == s.blob and back == s
        assert back.keyid == s.keyid and back.payload_type == s.payload_type


def test_worker_processes_hand_envelopes_back_compressed(pki: Pki) -> None:
    """Sealed in a worker (as the verification workers do), received in the compressed
    form with the worker's bytes: the replica's process does not compress them again."""
    node = Node()
    envs = [signed(pki, node.record()), node.status(free=2), _non_ascii_record(pki)]
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter builds its own dictionaries
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as pool:
        got = list(pool.map(seal, envs))
    for env, s in zip(envs, got, strict=True):
        assert type(s) is Packed and s.blob == seal(env).blob and s.envelope() == env


def test_the_dictionaries_come_from_the_contract_and_are_pinned() -> None:
    """Each dictionary is a run of valid payloads of its type (written as the registry
    and agent write them).  Their digest is part of the snapshot format: a change to
    them must come with a new ``resolver.snapshot.FORMAT`` (then update both here)."""
    decoder = json.JSONDecoder()
    for pt, model in ((RECORD, Record), (STATUS, Status)):
        text, at, docs = DICTIONARIES[pt].decode(), 0, 0
        while at < len(text):
            _, end = decoder.raw_decode(text, at)
            chunk = text[at:end].encode()
            assert parse_payload(pt, chunk, model).to_json() == chunk
            at, docs = end, docs + 1
        assert docs >= 3
        assert b"bench" not in DICTIONARIES[pt]
    assert (FORMAT, DICTIONARIES_DIGEST) == (6, PINNED), "dictionaries changed: bump FORMAT"


PINNED = "29c42d6930d23c15ef7cdac762479cd726186df81ecf3da1f3937473bbc3832a"
