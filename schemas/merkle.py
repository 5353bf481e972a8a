"""RFC 6962 / RFC 9162 Merkle trees: hashes, roots, inclusion and consistency proofs. No I/O.

Hashing (SHA-256, RFC 9162 section 2.1.1)::

    leaf hash  = SHA-256(0x00 || leaf bytes)
    node hash  = SHA-256(0x01 || left hash || right hash)
    empty root = SHA-256("")

A tree of ``n`` leaves splits at ``k``, the largest power of two smaller than ``n``:
its root is ``node(MTH(leaves[:k]), MTH(leaves[k:]))``.

Verification follows the algorithms of RFC 9162 section 2.1.3.2 (inclusion) and
section 2.1.4.2 (consistency) step by step; :func:`verify_inclusion` and
:func:`verify_consistency` raise :class:`~schemas.errors.ProofError` saying what was
found and what was expected.

:class:`MerkleTree` is the incremental, compact structure used to generate proofs.
It keeps every *full, aligned* subtree hash: level ``k`` is one ``bytearray`` holding
the hashes of the subtrees covering leaves ``[j * 2**k, (j + 1) * 2**k)`` for every
complete ``j``, 32 bytes each, concatenated.  Appending a leaf costs one leaf hash
and on average one node hash; all levels together hold under ``2 n`` hashes (64 MiB
at a million leaves, in ``log2 n`` flat buffers rather than millions of objects).
Any range hash that RFC 6962's recursion asks for (``MTH(D[a:b])`` with ``a``
aligned) is the right-to-left fold of at most ``log2 n`` stored hashes, so the root
at *any* earlier size, an inclusion proof and a consistency proof each cost
``O(log^2 n)`` stored-hash lookups and ``O(log n)`` SHA-256 calls, whatever ``n`` is.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from typing import Final

from schemas.errors import ProofError

__all__ = [
    "EMPTY_ROOT",
    "HASH_SIZE",
    "MerkleTree",
    "leaf_hash",
    "node_hash",
    "root_from_consistency_proof",
    "root_from_inclusion_proof",
    "root_of",
    "verify_consistency",
    "verify_inclusion",
]

HASH_SIZE: Final = 32
EMPTY_ROOT: Final = hashlib.sha256(b"").digest()

_LEAF_PREFIX: Final = b"\x00"
_NODE_PREFIX: Final = b"\x01"


def leaf_hash(data: bytes) -> bytes:
    """``SHA-256(0x00 || data)``: the hash of one leaf."""
    return hashlib.sha256(_LEAF_PREFIX + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """``SHA-256(0x01 || left || right)``: the hash of an interior node."""
    return hashlib.sha256(_NODE_PREFIX + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two strictly smaller than ``n`` (``n >= 2``)."""
    return 1 << ((n - 1).bit_length() - 1)


