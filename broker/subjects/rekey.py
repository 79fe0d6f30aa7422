"""Give every survivor a new data key and re-encrypt her held records under it.

Rotating the records key (``rewrap``) only rewraps the data keys: a database copy
that leaked together with the old records key still opens every held record in
any later copy too. Re-keying closes that: each survivor gets a fresh data key,
wrapped under the current records key, and every record the broker holds for her
is decrypted with the old data key and encrypted with the new one.

One survivor per transaction. Her row is locked first (an UPDATE that changes
nothing: a row lock on PostgreSQL, the write lock on SQLite), and deposits take the
same lock before reading her key (``disclosure.records``), so no record can be
sealed under a data key that is being replaced. A survivor whose key or any record
opens with no key the broker holds is left exactly as she was and counted. The run
ends with one ledger entry of its counts (``keys.held_records_rekeyed``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from broker.crypto.datakeys import (
    RecordUnreadable,
    decrypt_record,
    encrypt_record,
    new_wrapped_data_key,
    record_aad,
    unwrap_data_key,
    unwrap_with_any,
)
from broker.crypto.keystore import records_kek_id
from broker.ledger.entries import record_operation
from broker.models import HeldRecord, Subject

__all__ = ["RekeyReport", "lock_data_key", "rekey_held_records", "rekey_survivor"]

BATCH = 500


@dataclass
class RekeyReport:
    """Counts only: subject ids are not printed or logged."""

    survivors_checked: int = 0
    survivors_rekeyed: int = 0
    records_reencrypted: int = 0
    #: Her data key or one of her records opened with no key the broker holds: untouched.
    unreadable: int = 0
    #: Erased between the listing and her turn: nothing to re-key.
    erased_meanwhile: int = 0

    @property
    def done(self) -> bool:
        return self.unreadable == 0


async def lock_data_key(session: AsyncSession, subject_id: str) -> bytes | None:
    """The survivor's wrapped data key, her row locked until the transaction ends.

    None once she is erased. A no-op UPDATE rather than ``SELECT ... FOR UPDATE``:
    SQLite has no row locks, and its write lock is only taken by a write.
    """
    wrapped: bytes | None = await session.scalar(
        update(Subject)
        .where(Subject.id == subject_id)
        .values(wrapped_data_key=Subject.wrapped_data_key)
        .returning(Subject.wrapped_data_key)
        .execution_options(synchronize_session=False)
    )
    return wrapped


async def rekey_survivor(
    session: AsyncSession, keks: tuple[bytes, ...], subject_id: str, report: RekeyReport
) -> bool:
    """Re-key one survivor in the session's transaction; False if nothing may be written."""
    wrapped = await lock_data_key(session, subject_id)
    if wrapped is None:
        report.erased_meanwhile += 1
        return False
    try:
        old_key = unwrap_with_any(keks, wrapped)
    except RecordUnreadable:
        report.unreadable += 1
        return False
    new_wrapped = new_wrapped_data_key(keks[0])
    new_key = unwrap_data_key(keks[0], new_wrapped)
    held = (
        await session.execute(
            select(HeldRecord.id, HeldRecord.agency_id, HeldRecord.category, HeldRecord.ciphertext)
            .where(HeldRecord.subject_id == subject_id)
            .order_by(HeldRecord.id)
        )
    ).all()
    sealed: list[tuple[str, bytes]] = []
    for record_id, agency_id, category, blob in held:
        aad = record_aad(subject_id, agency_id, category)
        try:
            plaintext = decrypt_record(old_key, blob, aad)
        except RecordUnreadable:
            report.unreadable += 1
            return False
        sealed.append((record_id, encrypt_record(new_key, plaintext, aad)))
    for record_id, blob in sealed:
        await session.execute(
            update(HeldRecord)
            .where(HeldRecord.id == record_id)
            .values(ciphertext=blob)
            .execution_options(synchronize_session=False)
        )
    await session.execute(
        update(Subject)
        .where(Subject.id == subject_id)
        .values(wrapped_data_key=new_wrapped)
        .execution_options(synchronize_session=False)
    )
    report.survivors_rekeyed += 1
    report.records_reencrypted += len(sealed)
    return True


async def rekey_held_records(
    sessionmaker: async_sessionmaker[AsyncSession],
    keks: tuple[bytes, ...],
    batch: int = BATCH,
    progress: Callable[[RekeyReport], None] | None = None,
) -> RekeyReport:
    """New data keys under ``keks[0]`` for every survivor not erased; see the module.

    ``progress`` is called after each batch (a million survivors take a while).
    """
    report = RekeyReport()
    after = ""
    while True:
        async with sessionmaker() as session:
            ids = list(
                await session.scalars(
                    select(Subject.id)
                    .where(Subject.id > after, Subject.wrapped_data_key.is_not(None))
                    .order_by(Subject.id)
                    .limit(batch)
                )
            )
        for subject_id in ids:
            report.survivors_checked += 1
            async with sessionmaker() as session:
                if await rekey_survivor(session, keks, subject_id, report):
                    await session.commit()
                # otherwise closing the session rolls back: she stays as she was
        if progress is not None and ids:
            progress(report)
        if len(ids) < batch:
            break
        after = ids[-1]
    fields = {"records_key": records_kek_id(keks[0]), **dataclasses.asdict(report)}
    await record_operation(sessionmaker, "keys.held_records_rekeyed", fields)
    return report
