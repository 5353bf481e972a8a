"""Reference arithmetic on edwards25519, in pure Python, for *explaining* verdicts only.

Nothing here decides whether a key or a signature is accepted: libsodium does
(:mod:`schemas.keys`).  This module turns a refused public key into a message that says
what was found (a non-canonical encoding, a small-order point, a point outside the
prime-order subgroup, bytes that are no point at all), and gives ``tools/gen_vectors.py``
the point operations it needs to build the Ed25519 edge-case vectors.  It is slow
(milliseconds per scalar multiplication) and not constant-time: never use it on secrets.

Points are in extended coordinates ``(X, Y, Z, T)`` with ``x = X/Z``, ``y = Y/Z`` and
``x*y = T/Z`` (RFC 8032 section 5.1.4).
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "BASE",
    "IDENTITY",
    "L",
    "P",
    "Point",
    "add",
    "decode",
    "describe_public_key",
    "encode",
    "equal",
    "mul",
    "neg",
    "order_of_small",
]

P: Final = 2**255 - 19
"""The field prime."""
L: Final = 2**252 + 27742317777372353535851937790883648493
"""The order of the prime-order subgroup (and of the base point)."""
_D: Final = -121665 * pow(121666, P - 2, P) % P
_SQRT_M1: Final = pow(2, (P - 1) // 4, P)

Point = tuple[int, int, int, int]

IDENTITY: Final[Point] = (0, 1, 1, 0)


def add(p: Point, q: Point) -> Point:
    """``p + q`` (RFC 8032 section 5.1.4, the complete addition formula)."""
    x1, y1, z1, t1 = p
    x2, y2, z2, t2 = q
    a = (y1 - x1) * (y2 - x2) % P
    b = (y1 + x1) * (y2 + x2) % P
    c = 2 * t1 * t2 * _D % P
    d = 2 * z1 * z2 % P
    e, f, g, h = b - a, d - c, d + c, b + a
    return (e * f % P, g * h % P, f * g % P, e * h % P)


def neg(p: Point) -> Point:
    x, y, z, t = p
    return (-x % P, y, z, -t % P)


def mul(k: int, p: Point) -> Point:
    """``k * p`` by double-and-add (``k`` may be any non-negative integer)."""
    out = IDENTITY
    while k > 0:
        if k & 1:
            out = add(out, p)
        p = add(p, p)
        k >>= 1
    return out


def equal(p: Point, q: Point) -> bool:
    x1, y1, z1, _ = p
    x2, y2, z2, _ = q
    return (x1 * z2 - x2 * z1) % P == 0 and (y1 * z2 - y2 * z1) % P == 0


def _recover_x(y: int, sign: int) -> int | None:
    """The x with parity ``sign`` on the curve at ``y`` (``y`` < p), or None when none is."""
    x2 = (y * y - 1) * pow(_D * y * y + 1, P - 2, P) % P
    if x2 == 0:
        return 0
    x = pow(x2, (P + 3) // 8, P)
    if (x * x - x2) % P != 0:
        x = x * _SQRT_M1 % P
    if (x * x - x2) % P != 0:
        return None
    if x & 1 != sign:
        x = P - x
    return x


def decode(data: bytes) -> Point | None:
    """Decode 32 bytes leniently: ``y`` is taken mod p and ``x = 0`` may carry either sign.

    Returns None only when no curve point has that ``y``.  Strictness (canonical
    encodings) is checked separately by :func:`describe_public_key`.
    """
    if len(data) != 32:
        return None
    n = int.from_bytes(data, "little")
    y, sign = (n & ((1 << 255) - 1)) % P, n >> 255
    x = _recover_x(y, sign)
    if x is None:
        return None
    return (x, y, 1, x * y % P)


def encode(p: Point) -> bytes:
    """The canonical 32-byte encoding of ``p``."""
    x, y, z, _ = p
    zi = pow(z, P - 2, P)
    x, y = x * zi % P, y * zi % P
    return (y | ((x & 1) << 255)).to_bytes(32, "little")


def _base() -> Point:
    y = 4 * pow(5, P - 2, P) % P
    x = _recover_x(y, 0)
    assert x is not None
    return (x, y, 1, x * y % P)


BASE: Final[Point] = _base()
"""The base point B (``y = 4/5``, ``x`` even)."""


def order_of_small(p: Point) -> int | None:
    """The order of ``p`` when it is 1, 2, 4 or 8 (a small-order point), else None."""
    q = p
    for order in (1, 2, 4, 8):
        if equal(q, IDENTITY):
            return order
        q = add(q, q)
    return None


def describe_public_key(data: bytes) -> str | None:
    """Why ``data`` is not a valid Ed25519 public key, or None when it is one.

    Valid means what libsodium's ``crypto_core_ed25519_is_valid_point`` accepts: a
    canonical encoding of a curve point that is not of small order and lies in the
    prime-order subgroup.  The first fault found is named.
    """
    if len(data) != 32:
        return f"{len(data)} bytes, not 32"
    n = int.from_bytes(data, "little")
    y_enc, sign = n & ((1 << 255) - 1), n >> 255
    if y_enc >= P:
        return f"a non-canonical encoding (y = p + {y_enc - P}, at or above the field prime p)"
    point = decode(data)
    if point is None:
        return "not a point on the curve (no x exists for its y)"
    if point[0] == 0 and sign:
        return "a non-canonical encoding (x = 0 with the sign bit set)"
    small = order_of_small(point)
    if small is not None:
        return f"a small-order point (order {small})"
    if not equal(mul(L, point), IDENTITY):
        return "a point outside the prime-order subgroup (it has a small-order component)"
    return None
