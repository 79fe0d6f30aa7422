"""A small client for agencies and advocates: client assertions and authenticated calls.

Nobody should hand-craft JWTs. ``BrokerClient`` signs an RFC 7523 assertion with
the agency's private key (which never leaves the agency), trades it for an access
token and renews it before expiry. The demo, the tests and the benchmarks use it.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
from joserfc import jwt
from joserfc.jwk import ECKey, OKPKey

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


def load_private_jwk(path: str | Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(Path(path).read_text())
    return data


def make_client_assertion(
    client_id: str, private_jwk: dict[str, Any], token_endpoint: str, lifetime: int = 60
) -> str:
    """A single-use assertion: ``iss``=``sub``=client id, ``aud``=token endpoint, short ``exp``."""
    key: ECKey | OKPKey
    if private_jwk.get("kty") == "OKP":
        key, alg = OKPKey.import_key(private_jwk), "Ed25519"  # RFC 9864 fully-specified name
    else:
        key, alg = ECKey.import_key(private_jwk), "ES256"
    now = int(time.time())
    claims = {
        "iss": client_id,
        "sub": client_id,
        "aud": token_endpoint,
        "iat": now,
        "exp": now + lifetime,
        "jti": str(uuid.uuid4()),
    }
    header = {"alg": alg, "typ": "JWT"}
    if private_jwk.get("kid"):
        header["kid"] = private_jwk["kid"]
    return jwt.encode(header, claims, key, algorithms=[alg])


class BrokerClient:
    """Synchronous or async use through the wrapped httpx client (``http``)."""

    def __init__(
        self,
        base_url: str,
        client_id: str,
        private_jwk: dict[str, Any],
        *,
        token_endpoint: str | None = None,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.client_id = client_id
        self.private_jwk = private_jwk
        self.token_endpoint = token_endpoint or f"{self.base_url}/oauth/token"
        self.http = http or httpx.AsyncClient(base_url=self.base_url, timeout=10.0, trust_env=False)
        self._token: str | None = None
        self._token_expires = 0.0

    async def fetch_token(self) -> str:
        assertion = make_client_assertion(self.client_id, self.private_jwk, self.token_endpoint)
        resp = await self.http.post(
            "/oauth/token",
            data={
                "grant_type": "client_credentials",
                "client_assertion_type": ASSERTION_TYPE,
                "client_assertion": assertion,
            },
        )
        if resp.status_code != 200:
            raise RuntimeError(f"token request refused ({resp.status_code}): {resp.text}")
        body = resp.json()
        self._token = str(body["access_token"])
        self._token_expires = time.time() + int(body["expires_in"]) - 15
        return self._token

    async def token(self) -> str:
        if self._token is None or time.time() >= self._token_expires:
            return await self.fetch_token()
        return self._token

    async def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        headers = dict(kwargs.pop("headers", {}) or {})
        headers["Authorization"] = f"Bearer {await self.token()}"
        return await self.http.request(method, path, headers=headers, **kwargs)

    async def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return await self.request("GET", path, **kwargs)

    async def post(self, path: str, **kwargs: Any) -> httpx.Response:
        return await self.request("POST", path, **kwargs)

    async def patch(self, path: str, **kwargs: Any) -> httpx.Response:
        return await self.request("PATCH", path, **kwargs)

    async def delete(self, path: str, **kwargs: Any) -> httpx.Response:
        return await self.request("DELETE", path, **kwargs)

    async def aclose(self) -> None:
        await self.http.aclose()
