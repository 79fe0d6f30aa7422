"""Broker key folder: file modes, round trips, refusals, rotation, agency key generation."""

from __future__ import annotations

import base64
import os
import stat
import time
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest
from cryptography.hazmat.primitives import serialization
from joserfc.jwk import ECKey, thumbprint

from broker.crypto.agency_keys import generate_agency_keys, generate_p256_enc_keys
from broker.crypto.datakeys import (
    RecordUnreadable,
    new_wrapped_data_key,
    rewrap_data_key,
    unwrap_data_key,
    unwrap_with_any,
)
from broker.crypto.jwks import validate_public_jwks
from broker.crypto.key_files import KeyFileInsecure
from broker.crypto.key_rotation import (
    forget_retired_records_keks,
    rotate_records_kek,
    rotate_signing_key,
    rotate_subject_hmac,
)
from broker.crypto.keystore import (
    BROKER_KEY_FILES,
    RETIRED_TOKEN_TRUST_SECONDS,
    BrokerKeys,
    KeysMissing,
    RecordsKeyRotated,
    records_kek_id,
    subject_hmac_id,
)
from broker.crypto.payload import PayloadInvalid, sign_claims, verify_signed

PRIVATE_MEMBERS = {"d", "p", "q", "dp", "dq", "qi", "oth", "k"}


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def key_dir(tmp_path: Path) -> Path:
    return tmp_path / "keys"


def test_generate_creates_private_files(key_dir: Path) -> None:
    BrokerKeys.generate(key_dir)
    assert _mode(key_dir) == 0o700
    assert sorted(p.name for p in key_dir.iterdir()) == sorted(BROKER_KEY_FILES)
    for name in BROKER_KEY_FILES:
        assert _mode(key_dir / name) == 0o600, name


def test_generate_tightens_existing_dir(key_dir: Path) -> None:
    key_dir.mkdir(mode=0o755)
    os.chmod(key_dir, 0o755)
    BrokerKeys.generate(key_dir)
    assert _mode(key_dir) == 0o700


def test_generated_file_formats(key_dir: Path) -> None:
    keys = BrokerKeys.generate(key_dir)
    for name in ("subject-hmac.key", "records-kek.key"):
        assert len(base64.b64decode((key_dir / name).read_bytes().strip(), validate=True)) == 32
    pem = (key_dir / "checkpoint-ed25519.pem").read_bytes()
    assert pem.startswith(b"-----BEGIN PRIVATE KEY-----")
    jwk = orjson.loads((key_dir / "token-signing.jwk.json").read_bytes())
    assert jwk["kty"] == "EC" and jwk["crv"] == "P-256" and "d" in jwk
    assert jwk["kid"] == keys.token_signing.kid


def test_load_roundtrip(key_dir: Path) -> None:
    generated = BrokerKeys.generate(key_dir)
    loaded = BrokerKeys.load(key_dir)
    assert loaded.token_signing.as_dict(private=True) == generated.token_signing.as_dict(
        private=True
    )
    assert loaded.payload_signing.kid == generated.payload_signing.kid
    assert loaded.subject_hmac == generated.subject_hmac
    assert loaded.records_kek == generated.records_kek
    assert len(loaded.subject_hmac) == 32 and len(loaded.records_kek) == 32
    raw = serialization.Encoding.Raw
    fmt = serialization.PublicFormat.Raw
    assert loaded.checkpoint_signing.public_key().public_bytes(
        raw, fmt
    ) == generated.checkpoint_signing.public_key().public_bytes(raw, fmt)
    assert loaded.token_signing.kid != loaded.payload_signing.kid
    assert loaded.subject_hmac != loaded.records_kek


def test_load_missing_lists_files(key_dir: Path) -> None:
    with pytest.raises(KeysMissing) as info:
        BrokerKeys.load(key_dir)
    assert info.value.missing == list(BROKER_KEY_FILES)
    message = str(info.value)
    for name in BROKER_KEY_FILES:
        assert name in message
    assert "broker keys init" in message


def test_load_lists_only_the_missing_file(key_dir: Path) -> None:
    BrokerKeys.generate(key_dir)
    (key_dir / "records-kek.key").unlink()
    with pytest.raises(KeysMissing) as info:
        BrokerKeys.load(key_dir)
    assert info.value.missing == ["records-kek.key"]


