"""Rotating the ledger's checkpoint key: auditors follow the hand-over from either key,
running processes pick the new key up, and a host with a stale key folder signs nothing."""

from __future__ import annotations

import asyncio
import io
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import func, select

from broker.crypto.key_rotation import STAGED_CHECKPOINT_FILE
from broker.crypto.keystore import CHECKPOINT_FILE, BrokerKeys, load_checkpoint_key
from broker.ledger import checkpoint_key
from broker.ledger.checkpoint import (
    CheckpointError,
    open_checkpoint,
    parse_verifier_key,
    verifier_key,
)
from broker.ledger.checkpoint_key import CheckpointKeyStale, rotate_checkpoint_key
from broker.ledger.key_rotation import open_key_rotation
from broker.ledger.sequencer import integrate_pending, integrate_until_empty
from broker.ledger.service import ledger_key
from broker.ledger.status import ledger_status
from broker.ledger.verify import verify_export
from broker.models import LedgerEntry, LedgerKeyRotation, LedgerPending
from broker.settings import Settings
from tests.support import BASE_URL, World, broker_process, count_rows, runtime_of
from tests.test_disclosure import _ask
from tests.test_ledger import _busy_ledger, _vkey
from tests.test_records_kek_rotation import shell


@pytest.fixture
def settings(database_url: str, key_dir: Path, tmp_path: Path) -> Settings:
    """The session's keys, copied: these tests replace the checkpoint key."""
    keys = tmp_path / "keys"
    shutil.copytree(key_dir, keys)
    return Settings(
        environment="dev",
        database_url=database_url,
        key_dir=keys,
        public_url=BASE_URL,
        run_background_workers=False,
    )


async def _rotate(world: World) -> checkpoint_key.RotationDone:
    rt = world.rt
    return await rotate_checkpoint_key(
        rt.sessionmaker, rt.settings.key_dir, rt.settings.ledger_origin
    )


async def _latest_note(auditor: Any) -> dict[str, Any]:
    resp = await auditor.get("/v1/ledger/checkpoint")
    assert resp.status_code == 200, resp.text
    cp: dict[str, Any] = resp.json()
    return cp


async def test_auditors_follow_the_hand_over_from_either_key(world: World) -> None:
    s, auditor = await _busy_ledger(world)
    before = await integrate_until_empty(world.rt)
    old_vkey = await _vkey(world)
    saved = await _latest_note(auditor)

    done = await _rotate(world)
    assert (done.tree_size, done.old_verifier_key, done.resumed) == (before, old_vkey, False)
    keys = world.rt.settings.key_dir
    assert not (keys / STAGED_CHECKPOINT_FILE).exists()
    assert (keys / CHECKPOINT_FILE).stat().st_mode & 0o777 == 0o600
    assert verifier_key(
        world.rt.settings.ledger_origin, load_checkpoint_key(keys).public_key()
    ) == (done.new_verifier_key)

    # Until the tree grows, the latest tree head is served as the rotation, which the
    # new key signed too: what /v1/ledger/key names always opens it.
    handed = await _latest_note(auditor)
    assert handed["tree_size"] == before
    for vkey in (done.new_verifier_key, old_vkey):
        assert open_checkpoint(handed["note"], vkey).size == before

    # The running process signs the next batch with the new key, without a restart.
    assert (await s.officer.post("/v1/disclosures", json=_ask())).status_code == 200
    after = await integrate_until_empty(world.rt)
    assert after >= 1
    latest = await _latest_note(auditor)
    assert latest["tree_size"] == before + after
    assert open_checkpoint(latest["note"], done.new_verifier_key).size == before + after
    with pytest.raises(CheckpointError):
        open_checkpoint(latest["note"], old_vkey)

    async with world.rt.sessionmaker() as session:
        [entry] = (
            await session.scalars(
                select(LedgerEntry).where(LedgerEntry.entry_type == "ledger.key_rotated")
            )
        ).all()
    assert entry.idx >= before  # in the tree after the hand-over: under the new key
    body = json.loads(entry.body)
    assert (body["tree_size"], body["old_key"], body["new_key"], body["actor"]) == (
        before,
        old_vkey,
        done.new_verifier_key,
        None,
    )

    published = (await world.http.get("/v1/ledger/key")).json()
    assert published["verifier_key"] == done.new_verifier_key
    assert published["jwk"]["kid"] == done.new_verifier_key.split("+")[1]
    [rotation] = published["rotations"]
    assert (rotation["tree_size"], rotation["old_verifier_key"]) == (before, old_vkey)
    assert open_key_rotation(rotation["note"]).checkpoint.size == before

    export = await auditor.get("/v1/ledger/export", params={"checkpoints": "all"})
    assert export.content.startswith(b'{"kind":"key-rotation"')
    for pinned in (old_vkey, done.new_verifier_key):
        report = verify_export(io.BytesIO(export.content), pinned, trusted_checkpoint=saved["note"])
        assert report.ok, report.problems
        assert report.entries == before + after
    # Without the hand-over, the old key reaches nothing signed after it.
    without = b"\n".join(export.content.split(b"\n")[1:])
    report = verify_export(io.BytesIO(without), old_vkey)
    assert not report.ok


