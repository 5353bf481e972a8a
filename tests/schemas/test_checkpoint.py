"""C2SP signed notes and checkpoints: the public sumdb/note example, then our own cases."""

from __future__ import annotations

import base64
import hashlib

import pytest

from schemas.checkpoint import (
    TIMESTAMP_EXTENSION,
    Checkpoint,
    Note,
    NoteVerifier,
    key_id,
    open_checkpoint,
    open_note,
    sign_checkpoint,
    sign_note,
)
from schemas.errors import CheckpointError, KeyFileError, SignatureError
from schemas.keys import Ed25519PrivateKey, Ed25519PublicKey, private_from_seed, public_raw
from schemas.merkle import EMPTY_ROOT

# The example of golang.org/x/mod/sumdb/note (its package documentation and tests):
# a signer key, its verifier key, a text and the exact note Go's note.Sign produces.
GO_SKEY = "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz"
GO_VKEY = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
GO_TEXT = (
    "If you think cryptography is the answer to your problem,\n"
    "then you don't know what your problem is.\n"
)
GO_NOTE = (
    GO_TEXT + "\n— PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKv"
    "qfqdngotpRZb6KE6RyyBwJnAM=\n"
).encode()


def _go_key() -> Ed25519PrivateKey:
    raw = base64.b64decode(GO_SKEY.split("+", 4)[-1])
    assert raw[0] == 0x01
    return private_from_seed(raw[1:])


LOG_KEY = private_from_seed(bytes(range(32)))
OTHER_KEY = private_from_seed(bytes(range(1, 33)))
ORIGIN = "cpi.national/log"
LOG = NoteVerifier.from_public_key(ORIGIN, LOG_KEY)
ROOT = hashlib.sha256(b"root").digest()


# -- the public example ---------------------------------------------------------------------------


def test_go_example_verifies() -> None:
    v = NoteVerifier.from_vkey(GO_VKEY)
    assert v.key_id == 0xC74F20A3
    note, good = open_note(GO_NOTE, [v])
    assert note.text == GO_TEXT
    assert good == [v]


def test_go_example_is_reproduced_byte_for_byte() -> None:
    key = _go_key()
    assert NoteVerifier.from_public_key("PeterNeumann", key).to_vkey() == GO_VKEY
    assert sign_note(GO_TEXT, [("PeterNeumann", key)]) == GO_NOTE


def test_key_id_is_the_truncated_hash_of_name_newline_type_key() -> None:
    raw = public_raw(_go_key())
    want = hashlib.sha256(b"PeterNeumann\n\x01" + raw).digest()[:4]
    assert key_id("PeterNeumann", raw).to_bytes(4, "big") == want


def test_go_example_tampered_text_is_rejected() -> None:
    bad = GO_NOTE.replace(b"problem is", b"problem was")
    with pytest.raises(SignatureError, match="does not verify"):
        open_note(bad, [NoteVerifier.from_vkey(GO_VKEY)])


# -- checkpoints ---------------------------------------------------------------------------------


def test_checkpoint_round_trip_with_timestamp() -> None:
    cp = Checkpoint.create(origin=ORIGIN, size=12, root_hash=ROOT, timestamp=1_700_000_000)
    note = sign_checkpoint(cp, LOG_KEY)
    text = note.decode()
    body, _, sigline = text.partition("\n\n")
    assert body.split("\n") == [
        ORIGIN,
        "12",
        base64.b64encode(ROOT).decode(),
        f"{TIMESTAMP_EXTENSION} 1700000000",
    ]
    assert sigline.startswith(f"— {ORIGIN} ") and sigline.endswith("\n")
    blob = base64.b64decode(sigline.split(" ")[-1])
    assert int.from_bytes(blob[:4], "big") == LOG.key_id and len(blob) == 68
    got = open_checkpoint(note, LOG, origin=ORIGIN)
    assert got == cp and got.timestamp == 1_700_000_000


def test_empty_tree_checkpoint() -> None:
    cp = Checkpoint.create(origin=ORIGIN, size=0, root_hash=EMPTY_ROOT)
    assert open_checkpoint(sign_checkpoint(cp, LOG_KEY), LOG).size == 0
    assert cp.timestamp is None


def test_vkey_round_trip() -> None:
    assert NoteVerifier.from_vkey(LOG.to_vkey()) == LOG


