"""Real ``broker serve`` processes on 127.0.0.1 for walkthrough, fuzz, multi-process and
fault tests.

Every process started here is bounded: it is terminated (then killed) when its
context exits, start-up gives up after a deadline, and its stderr goes to a file
so that a process logging through a long outage never blocks on a full pipe.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import create_async_engine

from broker.models import LedgerEntry, LedgerPending
from broker.sdk import ASSERTION_TYPE, BrokerClient, make_client_assertion
from tests.support import sig_keypair

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def broker_env(database_url: str, key_dir: Path, public_url: str, **extra: str) -> dict[str, str]:
    """Environment shared by every process of one deployment (same keys, same issuer)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    env.update(
        {
            "BROKER_ENVIRONMENT": "dev",
            "BROKER_DATABASE_URL": database_url,
            "BROKER_KEY_DIR": str(key_dir),
            "BROKER_PUBLIC_URL": public_url,
            "BROKER_RATE_LIMIT_PER_SECOND": "0",
            "BROKER_SEQUENCER_INTERVAL_SECONDS": "0.02",
            "BROKER_DENIAL_QUANTUM_MS": "1",
        }
    )
    env.update(extra)
    return env


def run_cli(env: dict[str, str], *args: str) -> str:
    done = subprocess.run(  # noqa: S603
        [str(BIN / "broker"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


class BrokerProcess:
    """One ``broker serve`` on a loopback port; restartable on the same port, killable."""

    def __init__(
        self,
        env: dict[str, str],
        port: int | None = None,
        log: Path | None = None,
        log_level: str = "warning",
    ) -> None:
        self.env = env
        self.log_level = log_level
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        if log is None:
            fd, name = tempfile.mkstemp(prefix="broker-serve-", suffix=".log")
            os.close(fd)
            log = Path(name)
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(  # noqa: S603
                [
                    str(BIN / "broker"),
                    "serve",
                    "--port",
                    str(self.port),
                    "--log-level",
                    self.log_level,
                ],
                env=self.env,
                stdout=subprocess.DEVNULL,
                stderr=out,
            )
        deadline = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(f"{self.url}/.well-known/jwks.json", timeout=0.5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"broker serve did not come up:\n{self.stop()}")
            time.sleep(0.1)

    def kill(self) -> None:
        """SIGKILL: no shutdown hooks, no flushing — a crash."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> str:
        """Terminate gracefully (kill after 10 s); returns what it logged."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None
        return self.log_text()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def cli(self, *args: str) -> str:
        """Run a ``broker`` command against this process's database and keys."""
        return run_cli(self.env, *args)


@contextlib.contextmanager
def brokers(
    env: dict[str, str], count: int, log_level: str = "warning"
) -> Iterator[list[BrokerProcess]]:
    """``count`` processes sharing one database and key folder, like replicas behind a proxy."""
    procs = [BrokerProcess(env, log_level=log_level) for _ in range(count)]
    try:
        for p in procs:
            p.start()
        yield procs
    finally:
        for p in procs:
            p.stop()


@contextlib.contextmanager
def serve_broker(
    database_url: str, tmp_path: Path, extra_env: dict[str, str] | None = None
) -> Iterator[BrokerProcess]:
    """One broker on a free port with its own keys; stopped (and only it) afterwards."""
    port = free_port()
    env = broker_env(database_url, tmp_path / "broker-keys", f"http://127.0.0.1:{port}")
    env.update(extra_env or {})
    proc = BrokerProcess(env, port, tmp_path / "serve.log")
    try:
        proc.start()
        yield proc
    finally:
        proc.stop()


def bootstrap_admin(env: dict[str, str], url: str, tmp: Path) -> BrokerClient:
    """The first admin, issued from the shell as the README does; talks to ``url``."""
    client_id, private = _cli_admin(env, tmp)
    return client_at(url, client_id, private, env["BROKER_PUBLIC_URL"])


def _cli_admin(env: dict[str, str], tmp: Path) -> tuple[str, dict[str, Any]]:
    private, public = sig_keypair()
    jwks_file = tmp / f"admin-{os.getpid()}-{time.monotonic_ns()}.json"
    jwks_file.write_text(json.dumps(public))
    out = run_cli(
        env, "clients", "add", "--role", "admin", "--name", "ops", "--jwks", str(jwks_file)
    )
    return out.strip(), private


def client_at(
    url: str, client_id: str, private_jwk: dict[str, Any], public_url: str
) -> BrokerClient:
    """A credential talking to one replica; its assertions name the deployment's public URL."""
    return BrokerClient(url, client_id, private_jwk, token_endpoint=f"{public_url}/oauth/token")


@dataclass
class SyncClient:
    """A client credential and its access token, for synchronous callers (schemathesis)."""

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


def bootstrap_sync_admin(proc: BrokerProcess, tmp_path: Path) -> SyncClient:
    """The first admin of a single broker, as a synchronous client."""
    client_id, private = _cli_admin(proc.env, tmp_path)
    return SyncClient(proc.url, client_id, private)


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
