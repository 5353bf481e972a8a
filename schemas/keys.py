"""Ed25519 keys: generation, (de)serialisation and key ids. No file I/O here.

Reading and writing key files (with their 0600 permission rules) lives in
``registry.keyfile``; this module only turns keys into bytes and back.

Keys are ``cryptography`` objects.  Whether a signature is valid is libsodium's verdict
alone (:func:`verify_raw`, through PyNaCl), and whether 32 bytes are an acceptable public
key is libsodium's too (:func:`check_public_raw`); see ``docs/verification.md`` and
``docs/architecture.md``, "Ed25519 backends".
"""

from __future__ import annotations

import base64
import binascii
import functools
import stat
from typing import Final

import nacl.bindings
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from nacl.exceptions import CryptoError

from schemas import _edwards
from schemas.cpid import b32_digest
from schemas.errors import KeyFileError

__all__ = [
    "VERIFY_BACKEND",
    "Ed25519PrivateKey",
    "Ed25519PublicKey",
    "b64url_decode",
    "b64url_encode",
    "check_private_mode",
    "check_public_raw",
    "generate",
    "kid",
    "kid_of",
    "private_from_pem",
    "private_from_seed",
    "private_to_pem",
    "public_from_b64url",
    "public_from_raw",
    "public_from_text",
    "public_raw",
    "public_to_b64url",
    "public_to_pem",
    "verify_raw",
]


