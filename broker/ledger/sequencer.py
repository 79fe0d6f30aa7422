"""The sequencer: moves outbox entries into the Merkle tree and signs a checkpoint.

Requests only ever insert into ``ledger_pending``, so they never contend for the
tree. One sequencer at a time (a PostgreSQL transaction-scoped advisory lock
across processes; on SQLite the database's single writer plus an in-process
lock) takes a batch in outbox order, gives it the next contiguous indices,
stores every subtree node the batch completes and signs one checkpoint for the
grown tree — all in one transaction, so a crash leaves either the whole batch
integrated or none of it, and the entries stay in the outbox for the next try.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import bindparam, delete, func, insert, select, text
from sqlalchemy.ext.asyncio import AsyncSession

from broker.db import advisory_lock_key
from broker.hot_sql import HotStatement
from broker.ledger.checkpoint import Checkpoint, sign_checkpoint
from broker.ledger.checkpoint_key import signing_key
from broker.ledger.merkle import Node, append_leaves, root_from_frontier, subtree_nodes
from broker.models import LedgerCheckpoint, LedgerEntry, LedgerNode, LedgerPending

if TYPE_CHECKING:
    from broker.runtime import Runtime

#: pg_advisory_xact_lock key of the one sequencer at a time.
SEQUENCER_LOCK_KEY = advisory_lock_key("consent-broker/ledger-sequencer")


class SequencerState:
    """Per-runtime state: a lock for this process and the tree's right edge it last wrote.

    The tree only grows, so the frontier for a size this runtime wrote is still
    valid whenever the stored size equals it; otherwise it is read again. It lives
    on the runtime, not the module, so two runtimes (two databases) never mix.
    """

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.size = -1
        self.nodes: dict[Node, bytes] = {}
        #: The checkpoint key picked up after a rotation (None: the one loaded at start).
        self.checkpoint_key: Ed25519PrivateKey | None = None


_MAX_IDX = HotStatement(select(func.max(LedgerEntry.idx)))

# One fixed statement per dialect whatever the number of nodes, so it is parsed and
# planned once; the wanted (level, idx) pairs travel as arrays / one JSON text.
_NODES_PG = HotStatement(
    text(
        "SELECT n.level, n.idx, n.hash FROM ledger_nodes n "
        "JOIN unnest(CAST(:levels AS smallint[]), CAST(:idxs AS bigint[])) AS w(level, idx) "
        "ON n.level = w.level AND n.idx = w.idx"
    )
)
_NODES_SQLITE = text(
    "SELECT n.level, n.idx, n.hash FROM json_each(:pairs) AS w "
    "JOIN ledger_nodes n ON n.level = json_extract(w.value, '$[0]') "
    "AND n.idx = json_extract(w.value, '$[1]')"
)


async def tree_size(session: AsyncSession) -> int:
    rows = await _MAX_IDX.rows(session, {})
    last = rows[0][0] if rows else None
    return 0 if last is None else int(last) + 1


async def load_nodes(session: AsyncSession, wanted: set[Node]) -> dict[Node, bytes]:
    """Fetch stored subtree hashes in one query (``wanted`` is O(log n) nodes)."""
    if not wanted:
        return {}
    pairs = sorted(wanted)
    if session.get_bind().dialect.name == "postgresql":
        params: dict[str, object] = {
            "levels": [lv for lv, _ in pairs],
            "idxs": [ix for _, ix in pairs],
        }
        rows = await _NODES_PG.rows(session, params)
    else:
        rows = (await session.execute(_NODES_SQLITE, {"pairs": json.dumps(pairs)})).all()
    return {(int(lv), int(ix)): bytes(h) for lv, ix, h in rows}


async def _frontier(state: SequencerState, session: AsyncSession, size: int) -> dict[Node, bytes]:
    if state.size == size:
        return state.nodes
    wanted = set(subtree_nodes(0, size))
    nodes = await load_nodes(session, wanted)
    missing = wanted - nodes.keys()
    if missing:
        raise RuntimeError(f"ledger tree is missing nodes {sorted(missing)} at size {size}")
    return nodes


async def take_sequencer_lock(session: AsyncSession) -> None:
    """The lock every sequencer (and a checkpoint key rotation) holds for its transaction."""
    if session.get_bind().dialect.name == "postgresql":
        await session.execute(
            text("SELECT pg_advisory_xact_lock(:key)"), {"key": SEQUENCER_LOCK_KEY}
        )
    else:
        # Take SQLite's write lock before reading the size: a second process's
        # sequencer then waits here instead of racing for the same indices.
        await session.execute(text("DELETE FROM ledger_pending WHERE 0"))


async def integrate_pending(rt: Runtime, *, batch_size: int | None = None) -> int:
    """Integrate one batch from the outbox; returns how many entries it added."""
    limit = batch_size or rt.settings.sequencer_batch_size
    state = rt.sequencer
    async with state.lock, rt.sessionmaker() as session:
        try:
            async with session.begin():
                return await _integrate(rt, session, limit)
        except BaseException:
            state.size = -1  # the transaction did not commit: forget what it wrote
            raise


_PENDING = (
    select(
        LedgerPending.seq,
        LedgerPending.entry_id,
        LedgerPending.entry_type,
        LedgerPending.agency_id,
        LedgerPending.subject_commitment,
        LedgerPending.body,
        LedgerPending.created_at,
    )
    .order_by(LedgerPending.seq)
    .limit(bindparam("limit"))
)
_DONE = delete(LedgerPending).where(LedgerPending.seq.in_(bindparam("seqs", expanding=True)))
_ADD_ENTRIES = insert(LedgerEntry)
_ADD_NODES = insert(LedgerNode)
# PostgreSQL: a batch's rows as arrays, one statement whatever the batch size. A list
# of parameter sets would run the INSERT once per row (asyncpg's executemany), and the
# server starts and ends an executor for each: at peak that was three statements per
# disclosure, about a tenth of PostgreSQL's CPU per disclosure.
_ADD_ENTRIES_PG = HotStatement(
    text(
        "INSERT INTO ledger_entries (idx, entry_id, entry_type, agency_id, subject_commitment, "
        "body, leaf_hash, created_at, integrated_at) "
        "SELECT * FROM unnest(CAST(:idx AS bigint[]), CAST(:entry_id AS varchar[]), "
        "CAST(:entry_type AS varchar[]), CAST(:agency_id AS varchar[]), "
        "CAST(:subject_commitment AS varchar[]), CAST(:body AS text[]), "
        "CAST(:leaf_hash AS bytea[]), CAST(:created_at AS timestamptz[]), "
        "CAST(:integrated_at AS timestamptz[]))"
    ),
    writes=True,
)
_ADD_NODES_PG = HotStatement(
    text(
        "INSERT INTO ledger_nodes (level, idx, hash) "
        "SELECT * FROM unnest(CAST(:level AS smallint[]), CAST(:idx AS bigint[]), "
        "CAST(:hash AS bytea[]))"
    ),
    writes=True,
)
_DONE_PG = HotStatement(
    text("DELETE FROM ledger_pending WHERE seq = ANY(CAST(:seqs AS bigint[]))"), writes=True
)
_ADD_CHECKPOINT = insert(LedgerCheckpoint)


async def _integrate(rt: Runtime, session: AsyncSession, limit: int) -> int:
    await take_sequencer_lock(session)
    conn = await session.connection()
    pending = (await conn.execute(_PENDING, {"limit": limit})).all()
    if not pending:
        return 0
    size = await tree_size(session)
    frontier = await _frontier(rt.sequencer, session, size)
    sha256 = hashlib.sha256
    leaves = [sha256(b"\x00" + row.body.encode("utf-8")).digest() for row in pending]
    created, grown = append_leaves(size, frontier, leaves)
    now = datetime.now(UTC)
    await _write_batch(session, size, pending, leaves, created, now)
    new_size = size + len(pending)
    root = root_from_frontier(new_size, grown)
    origin = rt.settings.ledger_origin
    key = await signing_key(rt, session)
    note = sign_checkpoint(Checkpoint(origin=origin, size=new_size, root_hash=root), origin, key)
    await conn.execute(
        _ADD_CHECKPOINT,
        {"tree_size": new_size, "root_hash": root, "note": note, "created_at": now},
    )
    rt.sequencer.size, rt.sequencer.nodes = new_size, grown
    return len(pending)


async def _write_batch(
    session: AsyncSession,
    size: int,
    pending: Sequence[Any],  # rows of _PENDING
    leaves: list[bytes],
    created: list[tuple[int, int, bytes]],
    now: datetime,
) -> None:
    """Store the batch's entries and nodes, and take its rows out of the outbox."""
    entries = [
        {
            "idx": size + i,
            "entry_id": row.entry_id,
            "entry_type": row.entry_type,
            "agency_id": row.agency_id,
            "subject_commitment": row.subject_commitment,
            "body": row.body,
            "leaf_hash": leaves[i],
            "created_at": row.created_at,
            "integrated_at": now,
        }
        for i, row in enumerate(pending)
    ]
    nodes = [{"level": lv, "idx": ix, "hash": h} for lv, ix, h in created]
    # By key, not by range: a row with a lower seq may commit after the read above.
    done = {"seqs": [row.seq for row in pending]}
    if session.get_bind().dialect.name != "postgresql":
        conn = await session.connection()
        await conn.execute(_ADD_ENTRIES, entries)
        await conn.execute(_ADD_NODES, nodes)
        await conn.execute(_DONE, done)
        return
    await _ADD_ENTRIES_PG.affected(session, _as_arrays(entries))
    if nodes:
        await _ADD_NODES_PG.affected(session, _as_arrays(nodes))
    await _DONE_PG.affected(session, done)


def _as_arrays(rows: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """Rows of one shape as one list per column, for ``unnest``."""
    return {name: [row[name] for row in rows] for name in rows[0]}


async def integrate_until_empty(rt: Runtime, *, max_batches: int = 100_000) -> int:
    """Drain the outbox (tests, start-up, benchmarks); returns the entries added."""
    total = 0
    limit = rt.settings.sequencer_batch_size
    for _ in range(max_batches):
        added = await integrate_pending(rt)
        total += added
        if added < limit:
            # A short batch took every entry committed when it read the outbox; anything
            # later is the next poll's (saves an empty transaction per busy poll).
            break
    return total