@pytest.mark.parametrize("name", BROKER_KEY_FILES)
def test_world_readable_key_file_refused(key_dir: Path, name: str) -> None:
    BrokerKeys.generate(key_dir)
    os.chmod(key_dir / name, 0o644)
    with pytest.raises(KeyFileInsecure, match=r"0644.*chmod 600"):
        BrokerKeys.load(key_dir)


@pytest.mark.parametrize("mode", [0o640, 0o620, 0o604, 0o602, 0o610])
def test_group_or_world_accessible_key_file_refused(key_dir: Path, mode: int) -> None:
    BrokerKeys.generate(key_dir)
    os.chmod(key_dir / "records-kek.key", mode)
    with pytest.raises(KeyFileInsecure, match=f"{mode:04o}"):
        BrokerKeys.load(key_dir)
    os.chmod(key_dir / "records-kek.key", 0o400)  # owner-only, even read-only, is fine
    BrokerKeys.load(key_dir)


def test_symlinked_key_file_checked_at_target(key_dir: Path, tmp_path: Path) -> None:
    keys = BrokerKeys.generate(key_dir)
    target = tmp_path / "elsewhere.key"
    (key_dir / "records-kek.key").rename(target)
    (key_dir / "records-kek.key").symlink_to(target)
    assert BrokerKeys.load(key_dir).records_kek == keys.records_kek
    os.chmod(target, 0o644)
    with pytest.raises(KeyFileInsecure, match="0644"):
        BrokerKeys.load(key_dir)


def test_corrupt_key_file_refused_without_echoing_content(key_dir: Path) -> None:
    BrokerKeys.generate(key_dir)
    secret_text = "c2VjcmV0LWJ1dC10b28tc2hvcnQ="
    path = key_dir / "subject-hmac.key"
    path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, secret_text.encode())
    os.close(fd)
    with pytest.raises(ValueError, match="subject-hmac.key") as info:
        BrokerKeys.load(key_dir)
    assert secret_text not in str(info.value)


def test_generate_does_not_overwrite(key_dir: Path) -> None:
    first = BrokerKeys.generate(key_dir)
    before = {name: (key_dir / name).read_bytes() for name in BROKER_KEY_FILES}
    second = BrokerKeys.generate(key_dir)
    assert {name: (key_dir / name).read_bytes() for name in BROKER_KEY_FILES} == before
    assert second.records_kek == first.records_kek


def test_generate_fills_only_missing(key_dir: Path) -> None:
    first = BrokerKeys.generate(key_dir)
    (key_dir / "payload-signing.jwk.json").unlink()
    second = BrokerKeys.generate(key_dir)
    assert second.token_signing.kid == first.token_signing.kid
    assert second.payload_signing.kid != first.payload_signing.kid
    assert second.records_kek == first.records_kek
    assert not [p for p in key_dir.iterdir() if p.name.endswith(".tmp")]


def test_load_or_generate_fresh_then_stable(key_dir: Path) -> None:
    first = BrokerKeys.load_or_generate(key_dir)
    second = BrokerKeys.load_or_generate(key_dir)
    assert first.subject_hmac == second.subject_hmac


def test_load_or_generate_refuses_partial_set(key_dir: Path) -> None:
    BrokerKeys.generate(key_dir)
    (key_dir / "records-kek.key").unlink()
    with pytest.raises(KeysMissing, match="partial key set"):
        BrokerKeys.load_or_generate(key_dir)
    assert not (key_dir / "records-kek.key").exists()


def test_repr_has_no_key_material(key_dir: Path) -> None:
    keys = BrokerKeys.generate(key_dir)
    text = repr(keys) + str(keys)
    secrets = [
        keys.subject_hmac.hex(),
        base64.b64encode(keys.subject_hmac).decode(),
        keys.records_kek.hex(),
        base64.b64encode(keys.records_kek).decode(),
        str(keys.token_signing.as_dict(private=True)["d"]),
        str(keys.payload_signing.as_dict(private=True)["d"]),
        repr(keys.subject_hmac),
        repr(keys.records_kek),
    ]
    for secret in secrets:
        assert secret not in text
    assert keys.token_signing.kid is not None and keys.token_signing.kid in text


