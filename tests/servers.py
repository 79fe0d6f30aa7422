"""Real ``broker serve`` processes on 127.0.0.1 for multi-process and fault tests.

Every process started here is bounded: it is terminated (then killed) when its
context exits, and start-up gives up after a deadline.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from broker.sdk import BrokerClient
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
    """One ``broker serve`` on a loopback port; restartable, killable."""

    def __init__(self, env: dict[str, str], port: int | None = None) -> None:
        self.env = env
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> None:
        self.proc = subprocess.Popen(  # noqa: S603
            [str(BIN / "broker"), "serve", "--port", str(self.port), "--log-level", "warning"],
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(f"{self.url}/.well-known/jwks.json", timeout=0.5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                err = self.stop()
                raise RuntimeError(f"broker serve did not come up:\n{err}")
            time.sleep(0.1)

    def kill(self) -> None:
        """SIGKILL: no shutdown hooks, no flushing — a crash."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> str:
        """Terminate gracefully (kill after 10 s); returns what it wrote to stderr."""
        if self.proc is None:
            return ""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
        self.proc = None
        return err


@contextmanager
def brokers(env: dict[str, str], count: int) -> Iterator[list[BrokerProcess]]:
    """``count`` processes sharing one database and key folder, like replicas behind a proxy."""
    procs = [BrokerProcess(env) for _ in range(count)]
    try:
        for p in procs:
            p.start()
        yield procs
    finally:
        for p in procs:
            p.stop()


def bootstrap_admin(env: dict[str, str], url: str, tmp: Path) -> BrokerClient:
    """The first admin, issued from the shell as the README does; talks to ``url``."""
    private, public = sig_keypair()
    jwks_file = tmp / f"admin-{os.getpid()}-{time.monotonic_ns()}.json"
    jwks_file.write_text(json.dumps(public))
    out = run_cli(
        env, "clients", "add", "--role", "admin", "--name", "ops", "--jwks", str(jwks_file)
    )
    return client_at(url, _client_id(out), private, env["BROKER_PUBLIC_URL"])


def _client_id(cli_output: str) -> str:
    for token in cli_output.replace(":", " ").split():
        if len(token) == 36 and token.count("-") == 4:
            return token
    raise AssertionError(f"no client id in {cli_output!r}")


def client_at(
    url: str, client_id: str, private_jwk: dict[str, Any], public_url: str
) -> BrokerClient:
    """A credential talking to one replica; its assertions name the deployment's public URL."""
    return BrokerClient(url, client_id, private_jwk, token_endpoint=f"{public_url}/oauth/token")