@pytest.mark.parametrize(
    ("vkey", "match"),
    [
        ("PeterNeumann+c74f20a3", "must be <name>"),
        ("PeterNeumann+c74f20a4+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW", "give c74f20a3"),
        ("PeterNeumann+C74F20A3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW", "lower-case hex"),
        ("PeterNeumann+c74f20a3+AhpcPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW", "0x01 followed by"),
        ("PeterNeumann+c74f20a3+!!!", "not standard base64"),
        ("Peter Neumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW", "spaces"),
    ],
)
def test_bad_vkeys(vkey: str, match: str) -> None:
    with pytest.raises(CheckpointError, match=match):
        NoteVerifier.from_vkey(vkey)


@pytest.mark.parametrize(
    ("raw", "found"),
    [
        (bytes([1]) + bytes(31), "a small-order point (order 1)"),
        ((2**255 - 18).to_bytes(32, "little"), "a non-canonical encoding (y = p + 1"),
    ],
)
def test_vkey_with_small_order_or_non_canonical_key(raw: bytes, found: str) -> None:
    """A log key that is the identity point (or another small-order or non-canonical
    encoding) is refused as a verifier key, named as what it is."""
    name = "evil.log"
    blob = base64.b64encode(bytes([1]) + raw).decode()
    vkey = f"{name}+{key_id(name, raw):08x}+{blob}"
    with pytest.raises(CheckpointError) as info:
        NoteVerifier.from_vkey(vkey)
    assert found in str(info.value)
    with pytest.raises(KeyFileError, match=r"small-order|non-canonical"):
        NoteVerifier.from_public_key(name, Ed25519PublicKey.from_public_bytes(raw))


def _note(size: int = 5) -> bytes:
    return sign_checkpoint(Checkpoint.create(origin=ORIGIN, size=size, root_hash=ROOT), LOG_KEY)


def test_wrong_key_is_not_trusted() -> None:
    note = sign_checkpoint(Checkpoint.create(origin=ORIGIN, size=1, root_hash=ROOT), OTHER_KEY)
    with pytest.raises(SignatureError, match="none of them is a trusted key"):
        open_checkpoint(note, LOG)


def test_unknown_signatures_are_ignored_but_a_bad_known_one_rejects() -> None:
    text = Checkpoint.create(origin=ORIGIN, size=3, root_hash=ROOT).to_text()
    both = sign_note(text, [("witness.example/w1", OTHER_KEY), (ORIGIN, LOG_KEY)])
    assert open_checkpoint(both, LOG).size == 3
    # same name and key id as the log, but a signature by another key: reject the note
    parsed = Note.from_bytes(both)
    forged_sig = OTHER_KEY.sign(text.encode())
    forged = Note(
        text, (parsed.signatures[1].__class__(ORIGIN, LOG.key_id, forged_sig), parsed.signatures[1])
    ).to_bytes()
    with pytest.raises(SignatureError, match=r"signature by cpi.national/log .* does not verify"):
        open_checkpoint(forged, LOG)


def test_tampered_size_or_root_fails() -> None:
    note = _note(5)
    with pytest.raises(SignatureError):
        open_checkpoint(note.replace(b"\n5\n", b"\n6\n", 1), LOG)
    root_b64 = base64.b64encode(ROOT)
    other = base64.b64encode(hashlib.sha256(b"other").digest())
    with pytest.raises(SignatureError):
        open_checkpoint(note.replace(root_b64, other), LOG)


def test_wrong_origin() -> None:
    with pytest.raises(CheckpointError, match=r"origin is .cpi\.national/log., expected .x/log."):
        open_checkpoint(_note(), LOG, origin="x/log")


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("o\n05\n" + base64.b64encode(ROOT).decode() + "\n", "without leading zeroes"),
        ("o\n-1\n" + base64.b64encode(ROOT).decode() + "\n", "without leading zeroes"),
        ("o\n5\n", "has 2 lines"),
        ("o\n5\n" + base64.b64encode(b"short").decode() + "\n", "root hash is 5 bytes"),
        ("o\n5\n" + base64.urlsafe_b64encode(b"\xff" * 32).decode() + "\n", "standard base64"),
        ("\n5\n" + base64.b64encode(ROOT).decode() + "\n", "non-empty line"),
    ],
)
def test_malformed_checkpoint_text(text: str, match: str) -> None:
    with pytest.raises(CheckpointError, match=match):
        Checkpoint.from_text(text)


