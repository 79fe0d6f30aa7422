"""``broker ledger status``: is the ledger keeping up, and may this host sign it?

Requests only queue entries; the sequencers integrate and sign them. A sequencer
that cannot sign (its key folder lacks the current checkpoint key) only logs, and
entries keep waiting for a host that can: this is where an operator sees it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from sqlalchemy import func, select

from broker.crypto.keystore import load_checkpoint_key
from broker.ledger.checkpoint import verifier_key
from broker.ledger.checkpoint_key import ledger_signer
from broker.ledger.sequencer import tree_size
from broker.models import LedgerCheckpoint, LedgerKeyRotation, LedgerPending

if TYPE_CHECKING:
    from broker.runtime import Runtime

__all__ = ["LedgerStatus", "ledger_status"]


@dataclass(frozen=True)
class LedgerStatus:
    tree_size: int
    last_checkpoint_at: datetime | None
    pending: int
    oldest_pending_seconds: float | None
    #: The key the ledger expects next: a verifier key after a rotation, else the
    #: ``name+keyid`` of the newest checkpoint's signer (None on an empty ledger).
    expected_signer: str | None
    rotations: int
    this_folder_key: str
    this_folder_signs: bool

    def lines(self) -> list[str]:
        oldest = (
            "-" if self.oldest_pending_seconds is None else f"{self.oldest_pending_seconds:.1f} s"
        )
        last = "-" if self.last_checkpoint_at is None else self.last_checkpoint_at.isoformat()
        return [
            f"tree size: {self.tree_size}",
            f"last checkpoint: {last}",
            f"entries waiting to be integrated: {self.pending} (oldest {oldest})",
            f"checkpoint key the ledger expects: {self.expected_signer or '- (empty ledger)'}",
            f"checkpoint key rotations: {self.rotations}",
            f"this key folder's checkpoint key: {self.this_folder_key}",
            "this key folder may sign: " + ("yes" if self.this_folder_signs else "NO"),
        ]


async def ledger_status(rt: Runtime) -> LedgerStatus:
    origin = rt.settings.ledger_origin
    async with rt.sessionmaker() as session:
        size = await tree_size(session)
        last = await session.scalar(select(func.max(LedgerCheckpoint.created_at)))
        pending, oldest = (
            await session.execute(select(func.count(), func.min(LedgerPending.created_at)))
        ).one()
        rotations = await session.scalar(select(func.count()).select_from(LedgerKeyRotation))
        signer = await ledger_signer(session)
    key_dir = rt.keys.key_dir
    key = load_checkpoint_key(key_dir) if key_dir is not None else rt.keys.checkpoint_signing
    public = key.public_key()
    expected = signer.rotated_to
    if expected is None and signer.last_signers:
        name, kid = signer.last_signers[0]
        expected = f"{name}+{kid.hex()}"
    age = None
    if oldest is not None:
        oldest = oldest if oldest.tzinfo else oldest.replace(tzinfo=UTC)
        age = max(0.0, (datetime.now(UTC) - oldest).total_seconds())
    return LedgerStatus(
        tree_size=size,
        last_checkpoint_at=last,
        pending=int(pending),
        oldest_pending_seconds=age,
        expected_signer=expected,
        rotations=int(rotations or 0),
        this_folder_key=verifier_key(origin, public),
        this_folder_signs=signer.accepts(origin, public),
    )
