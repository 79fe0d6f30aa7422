"""The hand-written JWS/JWE writers against the RFCs' vectors and two independent readers."""

from __future__ import annotations

import base64
import json
from typing import Any

import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, x25519
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from joserfc import jwe, jws
from joserfc.jwk import ECKey, OKPKey
from jwcrypto import jwe as jc_jwe
from jwcrypto import jwk as jc_jwk

from broker.crypto.compact import b64url, concat_kdf, ecdh_es_a256kw, es256

HEADER = {"alg": "ECDH-ES+A256KW", "enc": "A256GCM", "cty": "JWT", "kid": "r1"}


def _b64d(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def _p256_private(d: str) -> ec.EllipticCurvePrivateKey:
    return ec.derive_private_key(int.from_bytes(_b64d(d), "big"), ec.SECP256R1())


def test_concat_kdf_matches_rfc7518_appendix_c() -> None:
    """RFC 7518 Appendix C: Alice's ephemeral key, Bob's static key, A128GCM, apu/apv."""
    alice = _p256_private("0_NxaRPUMQoAJt50Gz8YiTr8gRTwyEaCumd-MToTmIo")
    bob = _p256_private("VEmDZpDXXK8p8N0Cndsxs924q6nS1RXFASRl6BfUqdw")
    bob_x = bob.public_key().public_numbers().x.to_bytes(32, "big")
    assert b64url(bob_x) == "weNJy2HscCSM6AEDTDg04biOvhFhyyWvOHQfeF_PxMQ"
    z = alice.exchange(ec.ECDH(), bob.public_key())
    derived = concat_kdf(z, "A128GCM", 128, apu=b"Alice", apv=b"Bob")
    assert b64url(derived) == "VqqN6vgjbSBcIijNcacQGg"


@pytest.mark.parametrize("bits", [0, 7, 264, 512])
def test_concat_kdf_refuses_sizes_one_round_cannot_give(bits: int) -> None:
    with pytest.raises(ValueError):
        concat_kdf(b"\x01" * 32, "A256KW", bits)


def test_es256_is_raw_r_s_and_verifies_with_joserfc() -> None:
    key = ECKey.generate_key("P-256", private=True)
    assert key.private_key is not None
    token = es256({"alg": "ES256", "kid": "k"}, b'{"a":1}', key.private_key)
    assert len(_b64d(token.split(".")[2])) == 64  # R || S, not DER
    public = ECKey.import_key(key.as_dict(private=False))
    assert jws.deserialize_compact(token, public).payload == b'{"a":1}'


def test_es256_refuses_other_curves() -> None:
    with pytest.raises(TypeError):
        es256({"alg": "ES256"}, b"{}", ec.generate_private_key(ec.SECP384R1()))


@pytest.mark.parametrize(
    "header",
    [
        {**HEADER, "alg": "ECDH-ES"},
        {**HEADER, "enc": "A128GCM"},
        {**HEADER, "zip": "DEF"},
        {**HEADER, "apu": "QWxpY2U"},
        {**HEADER, "epk": {"kty": "OKP"}},
    ],
)
def test_jwe_writer_refuses_headers_it_does_not_honour(header: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        ecdh_es_a256kw(header, b"x", x25519.X25519PrivateKey.generate().public_key())


@pytest.mark.parametrize(
    "recipient",
    [
        ec.generate_private_key(ec.SECP384R1()).public_key(),
        ed25519.Ed25519PrivateKey.generate().public_key(),
    ],
    ids=["P-384", "Ed25519"],
)
def test_jwe_writer_refuses_other_key_types(recipient: Any) -> None:
    with pytest.raises(TypeError):
        ecdh_es_a256kw(HEADER, b"x", recipient)


RECIPIENTS: dict[str, ECKey | OKPKey] = {
    "X25519": OKPKey.generate_key("X25519", private=True),
    "P-256": ECKey.generate_key("P-256", private=True),
}


@pytest.mark.parametrize("curve", sorted(RECIPIENTS))
def test_every_jwe_is_fresh(curve: str) -> None:
    key = RECIPIENTS[curve]
    first, second = (ecdh_es_a256kw(HEADER, b"same", key.public_key).split(".") for _ in "ab")
    # epk (in the header), wrapped key, IV and ciphertext all change.
    assert all(a != b for a, b in zip(first[:4], second[:4], strict=True))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=40),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    claims=st.dictionaries(st.text(max_size=12), json_values, max_size=6),
    curve=st.sampled_from(sorted(RECIPIENTS)),
)
def test_joserfc_and_jwcrypto_open_what_the_writers_seal(
    claims: dict[str, Any], curve: str
) -> None:
    recipient = RECIPIENTS[curve]
    signer = ECKey.generate_key("P-256", private=True)
    assert signer.private_key is not None
    inner = es256({"alg": "ES256", "typ": "JWT"}, orjson.dumps(claims), signer.private_key)
    token = ecdh_es_a256kw(HEADER, inner.encode(), recipient.public_key)

    opened = jwe.decrypt_compact(token, recipient)
    assert opened.plaintext == inner.encode()
    verified = jws.deserialize_compact(inner, ECKey.import_key(signer.as_dict(private=False)))
    assert json.loads(verified.payload) == claims

    envelope = jc_jwe.JWE()
    envelope.deserialize(token, key=jc_jwk.JWK(**recipient.as_dict(private=True)))
    assert envelope.payload == inner.encode()