def test_public_jwks_has_no_private_members(key_dir: Path) -> None:
    keys = BrokerKeys.generate(key_dir)
    jwks = keys.public_jwks()
    assert len(jwks["keys"]) == 2
    for jwk in jwks["keys"]:
        assert not PRIVATE_MEMBERS & set(jwk)
        assert jwk["use"] == "sig" and jwk["alg"] == "ES256"
        assert jwk["kid"] == thumbprint({k: jwk[k] for k in ("kty", "crv", "x", "y")})
    assert {k["kid"] for k in jwks["keys"]} == {
        keys.token_signing.kid,
        keys.payload_signing.kid,
    }
    assert validate_public_jwks(jwks, "sig") == jwks


@pytest.mark.parametrize("curve", ["X25519", "P-256"])
def test_generate_agency_keys(tmp_path: Path, curve: str) -> None:
    out = tmp_path / "agency"
    paths = generate_agency_keys(out, "shelter-1", enc_curve=curve)  # type: ignore[arg-type]
    sig_private, sig_jwks, enc_private, enc_jwks = paths
    assert [p.name for p in paths] == [
        "shelter-1.sig.private.jwk.json",
        "shelter-1.sig.jwks.json",
        "shelter-1.enc.private.jwk.json",
        "shelter-1.enc.jwks.json",
    ]
    assert _mode(sig_private) == 0o600 and _mode(enc_private) == 0o600
    assert not _mode(sig_jwks) & 0o022 and not _mode(enc_jwks) & 0o022

    sig_pub = validate_public_jwks(orjson.loads(sig_jwks.read_bytes()), "sig")["keys"][0]
    enc_pub = validate_public_jwks(orjson.loads(enc_jwks.read_bytes()), "enc")["keys"][0]
    assert (sig_pub["kty"], sig_pub["crv"], sig_pub["alg"]) == ("EC", "P-256", "ES256")
    expected_kty = "OKP" if curve == "X25519" else "EC"
    assert (enc_pub["kty"], enc_pub["crv"]) == (expected_kty, curve)
    assert (enc_pub["use"], enc_pub["alg"]) == ("enc", "ECDH-ES+A256KW")
    for pub, private_path in ((sig_pub, sig_private), (enc_pub, enc_private)):
        private = orjson.loads(private_path.read_bytes())
        assert "d" in private and private["kid"] == pub["kid"]
        public_members = {k: pub[k] for k in ("kty", "crv", "x", "y") if k in pub}
        assert pub["kid"] == thumbprint(public_members)
    assert isinstance(ECKey.import_key(orjson.loads(sig_private.read_bytes())), ECKey)


def test_generate_p256_enc_keys(tmp_path: Path) -> None:
    enc_jwks = generate_p256_enc_keys(tmp_path, "a")[3]
    assert orjson.loads(enc_jwks.read_bytes())["keys"][0]["crv"] == "P-256"


def test_agency_keys_refuse_overwrite(tmp_path: Path) -> None:
    paths = generate_agency_keys(tmp_path, "a")
    before = [p.read_bytes() for p in paths]
    with pytest.raises(FileExistsError):
        generate_agency_keys(tmp_path, "a")
    assert [p.read_bytes() for p in paths] == before
    paths[3].unlink()
    with pytest.raises(FileExistsError):  # any one existing file blocks the whole set
        generate_agency_keys(tmp_path, "a")
    assert not paths[3].exists()


@pytest.mark.parametrize("name", ["", "../x", "a/b", ".hidden", "x" * 65])
def test_agency_keys_refuse_unsafe_names(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError, match="name"):
        generate_agency_keys(tmp_path, name)


# --------------------------------------------------------------------------- rotation


