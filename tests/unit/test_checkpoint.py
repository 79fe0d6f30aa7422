"""Tests for C2SP signed-note / tlog-checkpoint handling in broker.ledger.checkpoint."""

from __future__ import annotations

import base64
import hashlib
import re

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker.ledger import checkpoint as c

# golang.org/x/mod/sumdb/note documentation example (the signed-note reference vector).
GO_SKEY = "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz"
GO_VKEY = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
GO_TEXT = (
    "If you think cryptography is the answer to your problem,\n"
    "then you don't know what your problem is.\n"
)
GO_NOTE = (
    GO_TEXT + "\n\u2014 PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZ"
    "SNXgKvqfqdngotpRZb6KE6RyyBwJnAM=\n"
)

ORIGIN = "broker.example/ledger"
KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
OTHER = Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33)))
VKEY = c.verifier_key(ORIGIN, KEY.public_key())
ROOT = hashlib.sha256(b"root").digest()
CP = c.Checkpoint(ORIGIN, 1234, ROOT)


def go_private_key() -> Ed25519PrivateKey:
    raw = base64.b64decode(GO_SKEY.split("+", 4)[4])
    assert raw[0] == 0x01
    return Ed25519PrivateKey.from_private_bytes(raw[1:])


def sign_text(text: str, name: str = ORIGIN, key: Ed25519PrivateKey = KEY) -> str:
    """Sign a body without the body validation of format_body (to build hostile notes)."""
    kid = c.key_id(name, key.public_key())
    sig = key.sign(text.encode())
    return f"{text}\n\u2014 {name} {base64.b64encode(kid + sig).decode()}\n"


# --- reference vector -----------------------------------------------------------------------


def test_go_vector_verifier_key_and_signature() -> None:
    key = go_private_key()
    assert c.verifier_key("PeterNeumann", key.public_key()) == GO_VKEY
    name, kid, _ = c.parse_verifier_key(GO_VKEY)
    assert (name, kid.hex()) == ("PeterNeumann", "c74f20a3")
    assert c.sign_note(GO_TEXT, "PeterNeumann", key) == GO_NOTE  # Ed25519 is deterministic
    assert c.open_note(GO_NOTE, GO_VKEY) == GO_TEXT


def test_verifier_key_format() -> None:
    assert re.fullmatch(r"[^+\s]+\+[0-9a-f]{8}\+[A-Za-z0-9+/]{44}", VKEY)
    name, hex_id, b64 = VKEY.split("+", 2)
    raw = base64.b64decode(b64)
    assert name == ORIGIN and raw[0] == 0x01 and len(raw) == 33
    pub = KEY.public_key().public_bytes_raw()
    assert raw[1:] == pub
    assert hex_id == hashlib.sha256(ORIGIN.encode() + b"\n\x01" + pub).digest()[:4].hex()
    assert c.parse_verifier_key(VKEY)[1] == bytes.fromhex(hex_id)


@pytest.mark.parametrize(
    "vkey",
    [
        "",
        "PeterNeumann",
        "PeterNeumann+c74f20a3",
        "PeterNeumann+c74f20a4+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",  # wrong id
        "PeterNeumann+c74f20+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",
        "PeterNeumanx+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",  # wrong name
        "PeterNeumann+c74f20a3+AhpC2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",  # wrong type
        "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10",
        "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW!",
        "Peter Neumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",
        "+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",
    ],
)
def test_parse_verifier_key_rejects(vkey: str) -> None:
    with pytest.raises(c.CheckpointError):
        c.parse_verifier_key(vkey)


def test_verifier_key_rejects_bad_names() -> None:
    for name in ["", "a b", "a+b", "tab\tname"]:
        with pytest.raises(c.CheckpointError):
            c.verifier_key(name, KEY.public_key())
        with pytest.raises(c.CheckpointError):
            c.sign_checkpoint(CP, name, KEY)


# --- roundtrip and format -----------------------------------------------------------------