@pytest.mark.parametrize(
    ("mangle", "match"),
    [
        (lambda n: n.replace(b"\n\n", b"\n"), "no blank line"),
        (lambda n: n.rstrip(b"\n"), "does not end in a newline"),
        (lambda n: n.replace("—".encode(), b"--"), "does not start with"),
        (lambda n: n.replace(b"\n5\n", b"\n5\x07\n"), "control character"),
        (lambda n: n + b"\xff", "not valid UTF-8"),
        (lambda n: n + b"x" * 70000, "at most 65536"),
    ],
)
def test_malformed_notes(mangle, match: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(CheckpointError, match=match):
        open_checkpoint(mangle(_note()), LOG)


# -- the worked example of docs/audit.md -----------------------------------------------------------


def test_worked_example_in_the_docs() -> None:
    """The numbers docs/audit.md quotes; if this fails, fix the document too."""
    from schemas.merkle import MerkleTree, verify_consistency, verify_inclusion

    key = private_from_seed(hashlib.sha256(b"cpi test vectors v1 log").digest())
    verifier = NoteVerifier.from_public_key("cpi.national/log", key)
    assert (
        verifier.to_vkey()
        == "cpi.national/log+3a3142a3+AeC5FbjbADLqMAYXuHHtWAM5pFCZ6IpCnCIO5pcWTVe/"
    )
    cpid = b"CN.31.CMCC/GPU.4K7Q9M2XH3PT-Z"
    entries = [
        b'{"seq":1,"op":"register","cpid":"'
        + cpid
        + b'","digest":"'
        + b"a" * 64
        + b'","time":1767225600}',
        b'{"seq":2,"op":"revoke","subject":"CN.31.CMCC","digest":"'
        + b"b" * 64
        + b'","time":1767225660}',
        b'{"seq":3,"op":"update","cpid":"'
        + cpid
        + b'","digest":"'
        + b"c" * 64
        + b'","time":1767225720}',
    ]
    tree = MerkleTree.from_leaves(entries)
    h = bytes.fromhex
    assert tree.leaf_hash(0) == h(
        "8c578a1a86f164088574d3a11e5f066ed70f02d085b641bfc3283d8faee66678"
    )
    assert tree.leaf_hash(1) == h(
        "c1437aec48b7931e360697aef5da99c36c07f56cb69f802d3c2b2411886567d9"
    )
    assert tree.leaf_hash(2) == h(
        "ec209f4fcfc9662194304067b4a30e0c00e6b787ec2a5208062e464748feef2a"
    )
    assert tree.root(2) == h("179f866560f9500d7f144a38a0ea32b984aaf722bf71861fd2d151b122ae3c7d")
    assert tree.root() == h("cfe2ee4cdb1b12fa59eca9ec1a588f55955ebd4b06f916c549be95ae330d4532")
    assert tree.inclusion_proof(0) == [tree.leaf_hash(1), tree.leaf_hash(2)]
    assert tree.inclusion_proof(2) == [tree.root(2)]
    assert tree.consistency_proof(2, 3) == [tree.leaf_hash(2)]
    verify_inclusion(
        leaf=tree.leaf_hash(2), index=2, tree_size=3, proof=[tree.root(2)], root=tree.root()
    )
    verify_consistency(
        first=2,
        second=3,
        first_root=tree.root(2),
        second_root=tree.root(),
        proof=[tree.leaf_hash(2)],
    )
    cp = Checkpoint.create(
        origin="cpi.national/log", size=3, root_hash=tree.root(), timestamp=1767225780
    )
    assert (
        sign_checkpoint(cp, key)
        == (
            "cpi.national/log\n3\nz+LuTNsbEvpZ7KnsGliPVZVevUsG+RbFSb6VrjMNRTI=\n"
            "cpi-timestamp 1767225780\n\n— cpi.national/log OjFCo4fnVD1BxUv2uNYG6x96ObNnLDB5YCY/A7mWY"
            "m6RqNk+PyMjFpXLi9K/bV1ZziqtLNf5xYHSPWsX6D8KX8KNSwg=\n"
        ).encode()
    )
