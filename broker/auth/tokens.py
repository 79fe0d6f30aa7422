"""Short-lived access tokens: ES256 JWTs signed by the broker's token key.

Verification results are cached by token digest until the token expires, because
signature checks dominate a small request; the cache never answers the question
"is this client or agency still active?" — that is read from the database on
every request so a suspension acts at once.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, GuestProtocol

from broker.auth.roles import ROLE_SCOPES, Principal, Role
from broker.errors import Unauthenticated

ACCESS_TOKEN_TYP = "at+jwt"  # noqa: S105 - RFC 9068 media type, not a secret


def issue_access_token(
    *,
    key: ECKey,
    issuer: str,
    client_id: str,
    agency_id: str,
    role: Role,
    scopes: tuple[str, ...],
    lifetime: int,
) -> tuple[str, int]:
    now = int(time.time())
    claims = {
        "iss": issuer,
        "sub": client_id,
        "aud": issuer,
        "client_id": client_id,
        "agency_id": agency_id,
        "role": role.value,
        "scope": " ".join(scopes),
        "iat": now,
        "exp": now + lifetime,
        "jti": str(uuid.uuid4()),
    }
    header = {"alg": "ES256", "typ": ACCESS_TOKEN_TYP, "kid": key.kid}
    return jwt.encode(header, claims, key, algorithms=["ES256"]), lifetime


class AccessTokenVerifier:
    """Checks signature and claims once per token, then serves from a bounded cache.

    ``keys`` are the current token key and any retired ones (``broker keys rotate``):
    a token names its key by ``kid``, so tokens issued before a rotation stay valid
    until they expire. A token naming no known key is refused.
    """

    def __init__(self, keys: Sequence[ECKey], issuer: str, max_entries: int = 50_000) -> None:
        if not keys:
            raise ValueError("a verifier needs at least the current token key")
        self._keys = {str(key.kid): key for key in keys}
        self._issuer = issuer
        self._cache: OrderedDict[bytes, Principal] = OrderedDict()
        self._max = max_entries

    def verify(self, token: str) -> Principal:
        digest = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
        cached = self._cache.get(digest)
        now = datetime.now(UTC)
        if cached is not None:
            if cached.expires_at > now:
                return cached
            self._cache.pop(digest, None)
        principal = self._verify_uncached(token, now)
        self._cache[digest] = principal
        if len(self._cache) > self._max:
            self._cache.popitem(last=False)
        return principal

    def _verify_uncached(self, token: str, now: datetime) -> Principal:
        try:
            decoded = jwt.decode(token, self._key_named, algorithms=["ES256"])
        except (JoseError, ValueError, TypeError, KeyError):
            raise Unauthenticated("The access token is invalid.") from None
        header, claims = decoded.header, decoded.claims
        if header.get("typ") != ACCESS_TOKEN_TYP:
            raise Unauthenticated("The access token is invalid.")
        return _principal_from_claims(claims, self._issuer, now)

    def _key_named(self, obj: GuestProtocol) -> ECKey:
        return self._keys[obj.headers()["kid"]]  # KeyError: no such key (or no kid)


def _principal_from_claims(claims: dict[str, Any], issuer: str, now: datetime) -> Principal:
    try:
        exp = claims["exp"]
        iat = claims["iat"]
        role = Role(claims["role"])
        client_id = claims["sub"]
        agency_id = claims["agency_id"]
        scope = claims["scope"]
    except (KeyError, ValueError):
        raise Unauthenticated("The access token is invalid.") from None
    if (
        claims.get("iss") != issuer
        or claims.get("aud") != issuer
        or not isinstance(exp, int)
        or not isinstance(iat, int)
        or not isinstance(client_id, str)
        or not isinstance(agency_id, str)
        or not isinstance(scope, str)
        or claims.get("client_id") != client_id
    ):
        raise Unauthenticated("The access token is invalid.")
    ts = now.timestamp()
    if exp <= ts:
        raise Unauthenticated("The access token has expired.")
    if iat > ts + 60:
        raise Unauthenticated("The access token is not valid yet.")
    scopes = frozenset(scope.split()) & frozenset(ROLE_SCOPES[role])
    return Principal(
        client_id=client_id,
        agency_id=agency_id,
        role=role,
        scopes=scopes,
        expires_at=datetime.fromtimestamp(exp, UTC),
    )
