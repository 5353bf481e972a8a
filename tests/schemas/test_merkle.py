"""Merkle trees: the public RFC 6962 vectors, then properties against a reference tree."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas import merkle
from schemas.errors import ProofError
from schemas.merkle import (
    EMPTY_ROOT,
    MerkleTree,
    leaf_hash,
    node_hash,
    root_of,
    verify_consistency,
    verify_inclusion,
)

VECTORS_PATH = Path(__file__).resolve().parents[1] / "vectors" / "rfc6962.json"
"""RFC 6962 vectors, copied into tests/vectors/ (see the README there)."""

V: dict[str, Any] = json.loads(VECTORS_PATH.read_text(encoding="utf-8"))
LEAVES = [bytes.fromhex(x) for x in V["leaves_hex"]]
TREE = MerkleTree.from_leaves(LEAVES)


def _h(values: list[str]) -> list[bytes]:
    return [bytes.fromhex(x) for x in values]


# -- reference: RFC 6962 section 2.1 written as literally as possible -------------------------


def ref_mth(leaves: list[bytes]) -> bytes:
    n = len(leaves)
    if n == 0:
        return merkle.EMPTY_ROOT
    if n == 1:
        return leaf_hash(leaves[0])
    k = 1
    while k * 2 < n:
        k *= 2
    return node_hash(ref_mth(leaves[:k]), ref_mth(leaves[k:]))


def ref_path(m: int, leaves: list[bytes]) -> list[bytes]:
    n = len(leaves)
    if n == 1:
        return []
    k = 1
    while k * 2 < n:
        k *= 2
    if m < k:
        return [*ref_path(m, leaves[:k]), ref_mth(leaves[k:])]
    return [*ref_path(m - k, leaves[k:]), ref_mth(leaves[:k])]


def ref_subproof(m: int, leaves: list[bytes], whole: bool) -> list[bytes]:
    n = len(leaves)
    if m == n:
        return [] if whole else [ref_mth(leaves)]
    k = 1
    while k * 2 < n:
        k *= 2
    if m <= k:
        return [*ref_subproof(m, leaves[:k], whole), ref_mth(leaves[k:])]
    return [*ref_subproof(m - k, leaves[k:], False), ref_mth(leaves[:k])]


def ref_proof(m: int, leaves: list[bytes]) -> list[bytes]:
    return [] if m in (0, len(leaves)) else ref_subproof(m, leaves, True)


# -- the public vectors --------------------------------------------------------------------------


def test_vectors_are_all_there() -> None:
    assert len(LEAVES) == 8
    assert len(V["roots_by_size"]) == 8
    assert V["inclusion_proofs"] and V["consistency_proofs"]


def test_empty_root() -> None:
    assert EMPTY_ROOT.hex() == V["empty_root"]
    assert MerkleTree().root() == EMPTY_ROOT
    assert root_of([]) == EMPTY_ROOT


@pytest.mark.parametrize("size", sorted(int(s) for s in V["roots_by_size"]))
def test_roots(size: int) -> None:
    want = V["roots_by_size"][str(size)]
    assert TREE.root(size).hex() == want
    assert root_of([leaf_hash(x) for x in LEAVES[:size]]).hex() == want
    assert MerkleTree.from_leaves(LEAVES[:size]).root().hex() == want


@pytest.mark.parametrize(
    "case", V["inclusion_proofs"], ids=lambda c: f"{c['leaf_index']}of{c['tree_size']}"
)
def test_inclusion_vectors(case: dict[str, Any]) -> None:
    i, n = case["leaf_index"], case["tree_size"]
    assert [h.hex() for h in TREE.inclusion_proof(i, n)] == case["proof"]
    verify_inclusion(
        leaf=leaf_hash(LEAVES[i]),
        index=i,
        tree_size=n,
        proof=_h(case["proof"]),
        root=bytes.fromhex(V["roots_by_size"][str(n)]),
    )


@pytest.mark.parametrize(
    "case", V["consistency_proofs"], ids=lambda c: f"{c['size1']}to{c['size2']}"
)
def test_consistency_vectors(case: dict[str, Any]) -> None:
    m, n = case["size1"], case["size2"]
    assert [h.hex() for h in TREE.consistency_proof(m, n)] == case["proof"]
    verify_consistency(
        first=m,
        second=n,
        first_root=bytes.fromhex(V["roots_by_size"][str(m)]),
        second_root=bytes.fromhex(V["roots_by_size"][str(n)]),
        proof=_h(case["proof"]),
    )


def test_vector_inclusion_fails_for_the_neighbour_leaf() -> None:
    case = V["inclusion_proofs"][0]
    with pytest.raises(ProofError, match="leads to root"):
        verify_inclusion(
            leaf=leaf_hash(LEAVES[1]),
            index=case["leaf_index"],
            tree_size=case["tree_size"],
            proof=_h(case["proof"]),
            root=bytes.fromhex(V["roots_by_size"]["8"]),
        )


# -- edge cases ----------------------------------------------------------------------------------


def test_shape_errors_say_what_is_wrong() -> None:
    root = TREE.root()
    with pytest.raises(ProofError, match="leaf index 8 is not below tree size 8"):
        verify_inclusion(leaf=TREE.leaf_hash(0), index=8, tree_size=8, proof=[], root=root)
    with pytest.raises(ProofError, match="fewer than the path"):
        verify_inclusion(leaf=TREE.leaf_hash(0), index=0, tree_size=8, proof=[], root=root)
    with pytest.raises(ProofError, match="more than the path"):
        verify_inclusion(
            leaf=TREE.leaf_hash(0), index=0, tree_size=1, proof=[root], root=TREE.leaf_hash(0)
        )
    with pytest.raises(ProofError, match="must be 32 bytes, got 3"):
        verify_inclusion(leaf=b"abc", index=0, tree_size=1, proof=[], root=root)
    with pytest.raises(ProofError, match="consistency proof from 3 to 8 is empty"):
        verify_consistency(first=3, second=8, first_root=TREE.root(3), second_root=root, proof=[])
    with pytest.raises(ProofError, match="two different roots for tree size 8"):
        verify_consistency(first=8, second=8, first_root=TREE.root(7), second_root=root, proof=[])
    with pytest.raises(ProofError, match="expected 0 <= first <= second"):
        verify_consistency(first=5, second=4, first_root=root, second_root=root, proof=[])
    with pytest.raises(ProofError, match="root of the empty tree"):
        verify_consistency(first=0, second=8, first_root=root, second_root=root, proof=[])
    verify_consistency(first=0, second=8, first_root=EMPTY_ROOT, second_root=root, proof=[])
    verify_consistency(first=8, second=8, first_root=root, second_root=root, proof=[])


def test_tree_rejects_sizes_outside_it() -> None:
    with pytest.raises(ValueError, match=r"tree size 9 is outside 0\.\.8"):
        TREE.root(9)
    with pytest.raises(ValueError, match="leaf index 8 is outside the tree of size 8"):
        TREE.inclusion_proof(8)
    with pytest.raises(ValueError, match="first size 9"):
        TREE.consistency_proof(9)
    with pytest.raises(ValueError, match="32 bytes"):
        MerkleTree().append_hash(b"short")


# -- properties against the reference, sizes 1..300 -----------------------------------------------

MAX = 300
POOL = [i.to_bytes(4, "big") + b"leaf" for i in range(MAX)]
BIG = MerkleTree.from_leaves(POOL)


def test_every_size_matches_the_reference_root() -> None:
    incremental = MerkleTree()
    for n in range(1, MAX + 1):
        incremental.append(POOL[n - 1])
        want = ref_mth(POOL[:n])
        assert incremental.root() == want, n
        assert BIG.root(n) == want, n
        assert root_of([leaf_hash(x) for x in POOL[:n]]) == want, n


sizes = st.integers(min_value=1, max_value=MAX)


@st.composite
def size_and_index(draw: st.DrawFn) -> tuple[int, int]:
    n = draw(sizes)
    return n, draw(st.integers(min_value=0, max_value=n - 1))


@st.composite
def two_sizes(draw: st.DrawFn) -> tuple[int, int]:
    n = draw(sizes)
    return draw(st.integers(min_value=0, max_value=n)), n


@settings(max_examples=400, deadline=None)
@given(size_and_index())
def test_inclusion_matches_reference_and_verifies(case: tuple[int, int]) -> None:
    n, i = case
    proof = BIG.inclusion_proof(i, n)
    assert proof == ref_path(i, POOL[:n])
    verify_inclusion(leaf=leaf_hash(POOL[i]), index=i, tree_size=n, proof=proof, root=BIG.root(n))


@settings(max_examples=400, deadline=None)
@given(size_and_index(), st.data())
def test_tampered_inclusion_fails(case: tuple[int, int], data: st.DataObject) -> None:
    n, i = case
    proof = BIG.inclusion_proof(i, n)
    root = BIG.root(n)
    leaf = leaf_hash(POOL[i])
    what = data.draw(st.sampled_from(["leaf", "root", "index", "size", "hash", "drop", "add"]))
    kwargs: dict[str, Any] = {
        "leaf": leaf,
        "index": i,
        "tree_size": n,
        "proof": proof,
        "root": root,
    }
    if what == "leaf":
        kwargs["leaf"] = leaf_hash(POOL[i] + b"!")
    elif what == "root":
        kwargs["root"] = BIG.root(n - 1) if n > 1 else EMPTY_ROOT
    elif what == "index":
        if n == 1:
            kwargs["index"] = 1
        else:
            kwargs["index"] = data.draw(
                st.integers(min_value=0, max_value=n - 1).filter(lambda j: j != i)
            )
    elif what == "size":
        # another size with that size's root (a root commits to its size)
        size = data.draw(st.integers(min_value=1, max_value=MAX + 5).filter(lambda s: s != n))
        kwargs["tree_size"] = size
        kwargs["root"] = BIG.root(size) if size <= MAX else leaf_hash(b"?")
    elif what == "hash":
        if not proof:
            kwargs["proof"] = [root]
        else:
            j = data.draw(st.integers(min_value=0, max_value=len(proof) - 1))
            bit = data.draw(st.integers(min_value=0, max_value=255))
            bad = bytearray(proof[j])
            bad[bit // 8] ^= 1 << (bit % 8)
            kwargs["proof"] = [*proof[:j], bytes(bad), *proof[j + 1 :]]
    elif what == "drop":
        kwargs["proof"] = proof[:-1] if proof else [root]
    else:
        kwargs["proof"] = [*proof, root]
    with pytest.raises(ProofError):
        verify_inclusion(**kwargs)


@settings(max_examples=400, deadline=None)
@given(two_sizes())
def test_consistency_matches_reference_and_verifies(case: tuple[int, int]) -> None:
    m, n = case
    proof = BIG.consistency_proof(m, n)
    assert proof == ref_proof(m, POOL[:n])
    verify_consistency(
        first=m, second=n, first_root=BIG.root(m), second_root=BIG.root(n), proof=proof
    )


@settings(max_examples=400, deadline=None)
@given(two_sizes(), st.data())
def test_tampered_consistency_fails(case: tuple[int, int], data: st.DataObject) -> None:
    m, n = case
    proof = BIG.consistency_proof(m, n)
    kwargs: dict[str, Any] = {
        "first": m,
        "second": n,
        "first_root": BIG.root(m),
        "second_root": BIG.root(n),
        "proof": proof,
    }
    if m == 0:  # every tree extends the empty one: only a wrong empty root or a proof fail
        what = data.draw(st.sampled_from(["first_root", "add"]))
    else:
        what = data.draw(
            st.sampled_from(["first_root", "second_root", "fork", "hash", "drop", "add", "sizes"])
        )
    # a history in which leaf m-1 (inside the first tree) was rewritten
    forked = MerkleTree.from_leaves([*POOL[: max(m - 1, 0)], b"forged", *POOL[m:n]])
    if what == "first_root":
        kwargs["first_root"] = leaf_hash(b"x")
    elif what == "second_root":
        kwargs["second_root"] = forked.root(n)
    elif what == "fork":
        # the log serves the rewritten history's root and a proof made from it
        kwargs["second_root"] = forked.root(n)
        kwargs["proof"] = forked.consistency_proof(m, n)
    elif what == "hash":
        if not proof:
            kwargs["proof"] = [BIG.root(n)]
        else:
            j = data.draw(st.integers(min_value=0, max_value=len(proof) - 1))
            bad = bytearray(proof[j])
            bad[0] ^= 0x80
            kwargs["proof"] = [*proof[:j], bytes(bad), *proof[j + 1 :]]
    elif what == "drop":
        kwargs["proof"] = proof[:-1] if proof else [BIG.root(n)]
    elif what == "add":
        kwargs["proof"] = [*proof, BIG.root(n)]
    elif m == n:
        kwargs["first"] = n + 1  # a larger first than second
    else:
        other = data.draw(st.integers(min_value=1, max_value=n - 1).filter(lambda x: x != m))
        kwargs["first"] = other
    with pytest.raises(ProofError):
        verify_consistency(**kwargs)
