"""Keys rotated while the broker runs are taken from the key folder, with no restart.

``broker keys rotate token|payload|records`` and ``rewrap-records --forget-retired``
change files in the key folder; each process reads it every few seconds
(``broker.workers.reload_keys``) and at once when a token names a key it does not
hold. Every test runs on SQLite and on PostgreSQL, on its own copy of the key folder.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from fastapi import FastAPI

from broker.app import create_app
from broker.crypto.keystore import (
    forget_retired_records_keks,
    records_kek_id,
    rotate_records_kek,
    rotate_signing_key,
)
from broker.crypto.payload import PayloadInvalid, open_payload
from broker.runtime import Runtime
from broker.sdk import BrokerClient
from broker.workers import reload_keys
from tests.support import BASE_URL, Story, World, consent_body, story_one

ASK = {"subject_ref": "PD-24-0193", "category": "shelter", "purpose": "safety_planning"}
RECORD = {"intake_date": "2024-03-02", "bed_status": "assigned"}


async def _story(world: World) -> Story:
    s = await story_one(world)
    depositor = await world.client(s.shelter.id, "agency", "shelter case system")
    deposit = {"subject_ref": "HH-2024-0042", "category": "shelter", "record": RECORD}
    r = await depositor.post("/v1/records", json=deposit)
    assert r.status_code == 201, r.text
    terms = consent_body(
        subject_id=s.subject_id, source_agency_ids=[s.shelter.id], recipient_agency_id=s.police.id
    )
    await world.grant(s.advocate, **terms)
    return s


@pytest.fixture
def keys(world: World, tmp_path: Path) -> Path:
    """A copy of the session's key folder, for the broker processes of one test."""
    folder = tmp_path / "keys"
    shutil.copytree(world.rt.settings.key_dir, folder)
    return folder


@contextlib.asynccontextmanager
async def _process(
    world: World, keys: Path, **settings: Any
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """Another broker process on the same database, with ``keys`` as its key folder."""
    app = create_app(world.rt.settings.model_copy(update={"key_dir": keys, **settings}))
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url=BASE_URL) as http,
    ):
        yield app, http


def _runtime(app: FastAPI) -> Runtime:
    rt: Runtime = app.state.runtime
    return rt


def _as(client: BrokerClient, http: httpx.AsyncClient) -> BrokerClient:
    """The same credential, talking to another process."""
    return BrokerClient(BASE_URL, client.client_id, client.private_jwk, http=http)


def _kid(token: str) -> str:
    segment = token.split(".", 1)[0]
    header = orjson.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    return str(header["kid"])


async def _kids(http: httpx.AsyncClient) -> list[str]:
    return [k["kid"] for k in (await http.get("/.well-known/jwks.json")).json()["keys"]]


async def _disclose(http: httpx.AsyncClient, token: str) -> httpx.Response:
    return await http.post(
        "/v1/disclosures", json=ASK, headers={"Authorization": f"Bearer {token}"}
    )


async def test_a_running_process_signs_with_rotated_keys_and_still_trusts_the_old(
    world: World, keys: Path
) -> None:
    s = await _story(world)
    async with _process(world, keys) as (app, http):
        rt = _runtime(app)
        officer = _as(s.officer, http)
        old = rt.keys
        before = await officer.fetch_token()
        earlier = await _disclose(http, before)
        assert earlier.status_code == 200, earlier.text

        retired_token, new_token = rotate_signing_key(keys, "token")
        retired_payload, new_payload = rotate_signing_key(keys, "payload")
        # Until it reads the folder, the process signs as before.
        assert _kid(await officer.fetch_token()) == retired_token == old.token_signing.kid
        await reload_keys(rt)

        assert await _kids(http) == [new_token, new_payload, retired_token, retired_payload]
        after = await officer.fetch_token()
        assert _kid(after) == new_token
        later = await _disclose(http, after)
        assert later.status_code == 200, later.text
        # A token of the old key lives on until it expires.
        assert (await _disclose(http, before)).status_code == 200
        jwks = (await http.get("/.well-known/jwks.json")).json()
        current = {"keys": jwks["keys"][:2]}
        assert open_payload(later.json()["payload"], s.police.enc_private, current)
        assert open_payload(earlier.json()["payload"], s.police.enc_private, jwks)
        with pytest.raises(PayloadInvalid):
            open_payload(earlier.json()["payload"], s.police.enc_private, current)