@pytest.mark.parametrize("which", ["token", "payload"])
def test_rotate_keeps_only_the_public_half_of_the_old_key(key_dir: Path, which: str) -> None:
    before = BrokerKeys.generate(key_dir)
    old_key = before.token_signing if which == "token" else before.payload_signing
    started = time.time()
    retired_kid, new_kid = rotate_signing_key(key_dir, which)
    assert retired_kid == old_key.kid and new_kid != retired_kid

    after = BrokerKeys.load(key_dir)
    current = after.token_signing if which == "token" else after.payload_signing
    untouched = after.payload_signing if which == "token" else after.token_signing
    assert current.kid == new_kid and current.is_private
    assert (
        untouched.kid == (before.payload_signing if which == "token" else before.token_signing).kid
    )
    retired = after.retired_token if which == "token" else after.retired_payload
    assert [r.key.kid for r in retired] == [retired_kid] and not retired[0].key.is_private
    assert int(started) <= retired[0].retired_at <= time.time()

    retired_file = key_dir / "retired" / f"{which}-signing.{retired_kid}.jwk.json"
    assert not PRIVATE_MEMBERS & orjson.loads(retired_file.read_bytes()).keys()
    assert _mode(retired_file) == 0o600 and _mode(key_dir / "retired") == 0o700
    old_scalar = old_key.as_dict(private=True)["d"]
    assert isinstance(old_scalar, str)
    for path in key_dir.rglob("*"):  # the old private scalar is nowhere on disk
        if path.is_file():
            assert old_scalar.encode() not in path.read_bytes()

    kids = [k["kid"] for k in after.public_jwks()["keys"]]
    assert kids[:2] == [after.token_signing.kid, after.payload_signing.kid]
    assert retired_kid in kids and len(kids) == len(set(kids)) == 3
    # A retired token key is trusted (and published) only while its tokens can live;
    # a retired payload key stays, for the payloads agencies keep.
    later = time.time() + RETIRED_TOKEN_TRUST_SECONDS + 1
    assert retired[0].trusted(time.time())
    assert retired[0].trusted(later) is (which == "payload")
    assert (retired_kid in [k["kid"] for k in after.public_jwks(later)["keys"]]) is (
        which == "payload"
    )


def test_signing_keys_from_disk_change_only_with_the_folder(key_dir: Path) -> None:
    held = BrokerKeys.generate(key_dir)
    assert held.with_signing_keys_from_disk() is held
    retired_kid, new_kid = rotate_signing_key(key_dir, "token")
    taken = held.with_signing_keys_from_disk()
    assert taken.token_signing.kid == new_kid and taken.token_signing.is_private
    assert taken.payload_signing.kid == held.payload_signing.kid
    assert [r.key.kid for r in taken.retired_token] == [retired_kid]
    assert (taken.subject_hmac, taken.records_kek) == (held.subject_hmac, held.records_kek)
    assert taken.with_signing_keys_from_disk() is taken


def test_a_retired_token_key_is_trusted_from_when_a_process_first_sees_it(
    key_dir: Path,
) -> None:
    """Its retirement time may be long past when a host gets the copied folder: this
    host's processes signed with the key until they read the folder, so their tokens
    must live out their time. A key already known keeps its deadline on every read."""
    held = BrokerKeys.generate(key_dir)
    retired_kid, _ = rotate_signing_key(key_dir, "token")
    path = key_dir / "retired" / f"token-signing.{retired_kid}.jwk.json"
    long_ago = int(time.time()) - 86_400
    path.write_bytes(orjson.dumps({**orjson.loads(path.read_bytes()), "retired_at": long_ago}))
    seen = time.time()
    taken = held.with_signing_keys_from_disk()
    (retired,) = taken.retired_token
    assert retired.retired_at == long_ago
    assert retired.trusted_until is not None
    assert seen + RETIRED_TOKEN_TRUST_SECONDS <= retired.trusted_until
    assert retired.trusted_until <= time.time() + RETIRED_TOKEN_TRUST_SECONDS
    rotate_signing_key(key_dir, "payload")  # the folder changes again
    again = taken.with_signing_keys_from_disk()
    assert again is not taken and again.retired_token[0] is retired


def test_what_the_retired_payload_key_signed_still_verifies(key_dir: Path) -> None:
    before = BrokerKeys.generate(key_dir)
    notice = sign_claims({"event": "consent.revoked"}, before.payload_signing, typ="notice+jwt")
    rotate_signing_key(key_dir, "payload")
    rotate_signing_key(key_dir, "payload")
    after = BrokerKeys.load(key_dir)
    assert len(after.retired_payload) == 2
    assert verify_signed(notice, after.public_jwks(), expected_typ="notice+jwt") == {
        "event": "consent.revoked"
    }
    forged = sign_claims({"event": "x"}, ECKey.generate_key("P-256", private=True))
    with pytest.raises(PayloadInvalid):
        verify_signed(forged, after.public_jwks())


