"""Which key signs the ledger's checkpoints, and handing it over to a new one.

The database, not each host's key folder, says which checkpoint key is current:
the newest row of ``ledger_key_rotations`` or, before any rotation, the key that
signed the newest checkpoint. A sequencer checks it under its lock before signing,
picks up a rotated key from its own folder without a restart, and otherwise refuses
to sign: a checkpoint signed by a retired key beyond its hand-over, or by a key the
ledger never named, would be rejected by every auditor.

``rotate_checkpoint_key`` takes the same lock, so no batch is signed between the
tree head it hands over at and the new key taking effect. The new private key is
staged beside the current one and put in place only after the rotation row has
committed; a run cut short is finished (or undone) by running it again.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from sqlalchemy import insert, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from broker.crypto.key_rotation import (
    discard_staged_checkpoint_key,
    install_staged_checkpoint_key,
    stage_checkpoint_key,
    staged_checkpoint_key,
)
from broker.crypto.keystore import load_checkpoint_key
from broker.hot_sql import HotStatement
from broker.ledger.checkpoint import (
    Checkpoint,
    CheckpointError,
    key_id,
    parse_verifier_key,
    signer_ids,
    verifier_key,
)
from broker.ledger.entries import append_operation
from broker.ledger.key_rotation import sign_key_recovery, sign_key_rotation
from broker.ledger.merkle import EMPTY_ROOT
from broker.models import LedgerCheckpoint, LedgerKeyRotation

if TYPE_CHECKING:
    from broker.runtime import Runtime

log = logging.getLogger("broker.ledger")

# The newest rotation's key, and the newest checkpoint's note: one round trip per batch.
_SIGNER = HotStatement(
    select(
        select(LedgerKeyRotation.new_verifier_key)
        .order_by(LedgerKeyRotation.id.desc())
        .limit(1)
        .scalar_subquery(),
        select(LedgerCheckpoint.note)
        .order_by(LedgerCheckpoint.tree_size.desc())
        .limit(1)
        .scalar_subquery(),
    )
)


class CheckpointKeyStale(RuntimeError):
    """This key folder's checkpoint key is not the one the ledger names as current."""


@dataclass(frozen=True)
class LedgerSigner:
    """Whom the ledger expects to sign its next checkpoint.

    The newest rotation's new key; before any rotation, the key that signed the newest
    checkpoint (so a host given another deployment's key folder, or a fresh one made by
    mistake, cannot start signing); on an empty ledger, any key.
    """

    rotated_to: str | None
    last_signers: tuple[tuple[str, bytes], ...]

    def accepts(self, origin: str, key: Ed25519PublicKey) -> bool:
        if self.rotated_to is not None:
            return verifier_key(origin, key) == self.rotated_to
        if self.last_signers:
            return (origin, key_id(origin, key)) in self.last_signers
        return True


async def ledger_signer(session: AsyncSession) -> LedgerSigner:
    rotated_to, note = (await _SIGNER.rows(session, {}))[0]
    signers = tuple(signer_ids(str(note))) if note is not None else ()
    return LedgerSigner(None if rotated_to is None else str(rotated_to), signers)


async def signing_key(rt: Runtime, session: AsyncSession) -> Ed25519PrivateKey:
    """The key to sign the next checkpoint with; call it under the sequencer's lock."""
    signer = await ledger_signer(session)
    state = rt.sequencer
    origin = rt.settings.ledger_origin
    key = state.checkpoint_key or rt.keys.checkpoint_signing
    if signer.accepts(origin, key.public_key()):
        return key
    if rt.keys.key_dir is not None:
        on_disk = load_checkpoint_key(rt.keys.key_dir)
        if signer.accepts(origin, on_disk.public_key()):
            log.info("ledger: signing checkpoints with the rotated checkpoint key")
            state.checkpoint_key = on_disk
            return on_disk
    log.error(
        "ledger: not signing: this key folder's checkpoint key is not the one the ledger "
        "names (it was rotated, or the folder is another deployment's); copy the key folder "
        "from where `broker keys rotate checkpoint` last ran"
    )
    raise CheckpointKeyStale("this process's checkpoint key is not the ledger's current one")


@dataclass(frozen=True)
class RotationDone:
    tree_size: int
    old_verifier_key: str
    new_verifier_key: str
    #: True when this run only finished a rotation an earlier run had committed.
    resumed: bool = False


