"""Sealed disclosure payloads: round trips, refusals, headers, and jwcrypto interop."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import orjson
import pytest
from joserfc import jwe, jws
from joserfc.jwk import ECKey, OKPKey
from jwcrypto import jwe as jc_jwe
from jwcrypto import jwk as jc_jwk
from jwcrypto import jws as jc_jws

from broker.crypto.agency_keys import generate_agency_keys
from broker.crypto.jwks import validate_public_jwks
from broker.crypto.keystore import BrokerKeys
from broker.crypto.payload import (
    PayloadInvalid,
    open_payload,
    seal_payload,
    sign_claims,
    verify_signed,
)

CLAIMS: dict[str, Any] = {
    "iss": "https://broker.example",
    "aud": "agency-b",
    "sub": "hmac-sha256:00ff",
    "iat": 1_700_000_000,
    "records": [{"category": "safe-contact", "value": "Call after 6pm \u2014 not at home"}],
}


class Agency:
    def __init__(self, directory: Path, name: str, curve: str) -> None:
        paths = generate_agency_keys(directory, name, enc_curve=curve)  # type: ignore[arg-type]
        self.private: dict[str, Any] = orjson.loads(paths[2].read_bytes())
        self.jwks = validate_public_jwks(orjson.loads(paths[3].read_bytes()), "enc")
        self.kid: str = self.private["kid"]


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> BrokerKeys:
    return BrokerKeys.generate(tmp_path_factory.mktemp("broker") / "keys")


@pytest.fixture(scope="module", params=["X25519", "P-256"])
def agency(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Agency:
    return Agency(tmp_path_factory.mktemp("agency"), "recipient", request.param)


@pytest.fixture(scope="module")
def other_agency(tmp_path_factory: pytest.TempPathFactory) -> Agency:
    return Agency(tmp_path_factory.mktemp("other"), "other", "X25519")


def _b64d(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def _b64e(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _header(segment: str) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(_b64d(segment))
    return result


# ----------------------------------------------------------------------------- round trips


def test_seal_open_roundtrip(broker: BrokerKeys, agency: Agency) -> None:
    token = seal_payload(CLAIMS, broker.payload_signing, agency.jwks)
    assert open_payload(token, agency.private, broker.public_jwks()) == CLAIMS


def test_each_seal_is_fresh(broker: BrokerKeys, agency: Agency) -> None:
    first = seal_payload(CLAIMS, broker.payload_signing, agency.jwks)
    second = seal_payload(CLAIMS, broker.payload_signing, agency.jwks)
    assert first != second
    assert first.split(".")[0] != second.split(".")[0]  # fresh ephemeral key each time


def test_headers(broker: BrokerKeys, agency: Agency) -> None:
    token = seal_payload(CLAIMS, broker.payload_signing, agency.jwks)
    parts = token.split(".")
    assert len(parts) == 5
    outer = _header(parts[0])
    assert outer["alg"] == "ECDH-ES+A256KW"
    assert outer["enc"] == "A256GCM"
    assert outer["cty"] == "JWT"
    assert outer["kid"] == agency.kid
    assert outer["epk"]["crv"] == agency.jwks["keys"][0]["crv"]
    assert "d" not in outer["epk"]
    assert "zip" not in outer

    private = agency.private
    key = OKPKey.import_key(private) if private["kty"] == "OKP" else ECKey.import_key(private)
    obj = jwe.decrypt_compact(token, key)
    assert obj.plaintext is not None
    inner = _header(obj.plaintext.decode().split(".")[0])
    assert inner == {"alg": "ES256", "typ": "JWT", "kid": broker.payload_signing.kid}


def test_claims_are_compact_json(broker: BrokerKeys) -> None:
    token = sign_claims({"a": 1, "b": [1, 2]}, broker.payload_signing)
    assert _b64d(token.split(".")[1]) == b'{"a":1,"b":[1,2]}'


def test_seal_picks_first_usable_key(
    broker: BrokerKeys, agency: Agency, other_agency: Agency
) -> None:
    jwks = {"keys": [*agency.jwks["keys"], *other_agency.jwks["keys"]]}
    token = seal_payload(CLAIMS, broker.payload_signing, jwks)
    assert _header(token.split(".")[0])["kid"] == agency.kid
    assert open_payload(token, agency.private, broker.public_jwks()) == CLAIMS


# ----------------------------------------------------------------------------- refusals


def test_other_agency_cannot_open(broker: BrokerKeys, agency: Agency, other_agency: Agency) -> None:
    token = seal_payload(CLAIMS, broker.payload_signing, agency.jwks)
    with pytest.raises(PayloadInvalid, match="another key"):
        open_payload(token, other_agency.private, broker.public_jwks())
    # Even with the kid check bypassed, the wrong key cannot decrypt.
    anonymous = {k: v for k, v in other_agency.private.items() if k != "kid"}
    with pytest.raises(PayloadInvalid):
        open_payload(token, anonymous, broker.public_jwks())


@pytest.mark.parametrize("part", range(5))
def test_tampering_any_part_fails(broker: BrokerKeys, agency: Agency, part: int) -> None:
    token = seal_payload(CLAIMS, broker.payload_signing, agency.jwks)
    parts = token.split(".")
    raw = bytearray(_b64d(parts[part]))
    if part == 0:
        # Same header values, different bytes: only the AEAD (header is the AAD) notices.
        raw = bytearray(json.dumps(json.loads(raw), indent=1).encode())
    else:
        raw[len(raw) // 2] ^= 0x01
    parts[part] = _b64e(bytes(raw))
    with pytest.raises(PayloadInvalid):
        open_payload(".".join(parts), agency.private, broker.public_jwks())


def _recipient_public(agency: Agency) -> ECKey | OKPKey:
    jwk = agency.jwks["keys"][0]
    return ECKey.import_key(jwk) if jwk["kty"] == "EC" else OKPKey.import_key(jwk)


@pytest.mark.parametrize(
    "changes",
    [{"cty": None}, {"cty": "json"}, {"enc": "A128GCM"}, {"alg": "ECDH-ES"}, {"zip": "DEF"}],
)
def test_unexpected_jwe_headers_refused(
    broker: BrokerKeys, agency: Agency, changes: dict[str, Any]
) -> None:
    header = {"alg": "ECDH-ES+A256KW", "enc": "A256GCM", "cty": "JWT", "kid": agency.kid}
    for name, value in changes.items():
        if value is None:
            del header[name]
        else:
            header[name] = value
    inner = sign_claims(CLAIMS, broker.payload_signing)
    token = jwe.encrypt_compact(
        header,
        inner,
        _recipient_public(agency),
        algorithms=["ECDH-ES+A256KW", "ECDH-ES", "A256GCM", "A128GCM", "DEF"],
    )
    with pytest.raises(PayloadInvalid):
        open_payload(token, agency.private, broker.public_jwks())


def test_swapped_epk_fails(broker: BrokerKeys, agency: Agency) -> None:
    first = seal_payload(CLAIMS, broker.payload_signing, agency.jwks).split(".")
    second = seal_payload(CLAIMS, broker.payload_signing, agency.jwks).split(".")
    with pytest.raises(PayloadInvalid):
        open_payload(".".join([second[0], *first[1:]]), agency.private, broker.public_jwks())


@pytest.mark.parametrize("token", ["", "a.b", "a.b.c.d.e", "....", "x" * 100])
def test_garbage_fails(broker: BrokerKeys, agency: Agency, token: str) -> None:
    with pytest.raises(PayloadInvalid):
        open_payload(token, agency.private, broker.public_jwks())


def test_inner_signed_by_other_key_fails(broker: BrokerKeys, agency: Agency) -> None:
    # A forger can encrypt to the agency; it must not pass as the broker by reusing its kid.
    rogue = ECKey.generate_key("P-256", parameters={"kid": broker.payload_signing.kid or ""})
    forged_inner = sign_claims(CLAIMS, rogue)
    header = {"alg": "ECDH-ES+A256KW", "enc": "A256GCM", "cty": "JWT", "kid": agency.kid}
    token = jwe.encrypt_compact(header, forged_inner, _recipient_public(agency))
    with pytest.raises(PayloadInvalid):
        open_payload(token, agency.private, broker.public_jwks())


def test_inner_signed_by_token_key_is_accepted_only_if_published(
    broker: BrokerKeys, agency: Agency
) -> None:
    token = seal_payload(CLAIMS, broker.token_signing, agency.jwks)
    assert open_payload(token, agency.private, broker.public_jwks()) == CLAIMS
    payload_only = {"keys": [broker.public_jwks()["keys"][1]]}
    with pytest.raises(PayloadInvalid):
        open_payload(token, agency.private, payload_only)


# ----------------------------------------------------------------------------- verify_signed


def test_verify_signed_roundtrip_and_typ(broker: BrokerKeys) -> None:
    notice = sign_claims({"event": "consent.revoked"}, broker.payload_signing, typ="notice+jwt")
    jwks = broker.public_jwks()
    assert verify_signed(notice, jwks) == {"event": "consent.revoked"}
    assert verify_signed(notice, jwks, expected_typ="notice+jwt")["event"] == "consent.revoked"
    with pytest.raises(PayloadInvalid):
        verify_signed(notice, jwks, expected_typ="JWT")


def test_verify_signed_refusals(broker: BrokerKeys) -> None:
    jwks = broker.public_jwks()
    good = sign_claims({"a": 1}, broker.payload_signing)
    head, body, sig = good.split(".")
    tampered_body = _b64e(b'{"a":2}')
    with pytest.raises(PayloadInvalid):
        verify_signed(f"{head}.{tampered_body}.{sig}", jwks)
    no_kid = _b64e(b'{"alg":"ES256","typ":"JWT"}')
    with pytest.raises(PayloadInvalid):
        verify_signed(f"{no_kid}.{body}.{sig}", jwks)
    # alg confusion: an HS256 token "signed" with the public key bytes must not verify
    from joserfc.jwk import OctKey

    hs = jws.serialize_compact(
        {"alg": "HS256", "kid": broker.payload_signing.kid},
        body,
        OctKey.import_key(json.dumps(jwks["keys"][1])),
    )
    with pytest.raises(PayloadInvalid):
        verify_signed(hs, jwks)
    with pytest.raises(PayloadInvalid):
        verify_signed(good, {"keys": []})


def test_verify_signed_rejects_non_object_payload(broker: BrokerKeys) -> None:
    key = broker.payload_signing
    token = jws.serialize_compact({"alg": "ES256", "kid": key.kid}, b"[1,2]", key)
    with pytest.raises(PayloadInvalid, match="JSON object"):
        verify_signed(token, broker.public_jwks())


def test_sign_claims_requires_private_p256(broker: BrokerKeys) -> None:
    public = ECKey.import_key(broker.public_jwks()["keys"][0])
    with pytest.raises(TypeError):
        sign_claims(CLAIMS, public)


# ----------------------------------------------------------------------------- interop


def test_jwcrypto_opens_and_verifies(broker: BrokerKeys, agency: Agency) -> None:
    """An independent JOSE implementation must read what the broker seals."""
    token = seal_payload(CLAIMS, broker.payload_signing, agency.jwks)

    envelope = jc_jwe.JWE()
    envelope.deserialize(token, key=jc_jwk.JWK(**agency.private))
    protected = json.loads(envelope.objects["protected"])
    assert protected["alg"] == "ECDH-ES+A256KW" and protected["enc"] == "A256GCM"
    assert protected["cty"] == "JWT" and protected["kid"] == agency.kid

    signed = jc_jws.JWS()
    signed.deserialize(envelope.payload.decode())
    broker_keys = jc_jwk.JWKSet.from_json(json.dumps(broker.public_jwks()))
    signing_key = broker_keys.get_key(broker.payload_signing.kid)
    assert signing_key is not None
    signed.verify(signing_key, alg="ES256")
    assert json.loads(signed.payload) == CLAIMS

    with pytest.raises(jc_jws.InvalidJWSSignature):
        signed.verify(broker_keys.get_key(broker.token_signing.kid), alg="ES256")


def test_jwcrypto_sealed_payload_opens(broker: BrokerKeys, agency: Agency) -> None:
    """The reverse direction: broker code opens a jwcrypto-built nested token."""
    signer = jc_jwk.JWK(**broker.payload_signing.as_dict(private=True))
    inner = jc_jws.JWS(json.dumps(CLAIMS).encode())
    inner.add_signature(
        signer,
        alg="ES256",
        protected={"alg": "ES256", "typ": "JWT", "kid": broker.payload_signing.kid},
    )
    outer = jc_jwe.JWE(
        inner.serialize(compact=True).encode(),
        protected={"alg": "ECDH-ES+A256KW", "enc": "A256GCM", "cty": "JWT", "kid": agency.kid},
    )
    outer.add_recipient(jc_jwk.JWK(**agency.jwks["keys"][0]))
    token = outer.serialize(compact=True)
    assert open_payload(token, agency.private, broker.public_jwks()) == CLAIMS
