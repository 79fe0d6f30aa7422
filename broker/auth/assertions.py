"""RFC 7523 client assertions (``private_key_jwt``): parse, verify, refuse replays."""

from __future__ import annotations

import base64
import binascii
import warnings
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from joserfc import jwt
from joserfc.errors import JoseError, SecurityWarning
from joserfc.jws import JWSRegistry
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from broker.auth.dialect import insert_if_absent
from broker.crypto.jwks import load_keyset
from broker.errors import OAuthError
from broker.models import Agency, Client, UsedAssertion

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
SIGNING_ALGORITHMS = ("ES256", "EdDSA", "Ed25519")
_ALGS_FOR_KEY = {("EC", "P-256"): ("ES256",), ("OKP", "Ed25519"): ("EdDSA", "Ed25519")}
MAX_ASSERTION_BYTES = 8192
# Built once: passing ``algorithms=`` to joserfc makes a registry per call.
_REGISTRIES = {algs: JWSRegistry(algorithms=list(algs)) for algs in _ALGS_FOR_KEY.values()}


def _invalid(detail: str) -> OAuthError:
    return OAuthError("invalid_client", detail, status_code=401)


def _b64json(segment: str) -> dict[str, Any]:
    try:
        raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
        value = orjson.loads(raw)
    except (binascii.Error, ValueError):
        raise _invalid("The client assertion is not a well-formed JWT.") from None
    if not isinstance(value, dict):
        raise _invalid("The client assertion is not a well-formed JWT.")
    return value


def _pick_key(jwks: dict[str, Any], kid: object) -> dict[str, Any]:
    keys = [k for k in jwks.get("keys", []) if isinstance(k, dict)]
    if kid is None:
        if len(keys) == 1:
            return keys[0]
        raise _invalid("The client assertion has no 'kid' and the client has several keys.")
    for key in keys:
        if key.get("kid") == kid:
            return key
    raise _invalid("The client assertion's 'kid' names no key registered for this client.")


async def authenticate_client(
    session: AsyncSession,
    assertion: str,
    *,
    token_endpoint: str,
    max_lifetime: int,
    skew: int,
) -> tuple[Client, Agency]:
    """Return the client and its agency, or raise ``invalid_client``; records the jti."""
    if len(assertion) > MAX_ASSERTION_BYTES or assertion.count(".") != 2:
        raise _invalid("The client assertion is not a compact JWS.")
    header_seg, claims_seg, _ = assertion.split(".")
    header = _b64json(header_seg)
    unverified = _b64json(claims_seg)
    alg = header.get("alg")
    if alg not in SIGNING_ALGORITHMS:
        raise _invalid("The client assertion's algorithm is not accepted (use ES256 or EdDSA).")
    client_id = unverified.get("iss")
    if not isinstance(client_id, str) or not 0 < len(client_id) <= 64:
        raise _invalid("The client assertion has no valid 'iss'.")

    row = (
        await session.execute(
            select(Client, Agency)
            .join(Agency, Agency.id == Client.agency_id)
            .where(Client.id == client_id)
        )
    ).first()
    if row is None:
        raise _invalid("Unknown client.")
    client, agency = row[0], row[1]

    jwk = _pick_key(client.jwks, header.get("kid"))
    allowed = _ALGS_FOR_KEY.get((str(jwk.get("kty")), str(jwk.get("crv"))), ())
    if alg not in allowed:
        raise _invalid("The client assertion's algorithm does not match the registered key.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SecurityWarning)  # "EdDSA" name, RFC 9864
            claims = jwt.decode(
                assertion, load_keyset({"keys": [jwk]}), registry=_REGISTRIES[allowed]
            ).claims
    except (JoseError, ValueError, TypeError, KeyError):
        raise _invalid("The client assertion's signature does not verify.") from None

    now = datetime.now(UTC)
    _check_claims(claims, client_id, token_endpoint, now, max_lifetime, skew)

    if client.status != "active":
        raise _invalid("This client has been withdrawn.")
    if agency.status != "active":
        raise _invalid("This client's agency is suspended.")

    expires_at = datetime.fromtimestamp(claims["exp"], UTC) + timedelta(seconds=skew)
    fresh = await insert_if_absent(
        session,
        UsedAssertion.__table__,  # type: ignore[arg-type]
        {"client_id": client_id, "jti": claims["jti"], "expires_at": expires_at},
    )
    if not fresh:
        raise _invalid("This client assertion was already used (jti replay).")
    return client, agency


def _check_claims(
    claims: dict[str, Any],
    client_id: str,
    token_endpoint: str,
    now: datetime,
    max_lifetime: int,
    skew: int,
) -> None:
    if claims.get("iss") != client_id or claims.get("sub") != client_id:
        raise _invalid("The client assertion's 'iss' and 'sub' must both be the client id.")
    aud = claims.get("aud")
    audiences = aud if isinstance(aud, list) else [aud]
    if token_endpoint not in audiences:
        raise _invalid(f"The client assertion's 'aud' must be the token endpoint {token_endpoint}.")
    exp = claims.get("exp")
    if not isinstance(exp, int | float) or isinstance(exp, bool):
        raise _invalid("The client assertion has no numeric 'exp'.")
    ts = now.timestamp()
    if exp <= ts - skew:
        raise _invalid("The client assertion has expired.")
    if exp > ts + max_lifetime + skew:
        raise _invalid(f"The client assertion's 'exp' is more than {max_lifetime} s ahead.")
    for name in ("nbf", "iat"):
        value = claims.get(name)
        if value is None:
            continue
        if not isinstance(value, int | float) or isinstance(value, bool) or value > ts + skew:
            raise _invalid(f"The client assertion's '{name}' is in the future.")
    jti = claims.get("jti")
    if not isinstance(jti, str) or not 0 < len(jti) <= 255:
        raise _invalid("The client assertion has no valid 'jti'.")