def test_sign_open_roundtrip() -> None:
    note = c.sign_checkpoint(CP, ORIGIN, KEY)
    body = f"{ORIGIN}\n1234\n{base64.b64encode(ROOT).decode()}\n"
    assert c.format_body(CP) == body
    assert note.startswith(body + "\n\u2014 " + ORIGIN + " ")
    assert note.endswith("\n") and note.count("\n") == 5
    blob = base64.b64decode(note.rstrip("\n").rsplit(" ", 1)[1])
    assert len(blob) == 68 and blob[:4] == c.key_id(ORIGIN, KEY.public_key())
    assert c.open_checkpoint(note, VKEY) == CP
    assert c.open_checkpoint(note, VKEY, origin=ORIGIN) == CP


def test_zero_size_checkpoint() -> None:
    cp = c.Checkpoint(ORIGIN, 0, hashlib.sha256(b"").digest())
    assert c.open_checkpoint(c.sign_checkpoint(cp, ORIGIN, KEY), VKEY) == cp


def test_extension_lines_and_cosignatures_allowed() -> None:
    text = c.format_body(CP) + "ext line one\nanother: ext\n"
    assert c.open_checkpoint(sign_text(text), VKEY) == CP
    note = c.sign_checkpoint(CP, ORIGIN, KEY)
    witness = sign_text(c.format_body(CP), "witness.example", OTHER).split("\n\n", 1)[1]
    assert c.open_checkpoint(note + witness, VKEY) == CP
    before = c.format_body(CP) + "\n" + witness + note.split("\n\n", 1)[1]
    assert c.open_checkpoint(before, VKEY) == CP


def test_format_body_rejects_bad_checkpoints() -> None:
    for cp in [
        c.Checkpoint("", 1, ROOT),
        c.Checkpoint("a\nb", 1, ROOT),
        c.Checkpoint(ORIGIN, -1, ROOT),
        c.Checkpoint(ORIGIN, 2**63, ROOT),
        c.Checkpoint(ORIGIN, 1, ROOT[:31]),
    ]:
        with pytest.raises(c.CheckpointError):
            c.format_body(cp)


# --- rejection -----------------------------------------------------------------------------

NOTE = c.sign_checkpoint(CP, ORIGIN, KEY)


def test_wrong_key() -> None:
    other_same_name = c.verifier_key(ORIGIN, OTHER.public_key())
    with pytest.raises(c.CheckpointError, match="not signed"):
        c.open_checkpoint(NOTE, other_same_name)
    with pytest.raises(c.CheckpointError, match="not signed"):
        c.open_checkpoint(NOTE, c.verifier_key("someone.else", KEY.public_key()))
    # right name and key ID on the line, signature made by another key
    forged = sign_text(c.format_body(CP), ORIGIN, OTHER)
    kid = c.key_id(ORIGIN, KEY.public_key())
    sig = base64.b64decode(forged.rstrip("\n").rsplit(" ", 1)[1])[4:]
    forged = f"{c.format_body(CP)}\n\u2014 {ORIGIN} {base64.b64encode(kid + sig).decode()}\n"
    with pytest.raises(c.CheckpointError, match="invalid signature"):
        c.open_checkpoint(forged, VKEY)


def test_origin_mismatch() -> None:
    with pytest.raises(c.CheckpointError, match="origin"):
        c.open_checkpoint(NOTE, VKEY, origin="other.example/log")


@pytest.mark.parametrize(
    "old,new",
    [
        ("\n1234\n", "\n1235\n"),
        ("\n1234\n", "\n01234\n"),
        (ORIGIN + "\n", "broker.example/ledgeR\n"),
        (base64.b64encode(ROOT).decode()[:5], "AAAAA"),
    ],
)
def test_altered_body_fails_signature(old: str, new: str) -> None:
    tampered = NOTE.replace(old, new, 1)
    assert tampered != NOTE
    with pytest.raises(c.CheckpointError, match="invalid signature"):
        c.open_checkpoint(tampered, VKEY)


def _sig_line() -> str:
    return NOTE.split("\n\n", 1)[1]


