"""Rewrap every survivor's data key under the current records key, after a rotation.

Only the 40-byte wrapped keys change: the held records stay encrypted under the
same data keys, so a rewrap of a million survivors is a million key unwraps and
wraps, not a re-encryption. Each batch is one transaction, and a row is only
rewritten if it still holds the value read (``WHERE wrapped_data_key = old``): a
survivor erased meanwhile stays erased, and two rewraps running at once do no harm.
Running it again is safe and is how an operator checks that nothing is left. Each
run ends with one ledger entry of its counts (``keys.data_keys_rewrapped``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from broker.crypto.datakeys import RecordUnreadable, rewrap_data_key
from broker.crypto.keystore import records_kek_id
from broker.ledger.entries import record_operation
from broker.models import Subject

__all__ = ["RewrapReport", "rewrap_data_keys"]

BATCH = 500


@dataclass
class RewrapReport:
    """Counts only: subject ids are not printed or logged."""

    checked: int = 0
    rewrapped: int = 0
    already_current: int = 0
    #: Opened by no key the broker holds: a key file lost, or a row altered.
    unreadable: int = 0
    #: Changed (say, erased) between this pass's read and its write: left alone.
    changed_meanwhile: int = 0

    @property
    def done(self) -> bool:
        """Every data key is under the current key: retired keys open nothing needed."""
        return self.rewrapped == 0 and self.unreadable == 0 and self.changed_meanwhile == 0


async def rewrap_data_keys(
    sessionmaker: async_sessionmaker[AsyncSession], keks: tuple[bytes, ...], batch: int = BATCH
) -> RewrapReport:
    """Rewrap under ``keks[0]`` every data key that one of ``keks[1:]`` wraps."""
    report = RewrapReport()
    after = ""
    while True:
        async with sessionmaker() as session, session.begin():
            rows = (
                await session.execute(
                    select(Subject.id, Subject.wrapped_data_key)
                    .where(Subject.id > after, Subject.wrapped_data_key.is_not(None))
                    .order_by(Subject.id)
                    .limit(batch)
                )
            ).all()
            for subject_id, wrapped in rows:
                assert wrapped is not None  # the query leaves erased survivors out
                report.checked += 1
                try:
                    new = rewrap_data_key(keks, wrapped)
                except RecordUnreadable:
                    report.unreadable += 1
                    continue
                if new is None:
                    report.already_current += 1
                    continue
                result = await session.execute(
                    update(Subject)
                    .where(Subject.id == subject_id, Subject.wrapped_data_key == wrapped)
                    .values(wrapped_data_key=new)
                    .execution_options(synchronize_session=False)
                )
                if result.rowcount == 1:  # type: ignore[attr-defined]
                    report.rewrapped += 1
                else:
                    report.changed_meanwhile += 1
        if len(rows) < batch:
            break
        after = rows[-1][0]
    fields = {"records_key": records_kek_id(keks[0]), **dataclasses.asdict(report)}
    await record_operation(sessionmaker, "keys.data_keys_rewrapped", fields)
    return report