def root_of(leaf_hashes: Sequence[bytes]) -> bytes:
    """The root of a tree whose leaves have these hashes (``EMPTY_ROOT`` for none).

    Computed level by level: pair hashes left to right, carry an odd last one up.
    This yields exactly RFC 6962's MTH because the unpaired node is always the
    rightmost one.
    """
    if not leaf_hashes:
        return EMPTY_ROOT
    level = list(leaf_hashes)
    while len(level) > 1:
        nxt = [node_hash(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return level[0]


def _check_hash(value: bytes, what: str) -> None:
    if not isinstance(value, bytes | bytearray) or len(value) != HASH_SIZE:
        got = len(value) if isinstance(value, bytes | bytearray) else type(value).__name__
        raise ProofError(f"{what} must be {HASH_SIZE} bytes, got {got}")


def _check_path(path: Sequence[bytes], what: str) -> None:
    for i, p in enumerate(path):
        _check_hash(p, f"{what} element {i}")


def _lsb(x: int) -> int:
    return x & 1


def root_from_inclusion_proof(
    leaf: bytes, index: int, tree_size: int, proof: Sequence[bytes]
) -> bytes:
    """The root that ``proof`` implies for leaf hash ``leaf`` at ``index`` (RFC 9162 2.1.3.2).

    Raises :class:`ProofError` when the proof has the wrong shape for the index and size.
    """
    _check_hash(leaf, "leaf hash")
    _check_path(proof, "inclusion proof")
    if index < 0 or tree_size < 0:
        raise ProofError(f"leaf index {index} and tree size {tree_size} must not be negative")
    # 1. leaf_index must be below tree_size
    if index >= tree_size:
        raise ProofError(f"leaf index {index} is not below tree size {tree_size}")
    # 2.-3.
    fn, sn = index, tree_size - 1
    r = leaf
    # 4.
    for p in proof:
        if sn == 0:
            raise ProofError(
                f"inclusion proof for leaf {index} of {tree_size} has {len(proof)} hashes, "
                "more than the path to the root"
            )
        if _lsb(fn) or fn == sn:
            r = node_hash(p, r)
            if not _lsb(fn):
                while not _lsb(fn) and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    # 5.
    if sn != 0:
        raise ProofError(
            f"inclusion proof for leaf {index} of {tree_size} has {len(proof)} hashes, "
            "fewer than the path to the root"
        )
    return r


def verify_inclusion(
    *, leaf: bytes, index: int, tree_size: int, proof: Sequence[bytes], root: bytes
) -> None:
    """Check that leaf hash ``leaf`` is leaf ``index`` of the tree of ``tree_size`` with ``root``.

    Raises :class:`ProofError` naming the computed and the expected root on failure.
    """
    _check_hash(root, "root hash")
    got = root_from_inclusion_proof(leaf, index, tree_size, proof)
    if got != root:
        raise ProofError(
            f"inclusion proof for leaf {index} of tree size {tree_size} leads to root "
            f"{got.hex()}, expected {bytes(root).hex()}"
        )


def root_from_consistency_proof(
    first: int, second: int, first_root: bytes, proof: Sequence[bytes]
) -> tuple[bytes, bytes]:
    """The roots ``(fr, sr)`` that ``proof`` implies (RFC 9162 section 2.1.4.2, steps 1-6).

    Requires ``0 < first < second``; the caller compares ``fr`` with the first root and
    ``sr`` with the second.  Raises :class:`ProofError` when the proof has the wrong shape.
    """
    _check_hash(first_root, "first root")
    _check_path(proof, "consistency proof")
    if not 0 < first < second:
        raise ProofError(f"expected 0 < first < second, got first={first}, second={second}")
    # 1. an empty path cannot prove anything here
    if not proof:
        raise ProofError(f"consistency proof from {first} to {second} is empty")
    path = list(proof)
    # 2. a power-of-two first tree is itself a node of the second: its root starts the path
    if first & (first - 1) == 0:
        path.insert(0, bytes(first_root))
    # 3.-4.
    fn, sn = first - 1, second - 1
    while _lsb(fn):
        fn >>= 1
        sn >>= 1
    # 5.
    fr = sr = path[0]
    # 6.
    for c in path[1:]:
        if sn == 0:
            raise ProofError(
                f"consistency proof from {first} to {second} has {len(proof)} hashes, "
                "more than the two paths need"
            )
        if _lsb(fn) or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if not _lsb(fn):
                while not _lsb(fn) and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    # 7. (the root comparisons are the caller's)
    if sn != 0:
        raise ProofError(
            f"consistency proof from {first} to {second} has {len(proof)} hashes, "
            "fewer than the two paths need"
        )
    return fr, sr


def verify_consistency(
    *,
    first: int,
    second: int,
    first_root: bytes,
    second_root: bytes,
    proof: Sequence[bytes],
) -> None:
    """Check that the tree of size ``second`` with ``second_root`` extends the one of size
    ``first`` with ``first_root`` (append-only, nothing rewritten).

    Edge cases RFC 9162 leaves to the caller: ``first == second`` needs an empty proof
    and equal roots; ``first == 0`` needs an empty proof and ``first_root == EMPTY_ROOT``
    (every tree extends the empty one).  Raises :class:`ProofError`.
    """
    _check_hash(first_root, "first root")
    _check_hash(second_root, "second root")
    if first < 0 or second < first:
        raise ProofError(f"expected 0 <= first <= second, got first={first}, second={second}")
    if first == second or first == 0:
        if proof:
            raise ProofError(
                f"consistency proof from {first} to {second} must be empty, got {len(proof)} hashes"
            )
        if first == 0 and first_root != EMPTY_ROOT:
            raise ProofError(
                f"root of the empty tree is {bytes(first_root).hex()}, expected {EMPTY_ROOT.hex()}"
            )
        if first == second and first_root != second_root:
            raise ProofError(
                f"two different roots for tree size {first}: {bytes(first_root).hex()} and "
                f"{bytes(second_root).hex()}"
            )
        return
    fr, sr = root_from_consistency_proof(first, second, first_root, proof)
    if fr != first_root:
        raise ProofError(
            f"consistency proof from {first} to {second} leads to first root {fr.hex()}, "
            f"expected {bytes(first_root).hex()}"
        )
    if sr != second_root:
        raise ProofError(
            f"consistency proof from {first} to {second} leads to second root {sr.hex()}, "
            f"expected {bytes(second_root).hex()}"
        )


class MerkleTree:
    """An append-only Merkle tree that keeps every full subtree hash (see the module doc).

    >>> t = MerkleTree()
    >>> t.append(b"hello")
    0
    >>> t.root() == leaf_hash(b"hello")
    True
    """

    __slots__ = ("_levels", "_size")

    def __init__(self, leaf_hashes: Iterable[bytes] = ()) -> None:
        self._levels: list[bytearray] = [bytearray()]
        self._size = 0
        for h in leaf_hashes:
            self.append_hash(h)

    @classmethod
    def from_leaves(cls, leaves: Iterable[bytes]) -> MerkleTree:
        """A tree of these leaf values (each hashed with :func:`leaf_hash`)."""
        t = cls()
        for data in leaves:
            t.append(data)
        return t

    def __len__(self) -> int:
        return self._size

    @property
    def size(self) -> int:
        """Number of leaves."""
        return self._size

    def append(self, data: bytes) -> int:
        """Append a leaf value; returns its index."""
        return self.append_hash(leaf_hash(data))

    def append_hash(self, h: bytes) -> int:
        """Append a leaf by its hash; returns its index."""
        if len(h) != HASH_SIZE:
            raise ValueError(f"a leaf hash is {HASH_SIZE} bytes, got {len(h)}")
        index = self._size
        levels = self._levels
        levels[0] += h
        self._size += 1
        k = 0
        # a level whose count became even completed a subtree one level up
        while len(levels[k]) // HASH_SIZE % 2 == 0:
            lv = levels[k]
            parent = node_hash(bytes(lv[-2 * HASH_SIZE : -HASH_SIZE]), bytes(lv[-HASH_SIZE:]))
            if len(levels) == k + 1:
                levels.append(bytearray())
            levels[k + 1] += parent
            k += 1
        return index

    def extend(self, leaves: Iterable[bytes]) -> None:
        """Append several leaf values."""
        for data in leaves:
            self.append(data)

    def leaf_hash(self, index: int) -> bytes:
        """The hash of leaf ``index``."""
        if not 0 <= index < self._size:
            raise IndexError(f"leaf index {index} is outside the tree of size {self._size}")
        return self._stored(0, index)

    def _stored(self, level: int, j: int) -> bytes:
        lv = self._levels[level]
        return bytes(lv[j * HASH_SIZE : (j + 1) * HASH_SIZE])

    def _range(self, a: int, b: int) -> bytes:
        """``MTH(D[a:b])`` for ``a`` aligned to the largest power of two not above ``b - a``."""
        n = b - a
        if n <= 0:
            return EMPTY_ROOT
        parts: list[bytes] = []
        pos = a
        for k in range(n.bit_length() - 1, -1, -1):
            if n >> k & 1:
                parts.append(self._stored(k, pos >> k))
                pos += 1 << k
        h = parts[-1]
        for p in reversed(parts[:-1]):
            h = node_hash(p, h)
        return h

    def _check_size(self, size: int | None) -> int:
        if size is None:
            return self._size
        if not 0 <= size <= self._size:
            raise ValueError(f"tree size {size} is outside 0..{self._size}")
        return size

    def root(self, size: int | None = None) -> bytes:
        """The root hash at ``size`` leaves (default: all), O(log n)."""
        return self._range(0, self._check_size(size))

    def inclusion_proof(self, index: int, size: int | None = None) -> list[bytes]:
        """RFC 6962 ``PATH(index, D[:size])``: sibling hashes from the leaf up to the root."""
        n = self._check_size(size)
        if not 0 <= index < n:
            raise ValueError(f"leaf index {index} is outside the tree of size {n}")
        out: list[bytes] = []
        a, b = 0, n
        while b - a > 1:
            k = _split(b - a)
            if index - a < k:
                out.append(self._range(a + k, b))
                b = a + k
            else:
                out.append(self._range(a, a + k))
                a = a + k
        out.reverse()  # collected top-down; the proof lists the deepest sibling first
        return out

    def consistency_proof(self, first: int, second: int | None = None) -> list[bytes]:
        """RFC 6962 ``PROOF(first, D[:second])`` (empty when ``first`` is 0 or ``second``)."""
        n = self._check_size(second)
        if not 0 <= first <= n:
            raise ValueError(f"first size {first} is outside 0..{n}")
        if first in (0, n):
            return []
        out: list[bytes] = []
        m, a, b, whole = first, 0, n, True
        while True:
            size = b - a
            if m == size:
                if not whole:
                    out.append(self._range(a, b))
                break
            k = _split(size)
            if m <= k:
                out.append(self._range(a + k, b))
                b = a + k
            else:
                out.append(self._range(a, a + k))
                m -= k
                a = a + k
                whole = False
        out.reverse()
        return out
