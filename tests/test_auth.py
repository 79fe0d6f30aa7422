"""Machine authentication: private_key_jwt client assertions and access tokens."""

from __future__ import annotations

import base64
import json
import time
import uuid
import warnings
from typing import Any

import authlib.deprecate  # noqa: F401 - installs its "always show" filter before ours
import httpx
import pytest
from authlib.oauth2.rfc7523 import PrivateKeyJWT
from authlib.oauth2.rfc7523.assertion import private_key_jwt_sign
from joserfc import jwt
from joserfc.jwk import ECKey, OctKey

from broker.sdk import ASSERTION_TYPE, make_client_assertion
from tests.support import BASE_URL, World, sig_keypair

with warnings.catch_warnings():
    # authlib 1.9 announces at import that its httpx integration moves to "httpx2";
    # the tests below use it as an agency's developer would today.
    warnings.filterwarnings("ignore", "The httpx module is deprecated", DeprecationWarning)
    from authlib.integrations.httpx_client import AsyncOAuth2Client

TOKEN_URL = f"{BASE_URL}/oauth/token"


async def _token_request(http: httpx.AsyncClient, assertion: str) -> httpx.Response:
    return await http.post(
        "/oauth/token",
        data={
            "grant_type": "client_credentials",
            "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": assertion,
        },
    )


def _signed(
    private_jwk: dict[str, Any], claims: dict[str, Any], header: dict[str, Any] | None = None
) -> str:
    key = ECKey.import_key(private_jwk)
    hdr = {"alg": "ES256", "kid": private_jwk["kid"]} | (header or {})
    return jwt.encode(hdr, claims, key, algorithms=["ES256"])


def _claims(client_id: str, **over: Any) -> dict[str, Any]:
    now = int(time.time())
    base = {
        "iss": client_id,
        "sub": client_id,
        "aud": TOKEN_URL,
        "iat": now,
        "exp": now + 60,
        "jti": str(uuid.uuid4()),
    }
    base.update(over)
    return base


async def _agency_client(world: World) -> tuple[str, dict[str, Any]]:
    agency = await world.agency("Mercy Clinic", "medical")
    client = await world.client(agency.id, "agency")
    return client.client_id, client.private_jwk


async def test_token_and_use(world: World) -> None:
    cid, priv = await _agency_client(world)
    resp = await _token_request(world.http, make_client_assertion(cid, priv, TOKEN_URL))
    assert resp.status_code == 200
    body = resp.json()
    assert body["token_type"] == "Bearer"
    assert 0 < body["expires_in"] <= 900
    assert "disclosures:request" in body["scope"].split()
    assert resp.headers["cache-control"] == "no-store"
    claims = jwt.decode(body["access_token"], _broker_token_key(world)).claims
    assert claims["sub"] == cid and claims["role"] == "agency"


def _broker_token_key(world: World) -> Any:
    return world.rt.keys.token_signing


async def test_authlib_private_key_jwt_client(world: World, app: Any) -> None:
    """An agency developer uses authlib's own httpx OAuth client and PrivateKeyJWT."""
    cid, priv = await _agency_client(world)

    # authlib has no type information: its class is Any to mypy.
    class ShortLivedPrivateKeyJWT(PrivateKeyJWT):  # type: ignore[misc]  # exp <= 5 min
        def sign(self, auth: Any, token_endpoint: str) -> str:
            assertion: str = private_key_jwt_sign(
                ECKey.import_key(priv),
                client_id=auth.client_id,
                token_endpoint=token_endpoint,
                alg="ES256",
                header={"kid": priv["kid"]},
                expires_in=120,
            )
            return assertion

    async with AsyncOAuth2Client(
        client_id=cid,
        client_secret=priv,
        token_endpoint_auth_method=ShortLivedPrivateKeyJWT(TOKEN_URL),
        transport=httpx.ASGITransport(app=app),
        base_url=BASE_URL,
    ) as oauth:
        token = await oauth.fetch_token(TOKEN_URL, grant_type="client_credentials")
        assert token["token_type"] == "Bearer"
        resp = await oauth.get(f"{BASE_URL}/v1/agencies")
        assert resp.status_code == 403  # authenticated, but an agency is not an admin


async def test_ed25519_client_key(world: World) -> None:
    agency = await world.agency("Northside Legal Aid", "legal_aid")
    private, public = sig_keypair("Ed25519")
    assert world.admin is not None
    resp = await world.admin.post(
        "/v1/clients", json={"agency_id": agency.id, "role": "agency", "name": "ed", "jwks": public}
    )
    assert resp.status_code == 201, resp.text
    assertion = make_client_assertion(resp.json()["client_id"], private, TOKEN_URL)
    assert (await _token_request(world.http, assertion)).status_code == 200


async def test_replayed_assertion_refused(world: World) -> None:
    cid, priv = await _agency_client(world)
    assertion = make_client_assertion(cid, priv, TOKEN_URL)
    assert (await _token_request(world.http, assertion)).status_code == 200
    again = await _token_request(world.http, assertion)
    assert again.status_code == 401
    assert again.json()["error"] == "invalid_client"
    assert "replay" in again.json()["detail"]


