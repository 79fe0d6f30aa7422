"""The broker's own keys, kept as individual files in a private key folder.

One file per key makes rotation and backup explicit, and strict file modes keep a
misconfigured deployment from silently running with readable keys. Key files:

========================== ===================================================
``token-signing.jwk.json``   private EC P-256 JWK (ES256): OAuth access tokens,
                             records-endpoint request JWTs
``payload-signing.jwk.json`` private EC P-256 JWK (ES256): disclosure payloads,
                             webhook notices
``checkpoint-ed25519.pem``   unencrypted PKCS#8 PEM Ed25519 key: ledger checkpoints
``subject-hmac.key``         base64 text (one line) of 32 random bytes: subject
                             commitments
``records-kek.key``          base64 text (one line) of 32 random bytes: wraps
                             per-survivor data keys
========================== ===================================================

Files are created with mode 0600 in a 0700 folder and refused when group/world
accessible. JWK ``kid`` values are always the RFC 7638 thumbprint.

The two ES256 keys can be rotated (``broker keys rotate token|payload``): the new
private key replaces the file, and the old key's *public* half is kept, with the
time it was retired, as ``retired/<token|payload>-signing.<kid>.jwk.json``. A
retired payload key stays published, so payloads an agency kept still verify. A
retired token key is trusted and published only as long as tokens it signed can
live (``RETIRED_TOKEN_TRUST_SECONDS`` from its retirement or from when this process
first saw it retired, whichever is later): after that, whoever holds the old private
key can mint neither access tokens nor records-endpoint requests. Running processes
take rotated signing keys from the folder (``with_signing_keys_from_disk``) without a
restart.

The records key rotates too (``broker keys rotate records``): the old key is kept
whole as ``retired/records-kek.<id>.key`` (``records_kek_id``: a labelled hash,
not the key) and still unwraps, never wraps, until ``broker keys rewrap-records``
has moved every data key to the new one and ``--forget-retired`` deletes it.
Running processes take the folder's records keys when they next need them
(``with_secret_keys_from_disk``), without a restart.

The checkpoint key is rotated through the database (``broker keys rotate
checkpoint``, ``broker.ledger.checkpoint_key``): the old key cosigns a hand-over to
the new one that auditors follow, and is then gone. The subject-commitment key
rotates like the records key (``broker keys rotate subject``): new entries commit
under the new key, and the retired one stays in ``retired/subject-hmac.<id>.key``
for good, because the broker finds a survivor's older entries with it.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import hashlib
import hmac
import os
import re
import secrets
import stat
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import orjson
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from joserfc.jwk import ECKey, OKPKey, thumbprint

from broker.crypto.jwks import ENC_ALG

__all__ = [
    "BROKER_KEY_FILES",
    "BrokerKeys",
    "KeyFileInsecure",
    "KeysMissing",
    "RecordsKeyRotated",
    "RetiredKey",
    "discard_staged_checkpoint_key",
    "forget_retired_records_keks",
    "generate_agency_keys",
    "generate_p256_enc_keys",
    "install_staged_checkpoint_key",
    "load_checkpoint_key",
    "records_kek_id",
    "rotate_records_kek",
    "rotate_signing_key",
    "rotate_subject_hmac",
    "stage_checkpoint_key",
    "staged_checkpoint_key",
    "subject_hmac_id",
]

TOKEN_SIGNING_FILE = "token-signing.jwk.json"  # noqa: S105 - a file name
PAYLOAD_SIGNING_FILE = "payload-signing.jwk.json"
CHECKPOINT_FILE = "checkpoint-ed25519.pem"
SUBJECT_HMAC_FILE = "subject-hmac.key"
RECORDS_KEK_FILE = "records-kek.key"
BROKER_KEY_FILES = (
    TOKEN_SIGNING_FILE,
    PAYLOAD_SIGNING_FILE,
    CHECKPOINT_FILE,
    SUBJECT_HMAC_FILE,
    RECORDS_KEK_FILE,
)
RETIRED_DIR = "retired"
#: Access tokens live at most 900 s (the settings' cap) and clocks may be 120 s apart.
RETIRED_TOKEN_TRUST_SECONDS = 900 + 120
#: What ``rotate_signing_key`` rotates: the name on the command line, and the file.
SIGNING_KEY_FILES: dict[str, str] = {"token": TOKEN_SIGNING_FILE, "payload": PAYLOAD_SIGNING_FILE}
SECRET_BYTES = 32
_MAX_KEY_FILE_BYTES = 16 * 1024
_SIG_ALG = "ES256"
_T = TypeVar("_T")


class KeysMissing(RuntimeError):
    """Some broker key files are absent; ``missing`` lists their names."""

    def __init__(self, key_dir: Path, missing: list[str], hint: str | None = None) -> None:
        self.key_dir = key_dir
        self.missing = missing
        message = f"broker key files missing in {key_dir}: {', '.join(missing)}. " + (
            hint or f"Create them with `BROKER_KEY_DIR={key_dir} broker keys init`."
        )
        super().__init__(message)


class RecordsKeyRotated(RuntimeError):
    """The records key file no longer holds the key this process loaded."""


class KeyFileInsecure(PermissionError):
    """A key file is group/world accessible (or not a regular file) and is refused."""


# --------------------------------------------------------------------------- file I/O


def _read_key_file(path: Path) -> bytes:
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
        if info.st_size > _MAX_KEY_FILE_BYTES:
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


def _write_new_file(path: Path, data: bytes, mode: int = 0o600) -> bool:
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
    _fsync_dir(path.parent)
    return True


def _replace_file(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Rename a new file holding ``data`` over ``path``: readers see old or new, never half."""
    tmp = _write_temp(path, data, mode)
    try:
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _ensure_private_dir(directory: Path) -> None:
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    if stat.S_IMODE(directory.stat().st_mode) != 0o700:
        os.chmod(directory, 0o700)


