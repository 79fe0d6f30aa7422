"""A real ``broker serve`` process on 127.0.0.1, and a synchronous caller for it."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import create_async_engine

from broker.models import LedgerEntry, LedgerPending
from broker.sdk import ASSERTION_TYPE, make_client_assertion
from tests.support import sig_keypair

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Served:
    url: str
    env: dict[str, str]
    log: Path

    def cli(self, *args: str) -> str:
        done = subprocess.run(  # noqa: S603
            [str(BIN / "broker"), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@contextlib.contextmanager
def serve_broker(
    database_url: str, tmp_path: Path, extra_env: dict[str, str] | None = None
) -> Iterator[Served]:
    """Start ``broker serve`` on a free port; stop it (and only it) afterwards."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("BROKER_")},
        "BROKER_ENVIRONMENT": "dev",
        "BROKER_DATABASE_URL": database_url,
        "BROKER_KEY_DIR": str(tmp_path / "broker-keys"),
        "BROKER_PUBLIC_URL": url,
        **(extra_env or {}),
    }
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(  # noqa: S603
            [str(BIN / "broker"), "serve", "--port", str(port), "--log-level", "warning"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    served = Served(url, env, log)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{url}/.well-known/jwks.json", timeout=0.5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"broker serve did not come up:\n{served.log_text()}")
            time.sleep(0.1)
        yield served
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@dataclass
class SyncClient:
    """A client credential and its access token, for synchronous callers."""

    url: str
    client_id: str
    private_jwk: dict[str, Any]
    _token: str = ""
    _expires: float = 0.0
    http: httpx.Client = field(default_factory=lambda: httpx.Client(timeout=15.0))

    def token(self) -> str:
        if not self._token or time.monotonic() >= self._expires:
            assertion = make_client_assertion(
                self.client_id, self.private_jwk, f"{self.url}/oauth/token"
            )
            resp = self.http.post(
                f"{self.url}/oauth/token",
                data={
                    "grant_type": "client_credentials",
                    "client_assertion_type": ASSERTION_TYPE,
                    "client_assertion": assertion,
                },
            )
            assert resp.status_code == 200, resp.text
            body = resp.json()
            self._token = str(body["access_token"])
            self._expires = time.monotonic() + int(body["expires_in"]) - 30
        return self._token

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.token()}"}
        return self.http.request(method, f"{self.url}{path}", headers=headers, **kwargs)

    def post(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.request("POST", path, **kwargs)

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.request("GET", path, **kwargs)


def bootstrap_admin(served: Served, tmp_path: Path) -> SyncClient:
    """The first admin, made from the shell as the README says."""
    private, public = sig_keypair()
    jwks = tmp_path / "ops.sig.jwks.json"
    jwks.write_text(json.dumps(public))
    client_id = served.cli(
        "clients", "add", "--role", "admin", "--name", "ops", "--jwks", str(jwks)
    ).strip()
    return SyncClient(served.url, client_id, private)


def count_ledger_rows_at(database_url: str) -> tuple[int, int]:
    """(``ledger_entries``, ``ledger_pending``) rows, read from outside the server process."""

    async def count() -> tuple[int, int]:
        engine = create_async_engine(database_url)
        try:
            async with engine.connect() as conn:
                stored = await conn.scalar(select(func.count()).select_from(LedgerEntry))
                pending = await conn.scalar(select(func.count()).select_from(LedgerPending))
        finally:
            await engine.dispose()
        return int(stored or 0), int(pending or 0)

    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(lambda: asyncio.run(count())).result()
