"""Keys rotated while the broker runs are taken from the key folder, with no restart.

``broker keys rotate token|payload|records`` and ``rewrap-records --forget-retired``
change files in the key folder; each process reads it every few seconds
(``broker.workers.reload_keys``) and at once when a token names a key it does not
hold. Every test runs on SQLite and on PostgreSQL, on its own copy of the key folder.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import httpx
import pytest
from joserfc import jws

from broker.crypto.key_rotation import (
    forget_retired_records_keks,
    rotate_records_kek,
    rotate_signing_key,
)
from broker.crypto.keystore import records_kek_id
from broker.crypto.payload import PayloadInvalid, open_payload
from broker.workers import reload_keys
from tests.servers import bootstrap_admin, broker_env, brokers, client_at, free_port, run_cli
from tests.support import (
    POLICE_ASK,
    World,
    broker_process,
    runtime_of,
    same_client,
    story_with_held_record,
)


def _kid(token: str) -> str:
    return str(jws.extract_compact(token.encode()).headers()["kid"])


async def _kids(http: httpx.AsyncClient) -> list[str]:
    return [k["kid"] for k in (await http.get("/.well-known/jwks.json")).json()["keys"]]


async def _disclose(http: httpx.AsyncClient, token: str) -> httpx.Response:
    return await http.post(
        "/v1/disclosures", json=POLICE_ASK, headers={"Authorization": f"Bearer {token}"}
    )


async def test_a_running_process_signs_with_rotated_keys_and_still_trusts_the_old(
    world: World, key_copy: Path
) -> None:
    s = await story_with_held_record(world)
    async with broker_process(world, key_copy) as (app, http):
        rt = runtime_of(app)
        officer = same_client(s.officer, http)
        old = rt.keys
        before = await officer.fetch_token()
        earlier = await _disclose(http, before)
        assert earlier.status_code == 200, earlier.text

        retired_token, new_token = rotate_signing_key(key_copy, "token")
        retired_payload, new_payload = rotate_signing_key(key_copy, "payload")
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
    world: World, key_copy: Path
) -> None:
    s = await story_with_held_record(world)
    async with (
        broker_process(world, key_copy) as (one, http_one),
        broker_process(world, key_copy) as (two, http_two),
    ):
        rotate_signing_key(key_copy, "token")
        await reload_keys(runtime_of(one))
        token = await same_client(s.officer, http_one).fetch_token()
        new_kid = _kid(token)
        assert new_kid not in await _kids(http_two)

        answer = await _disclose(http_two, token)  # the second has not read the folder yet
        assert answer.status_code == 200, answer.text
        assert new_kid in await _kids(http_two)
        assert _kid(await same_client(s.officer, http_two).fetch_token()) == new_kid

        # Made-up kids cannot make a process read its folder more than once a second.
        rt_two = runtime_of(two)
        rt_two.unknown_kid_reload_at = time.monotonic()
        rotate_signing_key(key_copy, "token")
        await reload_keys(runtime_of(one))
        newer = await same_client(s.officer, http_one).fetch_token()
        assert (await _disclose(http_two, newer)).status_code == 401
        rt_two.unknown_kid_reload_at -= 1.0  # as if a second had gone by
        assert (await _disclose(http_two, newer)).status_code == 200


async def test_a_deleted_retired_token_key_stops_vouching_for_cached_tokens(
    world: World, key_copy: Path
) -> None:
    """After a compromise the README says to delete the retired key's file: what it
    signed is refused once the process reads the folder, even a token it verified
    (and cached) before."""
    s = await story_with_held_record(world)
    async with broker_process(world, key_copy) as (app, http):
        rt = runtime_of(app)
        token = await same_client(s.officer, http).fetch_token()
        assert (await _disclose(http, token)).status_code == 200
        retired, _ = rotate_signing_key(key_copy, "token")
        await reload_keys(rt)
        assert (await _disclose(http, token)).status_code == 200
        (key_copy / "retired" / f"token-signing.{retired}.jwk.json").unlink()
        await reload_keys(rt)
        refused = await _disclose(http, token)
        assert refused.status_code == 401, refused.text
        assert retired not in await _kids(http)


async def test_a_folder_read_half_way_keeps_the_keys_held(
    world: World, key_copy: Path, caplog: pytest.LogCaptureFixture
) -> None:
    s = await story_with_held_record(world)
    async with broker_process(world, key_copy) as (app, http):
        rt = runtime_of(app)
        held = rt.keys
        good = (key_copy / "token-signing.jwk.json").read_bytes()
        (key_copy / "token-signing.jwk.json").write_bytes(good[: len(good) // 2])  # mid-copy
        with caplog.at_level(logging.WARNING, logger="broker"):
            await reload_keys(rt)
        assert rt.keys is held
        assert "key folder not taken" in caplog.text
        assert "token-signing.jwk.json" in caplog.text
        token = await same_client(s.officer, http).fetch_token()
        assert _kid(token) == held.token_signing.kid
        assert (await _disclose(http, token)).status_code == 200

        (key_copy / "token-signing.jwk.json").write_bytes(good)
        retired, new = rotate_signing_key(key_copy, "token")
        await reload_keys(rt)
        assert (rt.keys.token_signing.kid, retired) == (new, held.token_signing.kid)


async def test_records_keys_follow_rotation_and_forgetting_without_restart(
    world: World, key_copy: Path
) -> None:
    async with broker_process(world, key_copy) as (app, _):
        rt = runtime_of(app)
        old_id, new_id = rotate_records_kek(key_copy)
        await reload_keys(rt)
        assert records_kek_id(rt.keys.records_kek) == new_id
        assert [records_kek_id(k) for k in rt.keys.retired_records_keks] == [old_id]
        assert forget_retired_records_keks(key_copy) == [old_id]
        await reload_keys(rt)
        assert rt.keys.retired_records_keks == ()


async def test_the_background_loop_reads_the_folder(world: World, key_copy: Path) -> None:
    """With the background workers on (as ``broker serve`` runs them), a rotation is
    served within the loop's interval."""
    async with broker_process(world, key_copy, run_background_workers=True) as (app, http):
        assert "key-folder" in {task.get_name() for task in runtime_of(app).tasks}
        _, new = rotate_signing_key(key_copy, "payload")
        for _ in range(100):  # 20 s at most, four times the loop's interval
            if new in await _kids(http):
                break
            await asyncio.sleep(0.2)
        assert new in await _kids(http)
        assert runtime_of(app).keys.payload_signing.kid == new


