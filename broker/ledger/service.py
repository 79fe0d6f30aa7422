"""Reading the ledger: checkpoints, filtered entries, proofs, receipts, exports.

Every proof is assembled from the O(log n) stored subtree nodes it needs, read
in one query; the tree is never rebuilt to answer a request.
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from datetime import datetime
from typing import TYPE_CHECKING, Any

import orjson
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from broker.auth.roles import Principal, Role
from broker.crypto.commitment import subject_commitment
from broker.crypto.compact import b64url
from broker.errors import Conflict, InvalidRequest, NotFound
from broker.ledger.checkpoint import parse_verifier_key, verifier_key
from broker.ledger.checkpoint_key import rotation_note_at, rotations
from broker.ledger.merkle import (
    Node,
    consistency_proof,
    consistency_proof_ranges,
    inclusion_proof,
    inclusion_proof_ranges,
    nodes_needed,
)
from broker.ledger.schemas import (
    CheckpointOut,
    ConsistencyProofOut,
    EntryOut,
    EntryPage,
    InclusionProofOut,
    KeyRotationOut,
    LedgerKeyOut,
    ReceiptOut,
)
from broker.ledger.sequencer import load_nodes, tree_size
from broker.models import Disclosure, LedgerCheckpoint, LedgerEntry

if TYPE_CHECKING:
    from broker.runtime import Runtime

EXPORT_BATCH = 5000


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


async def ledger_key(rt: Runtime, session: AsyncSession) -> LedgerKeyOut:
    """The current checkpoint key as the ledger records it, and how it was reached.

    The ledger's newest rotation names the current key, whichever key folder this
    process started with: a host not yet given the new key still publishes it.
    """
    handovers = await rotations(session)
    origin = rt.settings.ledger_origin
    if handovers:
        vkey = handovers[-1].new_verifier_key
        _, _, public = parse_verifier_key(vkey)
    else:
        public = rt.keys.checkpoint_signing.public_key()
        vkey = verifier_key(origin, public)
    raw = public.public_bytes(Encoding.Raw, PublicFormat.Raw)
    kid = vkey.split("+")[1]
    jwk = {
        "kty": "OKP",
        "crv": "Ed25519",
        "x": b64url(raw),
        "kid": kid,
        "alg": "EdDSA",
        "use": "sig",
    }
    return LedgerKeyOut(
        origin=origin,
        verifier_key=vkey,
        jwk=jwk,
        rotations=[
            KeyRotationOut(
                tree_size=r.tree_size,
                old_verifier_key=r.old_verifier_key,
                new_verifier_key=r.new_verifier_key,
                note=r.note,
                created_at=r.created_at,
            )
            for r in handovers
        ],
    )


async def _checkpoint_out(
    rt: Runtime, session: AsyncSession, cp: LedgerCheckpoint
) -> CheckpointOut:
    """The tree head as the current key signs it.

    Until the tree grows past a key rotation, its newest checkpoint was signed by the
    retired key; the rotation note, signed by both, stands in for it.
    """
    handed_over = await rotation_note_at(session, cp.tree_size)
    return CheckpointOut(
        origin=rt.settings.ledger_origin,
        tree_size=cp.tree_size,
        root_hash=b64(cp.root_hash),
        note=handed_over or cp.note,
        created_at=cp.created_at,
    )


async def _latest(session: AsyncSession) -> LedgerCheckpoint | None:
    stmt = select(LedgerCheckpoint).order_by(LedgerCheckpoint.tree_size.desc()).limit(1)
    return (await session.execute(stmt)).scalar_one_or_none()


async def latest_checkpoint(session: AsyncSession, rt: Runtime) -> CheckpointOut:
    cp = await _latest(session)
    if cp is None:
        raise NotFound("The ledger has no checkpoint yet: nothing has been integrated.")
    return await _checkpoint_out(rt, session, cp)


def _entry_out(row: LedgerEntry) -> EntryOut:
    return EntryOut(
        index=row.idx,
        entry_id=row.entry_id,
        type=row.entry_type,
        created_at=row.created_at,
        leaf_hash=b64(row.leaf_hash),
        entry=orjson.loads(row.body),
    )


async def list_entries(
    session: AsyncSession,
    rt: Runtime,
    *,
    from_index: int,
    limit: int,
    since: datetime | None,
    until: datetime | None,
    agency_id: str | None,
    entry_type: str | None,
    subject_id: str | None,
) -> EntryPage:
    stmt = select(LedgerEntry).where(LedgerEntry.idx >= from_index)
    if since is not None:
        stmt = stmt.where(LedgerEntry.created_at >= since)
    if until is not None:
        stmt = stmt.where(LedgerEntry.created_at < until)
    if agency_id is not None:
        stmt = stmt.where(LedgerEntry.agency_id == agency_id)
    if entry_type is not None:
        stmt = stmt.where(LedgerEntry.entry_type == entry_type)
    if subject_id is not None:
        # One commitment per key she may have been committed under (rotations).
        commitments = [subject_commitment(key, subject_id) for key in rt.keys.subject_hmacs]
        stmt = stmt.where(LedgerEntry.subject_commitment.in_(commitments))
    rows = (await session.execute(stmt.order_by(LedgerEntry.idx).limit(limit + 1))).scalars().all()
    more = len(rows) > limit
    rows = rows[:limit]
    return EntryPage(
        items=[_entry_out(r) for r in rows], next_index=rows[-1].idx + 1 if more else None
    )


async def _checked_size(session: AsyncSession, requested: int | None) -> int:
    size = await tree_size(session)
    if requested is None:
        return size
    if requested > size:
        raise InvalidRequest(
            f"tree_size {requested} exceeds the integrated ledger size {size}.", tree_size=size
        )
    return requested


def _inclusion_nodes(index: int, size: int) -> set[Node]:
    return nodes_needed(inclusion_proof_ranges(index, size)) | {(0, index)}


async def _nodes_proving_size(
    session: AsyncSession, wanted: set[Node], size: int
) -> dict[Node, bytes] | None:
    """The wanted nodes, if they alone prove the tree has ``size`` leaves; else None.

    The sequencer stores a node only once its whole subtree is integrated, so a stored
    node whose range ends at ``size`` shows the tree reached ``size``: a proof for a
    size the caller names then needs no separate size query (one round trip less).
    """
    if not any((ix + 1) << lv == size for lv, ix in wanted):
        return None
    nodes = await load_nodes(session, wanted)
    return nodes if nodes.keys() >= wanted else None


async def inclusion(session: AsyncSession, index: int, size: int | None) -> InclusionProofOut:
    if size is not None and 0 <= index < size:
        nodes = await _nodes_proving_size(session, _inclusion_nodes(index, size), size)
        if nodes is not None:
            return _inclusion_out(index, size, nodes)
    tree = await _checked_size(session, size)
    if not 0 <= index < tree:
        raise InvalidRequest(f"index must be in [0, {tree}) for tree_size {tree}.")
    return await _inclusion(session, index, tree)


async def _inclusion(session: AsyncSession, index: int, tree: int) -> InclusionProofOut:
    """Proof for an index and size already known to lie within the integrated tree."""
    return _inclusion_out(index, tree, await load_nodes(session, _inclusion_nodes(index, tree)))


def _inclusion_out(index: int, tree: int, nodes: dict[Node, bytes]) -> InclusionProofOut:
    path = inclusion_proof(index, tree, nodes)
    return InclusionProofOut(
        index=index, tree_size=tree, leaf_hash=b64(nodes[(0, index)]), hashes=[b64(h) for h in path]
    )


async def consistency(session: AsyncSession, first: int, second: int) -> ConsistencyProofOut:
    if 1 <= first < second:
        wanted = nodes_needed(consistency_proof_ranges(first, second))
        nodes = await _nodes_proving_size(session, wanted, second)
        if nodes is not None:
            return _consistency_out(first, second, nodes)
    tree = await _checked_size(session, second)
    if not 1 <= first <= tree:
        raise InvalidRequest(f"first must be in [1, {tree}] (second = {tree}).")
    nodes = await load_nodes(session, nodes_needed(consistency_proof_ranges(first, tree)))
    return _consistency_out(first, tree, nodes)


def _consistency_out(first: int, second: int, nodes: dict[Node, bytes]) -> ConsistencyProofOut:
    path = consistency_proof(first, second, nodes)
    return ConsistencyProofOut(first=first, second=second, hashes=[b64(h) for h in path])


async def receipt(
    session: AsyncSession, rt: Runtime, caller: Principal, disclosure_id: str
) -> ReceiptOut:
    """The requester's or an auditor's proof that a decision is in the signed log."""
    disclosure = await session.get(Disclosure, disclosure_id)
    if disclosure is None or (
        caller.role != Role.auditor and disclosure.requester_agency_id != caller.agency_id
    ):
        raise NotFound("No such disclosure.")
    row = (
        await session.execute(
            select(LedgerEntry).where(LedgerEntry.entry_id == disclosure.ledger_entry_id)
        )
    ).scalar_one_or_none()
    cp = await _latest(session)
    if row is None or cp is None or cp.tree_size <= row.idx:
        raise Conflict("The ledger entry is not integrated yet; retry in a moment.", retry_after=1)
    proof = await _inclusion(session, row.idx, cp.tree_size)  # both known integrated
    return ReceiptOut(
        disclosure_id=disclosure.id,
        outcome=disclosure.outcome,
        entry=_entry_out(row),
        inclusion_proof=proof,
        checkpoint=await _checkpoint_out(rt, session, cp),
    )


async def export_lines(
    rt: Runtime, start: int, end: int | None, all_checkpoints: bool
) -> AsyncIterator[bytes]:
    """JSONL in the offline verifier's format, streamed in batches from a fresh session.

    A checkpoint line is written directly after the entry that brings the tree to
    its size; with ``all_checkpoints`` false only the newest one within the range,
    which is also where the export ends.
    """
    async with rt.sessionmaker() as session:
        covered = select(LedgerCheckpoint.tree_size, LedgerCheckpoint.note).where(
            LedgerCheckpoint.tree_size > start
        )
        if end is not None:
            covered = covered.where(LedgerCheckpoint.tree_size <= end)
        newest = (
            await session.execute(covered.order_by(LedgerCheckpoint.tree_size.desc()).limit(1))
        ).first()
        if newest is None:
            return
        # Key hand-overs first: the verifier needs them before the checkpoints they sign.
        handovers = [
            orjson.dumps({"kind": "key-rotation", "note": r.note}) + b"\n"
            for r in await rotations(session)
        ]
        if handovers:
            yield b"".join(handovers)
        # Stop at a signed size so that every exported entry is covered by a checkpoint.
        stop = int(newest[0])
        cps = {stop: str(newest[1])}
        if all_checkpoints:
            signed = (await session.execute(covered)).all()
            cps = {int(size): note for size, note in signed if size <= stop}
        at = start
        while at < stop:
            upto = min(at + EXPORT_BATCH, stop)
            batch = (
                await session.execute(
                    select(LedgerEntry.idx, LedgerEntry.leaf_hash, LedgerEntry.body)
                    .where(LedgerEntry.idx >= at, LedgerEntry.idx < upto)
                    .order_by(LedgerEntry.idx)
                )
            ).all()
            if not batch:
                break
            out: list[bytes] = []
            for idx, leaf, body in batch:
                out.append(_entry_line(int(idx), leaf, body))
                note = cps.get(int(idx) + 1)
                if note is not None:
                    out.append(orjson.dumps({"kind": "checkpoint", "note": note}) + b"\n")
            yield b"".join(out)
            at = int(batch[-1][0]) + 1


def _entry_line(idx: int, leaf: bytes, body: str) -> bytes:
    # The stored body is already canonical JSON; splice it in rather than re-encode.
    head: dict[str, Any] = {"kind": "entry", "index": idx, "leaf_hash": b64(leaf)}
    return orjson.dumps(head)[:-1] + b',"entry":' + body.encode("utf-8") + b"}\n"