def test_a_rotation_cut_short_publishes_the_key_once(key_dir: Path) -> None:
    keys = BrokerKeys.generate(key_dir)
    (key_dir / "retired").mkdir(mode=0o700)
    # The retired copy was written, then the process died before replacing the file.
    current = keys.payload_signing
    path = key_dir / "retired" / f"payload-signing.{current.kid}.jwk.json"
    path.write_bytes(orjson.dumps({**current.as_dict(private=False), "retired_at": 1}))
    path.chmod(0o600)
    kids = [k["kid"] for k in BrokerKeys.load(key_dir).public_jwks()["keys"]]
    assert kids.count(current.kid) == 1 and len(kids) == 2
    retired, new = rotate_signing_key(key_dir, "payload")  # and it can simply run again
    assert retired == current.kid and BrokerKeys.load(key_dir).payload_signing.kid == new


@pytest.mark.parametrize("content", ["private", "renamed", "undated"])
def test_a_retired_file_that_is_not_what_it_says_is_refused(key_dir: Path, content: str) -> None:
    BrokerKeys.generate(key_dir)
    (key_dir / "retired").mkdir(mode=0o700)
    other = ECKey.generate_key("P-256", private=True)
    other.ensure_kid()
    kid = "not-its-thumbprint" if content == "renamed" else other.kid
    path = key_dir / "retired" / f"token-signing.{kid}.jwk.json"
    jwk = {**other.as_dict(private=content == "private"), "retired_at": 1}
    if content == "undated":
        del jwk["retired_at"]
    path.write_bytes(orjson.dumps(jwk))
    path.chmod(0o600)
    with pytest.raises(ValueError, match="token-signing"):
        BrokerKeys.load(key_dir)


@pytest.mark.parametrize("which", ["checkpoint", "records-kek", "subject-hmac"])
def test_only_signing_keys_rotate(key_dir: Path, which: str) -> None:
    BrokerKeys.generate(key_dir)
    with pytest.raises(ValueError, match="only token and payload"):
        rotate_signing_key(key_dir, which)


def test_rotate_needs_the_key_it_replaces(key_dir: Path) -> None:
    with pytest.raises(KeysMissing):
        rotate_signing_key(key_dir, "token")


# --------------------------------------------------------------------------- records key


def test_rotating_the_records_key_keeps_the_old_one_for_unwrapping_only(key_dir: Path) -> None:
    first = BrokerKeys.generate(key_dir).records_kek
    first_id, second_id = rotate_records_kek(key_dir)
    second = BrokerKeys.load(key_dir).records_kek
    third_id = rotate_records_kek(key_dir)[1]
    keys = BrokerKeys.load(key_dir)
    assert (first_id, second_id) == (records_kek_id(first), records_kek_id(second))
    assert records_kek_id(keys.records_kek) == third_id
    assert keys.records_keks[0] == keys.records_kek
    assert sorted(keys.retired_records_keks) == sorted([first, second])
    for kek in (first, second):
        path = key_dir / "retired" / f"records-kek.{records_kek_id(kek)}.key"
        assert _mode(path) == 0o600
        assert base64.b64decode(path.read_bytes()) == kek
    text = repr(keys)
    assert first.hex() not in text and base64.b64encode(first).decode() not in text
    assert sorted(forget_retired_records_keks(key_dir)) == sorted([first_id, second_id])
    assert BrokerKeys.load(key_dir).retired_records_keks == ()
    assert forget_retired_records_keks(key_dir) == []


def test_a_records_key_id_names_the_key_without_revealing_it() -> None:
    kek = os.urandom(32)
    kek_id = records_kek_id(kek)
    assert len(kek_id) == 16 and int(kek_id, 16) >= 0
    assert kek_id not in kek.hex() and records_kek_id(os.urandom(32)) != kek_id


# --------------------------------------------------------------------------- subject key


