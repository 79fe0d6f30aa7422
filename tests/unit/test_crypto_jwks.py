"""Agency JWKS validation: every refusal rule, and acceptance of the supported keys."""

from __future__ import annotations

import base64
import copy
from typing import Any

import pytest
from joserfc.jwk import ECKey, KeySet, OKPKey, RSAKey

from broker.crypto.jwks import (
    JWKSInvalid,
    load_keyset,
    select_encryption_key,
    validate_public_jwks,
)


def _public(key: ECKey | OKPKey, **extra: Any) -> dict[str, Any]:
    data = dict(key.as_dict(private=False))
    data.setdefault("kid", key.thumbprint())
    data.update(extra)
    return data


@pytest.fixture
def x25519() -> dict[str, Any]:
    return _public(OKPKey.generate_key("X25519"), use="enc", alg="ECDH-ES+A256KW")


@pytest.fixture
def p256() -> dict[str, Any]:
    return _public(ECKey.generate_key("P-256"))


@pytest.fixture
def ed25519() -> dict[str, Any]:
    return _public(OKPKey.generate_key("Ed25519"))


def _refused(jwks: object, use: str, *fragments: str) -> str:
    with pytest.raises(JWKSInvalid) as info:
        validate_public_jwks(jwks, use)  # type: ignore[arg-type]
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message
    return message


# ----------------------------------------------------------------------------- acceptance


def test_accepts_x25519_enc_key(x25519: dict[str, Any]) -> None:
    out = validate_public_jwks({"keys": [x25519]}, "enc")
    assert out == {"keys": [x25519]}


def test_accepts_p256_enc_key_without_use_or_alg(p256: dict[str, Any]) -> None:
    out = validate_public_jwks({"keys": [p256]}, "enc")
    assert out["keys"][0] == {k: p256[k] for k in ("kty", "crv", "x", "y", "kid")}


def test_accepts_p256_and_ed25519_sig_keys(p256: dict[str, Any], ed25519: dict[str, Any]) -> None:
    es = {**p256, "use": "sig", "alg": "ES256"}
    ed_old = {**ed25519, "alg": "EdDSA"}
    ed_new = {**_public(OKPKey.generate_key("Ed25519")), "alg": "Ed25519"}
    out = validate_public_jwks({"keys": [es, ed_old, ed_new]}, "sig")
    assert [k["kid"] for k in out["keys"]] == [es["kid"], ed_old["kid"], ed_new["kid"]]
    assert out["keys"][1]["alg"] == "EdDSA"
    assert out["keys"][2]["alg"] == "Ed25519"


def test_extra_members_are_dropped(x25519: dict[str, Any]) -> None:
    noisy = {**x25519, "key_ops": ["deriveKey"], "x5u": "https://example", "note": "hi"}
    out = validate_public_jwks({"keys": [noisy], "extra": True}, "enc")
    assert out == {"keys": [x25519]}
    assert set(out["keys"][0]) <= {"kty", "crv", "x", "y", "kid", "use", "alg"}


def test_input_is_not_mutated(x25519: dict[str, Any]) -> None:
    jwks = {"keys": [{**x25519, "note": "hi"}]}
    before = copy.deepcopy(jwks)
    validate_public_jwks(jwks, "enc")
    assert jwks == before


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("member", ["d", "p", "q", "dp", "dq", "qi", "oth", "k"])
def test_refuses_private_members(member: str, x25519: dict[str, Any]) -> None:
    message = _refused({"keys": [{**x25519, member: "AAAA"}]}, "enc", "keys[0]", f"'{member}'")
    assert "public key only" in message


def test_refuses_real_private_key() -> None:
    private = dict(OKPKey.generate_key("X25519").as_dict(private=True))
    private["kid"] = "k1"
    _refused({"keys": [private]}, "enc", "private key material ('d')")


def test_refuses_rsa() -> None:
    rsa = dict(RSAKey.generate_key(2048).as_dict(private=False))
    rsa["kid"] = "rsa"
    _refused({"keys": [rsa]}, "sig", "keys[0]", "RSA")


def test_refuses_oct() -> None:
    _refused({"keys": [{"kty": "oct", "kid": "s"}]}, "enc", "kty 'oct'")


@pytest.mark.parametrize(
    ("fixture", "use"),
    [("ed25519", "enc"), ("x25519", "sig")],
)
def test_refuses_wrong_curve_for_use(
    fixture: str, use: str, request: pytest.FixtureRequest
) -> None:
    key = dict(request.getfixturevalue(fixture))
    key.pop("use", None)
    key.pop("alg", None)
    _refused({"keys": [key]}, use, "keys[0]", f"cannot be used for '{use}'")


