"""Key files: read with their modes checked, written so no reader sees half a key,
and the encodings the broker's key files use (JWK, base64 secrets, PKCS#8 PEM).

Parsers raise fixed messages only, never anything derived from key material.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import os
import secrets
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import orjson
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from joserfc.jwk import ECKey, OKPKey, thumbprint

SECRET_BYTES = 32

MAX_KEY_FILE_BYTES = 16 * 1024

SIG_ALG = "ES256"

_T = TypeVar("_T")


class KeyFileInsecure(PermissionError):
    """A key file is group/world accessible (or not a regular file) and is refused."""


def read_key_file(path: Path) -> bytes:
    """Read a key file, refusing modes that let group or others read or write it.

    Symlinks are followed (secret mounts use them) but the mode check is made on the
    opened file itself, so a link cannot hide a readable target.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise KeyFileInsecure(f"cannot open key file {path} ({exc.strerror})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise KeyFileInsecure(f"key file {path} is not a regular file")
        if info.st_mode & 0o077:
            raise KeyFileInsecure(
                f"key file {path} has mode {stat.S_IMODE(info.st_mode):04o}; it must not be "
                f"accessible to group or others (run: chmod 600 {path})"
            )
        if info.st_size > MAX_KEY_FILE_BYTES:
            raise ValueError(f"key file {path} is too large to be a key")
        with os.fdopen(fd, "rb", closefd=False) as handle:
            return handle.read()
    finally:
        os.close(fd)


def _write_temp(path: Path, data: bytes, mode: int) -> Path:
    """``data`` in a new, synced file beside ``path``, for linking or renaming into place."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(tmp, flags, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    return tmp


def write_new_file(path: Path, data: bytes, mode: int = 0o600) -> bool:
    """Create ``path`` holding ``data`` with ``mode``; return False if it already exists.

    The content is written to a temporary O_EXCL file and hard-linked into place, so
    a reader never sees a half-written key and an existing file is never replaced.
    """
    tmp = _write_temp(path, data, mode)
    try:
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    fsync_dir(path.parent)
    return True


def replace_file(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Rename a new file holding ``data`` over ``path``: readers see old or new, never half."""
    tmp = _write_temp(path, data, mode)
    try:
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def ensure_private_dir(directory: Path) -> None:
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    if stat.S_IMODE(directory.stat().st_mode) != 0o700:
        os.chmod(directory, 0o700)


def ec_signing_key(jwk: dict[str, Any], *, private: bool = True) -> ECKey:
    """Import a P-256 JWK (private, or only its public half), forcing kid = thumbprint,
    use sig, alg ES256."""
    if jwk.get("kty") != "EC" or jwk.get("crv") != "P-256" or (private and "d" not in jwk):
        raise ValueError(f"expected a {'private' if private else 'public'} EC P-256 JWK")
    public = {"kty": "EC", "crv": "P-256", "x": jwk["x"], "y": jwk["y"]}
    params = {"kid": thumbprint(public), "use": "sig", "alg": SIG_ALG}
    secret = {"d": jwk["d"]} if private else {}
    return ECKey.import_key({**public, **secret, **params})


def new_ec_signing_key() -> ECKey:
    key = ECKey.generate_key("P-256")
    return ec_signing_key(dict(key.as_dict(private=True)))


def jwk_bytes(key: ECKey | OKPKey, private: bool) -> bytes:
    return orjson.dumps(dict(key.as_dict(private=private)), option=orjson.OPT_INDENT_2) + b"\n"


def encode_secret(raw: bytes) -> bytes:
    return base64.b64encode(raw) + b"\n"


def decode_secret(data: bytes) -> bytes:
    try:
        raw = base64.b64decode(data.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not base64 text") from None
    if len(raw) != SECRET_BYTES:
        raise ValueError(f"must decode to {SECRET_BYTES} bytes")
    return raw


def checkpoint_pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def load_key_file(path: Path, parse: Callable[[bytes], _T]) -> _T:
    data = read_key_file(path)
    try:
        return parse(data)
    except ValueError as exc:
        # Parsers only raise fixed messages, never anything derived from key material.
        raise ValueError(f"key file {path} is not valid: {exc}") from None


def parse_ec_jwk(data: bytes) -> ECKey:
    try:
        jwk = orjson.loads(data)
        if not isinstance(jwk, dict):
            raise TypeError
        return ec_signing_key(jwk)
    except Exception:  # joserfc/cryptography errors may echo input; hide them
        raise ValueError("expected a private EC P-256 JWK") from None


def parse_checkpoint(data: bytes) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except Exception:  # ValueError, TypeError, UnsupportedAlgorithm
        raise ValueError("expected an unencrypted PKCS#8 PEM Ed25519 private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError("expected an Ed25519 private key")
    return key