@pytest.mark.parametrize(
    ("case", "over"),
    [
        ("wrong aud", {"aud": "http://elsewhere.test/oauth/token"}),
        ("expired", {"exp": int(time.time()) - 600, "iat": int(time.time()) - 660}),
        ("exp too far", {"exp": int(time.time()) + 3600}),
        ("iss != sub", {"sub": "someone-else"}),
        ("no jti", {"jti": None}),
        ("future nbf", {"nbf": int(time.time()) + 600}),
    ],
)
async def test_bad_claims_refused(world: World, case: str, over: dict[str, Any]) -> None:
    cid, priv = await _agency_client(world)
    claims = {k: v for k, v in _claims(cid, **over).items() if v is not None}
    resp = await _token_request(world.http, _signed(priv, claims))
    assert resp.status_code == 401, case
    assert resp.headers["content-type"] == "application/problem+json"


async def test_unknown_kid_refused(world: World) -> None:
    cid, priv = await _agency_client(world)
    resp = await _token_request(world.http, _signed(priv, _claims(cid), {"kid": "nowhere"}))
    assert resp.status_code == 401
    assert "kid" in resp.json()["detail"]


async def test_key_of_another_client_refused(world: World) -> None:
    cid, _ = await _agency_client(world)
    other_private, _ = sig_keypair()
    resp = await _token_request(
        world.http, _signed(other_private, _claims(cid), {"kid": other_private["kid"]})
    )
    assert resp.status_code == 401


def _b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


async def test_alg_none_refused(world: World) -> None:
    cid, _ = await _agency_client(world)
    token = f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{_b64(_claims(cid))}."
    resp = await _token_request(world.http, token)
    assert resp.status_code == 401


async def test_hs256_with_public_key_refused(world: World) -> None:
    """The classic confusion attack: HMAC keyed with the client's *public* key."""
    cid, priv = await _agency_client(world)
    public = {k: v for k, v in priv.items() if k != "d"}
    secret = OctKey.import_key(json.dumps(public).encode())
    token = jwt.encode(
        {"alg": "HS256", "kid": priv["kid"]}, _claims(cid), secret, algorithms=["HS256"]
    )
    resp = await _token_request(world.http, token)
    assert resp.status_code == 401


async def test_unknown_client_and_bad_grant(world: World) -> None:
    _, priv = await _agency_client(world)
    resp = await _token_request(world.http, _signed(priv, _claims(str(uuid.uuid4()))))
    assert resp.status_code == 401
    bad = await world.http.post("/oauth/token", data={"grant_type": "password"})
    assert bad.status_code == 400
    assert bad.json()["error"] == "unsupported_grant_type"
    missing = await world.http.post("/oauth/token", data={})
    assert missing.status_code == 422
    assert missing.headers["content-type"] == "application/problem+json"


async def test_suspended_agency_refused_at_once(world: World) -> None:
    agency = await world.agency("Eastside Police DV Unit", "law_enforcement")
    officer = await world.client(agency.id, "agency")
    token = await officer.token()
    headers = {"Authorization": f"Bearer {token}"}
    probe = {"subject_ref": "PD-1", "category": "shelter", "purpose": "safety_planning"}
    before = await world.http.post("/v1/subjects", headers=headers, json={})
    assert before.status_code == 403  # authenticated (wrong role), so the token is good
    assert world.admin is not None
    r = await world.admin.patch(f"/v1/agencies/{agency.id}", json={"status": "suspended"})
    assert r.status_code == 200 and r.json()["status"] == "suspended"
    after = await world.http.post("/v1/subjects", headers=headers, json=probe)
    assert after.status_code == 401
    assert "suspended" in after.json()["detail"]
    fresh = await _token_request(
        world.http, make_client_assertion(officer.client_id, officer.private_jwk, TOKEN_URL)
    )
    assert fresh.status_code == 401


async def test_withdrawn_client_refused_at_once(world: World) -> None:
    agency = await world.agency()
    advocate = await world.client(agency.id, "advocate")
    assert (await advocate.post("/v1/subjects", json={})).status_code == 201
    assert world.admin is not None
    assert (await world.admin.delete(f"/v1/clients/{advocate.client_id}")).status_code == 200
    resp = await advocate.post("/v1/subjects", json={})
    assert resp.status_code == 401


async def test_bad_bearer_tokens(world: World) -> None:
    assert (await world.http.get("/v1/agencies")).status_code == 401
    assert (
        await world.http.get("/v1/agencies", headers={"Authorization": "Bearer x.y.z"})
    ).status_code == 401
    assert world.admin is not None
    token = await world.admin.token()
    head, body, sig = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(body + "=="))
    claims["role"] = "admin"
    claims["sub"] = "forged"
    forged = f"{head}.{_b64(claims)}.{sig}"
    resp = await world.http.get("/v1/agencies", headers={"Authorization": f"Bearer {forged}"})
    assert resp.status_code == 401
    assert resp.headers["www-authenticate"].startswith("Bearer")


async def test_discovery_documents(world: World) -> None:
    meta = (await world.http.get("/.well-known/oauth-authorization-server")).json()
    assert meta["token_endpoint"] == TOKEN_URL
    assert meta["token_endpoint_auth_methods_supported"] == ["private_key_jwt"]
    jwks = (await world.http.get("/.well-known/jwks.json")).json()
    assert jwks["keys"] and all("d" not in k for k in jwks["keys"])
