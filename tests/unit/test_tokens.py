"""Access-token verification across a key rotation: which keys a token may name, and for how long."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

import pytest
from joserfc import jwt
from joserfc.jwk import ECKey

from broker.auth.roles import Role
from broker.auth.tokens import MAX_TOKEN_LIFETIME, AccessTokenVerifier, issue_access_token
from broker.crypto.keystore import RETIRED_TOKEN_TRUST_SECONDS, RetiredKey
from broker.errors import Unauthenticated
from broker.settings import Settings

ISSUER = "https://broker.test"


def _key() -> ECKey:
    key = ECKey.generate_key("P-256", private=True)
    key.ensure_kid()
    return key


def _token(key: ECKey, lifetime: int = 300) -> str:
    token, _ = issue_access_token(
        key=key,
        issuer=ISSUER,
        client_id="c1",
        agency_id="a1",
        role=Role.agency,
        scopes=("disclosures:request",),
        lifetime=lifetime,
    )
    return token


def test_tokens_of_the_current_and_of_a_trusted_retired_key_verify() -> None:
    current, old = _key(), _key()
    until = time.time() + 60
    verifier = AccessTokenVerifier(current, ISSUER, retired=[RetiredKey(old, 1, until)])
    assert verifier.verify(_token(current)).client_id == "c1"
    by_old = verifier.verify(_token(old))
    # Cached no longer than the retired key is trusted, though the token says 300 s.
    assert by_old.expires_at == datetime.fromtimestamp(until, UTC)


@pytest.mark.parametrize("case", ["untrusted-retired", "unknown-kid", "no-kid"])
def test_tokens_naming_no_trusted_key_are_refused(case: str) -> None:
    current, old = _key(), _key()
    verifier = AccessTokenVerifier(current, ISSUER, retired=[RetiredKey(old, 1, time.time() - 1)])
    if case == "untrusted-retired":
        token = _token(old)
    else:
        stranger = _key()
        header: dict[str, Any] = {"alg": "ES256", "typ": "at+jwt"}
        if case == "unknown-kid":
            header["kid"] = stranger.kid
        claims = jwt.decode(_token(current), current).claims
        token = jwt.encode(header, claims, stranger)
    with pytest.raises(Unauthenticated):
        verifier.verify(token)


def test_a_token_living_longer_than_any_the_broker_issues_is_refused() -> None:
    key = _key()
    verifier = AccessTokenVerifier(key, ISSUER)
    assert verifier.verify(_token(key, lifetime=MAX_TOKEN_LIFETIME))
    with pytest.raises(Unauthenticated):
        verifier.verify(_token(key, lifetime=MAX_TOKEN_LIFETIME + 1))


def test_the_trust_window_covers_the_longest_token_and_clock_skew() -> None:
    fields = Settings.model_fields
    longest = max(m.le for m in fields["token_lifetime_seconds"].metadata if hasattr(m, "le"))
    skew = max(m.le for m in fields["clock_skew_seconds"].metadata if hasattr(m, "le"))
    assert longest == MAX_TOKEN_LIFETIME
    assert longest + skew <= RETIRED_TOKEN_TRUST_SECONDS


def test_a_token_naming_an_unknown_key_asks_for_the_folder_once() -> None:
    """Only a kid this verifier does not know asks (``on_unknown_kid``); when the keys
    changed the token is checked again, and a bad signature is refused either way."""
    current, rotated = _key(), _key()
    verifier = AccessTokenVerifier(current, ISSUER)
    asked: list[str] = []

    def look() -> bool:
        asked.append("asked")
        verifier.use_keys(rotated, [RetiredKey(current, 1, time.time() + 60)])
        return True

    verifier.on_unknown_kid = look
    assert verifier.verify(_token(current)).client_id == "c1"
    forged = jwt.encode({"alg": "ES256", "typ": "at+jwt", "kid": current.kid}, {}, _key())
    with pytest.raises(Unauthenticated):
        verifier.verify(forged)  # a known kid, a bad signature: nothing to look for
    assert asked == []
    assert verifier.verify(_token(rotated)).client_id == "c1"
    assert asked == ["asked"]
    assert verifier.verify(_token(current)).client_id == "c1"  # now a retired key's


@pytest.mark.parametrize(
    "token",
    ["", ".", "x.y.z", "e30.e30.", "W10.e30.x", "eyJraWQiOjF9.e30.x", "\udcff.a.b", "é.a.b"],
    ids=[
        "empty",
        "dot",
        "not-base64-json",
        "no-kid",
        "array",
        "kid-number",
        "surrogate",
        "non-ascii",
    ],
)
def test_a_header_without_a_readable_kid_asks_for_nothing(token: str) -> None:
    verifier = AccessTokenVerifier(_key(), ISSUER)
    verifier.on_unknown_kid = lambda: pytest.fail("asked")
    with pytest.raises(Unauthenticated):
        verifier.verify(token)


def test_a_failing_look_at_the_folder_refuses_the_token() -> None:
    verifier = AccessTokenVerifier(_key(), ISSUER)

    def broken() -> bool:
        raise RuntimeError("key folder unreadable")

    verifier.on_unknown_kid = broken
    with pytest.raises(Unauthenticated):
        verifier.verify(_token(_key()))