async def test_a_rotation_racing_the_sequencer_leaves_no_checkpoint_outside_its_keys_span(
    world: World,
) -> None:
    """The rotation takes the sequencer's lock: no batch is signed by the old key after
    the tree head it hands over at, however the two interleave."""
    s, auditor = await _busy_ledger(world, disclosures=12)
    rt = world.rt
    old_vkey = await _vkey(world)

    async def integrate_in_small_batches() -> None:
        for _ in range(100):  # bounded; the outbox empties well before
            if not await integrate_pending(rt, batch_size=2):
                return
            await asyncio.sleep(0)  # let the rotation in between batches

    async def rotate_soon() -> checkpoint_key.RotationDone:
        await asyncio.sleep(0)
        return await _rotate(world)

    _, done = await asyncio.gather(integrate_in_small_batches(), rotate_soon())
    await integrate_until_empty(rt)
    export = await auditor.get("/v1/ledger/export", params={"checkpoints": "all"})
    for pinned in (old_vkey, done.new_verifier_key):
        report = verify_export(io.BytesIO(export.content), pinned)
        assert report.ok, report.problems
        assert report.checkpoints_verified > 2


async def test_a_host_with_the_old_key_folder_signs_nothing(
    world: World, settings: Settings, tmp_path: Path
) -> None:
    s, _ = await _busy_ledger(world)
    await integrate_until_empty(world.rt)
    stale_keys = tmp_path / "stale-keys"
    shutil.copytree(settings.key_dir, stale_keys)  # another host's copy, never updated
    async with broker_process(world, stale_keys) as (stale_app, _):
        stale = runtime_of(stale_app)
        await _rotate(world)
        assert (await s.officer.post("/v1/disclosures", json=_ask())).status_code == 200
        waiting = await count_rows(world.rt, LedgerPending)
        assert waiting >= 1
        with pytest.raises(CheckpointKeyStale):
            await integrate_pending(stale)
        assert await count_rows(world.rt, LedgerPending) == waiting, (
            "nothing was integrated or lost"
        )
        # The stale host still publishes the ledger's current key, not its own.
        async with stale.sessionmaker() as session:
            published = await ledger_key(stale, session)
        assert published.verifier_key != verifier_key(
            settings.ledger_origin, stale.keys.checkpoint_signing.public_key()
        )
        # Given the new folder, it signs again; here the up-to-date process does.
        assert await integrate_until_empty(world.rt) == waiting


async def test_a_host_with_another_deployments_keys_signs_nothing(
    world: World, settings: Settings, tmp_path: Path
) -> None:
    """Before any rotation, the newest checkpoint's signer is the current key."""
    s, _ = await _busy_ledger(world)
    await integrate_until_empty(world.rt)
    other = tmp_path / "other-keys"
    BrokerKeys.generate(other)  # say, a folder made afresh by mistake
    async with broker_process(world, other) as (stranger_app, _):
        stranger = runtime_of(stranger_app)
        assert (await s.officer.post("/v1/disclosures", json=_ask())).status_code == 200
        waiting = await count_rows(world.rt, LedgerPending)
        with pytest.raises(CheckpointKeyStale):
            await integrate_pending(stranger)
        with pytest.raises(CheckpointKeyStale, match="not the ledger's current one"):
            await rotate_checkpoint_key(stranger.sessionmaker, other, settings.ledger_origin)
        assert await count_rows(world.rt, LedgerPending) == waiting
    assert await integrate_until_empty(world.rt) == waiting