def test_refuses_other_ec_curves() -> None:
    key = _public(ECKey.generate_key("P-384"))
    _refused({"keys": [key]}, "sig", "EC P-384")


def test_refuses_wrong_use(p256: dict[str, Any]) -> None:
    _refused({"keys": [{**p256, "use": "sig"}]}, "enc", "'use' is 'sig'")


@pytest.mark.parametrize(
    ("fixture", "use", "alg"),
    [
        ("x25519", "enc", "ECDH-ES"),
        ("p256", "enc", "ES256"),
        ("p256", "sig", "EdDSA"),
        ("ed25519", "sig", "ES256"),
        ("p256", "sig", "RS256"),
    ],
)
def test_refuses_wrong_alg(
    fixture: str, use: str, alg: str, request: pytest.FixtureRequest
) -> None:
    key = {**request.getfixturevalue(fixture), "alg": alg}
    key.pop("use", None)
    _refused({"keys": [key]}, use, "'alg'", alg)


def test_refuses_duplicate_kid(p256: dict[str, Any]) -> None:
    other = _public(ECKey.generate_key("P-256"), kid=p256["kid"])
    _refused({"keys": [p256, other]}, "enc", "keys[1]", "duplicate kid")


@pytest.mark.parametrize("kid", [None, "", "x" * 129, "caf\u00e9", "tab\there", 42])
def test_refuses_missing_or_bad_kid(kid: object, p256: dict[str, Any]) -> None:
    key = dict(p256)
    if kid is None:
        del key["kid"]
    else:
        key["kid"] = kid
    _refused({"keys": [key]}, "enc", "keys[0]", "'kid'")


def test_accepts_kid_of_128_printable_chars(p256: dict[str, Any]) -> None:
    validate_public_jwks({"keys": [{**p256, "kid": "~" * 128}]}, "enc")


def test_refuses_more_than_ten_keys() -> None:
    keys = [_public(ECKey.generate_key("P-256")) for _ in range(11)]
    _refused({"keys": keys}, "enc", "at most 10")
    validate_public_jwks({"keys": keys[:10]}, "enc")


@pytest.mark.parametrize("jwks", [{"keys": []}, {}, {"keys": "x"}, [], "keys", None, {"keys": [1]}])
def test_refuses_empty_or_not_an_object(jwks: object) -> None:
    _refused(jwks, "enc")


def test_refuses_invalid_ec_point(p256: dict[str, Any]) -> None:
    y = bytearray(base64.urlsafe_b64decode(p256["y"] + "=="))
    y[-1] ^= 1
    bad = {**p256, "y": base64.urlsafe_b64encode(bytes(y)).rstrip(b"=").decode()}
    _refused({"keys": [bad]}, "enc", "keys[0]", "not a valid EC P-256")


def test_refuses_low_order_x25519_point(x25519: dict[str, Any]) -> None:
    zero = base64.urlsafe_b64encode(bytes(32)).rstrip(b"=").decode()
    _refused({"keys": [{**x25519, "x": zero}]}, "enc", "not a valid OKP X25519")


@pytest.mark.parametrize("x", ["AAAA", "not base64!", "A" * 43 + "=", 7])
def test_refuses_malformed_coordinates(x: object, x25519: dict[str, Any]) -> None:
    _refused({"keys": [{**x25519, "x": x}]}, "enc", "'x'")


def test_refuses_okp_with_y(x25519: dict[str, Any]) -> None:
    _refused({"keys": [{**x25519, "y": x25519["x"]}]}, "enc", "'y'")


# ----------------------------------------------------------------------------- helpers


def test_load_keyset_imports_all_keys(x25519: dict[str, Any], p256: dict[str, Any]) -> None:
    jwks = validate_public_jwks({"keys": [x25519, p256]}, "enc")
    keyset = load_keyset(jwks)
    assert isinstance(keyset, KeySet)
    assert [k.kid for k in keyset] == [x25519["kid"], p256["kid"]]
    assert not any(k.is_private for k in keyset)


def test_select_encryption_key_skips_unusable(x25519: dict[str, Any], p256: dict[str, Any]) -> None:
    sig_only = {**_public(ECKey.generate_key("P-256")), "use": "sig"}
    kid, key = select_encryption_key({"keys": [sig_only, p256, x25519]})
    assert kid == p256["kid"]
    assert isinstance(key, ECKey)
    again_kid, again = select_encryption_key({"keys": [p256]})
    assert again is key  # imported once, served from the cache


def test_select_encryption_key_none_usable(ed25519: dict[str, Any]) -> None:
    with pytest.raises(JWKSInvalid, match="no key usable for encryption"):
        select_encryption_key({"keys": [ed25519]})
