"""Group commit of disclosure decisions on PostgreSQL.

Each decision (its ledger entry, its disclosure row and, for a permit, the grant use)
is one autocommit statement. At load, that statement's round trip -- a write to the
socket of a backend on another core, then a WAL flush -- was the worker's largest
cost after the seal. Decisions that reach the writer while a batch is in flight are
written together by the next batch, in one statement, so a busy worker pays one round
trip and one flush for many. A decision that finds no write in flight is written alone
on its request's own connection, so an idle worker pays what it did.

Per decision, the batch keeps ``repository.store_decision``'s semantics: a permit's
rows are written only if its grant use is taken (version still the latest, uses
left), a denial's always. The batch takes all uses of one grant version or none of
them; a permit whose use it could not take, and every decision of a batch the
database refused, is handed back to be written alone by the single statement, which
gives the exact answer. Only a batch whose outcome is unknown (the connection lost
once the statement may have run) fails its decisions, as a lone write would.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from sqlalchemy import bindparam, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from broker.hot_sql import HotStatement, OutcomeUnknown, PooledDriver
from broker.models.consent import ConsentGrant
from broker.models.disclosure import Disclosure
from broker.models.ledger import LedgerPending

#: Decisions per statement; more wait for the next batch.
MAX_BATCH = 128


def _columns(table: Any, prefix: str = "") -> str:
    return ", ".join(prefix + c.name for c in table.__table__.columns if c.name != "seq")


def _batch_sql() -> str:
    """The statement, from the models' own table and column names (no input)."""
    grants, pending, disclosures = (
        ConsentGrant.__tablename__,
        LedgerPending.__tablename__,
        Disclosure.__tablename__,
    )
    p_cols, r_p = _columns(LedgerPending), _columns(LedgerPending, "r.")
    d_cols, r_d = _columns(Disclosure), _columns(Disclosure, "r.")
    return f"""
WITH batch AS (
    SELECT t.ord, t.e -> 'p' AS p, t.e -> 'd' AS d, (t.e ->> 'take')::boolean AS take,
           t.e ->> 'grant_id' AS grant_id, (t.e ->> 'version')::integer AS version,
           (t.e ->> 'max_uses')::integer AS max_uses
    FROM jsonb_array_elements(CAST(:batch AS jsonb)) WITH ORDINALITY AS t(e, ord)
),
need AS (
    SELECT grant_id, version, max_uses, count(*) AS n
    FROM batch WHERE take GROUP BY grant_id, version, max_uses
),
used AS (
    UPDATE {grants} AS g SET uses = g.uses + need.n FROM need
    WHERE g.id = need.grant_id AND g.latest_version = need.version
      AND (need.max_uses IS NULL OR g.uses + need.n <= need.max_uses)
    RETURNING need.grant_id, need.version, need.max_uses
),
go AS (
    SELECT b.ord, b.p, b.d FROM batch AS b
    WHERE NOT b.take OR EXISTS (
        SELECT 1 FROM used AS u
        WHERE u.grant_id = b.grant_id AND u.version = b.version
          AND u.max_uses IS NOT DISTINCT FROM b.max_uses
    )
),
pending AS (
    INSERT INTO {pending} ({p_cols})
    SELECT {r_p}
    FROM go CROSS JOIN LATERAL jsonb_populate_record(NULL::{pending}, go.p) AS r
    ORDER BY go.ord
    RETURNING 1
)
INSERT INTO {disclosures} ({d_cols})
SELECT {r_d}
FROM go CROSS JOIN LATERAL jsonb_populate_record(NULL::{disclosures}, go.d) AS r
RETURNING id
"""  # noqa: S608


_BATCH = HotStatement(text(_batch_sql()).bindparams(bindparam("batch", type_=JSONB)), writes=True)


@dataclass
class _Decision:
    item: dict[str, Any]
    written: asyncio.Future[bool]


class DecisionWriter:
    """Writes the decisions of one worker's requests in batches, one batch at a time."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._queue: list[_Decision] = []
        self._draining: asyncio.Task[None] | None = None
        self._writing = 0
        #: Batch statements that ran to the end (for tests and diagnostics).
        self.batches = 0

    @property
    def busy(self) -> bool:
        """A decision write is in flight: the next decisions wait for a batch."""
        return self._writing > 0

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """Mark a decision write, alone or batched, as in flight."""
        self._writing += 1
        try:
            yield
        finally:
            self._writing -= 1

    async def store(
        self,
        pending: dict[str, Any],
        disclosure: dict[str, Any],
        grant: dict[str, Any] | None,
    ) -> bool:
        """True once written; False: not written, write it alone.

        ``grant`` (grant_id, version, max_uses) is the use a permit must take.
        """
        loop = asyncio.get_running_loop()
        item = {"p": pending, "d": disclosure, "take": grant is not None, **(grant or {})}
        decision = _Decision(item, loop.create_future())
        self._queue.append(decision)
        if self._draining is None:
            self._draining = loop.create_task(self._drain())
        return await decision.written

    async def _drain(self) -> None:
        try:
            while self._queue:
                batch, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
                await self._write(batch)
        finally:
            self._draining = None
            # Cancelled (shutdown): whatever is queued was never sent.
            for decision in self._queue:
                _settle(decision, False)
            self._queue = []

    async def _write(self, batch: list[_Decision]) -> None:
        driver = PooledDriver(self._engine)
        try:
            with self.writing():
                rows = await _BATCH.rows(driver, {"batch": [d.item for d in batch]})
        except DBAPIError as exc:
            await driver.reconnect()
            for decision in batch:
                if isinstance(exc, OutcomeUnknown):
                    _fail(decision, _unknown(exc.orig or exc))
                else:
                    # Refused whole, nothing written: each decision is written alone,
                    # where its own request answers for its own error.
                    _settle(decision, False)
            return
        except BaseException as exc:
            # Cancelled or failed mid-flight: the statement may have run.
            await driver.reconnect()
            for decision in batch:
                _fail(decision, _unknown(exc))
            raise
        await driver.commit()
        self.batches += 1
        written = {row[0] for row in rows}
        for decision in batch:
            _settle(decision, decision.item["d"]["id"] in written)


def _settle(decision: _Decision, written: bool) -> None:
    if not decision.written.done():  # its request may have been cancelled
        decision.written.set_result(written)


def _unknown(cause: BaseException) -> OutcomeUnknown:
    return OutcomeUnknown(_BATCH.sql, None, cause)


def _fail(decision: _Decision, error: BaseException) -> None:
    if not decision.written.done():
        decision.written.set_exception(error)