def test_rotating_the_subject_key_keeps_every_old_one(key_dir: Path) -> None:
    first = BrokerKeys.generate(key_dir).subject_hmac
    first_id, second_id = rotate_subject_hmac(key_dir)
    second = BrokerKeys.load(key_dir).subject_hmac
    third_id = rotate_subject_hmac(key_dir)[1]
    keys = BrokerKeys.load(key_dir)
    assert (first_id, second_id, third_id) == tuple(
        subject_hmac_id(k) for k in (first, second, keys.subject_hmac)
    )
    assert keys.subject_hmacs[0] == keys.subject_hmac
    assert sorted(keys.retired_subject_hmacs) == sorted([first, second])
    assert subject_hmac_id(first) != records_kek_id(first)  # names of their own kind
    for key in (first, second):
        path = key_dir / "retired" / f"subject-hmac.{subject_hmac_id(key)}.key"
        assert _mode(path) == 0o600 and base64.b64decode(path.read_bytes()) == key
        assert key.hex() not in repr(keys)
    # Records-key housekeeping leaves them alone.
    assert forget_retired_records_keks(key_dir) == []
    assert BrokerKeys.load(key_dir).retired_subject_hmacs == keys.retired_subject_hmacs
    assert keys.with_secret_keys_from_disk() is keys


def test_a_running_process_takes_a_rotated_subject_key(key_dir: Path) -> None:
    held = BrokerKeys.generate(key_dir)
    assert held.with_secret_keys_from_disk() is held
    rotate_subject_hmac(key_dir)
    taken = held.with_secret_keys_from_disk()
    assert taken.retired_subject_hmacs == (held.subject_hmac,)
    assert taken.subject_hmac == BrokerKeys.load(key_dir).subject_hmac != held.subject_hmac
    assert taken.records_kek == held.records_kek


#: The secret keys a rotation moves to retired/, and the stem of their file names.
SECRET_ROTATIONS = pytest.mark.parametrize(
    ("rotate", "stem"),
    [(rotate_records_kek, "records-kek"), (rotate_subject_hmac, "subject-hmac")],
    ids=["records", "subject"],
)


@SECRET_ROTATIONS
def test_a_retired_secret_key_under_another_name_is_refused(
    key_dir: Path, rotate: Callable[[Path], object], stem: str
) -> None:
    BrokerKeys.generate(key_dir)
    rotate(key_dir)
    (retired,) = (key_dir / "retired").glob(f"{stem}.*.key")
    retired.rename(retired.with_name(f"{stem}.0000000000000000.key"))
    with pytest.raises(ValueError, match="does not hold the key its name gives"):
        BrokerKeys.load(key_dir)


@SECRET_ROTATIONS
def test_rotating_a_secret_key_needs_the_key_it_replaces(
    key_dir: Path, rotate: Callable[[Path], object], stem: str
) -> None:
    with pytest.raises(KeysMissing):
        rotate(key_dir)


def test_rewrap_moves_a_data_key_to_the_current_key_and_keeps_it() -> None:
    old, new, stranger = os.urandom(32), os.urandom(32), os.urandom(32)
    wrapped = new_wrapped_data_key(old)
    data_key = unwrap_data_key(old, wrapped)
    moved = rewrap_data_key((new, old), wrapped)
    assert moved is not None and unwrap_data_key(new, moved) == data_key
    assert rewrap_data_key((new, old), moved) is None  # already current
    assert unwrap_with_any((new, old), wrapped) == unwrap_with_any((new, old), moved) == data_key
    with pytest.raises(RecordUnreadable):
        rewrap_data_key((new, stranger), wrapped)
    with pytest.raises(RecordUnreadable):
        unwrap_with_any((stranger,), wrapped)


def test_the_wrapping_key_is_checked_against_the_file(key_dir: Path) -> None:
    keys = BrokerKeys.generate(key_dir)
    assert keys.wrapping_kek() == keys.records_kek
    rotate_records_kek(key_dir)
    with pytest.raises(RecordsKeyRotated, match="rotated after this process loaded it"):
        keys.wrapping_kek()
    assert BrokerKeys.load(key_dir).wrapping_kek() != keys.records_kek
    fresh = keys.with_secret_keys_from_disk()  # what a running process takes instead
    assert fresh.records_keks == (BrokerKeys.load(key_dir).records_kek, keys.records_kek)
    assert fresh.wrapping_kek() == fresh.records_kek
    assert fresh.with_secret_keys_from_disk() is fresh  # nothing changed since
    in_memory = BrokerKeys(**{**keys.__dict__, "key_dir": None})
    assert in_memory.wrapping_kek() == keys.records_kek
