"""Disclosure payloads: a broker-signed JWS nested in a JWE for the recipient agency.

Sign-then-encrypt means only the recipient can read a disclosure, and after
decrypting it can still prove to anyone that the broker released exactly these
claims. Everything is standard compact JOSE (ES256 inside ECDH-ES+A256KW/A256GCM)
so agencies can use any JOSE library. This runs on every disclosure, so recipient
keys are imported once (see ``jwks.public_key_from_jwk``) and the two tokens are
written by ``compact`` straight over ``cryptography``; reading stays with joserfc.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import orjson
from joserfc import jwe, jws
from joserfc.jwe import JWERegistry
from joserfc.jwk import ECKey, GuestProtocol, JWKRegistry, Key, OKPKey
from joserfc.jws import JWSRegistry

from broker.crypto.compact import ecdh_es_a256kw, es256
from broker.crypto.jwks import ENC_ALG, public_key_from_jwk, select_encryption_key

__all__ = [
    "CONTENT_ENC",
    "SIG_ALG",
    "PayloadInvalid",
    "open_payload",
    "seal_payload",
    "sign_claims",
    "verify_signed",
]

SIG_ALG = "ES256"
CONTENT_ENC = "A256GCM"
#: Upper bound on serialised claims; joserfc's defaults (64 KiB JWE) are too small
#: for held records, while an unbounded size would let a peer exhaust memory.
MAX_CLAIMS_BYTES = 1024 * 1024

_JWS_REGISTRY = JWSRegistry(algorithms=[SIG_ALG])
_JWE_REGISTRY = JWERegistry(algorithms=[ENC_ALG, CONTENT_ENC])
# Limits apply to base64url segments, which grow by 4/3 per nesting level.
_JWS_REGISTRY.max_payload_length = 2 * MAX_CLAIMS_BYTES
_JWE_REGISTRY.max_ciphertext_length = 3 * MAX_CLAIMS_BYTES


class PayloadInvalid(ValueError):
    """A token could not be decrypted or verified; the reason is deliberately coarse."""


def _dumps(claims: Mapping[str, Any]) -> bytes:
    data = orjson.dumps(claims if isinstance(claims, dict) else dict(claims))
    if len(data) > MAX_CLAIMS_BYTES:
        raise ValueError(f"claims exceed {MAX_CLAIMS_BYTES} bytes")
    return data


def sign_claims(claims: Mapping[str, Any], key: ECKey, *, typ: str = "JWT") -> str:
    """Sign ``claims`` as a compact ES256 JWS with the key's ``kid`` in the header.

    ``typ`` lets callers give other signed objects (e.g. webhook notices) their own
    type, so one kind of token cannot be passed off as another.
    """
    private = key.private_key if isinstance(key, ECKey) and key.is_private else None
    if private is None or key.curve_name != "P-256":
        raise TypeError("sign_claims needs a private EC P-256 key")
    key.ensure_kid()
    header = {"alg": SIG_ALG, "typ": typ, "kid": key.kid}
    return es256(header, _dumps(claims), private)


def seal_payload(
    claims: Mapping[str, Any], signing_key: ECKey, recipient_jwks: dict[str, Any]
) -> str:
    """Sign ``claims`` and encrypt the JWS to the recipient's first usable enc key.

    Header: alg ECDH-ES+A256KW, enc A256GCM, cty JWT, kid of the recipient key.
    """
    kid, key = select_encryption_key(recipient_jwks)
    header = {"alg": ENC_ALG, "enc": CONTENT_ENC, "cty": "JWT", "kid": kid}
    inner = sign_claims(claims, signing_key).encode("ascii")
    return ecdh_es_a256kw(header, inner, key.public_key)


def _import_recipient_private(jwk: Mapping[str, Any]) -> ECKey | OKPKey:
    key = JWKRegistry.import_key(dict(jwk))
    if isinstance(key, ECKey) and key.curve_name == "P-256" and key.is_private:
        return key
    if isinstance(key, OKPKey) and key.curve_name == "X25519" and key.is_private:
        return key
    raise ValueError("recipient key must be a private X25519 or P-256 JWK")


def open_payload(
    token: str, recipient_private_jwk: dict[str, Any], broker_public_jwks: dict[str, Any]
) -> dict[str, Any]:
    """Decrypt a sealed payload and verify the broker's inner signature; return claims.

    This is the recipient's side (agency SDKs, tests); any failure is ``PayloadInvalid``.
    Headers are checked before any key agreement, so foreign tokens are cheap to refuse.
    """
    try:
        key = _import_recipient_private(recipient_private_jwk)
    except Exception as exc:
        raise PayloadInvalid("recipient key must be a private X25519 or P-256 JWK") from exc
    wanted_kid = recipient_private_jwk.get("kid")

    def resolve(obj: GuestProtocol) -> Key:
        header = obj.headers()
        if header.get("alg") != ENC_ALG or header.get("enc") != CONTENT_ENC:
            raise PayloadInvalid("unexpected JWE algorithms")
        if header.get("cty") != "JWT":
            raise PayloadInvalid("JWE content is not a JWT")
        if "zip" in header:
            raise PayloadInvalid("compressed payloads are not accepted")
        if wanted_kid is not None and header.get("kid") != wanted_kid:
            raise PayloadInvalid("JWE is addressed to another key")
        return key

    try:
        plaintext = jwe.decrypt_compact(token, resolve, registry=_JWE_REGISTRY).plaintext
        if plaintext is None:
            raise PayloadInvalid("JWE has no content")
        inner = plaintext.decode("ascii")
    except PayloadInvalid:
        raise
    except Exception as exc:  # any parser/crypto failure means "not a valid payload"
        raise PayloadInvalid("payload could not be decrypted") from exc
    return verify_signed(inner, broker_public_jwks, expected_typ="JWT")


def _resolver(public_jwks: Mapping[str, Any]) -> Callable[[GuestProtocol], Key]:
    """Pick the ES256 verification key named by the JWS ``kid``; no kid, no key."""

    def resolve(obj: GuestProtocol) -> Key:
        header = obj.headers()
        if header.get("alg") != SIG_ALG or "crit" in header or "b64" in header:
            raise PayloadInvalid("unexpected JWS header")
        kid = header.get("kid")
        if not isinstance(kid, str):
            raise PayloadInvalid("JWS header has no kid")
        keys = public_jwks.get("keys")
        for jwk in keys if isinstance(keys, list) else ():
            if (
                isinstance(jwk, Mapping)
                and jwk.get("kid") == kid
                and jwk.get("kty") == "EC"
                and jwk.get("crv") == "P-256"
                and jwk.get("use", "sig") == "sig"
                and jwk.get("alg", SIG_ALG) == SIG_ALG
            ):
                return public_key_from_jwk(jwk)
        raise PayloadInvalid("no verification key for this kid")

    return resolve


def verify_signed(
    token: str, public_jwks: dict[str, Any], *, expected_typ: str | None = None
) -> dict[str, Any]:
    """Verify a compact ES256 JWS against ``public_jwks`` (by kid) and return its claims.

    Only the signature, header and JSON shape are checked: time and audience
    claims are the caller's business. Any failure is ``PayloadInvalid``.
    """
    try:
        obj = jws.deserialize_compact(token, _resolver(public_jwks), registry=_JWS_REGISTRY)
        if expected_typ is not None and obj.protected.get("typ") != expected_typ:
            raise PayloadInvalid("unexpected JWS typ")
        claims = orjson.loads(obj.payload)
    except PayloadInvalid:
        raise
    except Exception as exc:  # any parser/crypto failure means "not a valid signature"
        raise PayloadInvalid("signature could not be verified") from exc
    if not isinstance(claims, dict):
        raise PayloadInvalid("JWS payload is not a JSON object")
    return claims