# --------------------------------------------------------------------------- key codecs


def _ec_signing_key(jwk: dict[str, Any], *, private: bool = True) -> ECKey:
    """Import a P-256 JWK (private, or only its public half), forcing kid = thumbprint,
    use sig, alg ES256."""
    if jwk.get("kty") != "EC" or jwk.get("crv") != "P-256" or (private and "d" not in jwk):
        raise ValueError(f"expected a {'private' if private else 'public'} EC P-256 JWK")
    public = {"kty": "EC", "crv": "P-256", "x": jwk["x"], "y": jwk["y"]}
    params = {"kid": thumbprint(public), "use": "sig", "alg": _SIG_ALG}
    secret = {"d": jwk["d"]} if private else {}
    return ECKey.import_key({**public, **secret, **params})


def _new_ec_signing_key() -> ECKey:
    key = ECKey.generate_key("P-256")
    return _ec_signing_key(dict(key.as_dict(private=True)))


def _jwk_bytes(key: ECKey | OKPKey, private: bool) -> bytes:
    return orjson.dumps(dict(key.as_dict(private=private)), option=orjson.OPT_INDENT_2) + b"\n"


def _encode_secret(raw: bytes) -> bytes:
    return base64.b64encode(raw) + b"\n"


def _decode_secret(data: bytes) -> bytes:
    try:
        raw = base64.b64decode(data.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not base64 text") from None
    if len(raw) != SECRET_BYTES:
        raise ValueError(f"must decode to {SECRET_BYTES} bytes")
    return raw


def _checkpoint_pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


_GENERATORS: dict[str, Callable[[], bytes]] = {
    TOKEN_SIGNING_FILE: lambda: _jwk_bytes(_new_ec_signing_key(), private=True),
    PAYLOAD_SIGNING_FILE: lambda: _jwk_bytes(_new_ec_signing_key(), private=True),
    CHECKPOINT_FILE: lambda: _checkpoint_pem(Ed25519PrivateKey.generate()),
    SUBJECT_HMAC_FILE: lambda: _encode_secret(secrets.token_bytes(SECRET_BYTES)),
    RECORDS_KEK_FILE: lambda: _encode_secret(secrets.token_bytes(SECRET_BYTES)),
}


# --------------------------------------------------------------------------- broker keys


@dataclass(frozen=True)
class RetiredKey:
    """The public half of a rotated-out signing key: it verifies, it never signs."""

    key: ECKey
    retired_at: int
    #: Epoch seconds after which it verifies nothing (None: kept for good).
    trusted_until: float | None = None

    def trusted(self, now: float) -> bool:
        return self.trusted_until is None or now < self.trusted_until


@dataclass(frozen=True, repr=False)
class BrokerKeys:
    """All broker secrets, loaded once at start-up and passed to whoever needs them."""

    token_signing: ECKey
    payload_signing: ECKey
    checkpoint_signing: Ed25519PrivateKey
    subject_hmac: bytes
    records_kek: bytes
    retired_token: tuple[RetiredKey, ...] = ()
    retired_payload: tuple[RetiredKey, ...] = ()
    #: Records keys rotated out and not yet forgotten: they only unwrap, never wrap.
    retired_records_keks: tuple[bytes, ...] = ()
    #: Subject-commitment keys rotated out: entries written under them are found with them.
    retired_subject_hmacs: tuple[bytes, ...] = ()
    #: Where the keys were loaded from (None for keys made in memory).
    key_dir: Path | None = None

    @property
    def records_keks(self) -> tuple[bytes, ...]:
        """Every records key that may unwrap a data key: the current one first."""
        return (self.records_kek, *self.retired_records_keks)

    @property
    def subject_hmacs(self) -> tuple[bytes, ...]:
        """Every key a ledger commitment to a survivor may be under: the current one first."""
        return (self.subject_hmac, *self.retired_subject_hmacs)

    def wrapping_kek(self) -> bytes:
        """The records key to wrap a new survivor's data key with, checked against the file.

        A process started before ``broker keys rotate records`` still holds the old key,
        which ``rewrap-records --forget-retired`` may delete once the stored keys are
        moved: what such a process wrapped would then open with nothing. It raises
        (``RecordsKeyRotated``) instead, and the runtime takes the folder's keys and asks
        again (``Runtime.wrapping_kek``). Enrolment is rare; reading a 45-byte file is not
        a cost there. Unwrapping needs no such check: a data key that opens with none of
        the keys held makes the runtime read the folder too.
        """
        if self.key_dir is not None:
            on_disk = _load(self.key_dir / RECORDS_KEK_FILE, _decode_secret)
            if not hmac.compare_digest(on_disk, self.records_kek):
                raise RecordsKeyRotated("the records key was rotated after this process loaded it")
        return self.records_kek

    def __repr__(self) -> str:
        # Only public identifiers: this object ends up in tracebacks and debug logs.
        return (
            f"BrokerKeys(token_signing=<ES256 kid={self.token_signing.kid}>, "
            f"payload_signing=<ES256 kid={self.payload_signing.kid}>, "
            "checkpoint_signing=<Ed25519>, subject_hmac=<secret>, records_kek=<secret>)"
        )

    __str__ = __repr__

    def public_jwks(self, now: float | None = None) -> dict[str, Any]:
        """JWKS served to agencies: the two ES256 signing keys, then retired ones still
        trusted at ``now``. Public members only; a kid appears once (a rotation cut
        short may leave the current key's public half among the retired).
        """
        at = time.time() if now is None else now
        retired = [r.key for r in (*self.retired_token, *self.retired_payload) if r.trusted(at)]
        keys: dict[str, dict[str, Any]] = {}
        for key in (self.token_signing, self.payload_signing, *retired):
            keys.setdefault(str(key.kid), dict(key.as_dict(private=False)))
        return {"keys": list(keys.values())}

    def with_secret_keys_from_disk(self) -> BrokerKeys:
        """These keys with the records and subject-commitment keys now in the folder,
        current and retired (after ``broker keys rotate records|subject`` or
        ``rewrap-records --forget-retired``); ``self`` if nothing changed.

        A running process takes them every few seconds, and at once when a data key
        opens with none of its keys or its records key file changed, instead of
        needing a restart.
        """
        if self.key_dir is None:
            return self
        fresh = dataclasses.replace(
            self,
            records_kek=_load(self.key_dir / RECORDS_KEK_FILE, _decode_secret),
            retired_records_keks=_load_retired_secrets(self.key_dir, "records-kek"),
            subject_hmac=_load(self.key_dir / SUBJECT_HMAC_FILE, _decode_secret),
            retired_subject_hmacs=_load_retired_secrets(self.key_dir, "subject-hmac"),
        )
        return self if fresh == self else fresh

    def with_signing_keys_from_disk(self) -> BrokerKeys:
        """These keys with the token and payload signing keys now in the folder, current
        and retired; ``self`` if nothing changed.

        A running process takes them after ``broker keys rotate token|payload`` (or once
        a compromised retired key's file is deleted) instead of needing a restart. A
        retired token key this process already knew keeps its trust deadline; one it
        sees retired for the first time is trusted from now, because this process (and
        others on the host not yet refreshed) signed with it until now.
        """
        if self.key_dir is None:
            return self
        token = _load(self.key_dir / TOKEN_SIGNING_FILE, _parse_ec_jwk)
        payload = _load(self.key_dir / PAYLOAD_SIGNING_FILE, _parse_ec_jwk)
        known = {str(r.key.kid): r for r in self.retired_token}
        retired_token = _load_retired(self.key_dir, "token", RETIRED_TOKEN_TRUST_SECONDS, known)
        retired_payload = _load_retired(self.key_dir, "payload", None)
        if (
            token.kid == self.token_signing.kid
            and payload.kid == self.payload_signing.kid
            and retired_token == self.retired_token
            and _kids(retired_payload) == _kids(self.retired_payload)
        ):
            return self
        return dataclasses.replace(
            self,
            token_signing=token,
            payload_signing=payload,
            retired_token=retired_token,
            retired_payload=retired_payload,
        )

    def checkpoint_public_key_pem(self) -> bytes:
        """Ed25519 checkpoint verification key (SubjectPublicKeyInfo PEM) for auditors."""
        return self.checkpoint_signing.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    @classmethod
    def load(cls, key_dir: Path) -> BrokerKeys:
        """Load all keys from ``key_dir``; raise ``KeysMissing`` if any file is absent."""
        key_dir = Path(key_dir)
        missing = [name for name in BROKER_KEY_FILES if not (key_dir / name).exists()]
        if missing:
            raise KeysMissing(key_dir, missing)
        return cls(
            token_signing=_load(key_dir / TOKEN_SIGNING_FILE, _parse_ec_jwk),
            payload_signing=_load(key_dir / PAYLOAD_SIGNING_FILE, _parse_ec_jwk),
            checkpoint_signing=_load(key_dir / CHECKPOINT_FILE, _parse_checkpoint),
            subject_hmac=_load(key_dir / SUBJECT_HMAC_FILE, _decode_secret),
            records_kek=_load(key_dir / RECORDS_KEK_FILE, _decode_secret),
            retired_token=_load_retired(key_dir, "token", RETIRED_TOKEN_TRUST_SECONDS),
            retired_payload=_load_retired(key_dir, "payload", None),
            retired_records_keks=_load_retired_secrets(key_dir, "records-kek"),
            retired_subject_hmacs=_load_retired_secrets(key_dir, "subject-hmac"),
            key_dir=key_dir,
        )

    @classmethod
    def generate(cls, key_dir: Path) -> BrokerKeys:
        """Create whichever key files are missing (never overwriting) and load the set.

        Concurrent callers are safe: each file is created atomically by exactly one of
        them, and everyone returns what is on disk.
        """
        key_dir = Path(key_dir)
        _ensure_private_dir(key_dir)
        for name in BROKER_KEY_FILES:
            path = key_dir / name
            if not path.exists():
                _write_new_file(path, _GENERATORS[name]())
        return cls.load(key_dir)

    @classmethod
    def load_or_generate(cls, key_dir: Path) -> BrokerKeys:
        """Load the keys, generating a complete set if the folder holds none of them.

        A partial set is refused rather than completed: silently replacing a lost
        ``records-kek.key`` or ``subject-hmac.key`` would make every held record
        unreadable or every subject commitment unmatchable.
        """
        key_dir = Path(key_dir)
        try:
            return cls.load(key_dir)
        except KeysMissing as exc:
            if len(exc.missing) != len(BROKER_KEY_FILES):
                raise KeysMissing(
                    key_dir,
                    exc.missing,
                    "Refusing to complete a partial key set automatically; restore the "
                    f"files from backup, or run `BROKER_KEY_DIR={key_dir} broker keys init` "
                    "to create only the missing ones.",
                ) from None
        return cls.generate(key_dir)


def _load(path: Path, parse: Callable[[bytes], _T]) -> _T:
    data = _read_key_file(path)
    try:
        return parse(data)
    except ValueError as exc:
        # Parsers only raise fixed messages, never anything derived from key material.
        raise ValueError(f"key file {path} is not valid: {exc}") from None


def _parse_ec_jwk(data: bytes) -> ECKey:
    try:
        jwk = orjson.loads(data)
        if not isinstance(jwk, dict):
            raise TypeError
        return _ec_signing_key(jwk)
    except Exception:  # joserfc/cryptography errors may echo input; hide them
        raise ValueError("expected a private EC P-256 JWK") from None


def _parse_retired(data: bytes) -> tuple[ECKey, int]:
    try:
        jwk = orjson.loads(data)
        if not isinstance(jwk, dict) or "d" in jwk:
            raise TypeError
        retired_at = jwk["retired_at"]
        if type(retired_at) is not int:
            raise TypeError
        return _ec_signing_key(jwk, private=False), retired_at
    except Exception:  # joserfc/cryptography errors may echo input; hide them
        raise ValueError("expected a public EC P-256 JWK with 'retired_at'") from None


def _retired_name(which: str, kid: str) -> str:
    return f"{which}-signing.{kid}.jwk.json"


def _load_retired(
    key_dir: Path,
    which: str,
    trust_seconds: int | None,
    known: Mapping[str, RetiredKey] | None = None,
) -> tuple[RetiredKey, ...]:
    """Retired public keys of ``which``, newest first; a file whose kid is not its name's
    is refused, so a key cannot be slipped in under another key's file name.

    With ``trust_seconds``, each is trusted that long after its retirement or after
    now (this process first seeing it retired), whichever is later: processes that had
    not taken the new key yet kept signing with it until then. A key in ``known`` (kid
    to what this process loaded before) keeps the deadline it was given then.
    """
    folder = key_dir / RETIRED_DIR
    if not folder.is_dir():
        return ()
    seen = time.time()
    found: list[RetiredKey] = []
    for path in folder.glob(f"{which}-signing.*.jwk.json"):
        key, retired_at = _load(path, _parse_retired)
        if path.name != _retired_name(which, str(key.kid)):
            raise ValueError(f"key file {path} does not hold the key its name gives")
        before = (known or {}).get(str(key.kid))
        if before is not None and before.retired_at == retired_at:
            found.append(before)
            continue
        until = None if trust_seconds is None else max(retired_at, seen) + trust_seconds
        found.append(RetiredKey(key, retired_at, until))
    return tuple(sorted(found, key=lambda r: (-r.retired_at, str(r.key.kid))))


def _kids(retired: tuple[RetiredKey, ...]) -> list[str]:
    return [str(r.key.kid) for r in retired]


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
    old = _load(path, _parse_ec_jwk)
    retired_dir = key_dir / RETIRED_DIR
    _ensure_private_dir(retired_dir)
    retired = retired_dir / _retired_name(which, str(old.kid))
    public = {**old.as_dict(private=False), "retired_at": int(time.time())}
    # Already there after a rotation cut short: the first retirement time stands.
    _write_new_file(retired, orjson.dumps(public, option=orjson.OPT_INDENT_2) + b"\n")
    new = _new_ec_signing_key()
    _replace_file(path, _jwk_bytes(new, private=True))
    return str(old.kid), str(new.kid)


def records_kek_id(kek: bytes) -> str:
    """A records key's public name: 16 hex digits of a labelled SHA-256, never the key."""
    return hashlib.sha256(b"consent-broker/records-kek-id\x00" + kek).hexdigest()[:16]


def subject_hmac_id(key: bytes) -> str:
    """A subject-commitment key's public name, like ``records_kek_id``."""
    return hashlib.sha256(b"consent-broker/subject-hmac-id\x00" + key).hexdigest()[:16]


#: Secret keys rotated by keeping the old ones whole in ``retired/``: file, public name.
_RETIRED_SECRETS: dict[str, tuple[str, Callable[[bytes], str]]] = {
    "records-kek": (RECORDS_KEK_FILE, records_kek_id),
    "subject-hmac": (SUBJECT_HMAC_FILE, subject_hmac_id),
}


def _retired_secret_name(kind: str, key_id: str) -> str:
    return f"{kind}.{key_id}.key"


def _load_retired_secrets(key_dir: Path, kind: str) -> tuple[bytes, ...]:
    """Retired keys of ``kind``, by file name; a file whose key is not its name's is refused."""
    folder = key_dir / RETIRED_DIR
    if not folder.is_dir():
        return ()
    name_of = _RETIRED_SECRETS[kind][1]
    found = []
    for path in sorted(folder.glob(f"{kind}.*.key")):
        key = _load(path, _decode_secret)
        if path.name != _retired_secret_name(kind, name_of(key)):
            raise ValueError(f"key file {path} does not hold the key its name gives")
        found.append(key)
    return tuple(found)


def _rotate_secret(key_dir: Path, kind: str) -> tuple[str, str]:
    """Replace a secret key, keeping the old one whole in ``retired/``; (old id, new id).

    The old key is copied into ``retired/`` before the new one replaces the file, so
    no crash can leave something made with a key the broker no longer has.
    """
    file_name, name_of = _RETIRED_SECRETS[kind]
    key_dir = Path(key_dir)
    path = key_dir / file_name
    if not path.exists():
        raise KeysMissing(key_dir, [path.name])
    old = _load(path, _decode_secret)
    retired_dir = key_dir / RETIRED_DIR
    _ensure_private_dir(retired_dir)
    old_id = name_of(old)
    # Already there after a rotation cut short: the same bytes, so nothing to do.
    _write_new_file(retired_dir / _retired_secret_name(kind, old_id), _encode_secret(old))
    new = secrets.token_bytes(SECRET_BYTES)
    _replace_file(path, _encode_secret(new))
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
        _fsync_dir(folder)
    return gone


#: ``broker keys rotate checkpoint`` stages the new key here until its rotation commits.
STAGED_CHECKPOINT_FILE = CHECKPOINT_FILE + ".next"


def load_checkpoint_key(key_dir: Path) -> Ed25519PrivateKey:
    """The checkpoint key in the folder now (a running process may hold an older one)."""
    return _load(Path(key_dir) / CHECKPOINT_FILE, _parse_checkpoint)


def staged_checkpoint_key(key_dir: Path) -> Ed25519PrivateKey | None:
    path = Path(key_dir) / STAGED_CHECKPOINT_FILE
    return _load(path, _parse_checkpoint) if path.exists() else None


def stage_checkpoint_key(key_dir: Path) -> Ed25519PrivateKey:
    """A new checkpoint key, written beside the current one; nothing signs with it yet."""
    key = Ed25519PrivateKey.generate()
    _replace_file(Path(key_dir) / STAGED_CHECKPOINT_FILE, _checkpoint_pem(key))
    return key


def install_staged_checkpoint_key(key_dir: Path) -> None:
    """Move the staged key over the current one (atomic); the old private key is gone."""
    key_dir = Path(key_dir)
    os.replace(key_dir / STAGED_CHECKPOINT_FILE, key_dir / CHECKPOINT_FILE)
    _fsync_dir(key_dir)


def discard_staged_checkpoint_key(key_dir: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        (Path(key_dir) / STAGED_CHECKPOINT_FILE).unlink()
    _fsync_dir(Path(key_dir))


def _parse_checkpoint(data: bytes) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except Exception:  # ValueError, TypeError, UnsupportedAlgorithm
        raise ValueError("expected an unencrypted PKCS#8 PEM Ed25519 private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError("expected an Ed25519 private key")
    return key


# --------------------------------------------------------------------------- agency keys

_AGENCY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
EncCurve = Literal["X25519", "P-256"]


def generate_agency_keys(
    out_dir: Path, name: str, enc_curve: EncCurve = "X25519"
) -> tuple[Path, Path, Path, Path]:
    """Create an agency's key pairs for ``broker keys generate --out DIR``.

    Signing: P-256 / ES256 (private_key_jwt client assertions). Encryption:
    ``enc_curve`` (X25519 default, or P-256) with ECDH-ES+A256KW. Returns
    ``(sig_private, sig_jwks, enc_private, enc_jwks)`` paths; private files are 0600,
    and no existing file is ever overwritten.
    """
    if not _AGENCY_NAME.fullmatch(name):
        raise ValueError("name must be 1-64 characters of letters, digits, '.', '_' or '-'")
    out_dir = Path(out_dir)
    paths = (
        out_dir / f"{name}.sig.private.jwk.json",
        out_dir / f"{name}.sig.jwks.json",
        out_dir / f"{name}.enc.private.jwk.json",
        out_dir / f"{name}.enc.jwks.json",
    )
    existing = [str(p) for p in paths if p.exists()]
    if existing:
        raise FileExistsError(f"refusing to overwrite existing key files: {', '.join(existing)}")

    sig_key = _new_ec_signing_key()
    enc_key: ECKey | OKPKey
    if enc_curve == "X25519":
        enc_key = OKPKey.generate_key("X25519")
    elif enc_curve == "P-256":
        enc_key = ECKey.generate_key("P-256")
    else:
        raise ValueError("enc_curve must be 'X25519' or 'P-256'")
    enc_key = _with_params(enc_key, use="enc", alg=ENC_ALG)

    out_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    contents = (
        (_jwk_bytes(sig_key, private=True), 0o600),
        (_jwks_bytes(sig_key), 0o644),
        (_jwk_bytes(enc_key, private=True), 0o600),
        (_jwks_bytes(enc_key), 0o644),
    )
    for path, (data, mode) in zip(paths, contents, strict=True):
        if not _write_new_file(path, data, mode):
            raise FileExistsError(f"refusing to overwrite existing key file: {path}")
    return paths


def generate_p256_enc_keys(out_dir: Path, name: str) -> tuple[Path, Path, Path, Path]:
    """``generate_agency_keys`` with a P-256 encryption key, for stacks without X25519."""
    return generate_agency_keys(out_dir, name, enc_curve="P-256")


def _with_params(key: ECKey | OKPKey, *, use: str, alg: str) -> ECKey | OKPKey:
    data = dict(key.as_dict(private=True))
    public: dict[str, Any] = {k: data[k] for k in ("kty", "crv", "x", "y") if k in data}
    data.update({"kid": thumbprint(public), "use": use, "alg": alg})
    if isinstance(key, ECKey):
        return ECKey.import_key(data)
    return OKPKey.import_key(data)


def _jwks_bytes(key: ECKey | OKPKey) -> bytes:
    jwks = {"keys": [dict(key.as_dict(private=False))]}
    return orjson.dumps(jwks, option=orjson.OPT_INDENT_2) + b"\n"
