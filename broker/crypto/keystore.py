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

Rotations are ``broker.crypto.key_rotation``; reading and writing the files, and
their encodings, ``broker.crypto.key_files``; agencies' key pairs,
``broker.crypto.agency_keys``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from joserfc.jwk import ECKey

from broker.crypto.key_files import (
    SECRET_BYTES,
    checkpoint_pem,
    decode_secret,
    ec_signing_key,
    encode_secret,
    ensure_private_dir,
    jwk_bytes,
    load_key_file,
    new_ec_signing_key,
    parse_checkpoint,
    parse_ec_jwk,
    write_new_file,
)

__all__ = [
    "BROKER_KEY_FILES",
    "BrokerKeys",
    "KeysMissing",
    "RecordsKeyRotated",
    "RetiredKey",
    "load_checkpoint_key",
    "records_kek_id",
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


_GENERATORS: dict[str, Callable[[], bytes]] = {
    TOKEN_SIGNING_FILE: lambda: jwk_bytes(new_ec_signing_key(), private=True),
    PAYLOAD_SIGNING_FILE: lambda: jwk_bytes(new_ec_signing_key(), private=True),
    CHECKPOINT_FILE: lambda: checkpoint_pem(Ed25519PrivateKey.generate()),
    SUBJECT_HMAC_FILE: lambda: encode_secret(secrets.token_bytes(SECRET_BYTES)),
    RECORDS_KEK_FILE: lambda: encode_secret(secrets.token_bytes(SECRET_BYTES)),
}


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
            on_disk = load_key_file(self.key_dir / RECORDS_KEK_FILE, decode_secret)
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
            records_kek=load_key_file(self.key_dir / RECORDS_KEK_FILE, decode_secret),
            retired_records_keks=_load_retired_secrets(self.key_dir, "records-kek"),
            subject_hmac=load_key_file(self.key_dir / SUBJECT_HMAC_FILE, decode_secret),
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
        token = load_key_file(self.key_dir / TOKEN_SIGNING_FILE, parse_ec_jwk)
        payload = load_key_file(self.key_dir / PAYLOAD_SIGNING_FILE, parse_ec_jwk)
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
            token_signing=load_key_file(key_dir / TOKEN_SIGNING_FILE, parse_ec_jwk),
            payload_signing=load_key_file(key_dir / PAYLOAD_SIGNING_FILE, parse_ec_jwk),
            checkpoint_signing=load_key_file(key_dir / CHECKPOINT_FILE, parse_checkpoint),
            subject_hmac=load_key_file(key_dir / SUBJECT_HMAC_FILE, decode_secret),
            records_kek=load_key_file(key_dir / RECORDS_KEK_FILE, decode_secret),
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
        ensure_private_dir(key_dir)
        for name in BROKER_KEY_FILES:
            path = key_dir / name
            if not path.exists():
                write_new_file(path, _GENERATORS[name]())
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


def _parse_retired(data: bytes) -> tuple[ECKey, int]:
    try:
        jwk = orjson.loads(data)
        if not isinstance(jwk, dict) or "d" in jwk:
            raise TypeError
        retired_at = jwk["retired_at"]
        if type(retired_at) is not int:
            raise TypeError
        return ec_signing_key(jwk, private=False), retired_at
    except Exception:  # joserfc/cryptography errors may echo input; hide them
        raise ValueError("expected a public EC P-256 JWK with 'retired_at'") from None


def retired_signing_key_name(which: str, kid: str) -> str:
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
        key, retired_at = load_key_file(path, _parse_retired)
        if path.name != retired_signing_key_name(which, str(key.kid)):
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


def records_kek_id(kek: bytes) -> str:
    """A records key's public name: 16 hex digits of a labelled SHA-256, never the key."""
    return hashlib.sha256(b"consent-broker/records-kek-id\x00" + kek).hexdigest()[:16]


def subject_hmac_id(key: bytes) -> str:
    """A subject-commitment key's public name, like ``records_kek_id``."""
    return hashlib.sha256(b"consent-broker/subject-hmac-id\x00" + key).hexdigest()[:16]


#: Secret keys rotated by keeping the old ones whole in ``retired/``: file, public name.
RETIRED_SECRETS: dict[str, tuple[str, Callable[[bytes], str]]] = {
    "records-kek": (RECORDS_KEK_FILE, records_kek_id),
    "subject-hmac": (SUBJECT_HMAC_FILE, subject_hmac_id),
}


def retired_secret_name(kind: str, key_id: str) -> str:
    return f"{kind}.{key_id}.key"


def _load_retired_secrets(key_dir: Path, kind: str) -> tuple[bytes, ...]:
    """Retired keys of ``kind``, by file name; a file whose key is not its name's is refused."""
    folder = key_dir / RETIRED_DIR
    if not folder.is_dir():
        return ()
    name_of = RETIRED_SECRETS[kind][1]
    found = []
    for path in sorted(folder.glob(f"{kind}.*.key")):
        key = load_key_file(path, decode_secret)
        if path.name != retired_secret_name(kind, name_of(key)):
            raise ValueError(f"key file {path} does not hold the key its name gives")
        found.append(key)
    return tuple(found)


def load_checkpoint_key(key_dir: Path) -> Ed25519PrivateKey:
    """The checkpoint key in the folder now (a running process may hold an older one)."""
    return load_key_file(Path(key_dir) / CHECKPOINT_FILE, parse_checkpoint)
