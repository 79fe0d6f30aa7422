"""Signed tree heads as C2SP ``tlog-checkpoint`` bodies inside C2SP ``signed-note``s.

Using the ecosystem's wire format (rather than an ad-hoc JSON signature) means
the ledger's checkpoints can be checked by existing witnesses and tooling such as
Go's ``golang.org/x/mod/sumdb/note``.  Parsing mirrors Go's ``note.Open``: split at
the last blank line, reject any malformed signature line, let the first
signature matching our (name, key ID) decide, and ignore other signers (e.g.
witness cosignatures).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

__all__ = [
    "MAX_NOTE_BYTES",
    "Checkpoint",
    "CheckpointError",
    "format_body",
    "key_id",
    "open_checkpoint",
    "open_note",
    "parse_body",
    "parse_verifier_key",
    "sign_checkpoint",
    "sign_note",
    "signer_ids",
    "verifier_key",
]

MAX_NOTE_BYTES = 16 * 1024
MAX_SIGNATURES = 100  # Go's note.Open limit: bounds work spent on hostile notes
SIG_PREFIX = "\u2014 "  # EM DASH + space
ALG_ED25519 = 0x01
HASH_SIZE = 32
MAX_TREE_SIZE = 2**63 - 1  # tlog tooling parses sizes as int64

_CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f]")
_SIZE = re.compile(r"0|[1-9][0-9]*", re.ASCII)
_KEY_HASH = re.compile(r"[0-9a-fA-F]{8}", re.ASCII)


class CheckpointError(ValueError):
    """A note or checkpoint is malformed, unsigned by the expected key, or mismatched."""


@dataclass(frozen=True)
class Checkpoint:
    """A tree head: the log ``origin`` committed to ``root_hash`` over ``size`` leaves."""

    origin: str
    size: int
    root_hash: bytes


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _b64decode_canonical(text: str) -> bytes:
    """Strict standard base64; non-canonical spellings are refused to avoid malleability."""
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error, ValueError) as exc:
        raise CheckpointError("invalid base64") from exc
    if _b64(raw) != text:
        raise CheckpointError("non-canonical base64")
    return raw


def _valid_name(name: str) -> bool:
    """C2SP key-name rule: non-empty, no Unicode whitespace, no '+'."""
    return bool(name) and "+" not in name and not any(c.isspace() for c in name)


def _raw_public(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def key_id(key_name: str, public_key: Ed25519PublicKey) -> bytes:
    """4-byte C2SP key ID: SHA-256(name || 0x0A || 0x01 || raw key)[:4]."""
    data = key_name.encode("utf-8") + b"\n" + bytes([ALG_ED25519]) + _raw_public(public_key)
    return hashlib.sha256(data).digest()[:4]


def verifier_key(key_name: str, public_key: Ed25519PublicKey) -> str:
    """Encode the public half as a note verifier key: ``name+hexid+base64(0x01||key)``."""
    if not _valid_name(key_name):
        raise CheckpointError(f"invalid key name {key_name!r}")
    kid = key_id(key_name, public_key).hex()
    return f"{key_name}+{kid}+{_b64(bytes([ALG_ED25519]) + _raw_public(public_key))}"


def parse_verifier_key(vkey: str) -> tuple[str, bytes, Ed25519PublicKey]:
    """Parse a verifier key, checking that its advertised key ID matches the key."""
    name, sep1, rest = vkey.strip().partition("+")
    hex_id, sep2, key_b64 = rest.partition("+")  # base64 may itself contain '+'
    if not (sep1 and sep2 and _valid_name(name) and _KEY_HASH.fullmatch(hex_id)):
        raise CheckpointError("malformed verifier key")
    raw = _b64decode_canonical(key_b64)
    if len(raw) != 1 + HASH_SIZE or raw[0] != ALG_ED25519:
        raise CheckpointError("verifier key is not an Ed25519 key")
    try:
        public_key = Ed25519PublicKey.from_public_bytes(raw[1:])
    except ValueError as exc:
        raise CheckpointError("invalid Ed25519 public key") from exc
    kid = key_id(name, public_key)
    if kid != bytes.fromhex(hex_id):
        raise CheckpointError("verifier key ID does not match the key")
    return name, kid, public_key


def _check_text(text: str) -> None:
    if not text or not text.endswith("\n") or "\n\n" in text or _CONTROL.search(text):
        raise CheckpointError("note text must be non-empty newline-terminated lines")


def sign_note(text: str, key_name: str, *private_keys: Ed25519PrivateKey) -> str:
    """Sign arbitrary note text, one signature line per key in the order given.

    Each signature covers the text bytes exactly; several keys under one name
    cosign a note (a checkpoint key handing over to its successor).
    """
    _check_text(text)
    if not _valid_name(key_name):
        raise CheckpointError(f"invalid key name {key_name!r}")
    if not private_keys:
        raise CheckpointError("a note needs at least one signature")
    lines = []
    for private_key in private_keys:
        sig = private_key.sign(text.encode("utf-8"))
        kid = key_id(key_name, private_key.public_key())
        lines.append(f"{SIG_PREFIX}{key_name} {_b64(kid + sig)}\n")
    note = f"{text}\n{''.join(lines)}"
    if len(note.encode("utf-8")) > MAX_NOTE_BYTES:
        raise CheckpointError("note too large")
    return note


def open_note(note: str, vkey: str) -> str:
    """Verify ``note`` against ``vkey`` and return the signed text (body).

    Raises ``CheckpointError`` on malformed notes, when no signature line carries
    the key's name and ID, or when that signature does not verify.
    """
    name, kid, public_key = parse_verifier_key(vkey)
    if not isinstance(note, str):
        raise CheckpointError("note must be text")
    try:
        encoded = note.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise CheckpointError("note is not valid UTF-8") from exc
    if len(encoded) > MAX_NOTE_BYTES:
        raise CheckpointError("note exceeds 16 KiB")
    if _CONTROL.search(note):
        raise CheckpointError("note contains control characters")
    split = note.rfind("\n\n")
    if split < 0:
        raise CheckpointError("note has no signature block")
    text, sigs = note[: split + 1], note[split + 2 :]
    if not sigs.endswith("\n"):
        raise CheckpointError("note signature block must end with a newline")
    lines = sigs[:-1].split("\n")
    if len(lines) > MAX_SIGNATURES:
        raise CheckpointError("too many signatures")
    candidate: bytes | None = None
    for line in lines:
        if not line.startswith(SIG_PREFIX):
            raise CheckpointError("malformed signature line")
        sig_name, _, sig_b64 = line[len(SIG_PREFIX) :].partition(" ")
        if not _valid_name(sig_name) or not sig_b64:
            raise CheckpointError("malformed signature line")
        try:
            blob = base64.b64decode(sig_b64.encode("ascii"), validate=True)
        except (UnicodeEncodeError, binascii.Error, ValueError) as exc:
            raise CheckpointError("malformed signature encoding") from exc
        if len(blob) < 5:
            raise CheckpointError("signature too short")
        if candidate is None and sig_name == name and blob[:4] == kid:
            candidate = blob[4:]
    if candidate is None:
        raise CheckpointError(f"note is not signed by {name}")
    if len(candidate) != 64:
        raise CheckpointError("invalid signature")
    try:
        public_key.verify(candidate, text.encode("utf-8"))
    except InvalidSignature as exc:
        raise CheckpointError("invalid signature") from exc
    return text


def signer_ids(note: str) -> list[tuple[str, bytes]]:
    """(key name, 4-byte key ID) of each signature line, unverified: who claims to sign."""
    split = note.rfind("\n\n")
    found = []
    for line in note[split + 2 :].split("\n") if split >= 0 else []:
        name, _, sig_b64 = line.removeprefix(SIG_PREFIX).partition(" ")
        try:
            blob = base64.b64decode(sig_b64.encode("ascii"), validate=True)
        except (UnicodeEncodeError, binascii.Error, ValueError):
            continue
        if line.startswith(SIG_PREFIX) and len(blob) > 4:
            found.append((name, blob[:4]))
    return found


def format_body(cp: Checkpoint) -> str:
    """The tlog-checkpoint body: origin, decimal size, base64 root, each newline-terminated."""
    if not cp.origin or "\n" in cp.origin or _CONTROL.search(cp.origin):
        raise CheckpointError("invalid origin")
    if isinstance(cp.size, bool) or not 0 <= cp.size <= MAX_TREE_SIZE:
        raise CheckpointError("invalid tree size")
    if len(cp.root_hash) != HASH_SIZE:
        raise CheckpointError("root hash must be 32 bytes")
    return f"{cp.origin}\n{cp.size}\n{_b64(cp.root_hash)}\n"


def parse_body(text: str) -> Checkpoint:
    """Parse a checkpoint body; extension lines after the third are allowed and ignored."""
    lines = text.split("\n")
    if len(lines) < 4 or lines[-1] != "" or any(not line for line in lines[:-1]):
        raise CheckpointError("checkpoint body must have at least 3 non-empty lines")
    origin, size_text, root_text = lines[0], lines[1], lines[2]
    if not _SIZE.fullmatch(size_text):
        raise CheckpointError("tree size is not a canonical decimal")
    size = int(size_text)
    if size > MAX_TREE_SIZE:
        raise CheckpointError("tree size out of range")
    root = _b64decode_canonical(root_text)
    if len(root) != HASH_SIZE:
        raise CheckpointError("root hash must be 32 bytes")
    return Checkpoint(origin=origin, size=size, root_hash=root)


def sign_checkpoint(cp: Checkpoint, key_name: str, private_key: Ed25519PrivateKey) -> str:
    """Produce the full signed-note text for a checkpoint."""
    return sign_note(format_body(cp), key_name, private_key)


def open_checkpoint(note: str, vkey: str, origin: str | None = None) -> Checkpoint:
    """Verify a signed checkpoint and return it; ``origin`` pins which log it must be for."""
    cp = parse_body(open_note(note, vkey))
    if origin is not None and cp.origin != origin:
        raise CheckpointError(f"checkpoint origin {cp.origin!r} != expected {origin!r}")
    return cp