async def test_real_broker_processes_follow_a_rotation_of_their_shared_folder(
    database_url: str, tmp_path: Path
) -> None:
    """Two ``broker serve`` processes on 127.0.0.1 sharing one key folder, as replicas
    on one host do: after ``broker keys rotate token`` both sign with the new key
    within the folder-reading interval, and a token issued before works on both."""
    public_url = f"http://127.0.0.1:{free_port()}"
    env = broker_env(database_url, tmp_path / "keys", public_url)
    run_cli(env, "keys", "init")
    with brokers(env, 2, log_level="info") as procs:
        admin = await asyncio.to_thread(bootstrap_admin, env, procs[0].url, tmp_path)
        before = await admin.token()
        rotated = await asyncio.to_thread(run_cli, env, "keys", "rotate", "token")
        new_kid = rotated.strip().rsplit(" ", 1)[-1]
        assert new_kid != _kid(before)
        async with httpx.AsyncClient(timeout=10) as http:
            for proc in procs:
                for _ in range(75):  # 15 s at most, three times the interval
                    jwks = (await http.get(f"{proc.url}/.well-known/jwks.json")).json()
                    if jwks["keys"][0]["kid"] == new_kid:
                        break
                    await asyncio.sleep(0.2)
                assert jwks["keys"][0]["kid"] == new_kid, proc.log_text()
                old_token = {"Authorization": f"Bearer {before}"}
                assert (await http.get(f"{proc.url}/v1/agencies", headers=old_token)).is_success
                replica = client_at(proc.url, admin.client_id, admin.private_jwk, public_url)
                assert _kid(await replica.fetch_token()) == new_kid
                await replica.aclose()
                # The operator can see it happen (the broker's logger reaches the log).
                assert f"signing keys reloaded from the key folder: token kid {new_kid}" in (
                    proc.log_text()
                )
        await admin.aclose()