async def rotate_checkpoint_key(
    sessionmaker: async_sessionmaker[AsyncSession],
    key_dir: Path,
    origin: str,
    *,
    lost_vkey: str | None = None,
) -> RotationDone:
    """Hand the checkpoint key over to a new one at the ledger's latest tree head.

    With ``lost_vkey`` (the verifier key of a checkpoint key whose private half is
    lost), a recovery instead: the new key alone signs the hand-over, and auditors who
    pinned the lost key must confirm the new one out of band.
    """
    from broker.ledger.sequencer import take_sequencer_lock

    async with sessionmaker() as session, session.begin():
        await take_sequencer_lock(session)
        signer = await ledger_signer(session)
        current = signer.rotated_to
        staged = staged_checkpoint_key(key_dir)
        if staged is not None:
            if current is not None and verifier_key(origin, staged.public_key()) == current:
                # The row committed, the file was not moved yet: finish that run.
                install_staged_checkpoint_key(key_dir)
                row = await _newest_rotation(session)
                assert row is not None  # ``current`` came from it
                return RotationDone(row.tree_size, row.old_verifier_key, current, True)
            discard_staged_checkpoint_key(key_dir)  # that run never committed
        head = await _tree_head(session, origin)
        if lost_vkey is None:
            old = load_checkpoint_key(key_dir)
            old_vkey = verifier_key(origin, old.public_key())
            if not signer.accepts(origin, old.public_key()):
                raise CheckpointKeyStale(
                    "this key folder's checkpoint key is not the ledger's current one; run "
                    "the rotation with the key folder of the last rotation"
                )
            new = stage_checkpoint_key(key_dir)
            note, kind = sign_key_rotation(head, old, new), "ledger.key_rotated"
        else:
            old_vkey = _lost_key(signer, origin, lost_vkey, key_dir)
            new = stage_checkpoint_key(key_dir)
            note, kind = sign_key_recovery(head, old_vkey, new), "ledger.key_recovered"
        new_vkey = verifier_key(origin, new.public_key())
        await session.execute(
            insert(LedgerKeyRotation).values(
                tree_size=head.size,
                old_verifier_key=old_vkey,
                new_verifier_key=new_vkey,
                note=note,
            )
        )
        # Also in the tree itself, integrated (and so signed) under the new key.
        fields = {"tree_size": head.size, "old_key": old_vkey, "new_key": new_vkey}
        await append_operation(session, kind, fields)
    install_staged_checkpoint_key(key_dir)
    return RotationDone(head.size, old_vkey, new_vkey)


def _lost_key(signer: LedgerSigner, origin: str, lost_vkey: str, key_dir: Path) -> str:
    """``lost_vkey``, checked to be the key the ledger expects and not in ``key_dir``."""
    try:
        name, _, public = parse_verifier_key(lost_vkey)
    except CheckpointError as exc:
        raise CheckpointKeyStale(f"the lost key given is not a verifier key: {exc}") from None
    if name != origin or not signer.accepts(origin, public):
        raise CheckpointKeyStale(
            "the lost key given is not the checkpoint key the ledger expects (GET "
            "/v1/ledger/key published it; auditors pinned it)"
        )
    with contextlib.suppress(OSError, ValueError):
        if verifier_key(origin, load_checkpoint_key(key_dir).public_key()) == lost_vkey:
            raise CheckpointKeyStale(
                "this key folder holds that key: it is not lost; rotate without --lost-key, "
                "so the old key vouches for the new one"
            )
    return lost_vkey


async def _tree_head(session: AsyncSession, origin: str) -> Checkpoint:
    """The latest signed tree head (the empty tree before the first checkpoint)."""
    stmt = select(LedgerCheckpoint.tree_size, LedgerCheckpoint.root_hash)
    row = (await session.execute(stmt.order_by(LedgerCheckpoint.tree_size.desc()).limit(1))).first()
    if row is None:
        return Checkpoint(origin, 0, EMPTY_ROOT)
    return Checkpoint(origin, int(row[0]), bytes(row[1]))


async def _newest_rotation(session: AsyncSession) -> LedgerKeyRotation | None:
    stmt = select(LedgerKeyRotation).order_by(LedgerKeyRotation.id.desc()).limit(1)
    return (await session.execute(stmt)).scalar_one_or_none()


async def rotations(session: AsyncSession) -> list[LedgerKeyRotation]:
    """Every rotation, oldest first (a handful over a ledger's life)."""
    stmt = select(LedgerKeyRotation).order_by(LedgerKeyRotation.id)
    return list((await session.execute(stmt)).scalars())


async def rotation_note_at(session: AsyncSession, tree_size: int) -> str | None:
    """The newest rotation's note if it was made at ``tree_size``, else None."""
    row = await _newest_rotation(session)
    return row.note if row is not None and row.tree_size == tree_size else None
