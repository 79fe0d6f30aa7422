"""Short-lived access tokens: ES256 JWTs signed by the broker's token key.

Verification results are cached by token digest until the token expires, because
signature checks dominate a small request; the cache never answers the question
"is this client or agency still active?" — that is read from the database on
every request so a suspension acts at once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from joserfc import jws, jwt
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, GuestProtocol

from broker.auth.roles import ROLE_SCOPES, Principal, Role
from broker.crypto.keystore import RetiredKey
from broker.crypto.randomness import random_id
from broker.errors import Unauthenticated

ACCESS_TOKEN_TYP = "at+jwt"  # noqa: S105 - RFC 9068 media type, not a secret
#: No access token the broker issues lives longer (the settings' cap); none is accepted.
MAX_TOKEN_LIFETIME = 900


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
        "jti": random_id(),
    }
    header = {"alg": "ES256", "typ": ACCESS_TOKEN_TYP, "kid": key.kid}
    return jwt.encode(header, claims, key, algorithms=["ES256"]), lifetime


class AccessTokenVerifier:
    """Checks signature and claims once per token, then serves from a bounded cache.

    A token names its key by ``kid``: the current token key, or a ``retired`` one
    (``broker keys rotate``) while it is still trusted, so tokens issued before a
    rotation keep working until they expire. A token naming no such key is refused,
    and one verified by a retired key is cached no longer than that key is trusted.

    ``on_unknown_kid`` lets the runtime look for a key this process has not loaded
    yet (another process rotated the folder's key and signed with the new one); it
    returns True when the keys changed (``use_keys``), and the token is tried again.
    """

    def __init__(
        self,
        key: ECKey,
        issuer: str,
        retired: Sequence[RetiredKey] = (),
        max_entries: int = 50_000,
    ) -> None:
        self._issuer = issuer
        self._cache: OrderedDict[bytes, Principal] = OrderedDict()
        self._max = max_entries
        self.on_unknown_kid: Callable[[], bool] | None = None
        self.use_keys(key, retired)

    def use_keys(self, key: ECKey, retired: Sequence[RetiredKey] = ()) -> None:
        """Verify with these keys from now on, forgetting every token verified before:
        a key no longer trusted (its retired file deleted after a compromise) must not
        go on vouching for tokens from the cache."""
        self._key = key
        self._retired = {str(r.key.kid): r for r in retired if r.key.kid != key.kid}
        self._cache.clear()

    def verify(self, token: str) -> Principal:
        digest = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
        cached = self._cache.get(digest)
        now = datetime.now(UTC)
        if cached is not None:
            if cached.expires_at > now:
                return cached
            self._cache.pop(digest, None)
        try:
            principal = self._verify_uncached(token, now)
        except Unauthenticated:
            if not self._found_new_key_for(token):
                raise
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
        principal = _principal_from_claims(claims, self._issuer, now)
        retired = self._retired.get(header["kid"])
        if retired is not None and retired.trusted_until is not None:
            until = datetime.fromtimestamp(retired.trusted_until, UTC)
            principal = dataclasses.replace(principal, expires_at=min(principal.expires_at, until))
        return principal

    def _found_new_key_for(self, token: str) -> bool:
        """Whether the token names a key this verifier does not know and a look at the
        key folder (``on_unknown_kid``) changed the keys."""
        kid = _header_kid(token)
        if kid is None or kid == self._key.kid or kid in self._retired or not self.on_unknown_kid:
            return False
        try:
            return self.on_unknown_kid()
        except Exception:  # a look at the folder that fails must refuse, never answer 500
            return False

    def _key_named(self, obj: GuestProtocol) -> ECKey:
        """The key the header's kid names; KeyError when none is (or no longer) trusted."""
        kid = obj.headers()["kid"]
        if kid == self._key.kid:
            return self._key
        retired = self._retired[kid]
        if not retired.trusted(time.time()):
            raise KeyError(kid)
        return retired.key


def _header_kid(token: str) -> str | None:
    """The ``kid`` a compact JWS header claims, unverified; None if there is none."""
    try:
        kid = jws.extract_compact(token.encode("utf-8", "surrogatepass")).headers().get("kid")
    except (JoseError, ValueError, TypeError):
        return None
    return kid if isinstance(kid, str) else None


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
    if exp - iat > MAX_TOKEN_LIFETIME:
        raise Unauthenticated("The access token is invalid.")
    scopes = frozenset(scope.split()) & frozenset(ROLE_SCOPES[role])
    return Principal(
        client_id=client_id,
        agency_id=agency_id,
        role=role,
        scopes=scopes,
        expires_at=datetime.fromtimestamp(exp, UTC),
    )
