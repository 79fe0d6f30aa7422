"""Rotating the broker's keys in its key folder (``broker keys rotate …``).

Every rotation writes what it retires before it replaces anything, so no crash can
leave something signed or wrapped by a key the folder no longer has. Running
processes take the new keys from the folder without a restart.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import time
from pathlib import Path

import orjson
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker.crypto.key_files import (
    SECRET_BYTES,
    checkpoint_pem,
    decode_secret,
    encode_secret,
    ensure_private_dir,
    fsync_dir,
    jwk_bytes,
    load_key_file,
    new_ec_signing_key,
    parse_checkpoint,
    parse_ec_jwk,
    replace_file,
    write_new_file,
)
from broker.crypto.keystore import (
    CHECKPOINT_FILE,
    RETIRED_DIR,
    RETIRED_SECRETS,
    SIGNING_KEY_FILES,
    KeysMissing,
    retired_secret_name,
    retired_signing_key_name,
)

__all__ = [
    "STAGED_CHECKPOINT_FILE",
    "discard_staged_checkpoint_key",
    "forget_retired_records_keks",
    "install_staged_checkpoint_key",
    "rotate_records_kek",
    "rotate_signing_key",
    "rotate_subject_hmac",
    "stage_checkpoint_key",
    "staged_checkpoint_key",
]


def rotate_signing_key(key_dir: Path, which: str) -> tuple[str, str]:
    """Replace the ``token`` or ``payload`` signing key; returns (retired kid, new kid).

    The old key's public half is written to ``retired/`` before the new private key
    replaces the file, so no crash can leave something signed by a key that is not
    published. The old private key is gone afterwards: back the folder up first if
    you must keep it. Running processes sign with the new key once they next read the
    folder (``Runtime.reload_keys``).
    """
    if which not in SIGNING_KEY_FILES:
        raise ValueError(f"only {' and '.join(SIGNING_KEY_FILES)} signing keys are rotated")
    key_dir = Path(key_dir)
    path = key_dir / SIGNING_KEY_FILES[which]
    if not path.exists():
        raise KeysMissing(key_dir, [path.name])
    old = load_key_file(path, parse_ec_jwk)
    retired_dir = key_dir / RETIRED_DIR
    ensure_private_dir(retired_dir)
    retired = retired_dir / retired_signing_key_name(which, str(old.kid))
    public = {**old.as_dict(private=False), "retired_at": int(time.time())}
    # Already there after a rotation cut short: the first retirement time stands.
    write_new_file(retired, orjson.dumps(public, option=orjson.OPT_INDENT_2) + b"\n")
    new = new_ec_signing_key()
    replace_file(path, jwk_bytes(new, private=True))
    return str(old.kid), str(new.kid)


def _rotate_secret(key_dir: Path, kind: str) -> tuple[str, str]:
    """Replace a secret key, keeping the old one whole in ``retired/``; (old id, new id).

    The old key is copied into ``retired/`` before the new one replaces the file, so
    no crash can leave something made with a key the broker no longer has.
    """
    file_name, name_of = RETIRED_SECRETS[kind]
    key_dir = Path(key_dir)
    path = key_dir / file_name
    if not path.exists():
        raise KeysMissing(key_dir, [path.name])
    old = load_key_file(path, decode_secret)
    retired_dir = key_dir / RETIRED_DIR
    ensure_private_dir(retired_dir)
    old_id = name_of(old)
    # Already there after a rotation cut short: the same bytes, so nothing to do.
    write_new_file(retired_dir / retired_secret_name(kind, old_id), encode_secret(old))
    new = secrets.token_bytes(SECRET_BYTES)
    replace_file(path, encode_secret(new))
    return old_id, name_of(new)


def rotate_records_kek(key_dir: Path) -> tuple[str, str]:
    """Replace the records key (KEK); returns (retired id, new id).

    The retired key still unwraps. Running processes wrap with the new key once they
    next read the folder; ``broker keys rewrap-records`` then rewraps the stored data
    keys, and ``--forget-retired`` deletes the old key.
    """
    return _rotate_secret(key_dir, "records-kek")


def rotate_subject_hmac(key_dir: Path) -> tuple[str, str]:
    """Replace the subject-commitment key; returns (retired id, new id).

    Entries written from then on commit to survivors under the new key. The retired
    key is kept for good: the broker finds a survivor's older entries with it.
    """
    return _rotate_secret(key_dir, "subject-hmac")


def forget_retired_records_keks(key_dir: Path) -> list[str]:
    """Delete every retired records key file; returns the ids deleted."""
    folder = Path(key_dir) / RETIRED_DIR
    gone = []
    for path in sorted(folder.glob("records-kek.*.key")) if folder.is_dir() else []:
        path.unlink()
        gone.append(path.name.split(".")[1])
    if gone:
        fsync_dir(folder)
    return gone


#: ``broker keys rotate checkpoint`` stages the new key here until its rotation commits.
STAGED_CHECKPOINT_FILE = CHECKPOINT_FILE + ".next"


def staged_checkpoint_key(key_dir: Path) -> Ed25519PrivateKey | None:
    path = Path(key_dir) / STAGED_CHECKPOINT_FILE
    return load_key_file(path, parse_checkpoint) if path.exists() else None


def stage_checkpoint_key(key_dir: Path) -> Ed25519PrivateKey:
    """A new checkpoint key, written beside the current one; nothing signs with it yet."""
    key = Ed25519PrivateKey.generate()
    replace_file(Path(key_dir) / STAGED_CHECKPOINT_FILE, checkpoint_pem(key))
    return key


def install_staged_checkpoint_key(key_dir: Path) -> None:
    """Move the staged key over the current one (atomic); the old private key is gone."""
    key_dir = Path(key_dir)
    os.replace(key_dir / STAGED_CHECKPOINT_FILE, key_dir / CHECKPOINT_FILE)
    fsync_dir(key_dir)


def discard_staged_checkpoint_key(key_dir: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        (Path(key_dir) / STAGED_CHECKPOINT_FILE).unlink()
    fsync_dir(Path(key_dir))