async def test_another_process_takes_a_new_token_key_when_a_token_names_it(
    world: World, keys: Path
) -> None:
    s = await _story(world)
    async with _process(world, keys) as (one, http_one), _process(world, keys) as (two, http_two):
        rotate_signing_key(keys, "token")
        await reload_keys(_runtime(one))
        token = await _as(s.officer, http_one).fetch_token()
        new_kid = _kid(token)
        assert new_kid not in await _kids(http_two)

        answer = await _disclose(http_two, token)  # the second has not read the folder yet
        assert answer.status_code == 200, answer.text
        assert new_kid in await _kids(http_two)
        assert _kid(await _as(s.officer, http_two).fetch_token()) == new_kid

        # Made-up kids cannot make a process read its folder more than once a second.
        rt_two = _runtime(two)
        rt_two.unknown_kid_reload_at = time.monotonic()
        rotate_signing_key(keys, "token")
        await reload_keys(_runtime(one))
        newer = await _as(s.officer, http_one).fetch_token()
        assert (await _disclose(http_two, newer)).status_code == 401
        rt_two.unknown_kid_reload_at -= 1.0  # as if a second had gone by
        assert (await _disclose(http_two, newer)).status_code == 200


async def test_a_deleted_retired_token_key_stops_vouching_for_cached_tokens(
    world: World, keys: Path
) -> None:
    """After a compromise the README says to delete the retired key's file: what it
    signed is refused once the process reads the folder, even a token it verified
    (and cached) before."""
    s = await _story(world)
    async with _process(world, keys) as (app, http):
        rt = _runtime(app)
        token = await _as(s.officer, http).fetch_token()
        assert (await _disclose(http, token)).status_code == 200
        retired, _ = rotate_signing_key(keys, "token")
        await reload_keys(rt)
        assert (await _disclose(http, token)).status_code == 200
        (keys / "retired" / f"token-signing.{retired}.jwk.json").unlink()
        await reload_keys(rt)
        refused = await _disclose(http, token)
        assert refused.status_code == 401, refused.text
        assert retired not in await _kids(http)


async def test_a_folder_read_half_way_keeps_the_keys_held(
    world: World, keys: Path, caplog: pytest.LogCaptureFixture
) -> None:
    s = await _story(world)
    async with _process(world, keys) as (app, http):
        rt = _runtime(app)
        held = rt.keys
        good = (keys / "token-signing.jwk.json").read_bytes()
        (keys / "token-signing.jwk.json").write_bytes(good[: len(good) // 2])  # mid-copy
        with caplog.at_level(logging.WARNING, logger="broker"):
            await reload_keys(rt)
        assert rt.keys is held
        assert "key folder not taken" in caplog.text
        assert "token-signing.jwk.json" in caplog.text
        token = await _as(s.officer, http).fetch_token()
        assert _kid(token) == held.token_signing.kid
        assert (await _disclose(http, token)).status_code == 200

        (keys / "token-signing.jwk.json").write_bytes(good)
        retired, new = rotate_signing_key(keys, "token")
        await reload_keys(rt)
        assert (rt.keys.token_signing.kid, retired) == (new, held.token_signing.kid)


async def test_records_keys_follow_rotation_and_forgetting_without_restart(
    world: World, keys: Path
) -> None:
    async with _process(world, keys) as (app, _):
        rt = _runtime(app)
        old_id, new_id = rotate_records_kek(keys)
        await reload_keys(rt)
        assert records_kek_id(rt.keys.records_kek) == new_id
        assert [records_kek_id(k) for k in rt.keys.retired_records_keks] == [old_id]
        assert forget_retired_records_keks(keys) == [old_id]
        await reload_keys(rt)
        assert rt.keys.retired_records_keks == ()


async def test_the_background_loop_reads_the_folder(world: World, keys: Path) -> None:
    """With the background workers on (as ``broker serve`` runs them), a rotation is
    served within the loop's interval."""
    async with _process(world, keys, run_background_workers=True) as (app, http):
        assert "key-folder" in {task.get_name() for task in _runtime(app).tasks}
        _, new = rotate_signing_key(keys, "payload")
        for _ in range(100):  # 20 s at most, four times the loop's interval
            if new in await _kids(http):
                break
            await asyncio.sleep(0.2)
        assert new in await _kids(http)
        assert _runtime(app).keys.payload_signing.kid == new