@pytest.mark.parametrize(
    "note",
    [
        NOTE[:-1],  # no final newline
        NOTE[:-10] + "\n",  # truncated signature
        NOTE.replace("\n\n", "\n", 1),  # no blank line
        NOTE + "garbage\n",
        NOTE + "\n",
        NOTE.replace("\u2014 ", "-- "),
        NOTE.replace("\u2014 ", "\u2014"),
        NOTE.replace(f"{ORIGIN} ", f"{ORIGIN}  "),
        NOTE.replace(f"\u2014 {ORIGIN} ", f"\u2014 {ORIGIN}"),
        c.format_body(CP) + "\n\u2014 " + ORIGIN + " AAAA\n",  # < 5 bytes
        c.format_body(CP) + "\n",
        NOTE.replace("1234", "12\x0034"),
        NOTE.replace("\n", "\r\n"),
        NOTE + _sig_line() * 100,  # > 100 signatures
        "",
        "\ud800" + NOTE,
    ],
)
def test_malformed_notes(note: str) -> None:
    with pytest.raises(c.CheckpointError):
        c.open_checkpoint(note, VKEY)


def test_first_matching_signature_decides() -> None:
    body, sig = NOTE.split("\n\n", 1)
    blob = bytearray(base64.b64decode(sig.rstrip("\n").rsplit(" ", 1)[1]))
    blob[10] ^= 1
    bad = f"\u2014 {ORIGIN} {base64.b64encode(bytes(blob)).decode()}\n"
    with pytest.raises(c.CheckpointError):
        c.open_checkpoint(f"{body}\n\n{bad}{sig}", VKEY)


def test_size_limit() -> None:
    big = c.format_body(CP) + ("x" * 100 + "\n") * 170
    assert len(big) > c.MAX_NOTE_BYTES
    with pytest.raises(c.CheckpointError):
        c.open_checkpoint(sign_text(big), VKEY)
    with pytest.raises(c.CheckpointError):
        c.sign_note(big, ORIGIN, KEY)


@pytest.mark.parametrize(
    "size", ["01", "+1", "-1", " 1", "1 ", "1_000", "\u0661", "0x10", "", "9223372036854775808"]
)
def test_non_canonical_sizes(size: str) -> None:
    text = f"{ORIGIN}\n{size}\n{base64.b64encode(ROOT).decode()}\n"
    with pytest.raises(c.CheckpointError):
        c.open_checkpoint(sign_text(text), VKEY)


def test_max_size_accepted() -> None:
    text = f"{ORIGIN}\n9223372036854775807\n{base64.b64encode(ROOT).decode()}\n"
    assert c.open_checkpoint(sign_text(text), VKEY).size == 2**63 - 1


@pytest.mark.parametrize(
    "root",
    [
        base64.b64encode(ROOT[:31]).decode(),
        base64.b64encode(ROOT + b"\0").decode(),
        base64.b64encode(ROOT).decode().rstrip("="),
        base64.b64encode(ROOT).decode()[:-2] + "B=",  # non-canonical trailing bits
        base64.urlsafe_b64encode(b"\xff" * 32).decode(),
        "not base64!",
        base64.b64encode(ROOT).decode() + " ",
    ],
)
def test_bad_root_hash(root: str) -> None:
    text = f"{ORIGIN}\n5\n{root}\n"
    with pytest.raises(c.CheckpointError):
        c.open_checkpoint(sign_text(text), VKEY)


@pytest.mark.parametrize(
    "text",
    [f"{ORIGIN}\n5\n", f"\n5\n{base64.b64encode(ROOT).decode()}\n"],
)
def test_missing_lines(text: str) -> None:
    with pytest.raises(c.CheckpointError):
        c.open_checkpoint(sign_text(text), VKEY)


def test_sign_note_rejects_bad_text() -> None:
    for text in ["", "no newline", "a\n\nb\n", "ctl\x01\n"]:
        with pytest.raises(c.CheckpointError):
            c.sign_note(text, ORIGIN, KEY)


def test_error_is_value_error() -> None:
    assert issubclass(c.CheckpointError, ValueError)
