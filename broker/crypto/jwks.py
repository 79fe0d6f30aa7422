"""Validation of the public key sets agencies register, and cached key import.

An agency's JWKS decides where survivors' data can be decrypted and whose signatures
the broker accepts, so registration is strict: only small, modern, public EC/OKP
keys with an explicit ``kid`` get in, and everything is normalised to the members
the broker actually uses. Disclosure code later imports keys through a cache keyed
by the key's public values, so the hot path never re-parses a JWK.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping
from functools import lru_cache
from typing import Any, Literal

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, KeySet, OKPKey

__all__ = [
    "ENC_ALG",
    "MAX_KEYS",
    "JWKSInvalid",
    "KeyUse",
    "load_keyset",
    "public_key_from_jwk",
    "select_encryption_key",
    "validate_public_jwks",
]

KeyUse = Literal["enc", "sig"]

#: The only key-management algorithm the broker encrypts to.
ENC_ALG = "ECDH-ES+A256KW"
MAX_KEYS = 10
MAX_KID_LENGTH = 128

PRIVATE_MEMBERS = ("d", "p", "q", "dp", "dq", "qi", "oth", "k")
PUBLIC_MEMBERS = ("kty", "crv", "x", "y", "kid", "use", "alg")

# (kty, crv) pairs accepted per use, and the "alg" values each may declare.
_ALLOWED: dict[KeyUse, dict[tuple[str, str], frozenset[str]]] = {
    "enc": {
        ("OKP", "X25519"): frozenset({ENC_ALG}),
        ("EC", "P-256"): frozenset({ENC_ALG}),
    },
    "sig": {
        ("OKP", "Ed25519"): frozenset({"EdDSA", "Ed25519"}),
        ("EC", "P-256"): frozenset({"ES256"}),
    },
}

_B64URL = re.compile(r"[A-Za-z0-9_-]+")
_COORDINATE_BYTES = 32  # P-256, X25519 and Ed25519 all use 32-byte coordinates

PublicKey = ECKey | OKPKey


class JWKSInvalid(ValueError):
    """A registered key set breaks a rule; the message names the key and the rule."""


def _b64url_decode(value: str) -> bytes:
    """Strict base64url (no padding, no stray characters), as RFC 7515 requires."""
    if not _B64URL.fullmatch(value) or len(value) % 4 == 1:
        raise ValueError("not base64url")
    try:
        return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except (binascii.Error, ValueError) as exc:  # pragma: no cover - regex guards this
        raise ValueError("not base64url") from exc


def _check_kid(where: str, kid: object) -> str:
    if not isinstance(kid, str) or not kid:
        raise JWKSInvalid(f"{where}: 'kid' is required (a non-empty string)")
    if len(kid) > MAX_KID_LENGTH:
        raise JWKSInvalid(f"{where}: 'kid' is longer than {MAX_KID_LENGTH} characters")
    if not all(0x20 <= ord(ch) <= 0x7E for ch in kid):
        raise JWKSInvalid(f"{where}: 'kid' must be printable ASCII")
    return kid


def _check_coordinate(where: str, name: str, value: object) -> str:
    if not isinstance(value, str):
        raise JWKSInvalid(f"{where}: '{name}' is required (a base64url string)")
    try:
        raw = _b64url_decode(value)
    except ValueError:
        raise JWKSInvalid(f"{where}: '{name}' is not valid base64url") from None
    if len(raw) != _COORDINATE_BYTES:
        raise JWKSInvalid(f"{where}: '{name}' must encode {_COORDINATE_BYTES} bytes")
    return value


def _validate_key(where: str, raw: object, use: KeyUse) -> dict[str, Any]:
    if not isinstance(raw, Mapping):
        raise JWKSInvalid(f"{where}: each key must be a JSON object")
    for member in PRIVATE_MEMBERS:
        if member in raw:
            raise JWKSInvalid(
                f"{where}: private key material ('{member}') is not accepted; "
                "register the public key only"
            )
    kty = raw.get("kty")
    if kty in ("oct", "RSA"):
        raise JWKSInvalid(f"{where}: kty '{kty}' is not accepted; use EC P-256 or OKP keys")
    if not isinstance(kty, str):
        raise JWKSInvalid(f"{where}: 'kty' is required")
    crv = raw.get("crv")
    if not isinstance(crv, str):
        raise JWKSInvalid(f"{where}: 'crv' is required")
    allowed = _ALLOWED[use]
    if (kty, crv) not in allowed:
        accepted = ", ".join(f"{k} {c}" for k, c in allowed)
        raise JWKSInvalid(f"{where}: {kty} {crv} cannot be used for '{use}'; accepted: {accepted}")
    kid = _check_kid(where, raw.get("kid"))

    declared_use = raw.get("use")
    if declared_use is not None and declared_use != use:
        raise JWKSInvalid(f"{where}: 'use' is {declared_use!r} but a '{use}' key is required")
    alg = raw.get("alg")
    if alg is not None and alg not in allowed[(kty, crv)]:
        expected = " or ".join(sorted(allowed[(kty, crv)]))
        raise JWKSInvalid(f"{where}: 'alg' {alg!r} does not fit a {kty} {crv} key ({expected})")

    out: dict[str, Any] = {"kty": kty, "crv": crv, "x": _check_coordinate(where, "x", raw.get("x"))}
    if kty == "EC":
        out["y"] = _check_coordinate(where, "y", raw.get("y"))
    elif "y" in raw:
        raise JWKSInvalid(f"{where}: an OKP key has no 'y' member")
    out["kid"] = kid
    if declared_use is not None:
        out["use"] = declared_use
    if alg is not None:
        out["alg"] = alg

    try:
        key = public_key_from_jwk(out)
    except (JoseError, ValueError, TypeError):
        raise JWKSInvalid(f"{where}: not a valid {kty} {crv} public key") from None
    if crv == "X25519":
        _check_x25519_point(where, key)
    return out


def _check_x25519_point(where: str, key: PublicKey) -> None:
    """Refuse low-order X25519 points: every agreement with them yields the zero secret."""
    public = key.public_key
    assert isinstance(public, X25519PublicKey)
    try:
        X25519PrivateKey.generate().exchange(public)
    except ValueError:
        raise JWKSInvalid(f"{where}: not a valid OKP X25519 public key") from None


def validate_public_jwks(jwks: object, use: KeyUse) -> dict[str, Any]:
    """Check an agency-supplied JWKS for ``use`` and return it normalised.

    Raises ``JWKSInvalid`` naming the first offending key. The result holds only
    kty, crv, x, y, kid, use and alg, so nothing unexpected is ever stored or served.
    """
    if not isinstance(jwks, Mapping):
        raise JWKSInvalid("a JWKS must be a JSON object with a 'keys' list")
    keys = jwks.get("keys")
    if not isinstance(keys, list):
        raise JWKSInvalid("a JWKS must have a 'keys' list")
    if not keys:
        raise JWKSInvalid("'keys' is empty; register at least one key")
    if len(keys) > MAX_KEYS:
        raise JWKSInvalid(f"'keys' has {len(keys)} keys; at most {MAX_KEYS} are accepted")
    normalised: list[dict[str, Any]] = []
    seen: set[str] = set()
    for index, raw in enumerate(keys):
        key = _validate_key(f"keys[{index}]", raw, use)
        if key["kid"] in seen:
            raise JWKSInvalid(f"keys[{index}]: duplicate kid {key['kid']!r}")
        seen.add(key["kid"])
        normalised.append(key)
    return {"keys": normalised}


@lru_cache(maxsize=1024)
def _import_public(kty: str, crv: str, x: str, y: str | None, kid: str | None) -> PublicKey:
    data: dict[str, Any] = {"kty": kty, "crv": crv, "x": x}
    if y is not None:
        data["y"] = y
    if kid is not None:
        data["kid"] = kid
    if kty == "EC":
        return ECKey.import_key(data)
    if kty == "OKP":
        return OKPKey.import_key(data)
    raise ValueError(f"unsupported kty {kty!r}")


def public_key_from_jwk(jwk: Mapping[str, Any]) -> PublicKey:
    """Import a public EC/OKP JWK, cached by (kty, crv, x, y, kid).

    Only public members feed the import, so a private JWK yields its public half.
    Cached key objects are shared: callers must not mutate them.
    """
    kty, crv, x, y, kid = (jwk.get(m) for m in ("kty", "crv", "x", "y", "kid"))
    if not (isinstance(kty, str) and isinstance(crv, str) and isinstance(x, str)):
        raise ValueError("a JWK needs string 'kty', 'crv' and 'x'")
    if not (y is None or isinstance(y, str)) or not (kid is None or isinstance(kid, str)):
        raise ValueError("'y' and 'kid' must be strings")
    return _import_public(kty, crv, x, y, kid)


def load_keyset(jwks: Mapping[str, Any]) -> KeySet:
    """Import a (validated) JWKS as a joserfc ``KeySet`` of public keys."""
    keys = jwks.get("keys")
    if not isinstance(keys, list) or not keys:
        raise JWKSInvalid("a JWKS must have a non-empty 'keys' list")
    try:
        return KeySet([public_key_from_jwk(k) for k in keys])
    except (JoseError, ValueError, TypeError, AttributeError):
        raise JWKSInvalid("the JWKS holds a key that cannot be imported") from None


def _usable_for_enc(jwk: Mapping[str, Any]) -> bool:
    pair = (jwk.get("kty"), jwk.get("crv"))
    return (
        pair in _ALLOWED["enc"]
        and jwk.get("use", "enc") == "enc"
        and jwk.get("alg", ENC_ALG) == ENC_ALG
        and isinstance(jwk.get("kid"), str)
        and not any(m in jwk for m in PRIVATE_MEMBERS)
    )


def select_encryption_key(jwks: Mapping[str, Any]) -> tuple[str, PublicKey]:
    """Return ``(kid, key)`` for the first key in ``jwks`` usable with ECDH-ES+A256KW.

    Order decides: an agency rotating keys lists the new key first.
    """
    keys = jwks.get("keys")
    if isinstance(keys, list):
        for jwk in keys:
            if isinstance(jwk, Mapping) and _usable_for_enc(jwk):
                try:
                    return jwk["kid"], public_key_from_jwk(jwk)
                except (JoseError, ValueError, TypeError):
                    continue
    raise JWKSInvalid("the JWKS has no key usable for encryption (X25519 or P-256, ECDH-ES+A256KW)")
