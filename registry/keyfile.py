"""Key files on disk: private keys are written 0600 and refused when others can read them."""

from __future__ import annotations

import os
from pathlib import Path

from schemas import keys
from schemas.errors import KeyFileError
from schemas.keys import Ed25519PrivateKey, Ed25519PublicKey

__all__ = ["load_or_create", "load_private", "load_public", "write_private", "write_public"]


def write_private(
    path: str | os.PathLike[str], key: Ed25519PrivateKey, *, overwrite: bool = False
) -> Path:
    """Write ``key`` as PKCS#8 PEM, created with mode 0600 (never briefly readable by others)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
    try:
        fd = os.open(p, flags, 0o600)
    except FileExistsError as exc:
        raise KeyFileError(f"{p}: already exists; refusing to overwrite a key") from exc
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, keys.private_to_pem(key))
    finally:
        os.close(fd)
    return p


def write_public(path: str | os.PathLike[str], key: Ed25519PrivateKey | Ed25519PublicKey) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(keys.public_to_pem(key))
    return p


def load_private(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    """Load a private key, refusing files that the group or others can access."""
    p = Path(path)
    try:
        st = p.stat()
        data = p.read_bytes()
    except FileNotFoundError as exc:
        raise KeyFileError(f"{p}: no such key file") from exc
    except OSError as exc:
        raise KeyFileError(f"{p}: cannot read key file: {exc.strerror}") from exc
    keys.check_private_mode(st.st_mode, source=str(p))
    return keys.private_from_pem(data, source=str(p))


def load_public(path: str | os.PathLike[str]) -> Ed25519PublicKey:
    """Load a public key from a PEM public key, a private key file, or base64url text."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"{p}: cannot read key file: {exc.strerror}") from exc
    if b"PRIVATE KEY" in data:
        return load_private(p).public_key()
    return keys.public_from_text(data, source=str(p))


def load_or_create(path: str | os.PathLike[str]) -> tuple[Ed25519PrivateKey, bool]:
    """Load the key at ``path`` or create it (0600) on first use; says whether it was created."""
    p = Path(path)
    if p.exists():
        return load_private(p), False
    key = keys.generate()
    write_private(p, key)
    return key, True
