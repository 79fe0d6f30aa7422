"""Nothing lost: drain the ledger outbox, export the log and verify it offline.

Used after the authorization matrix and the fuzz runs: whatever those threw at the
broker, every outbox row must have reached the signed log, and the exported log
must re-hash to the latest signed checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass

import httpx
from sqlalchemy import func, select

from broker.ledger.sequencer import integrate_until_empty
from broker.ledger.verify import verify_export
from broker.models import LedgerEntry, LedgerPending
from broker.runtime import Runtime
from broker.sdk import BrokerClient


@dataclass(frozen=True)
class LedgerCheck:
    entries: int
    """Entries re-hashed by the offline verifier."""
    stored: int
    """Rows in ``ledger_entries``."""
    pending: int
    """Rows left in the outbox."""
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems and self.pending == 0 and self.entries == self.stored


def verify_export_text(text: str, key: dict[str, str]) -> tuple[int, list[str]]:
    report = verify_export(text.splitlines(), key["verifier_key"], origin=key["origin"], workers=1)
    return report.entries, list(report.problems)


async def count_ledger_rows(rt: Runtime) -> tuple[int, int]:
    """(``ledger_entries`` rows, ``ledger_pending`` rows)."""
    async with rt.sessionmaker() as session:
        stored = await session.scalar(select(func.count()).select_from(LedgerEntry))
        pending = await session.scalar(select(func.count()).select_from(LedgerPending))
    return int(stored or 0), int(pending or 0)


async def check_ledger(rt: Runtime, http: httpx.AsyncClient, auditor: BrokerClient) -> LedgerCheck:
    """Integrate everything pending, then export as an auditor and verify every entry."""
    await integrate_until_empty(rt)
    key_resp = await http.get("/v1/ledger/key")
    assert key_resp.status_code == 200, key_resp.text
    export = await auditor.get("/v1/ledger/export")
    assert export.status_code == 200, export.text
    entries, problems = verify_export_text(export.text, key_resp.json())
    stored, pending = await count_ledger_rows(rt)
    return LedgerCheck(entries, stored, pending, problems)