async def test_a_rotation_cut_short_is_finished_by_running_it_again(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    s, _ = await _busy_ledger(world)
    await integrate_until_empty(world.rt)
    keys = world.rt.settings.key_dir

    def crash(_: Path) -> None:
        raise OSError("the machine went down before the key file was moved")

    monkeypatch.setattr(checkpoint_key, "install_staged_checkpoint_key", crash)
    with pytest.raises(OSError, match="went down"):
        await _rotate(world)
    monkeypatch.undo()
    assert (keys / STAGED_CHECKPOINT_FILE).exists()
    # The ledger already names the new key, which the folder does not hold yet: no signing.
    assert (await s.officer.post("/v1/disclosures", json=_ask())).status_code == 200
    with pytest.raises(CheckpointKeyStale):
        await integrate_pending(world.rt)
    done = await _rotate(world)
    assert done.resumed and not (keys / STAGED_CHECKPOINT_FILE).exists()
    assert await integrate_until_empty(world.rt) >= 1
    async with world.rt.sessionmaker() as session:
        assert await session.scalar(select(func.count()).select_from(LedgerKeyRotation)) == 1


async def test_a_staged_key_that_never_committed_is_dropped(world: World) -> None:
    keys = world.rt.settings.key_dir
    shutil.copy(keys / CHECKPOINT_FILE, keys / STAGED_CHECKPOINT_FILE)  # a stray leftover
    done = await _rotate(world)
    assert not done.resumed and done.tree_size == 0
    assert not (keys / STAGED_CHECKPOINT_FILE).exists()
    assert verifier_key(
        world.rt.settings.ledger_origin, load_checkpoint_key(keys).public_key()
    ) == (done.new_verifier_key)


async def test_rotating_from_a_stale_folder_is_refused(world: World, tmp_path: Path) -> None:
    stale = tmp_path / "stale-keys"
    shutil.copytree(world.rt.settings.key_dir, stale)
    await _rotate(world)
    with pytest.raises(CheckpointKeyStale, match="not the ledger's current one"):
        await rotate_checkpoint_key(world.rt.sessionmaker, stale, world.rt.settings.ledger_origin)


def test_rotate_from_the_shell(tmp_path: Path, database_url: str, settings: Settings) -> None:
    broker = shell(tmp_path, database_url)  # production, keys in tmp_path / "keys"
    first = broker("keys", "rotate", "checkpoint")
    assert first.returncode == 0, first.stderr
    assert "rotated at tree size 0" in first.stdout
    new_vkey = first.stdout.strip().splitlines()[-1]
    on_disk = load_checkpoint_key(settings.key_dir).public_key()
    assert parse_verifier_key(new_vkey)[2] == on_disk
    assert "copy the folder to every other host" in first.stderr
    second = broker("keys", "rotate", "checkpoint")
    assert second.returncode == 0, second.stderr
    current = second.stdout.strip().splitlines()[-1]
    assert current != new_vkey
    # The key file is lost; `keys init` makes a new one, which the ledger does not accept.
    (settings.key_dir / CHECKPOINT_FILE).unlink()
    assert broker("keys", "init").returncode == 0
    assert broker("ledger", "status").returncode == 1
    misuse = broker("keys", "rotate", "token", "--lost-key", current)
    assert misuse.returncode == 2 and "checkpoint key only" in misuse.stderr
    saved = tmp_path / "published.vkey"
    saved.write_text(current + "\n")
    recovered = broker("keys", "rotate", "checkpoint", "--lost-key", f"@{saved}")
    assert recovered.returncode == 0, recovered.stderr
    assert "out of band" in recovered.stderr
    assert broker("ledger", "status").returncode == 0


async def test_ledger_status_shows_the_backlog_and_who_may_sign(
    world: World, settings: Settings, tmp_path: Path
) -> None:
    s, _ = await _busy_ledger(world)
    status = await ledger_status(world.rt)
    assert status.pending >= 5 and status.oldest_pending_seconds is not None
    assert (status.tree_size, status.expected_signer, status.this_folder_signs) == (0, None, True)
    size = await integrate_until_empty(world.rt)
    status = await ledger_status(world.rt)
    assert (status.tree_size, status.pending, status.oldest_pending_seconds) == (size, 0, None)
    assert status.last_checkpoint_at is not None
    assert status.expected_signer == "+".join(status.this_folder_key.split("+")[:2])
    assert "this key folder may sign: yes" in status.lines()

    stale = tmp_path / "stale-keys"
    shutil.copytree(settings.key_dir, stale)
    done = await _rotate(world)
    async with broker_process(world, stale) as (stale_app, _):
        seen = await ledger_status(runtime_of(stale_app))
    assert (seen.expected_signer, seen.rotations) == (done.new_verifier_key, 1)
    assert not seen.this_folder_signs and "this key folder may sign: NO" in seen.lines()


def test_ledger_status_from_the_shell(
    tmp_path: Path, database_url: str, settings: Settings
) -> None:
    broker = shell(tmp_path, database_url)
    fine = broker("ledger", "status")
    assert fine.returncode == 0, fine.stderr
    assert "tree size: 0" in fine.stdout and "may sign: yes" in fine.stdout
    other = tmp_path / "elsewhere"
    shutil.copytree(settings.key_dir, other)
    assert broker("keys", "rotate", "checkpoint").returncode == 0
    env_other = shell(other.parent / "x", database_url)  # a folder that was not rotated
    shutil.copytree(other, other.parent / "x" / "keys")
    stale = env_other("ledger", "status")
    assert stale.returncode == 1 and "may sign: NO" in stale.stdout
    assert "copy the key folder" in stale.stderr


async def test_a_lost_key_is_recovered_and_auditors_are_told(
    world: World, settings: Settings
) -> None:
    """The key file is lost and `broker keys init` made a new one: its sequencer refuses to
    sign (the ledger expects the lost key), until a recovery names the lost key."""
    s, auditor = await _busy_ledger(world)
    before = await integrate_until_empty(world.rt)
    lost_vkey = await _vkey(world)
    keys = settings.key_dir
    (keys / CHECKPOINT_FILE).unlink()
    BrokerKeys.generate(keys)  # completes the folder with a fresh checkpoint key
    async with broker_process(world, keys) as (restarted, http):  # a restart
        rt = runtime_of(restarted)
        assert (await s.officer.post("/v1/disclosures", json=_ask())).status_code == 200
        with pytest.raises(CheckpointKeyStale):
            await integrate_pending(rt)
        origin = settings.ledger_origin
        stranger = verifier_key(origin, Ed25519PrivateKey.generate().public_key())
        with pytest.raises(CheckpointKeyStale, match="not the checkpoint key the ledger"):
            await rotate_checkpoint_key(rt.sessionmaker, keys, origin, lost_vkey=stranger)
        done = await rotate_checkpoint_key(rt.sessionmaker, keys, origin, lost_vkey=lost_vkey)
        assert (done.tree_size, done.old_verifier_key) == (before, lost_vkey)
        with pytest.raises(CheckpointKeyStale, match="it is not lost"):
            await rotate_checkpoint_key(
                rt.sessionmaker, keys, origin, lost_vkey=done.new_verifier_key
            )
        assert await integrate_until_empty(rt) >= 2  # the disclosure and the recovery entry
        token = await auditor.token()
        export = await http.get(
            "/v1/ledger/export",
            params={"checkpoints": "all"},
            headers={"Authorization": f"Bearer {token}"},
        )
    assert export.status_code == 200
    report = verify_export(io.BytesIO(export.content), done.new_verifier_key)
    assert report.ok, report.problems
    report = verify_export(io.BytesIO(export.content), lost_vkey)
    assert not report.ok
    assert any("without its own signature" in p for p in report.problems), report.problems
