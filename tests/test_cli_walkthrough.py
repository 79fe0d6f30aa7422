"""The README walkthrough, command by command, against a real `broker serve` process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.servers import free_port, run_cli, serve_broker

BIN = Path(sys.executable).parent


@pytest.fixture
def served(database_url: str, tmp_path: Path) -> Iterator[tuple[str, dict[str, str]]]:
    with serve_broker(database_url, tmp_path) as proc:
        yield proc.url, proc.env


def test_walkthrough_and_demo(served: tuple[str, dict[str, str]], tmp_path: Path) -> None:
    url, env = served
    keys = tmp_path / "agency-keys"
    out = run_cli(env, "keys", "generate", "--out", str(keys), "--name", "ops")
    assert "ops.sig.jwks.json" in out
    assert (keys / "ops.sig.private.jwk.json").stat().st_mode & 0o077 == 0
    admin_id = run_cli(
        env,
        "clients",
        "add",
        "--role",
        "admin",
        "--name",
        "ops",
        "--jwks",
        str(keys / "ops.sig.jwks.json"),
    ).strip()
    assert len(admin_id) == 36
    token = run_cli(
        env,
        "token",
        "--client-id",
        admin_id,
        "--key",
        str(keys / "ops.sig.private.jwk.json"),
        "--url",
        url,
    ).strip()
    enc = json.loads((keys / "ops.enc.jwks.json").read_text())
    resp = httpx.post(
        f"{url}/v1/agencies",
        headers={"Authorization": f"Bearer {token}"},
        json={"name": "Harbor House", "kind": "shelter", "encryption_jwks": enc},
    )
    assert resp.status_code == 201, resp.text
    demo = subprocess.run(  # noqa: S603
        [str(BIN / "broker"), "demo", "--url", url],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert "after revocation the DV Unit gets HTTP 403" in demo.stdout
    assert '"bed_status": "assigned"' in demo.stdout
    assert "shelter_location" in demo.stdout  # listed as withheld, never as data
    assert "(confidential)" not in demo.stdout
    assert "verified against the signed checkpoint" in demo.stdout

    # The auditor's offline check, fetching the export from the running broker.
    resp = httpx.post(
        f"{url}/v1/clients",
        headers={"Authorization": f"Bearer {token}"},
        json={
            "agency_id": resp.json()["id"],
            "role": "auditor",
            "name": "oversight",
            "jwks": json.loads((keys / "ops.sig.jwks.json").read_text()),
        },
    )
    assert resp.status_code == 201, resp.text
    vkey = httpx.get(f"{url}/v1/ledger/key").json()["verifier_key"]
    (tmp_path / "vkey.txt").write_text(vkey)
    deadline = time.monotonic() + 10
    while True:  # the sequencer integrates within a fraction of a second
        verified = subprocess.run(  # noqa: S603
            [
                str(BIN / "broker"),
                "ledger",
                "verify",
                "--url",
                url,
                "--vkey",
                f"@{tmp_path / 'vkey.txt'}",
                "--client-id",
                resp.json()["client_id"],
                "--key",
                str(keys / "ops.sig.private.jwk.json"),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if verified.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert verified.stdout.startswith("OK: ") and "checkpoints verified" in verified.stdout


def test_production_refuses_to_start_without_keys(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "BROKER_ENVIRONMENT": "production",
        "BROKER_KEY_DIR": str(tmp_path / "none"),
        "BROKER_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/x.db",
    }
    done = subprocess.run(  # noqa: S603
        [str(BIN / "broker"), "serve", "--port", str(free_port())],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode != 0
    assert "broker keys init" in done.stderr


def test_keys_rotate_from_the_shell(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "BROKER_ENVIRONMENT": "production",
        "BROKER_KEY_DIR": str(tmp_path / "keys"),
        "BROKER_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/x.db",
    }

    def broker(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(  # noqa: S603
            [str(BIN / "broker"), *args], env=env, capture_output=True, text=True, check=False
        )

    missing = broker("keys", "rotate", "payload")
    assert missing.returncode != 0 and "broker keys init" in missing.stderr
    assert broker("keys", "init").returncode == 0
    rotated = broker("keys", "rotate", "payload")
    assert rotated.returncode == 0, rotated.stderr
    assert rotated.stdout.startswith("payload signing key rotated: new kid ")
    assert "within 5 s (no restart)" in rotated.stderr
    assert len(list((tmp_path / "keys" / "retired").glob("payload-signing.*.jwk.json"))) == 1
    not_served = subprocess.run(  # noqa: S603
        [str(BIN / "broker"), "serve", "--port", "1"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert not_served.returncode == 2, not_served.stderr
    assert "never migrated" in not_served.stderr and "Traceback" not in not_served.stderr
    unmigrated = broker("keys", "rotate", "checkpoint")
    assert unmigrated.returncode == 1 and "broker migrate" in unmigrated.stderr
    assert "Traceback" not in unmigrated.stderr
    key = (tmp_path / "keys" / "checkpoint-ed25519.pem").read_bytes()
    assert not (tmp_path / "keys" / "checkpoint-ed25519.pem.next").exists()
    assert broker("migrate").returncode == 0
    handed_over = broker("keys", "rotate", "checkpoint")
    assert handed_over.returncode == 0, handed_over.stderr
    assert (tmp_path / "keys" / "checkpoint-ed25519.pem").read_bytes() != key
