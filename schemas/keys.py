"""Ed25519 keys: generation, (de)serialisation and key ids. No file I/O here.

Reading and writing key files (with their 0600 permission rules) lives in
``registry.keyfile``; this module only turns keys into bytes and back.

Keys are ``cryptography`` objects.  Signature checks (:func:`verify_raw`) ask libsodium
(through PyNaCl) first when it is importable, about twice as fast as OpenSSL here, and
leave every rejection to OpenSSL, so what verifies is exactly what OpenSSL accepts (see
``docs/architecture.md``, "Ed25519 backends").
"""

from __future__ import annotations

import base64
import binascii
import stat
from collections.abc import Callable

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from schemas.cpid import b32_digest
from schemas.errors import KeyFileError

__all__ = [
    "VERIFY_BACKEND",
    "Ed25519PrivateKey",
    "Ed25519PublicKey",
    "b64url_decode",
    "b64url_encode",
    "check_private_mode",
    "generate",
    "kid",
    "kid_of",
    "private_from_pem",
    "private_from_seed",
    "private_to_pem",
    "public_from_b64url",
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


def public_from_b64url(text: str) -> Ed25519PublicKey:
    raw = b64url_decode(text)
    if len(raw) != 32:
        raise KeyFileError(f"an Ed25519 public key is 32 bytes, got {len(raw)}")
    return Ed25519PublicKey.from_public_bytes(raw)


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


def _openssl_verify(public_key: Ed25519PublicKey, signature: bytes, data: bytes) -> bool:
    """OpenSSL's verdict (through ``cryptography``): the reference for :func:`verify_raw`."""
    try:
        public_key.verify(signature, data)
    except InvalidSignature:
        return False
    return True


def _load_sodium() -> tuple[Callable[[bytes, bytes], bytes], type[Exception]] | None:
    try:
        from nacl.bindings import crypto_sign_open
        from nacl.exceptions import CryptoError
    except ImportError:  # pragma: no cover - PyNaCl is a dependency; kept optional on purpose
        return None
    return crypto_sign_open, CryptoError


_SODIUM = _load_sodium()
VERIFY_BACKEND = "libsodium+openssl" if _SODIUM is not None else "openssl"
"""Who decides signatures in :func:`verify_raw`: ``libsodium+openssl`` (libsodium
accepts, OpenSSL confirms every rejection) or ``openssl`` (PyNaCl not importable)."""


def _sodium_verify(public_key: Ed25519PublicKey, signature: bytes, data: bytes) -> bool:
    """libsodium's verdict alone.  It is stricter than OpenSSL's (it also refuses
    small-order and non-canonical points).  Raises RuntimeError without PyNaCl."""
    if _SODIUM is None:
        raise RuntimeError("PyNaCl is not importable")
    crypto_sign_open, error = _SODIUM
    if len(signature) != 64:
        return False
    try:
        crypto_sign_open(signature + data, public_key.public_bytes_raw())
    except error:
        return False
    return True


def verify_raw(public_key: Ed25519PublicKey, signature: bytes, data: bytes) -> bool:
    """True when ``signature`` is ``public_key``'s Ed25519 signature over ``data``.

    The answer is OpenSSL's.  With PyNaCl importable, libsodium is asked first: what it
    accepts, OpenSSL accepts too (libsodium makes every check OpenSSL makes, and refuses
    small-order and non-canonical points besides), so its acceptance is final and only
    its rejections are passed on to OpenSSL.  A valid signature -- every one in normal
    operation -- costs one libsodium check, about half of OpenSSL's.
    """
    if _SODIUM is not None and _sodium_verify(public_key, signature, data):
        return True
    return _openssl_verify(public_key, signature, data)