def b64url_encode(data: bytes) -> str:
    """base64url without padding (how public keys are written in documents)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """Inverse of :func:`b64url_encode`; also accepts padding and the standard alphabet."""
    try:
        cleaned = text.strip().rstrip("=").replace("-", "+").replace("_", "/")
        # validate=True: a character outside the alphabet is an error, not skipped
        return base64.b64decode(cleaned + "=" * (-len(cleaned) % 4), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise KeyFileError(f"not base64url: {text[:40]!r}") from exc


def generate() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def private_from_seed(seed: bytes) -> Ed25519PrivateKey:
    """A private key from its 32-byte seed (fixed test keys, RFC 8032 vectors)."""
    if len(seed) != 32:
        raise KeyFileError(f"an Ed25519 seed is 32 bytes, got {len(seed)}")
    return Ed25519PrivateKey.from_private_bytes(seed)


def public_raw(key: Ed25519PublicKey | Ed25519PrivateKey) -> bytes:
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def public_to_b64url(key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    return b64url_encode(public_raw(key))


@functools.lru_cache(maxsize=4096)
def _valid_point(raw: bytes) -> bool:
    # a cache: certs and anchors come back again and again, and the subgroup check
    # costs about as much as a signature check
    return bool(nacl.bindings.crypto_core_ed25519_is_valid_point(raw))


def check_public_raw(raw: bytes) -> bytes:
    """``raw`` if it is an acceptable Ed25519 public key, else KeyFileError saying why.

    Acceptable is what libsodium's ``crypto_core_ed25519_is_valid_point`` accepts: 32
    bytes that canonically encode a curve point which is not of small order and lies
    in the prime-order subgroup.  Honest key generation only ever produces such keys;
    the refused ones are the small-order points (with them anyone can make signatures
    that hold for any message under a cofactorless check), their non-canonical
    encodings, and points with a small-order component (refused too, so that a key
    has exactly one meaning under every verification equation).
    """
    if len(raw) != 32:
        raise KeyFileError(f"an Ed25519 public key is 32 bytes, got {len(raw)}")
    if not _valid_point(bytes(raw)):
        found = _edwards.describe_public_key(raw) or "refused by libsodium"
        raise KeyFileError(
            f"public key {b64url_encode(raw)} is {found}; expected the canonical encoding "
            "of a point of the prime-order subgroup, as Ed25519 key generation makes"
        )
    return raw


_P: Final = 2**255 - 19
_Y8: Final = 55188659117513257062467267217118295137698188065244968500265048394206261417927
_SMALL_ORDER_Y: Final = frozenset({0, 1, _P - 1, _Y8, _P - _Y8})
"""The y coordinates of the eight points of small order (orders 1, 2, 4 and 8)."""


def check_public_raw_fast(raw: bytes) -> bytes:
    """``raw`` unless it is a non-canonical encoding (``y >= p``) or a small-order point in
    any encoding; else KeyFileError saying why.  A byte-level check (no point arithmetic,
    about a microsecond), for keys that passed :func:`check_public_raw` where they were
    registered (a ``record.v1``'s node key, docs/verification.md §2).  It does not check
    that the point is on the curve or in the prime-order subgroup.
    """
    if len(raw) != 32:
        raise KeyFileError(f"an Ed25519 public key is 32 bytes, got {len(raw)}")
    y = int.from_bytes(raw, "little") & ((1 << 255) - 1)
    if y >= _P or y in _SMALL_ORDER_Y:
        found = _edwards.describe_public_key(raw) or "refused"
        raise KeyFileError(
            f"public key {b64url_encode(raw)} is {found}; expected the canonical encoding "
            "of a point that is not of small order"
        )
    return raw


def public_from_raw(raw: bytes) -> Ed25519PublicKey:
    """A public key object from 32 raw bytes, checked by :func:`check_public_raw`."""
    return Ed25519PublicKey.from_public_bytes(check_public_raw(raw))


def public_from_b64url(text: str) -> Ed25519PublicKey:
    return public_from_raw(b64url_decode(text))


def kid(raw_public_key: bytes) -> str:
    """Key id: first 16 Crockford base32 characters of sha256(raw public key)."""
    return b32_digest(raw_public_key, 16)


def kid_of(key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    return kid(public_raw(key))


def private_to_pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def public_to_pem(key: Ed25519PublicKey | Ed25519PrivateKey) -> bytes:
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return pub.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def private_from_pem(data: bytes, *, source: str = "key") -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise KeyFileError(f"{source}: not an unencrypted PEM private key ({exc})") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{source}: expected an Ed25519 key, got {type(key).__name__}")
    return key


def public_from_text(data: bytes, *, source: str = "key") -> Ed25519PublicKey:
    """A public key from a PEM public key, a PEM private key, or base64url of 32 raw bytes."""
    text = data.strip()
    if text.startswith(b"-----BEGIN PUBLIC KEY-----"):
        try:
            pub = serialization.load_pem_public_key(text)
        except (ValueError, UnsupportedAlgorithm) as exc:
            raise KeyFileError(f"{source}: malformed PEM public key ({exc})") from exc
        if not isinstance(pub, Ed25519PublicKey):
            raise KeyFileError(f"{source}: expected an Ed25519 key, got {type(pub).__name__}")
        try:
            check_public_raw(pub.public_bytes_raw())
        except KeyFileError as exc:
            raise KeyFileError(f"{source}: {exc}") from exc
        return pub
    if text.startswith(b"-----BEGIN"):
        return private_from_pem(text, source=source).public_key()
    try:
        return public_from_b64url(text.decode("ascii"))
    except (UnicodeDecodeError, KeyFileError) as exc:
        raise KeyFileError(
            f"{source}: expected a PEM key or base64url of 32 raw bytes ({exc})"
        ) from exc


def check_private_mode(mode: int, *, source: str) -> None:
    """Refuse a private key file that the group or others can read or write."""
    loose = stat.S_IMODE(mode) & 0o077
    if loose:
        raise KeyFileError(
            f"{source}: private key is accessible by group/others (mode {stat.S_IMODE(mode):04o}, "
            f"expected 0600); fix with: chmod 600 {source}"
        )


def _self_test() -> None:
    """Refuse to run on a libsodium that does not give the rule's verdicts (docs/verification.md
    asks for 1.0.18 or later): the identity key with ``R`` = identity and
    ``S`` = 0 must be refused, an honest signature accepted."""
    if not nacl.bindings.has_crypto_core_ed25519:
        raise ImportError("PyNaCl is built without crypto_core_ed25519 (a minimal libsodium)")
    identity = bytes([1]) + bytes(31)
    seed = bytes(range(32))
    pk, sk = nacl.bindings.crypto_sign_seed_keypair(seed)
    signed = nacl.bindings.crypto_sign(b"self-test", sk)
    if _sodium_verify(identity, identity + bytes(32), b"x") or not _sodium_verify(
        pk, signed[:64], b"self-test"
    ):
        raise ImportError("the libsodium under PyNaCl does not verify Ed25519 as 1.0.18+ does")
    if nacl.bindings.crypto_core_ed25519_is_valid_point(identity):
        raise ImportError("the libsodium under PyNaCl accepts the identity point as a key")


def _sodium_verify(public_raw: bytes, signature: bytes, data: bytes) -> bool:
    if len(signature) != 64 or len(public_raw) != 32:
        return False
    try:
        # crypto_sign_open(sig || m) is crypto_sign_verify_detached(sig, m) plus a copy:
        # the same checks, the same verdict
        nacl.bindings.crypto_sign_open(signature + data, public_raw)
    except CryptoError:
        return False
    return True


VERIFY_BACKEND = "libsodium"
"""Who decides signatures in :func:`verify_raw`: libsodium (through PyNaCl), alone."""


def verify_raw(public_key: Ed25519PublicKey | bytes, signature: bytes, data: bytes) -> bool:
    """True when ``signature`` is ``public_key``'s Ed25519 signature over ``data``.

    The one verdict of the protocol (docs/verification.md): exactly what libsodium's
    ``crypto_sign_verify_detached`` (1.0.18 or later) accepts -- ``S`` below the group
    order ``L``; ``A`` and ``R`` canonically encoded and neither of small order; and the
    cofactorless equation ``[S]B = R + [k]A`` holding, checked as the encoding of
    ``[S]B - [k]A`` equal to ``R`` byte for byte.  No other library is asked.
    ``public_key`` is a key object or its 32 raw bytes (not checked beyond what the
    verification itself checks: see :func:`check_public_raw` for parsing keys).
    """
    raw = public_key if isinstance(public_key, bytes) else public_key.public_bytes_raw()
    return _sodium_verify(raw, signature, data)


_self_test()
