"""The verifiable ledger: sequencing, checkpoints, proofs, receipts, exports, tampering.

Every test runs on SQLite and PostgreSQL. The background sequencer is off in
tests, so each test drains the outbox itself with ``integrate_until_empty``.
"""

from __future__ import annotations

import base64
import io
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select, text

from broker.cli import main as broker_main
from broker.errors import InvalidRequest
from broker.ledger import service as ledger_service
from broker.ledger.canonical import canonical_json
from broker.ledger.checkpoint import open_checkpoint
from broker.ledger.merkle import StreamingTree, leaf_hash, verify_consistency, verify_inclusion
from broker.ledger.sequencer import integrate_until_empty
from broker.ledger.verify import verify_export
from broker.models import Agency, LedgerCheckpoint, LedgerEntry, LedgerPending
from tests.support import World, attestation, consent_body
from tests.test_disclosure import SECRET_VALUES, SHELTER_RECORD, _ask, _setup


def _b(text_: str) -> bytes:
    return base64.b64decode(text_)


async def _auditor(world: World) -> Any:
    oversight = await world.agency("State DV Oversight Board", "oversight")
    return await world.client(oversight.id, "auditor", "oversight auditor")


async def _vkey(world: World) -> str:
    resp = await world.http.get("/v1/ledger/key")
    assert resp.status_code == 200
    return str(resp.json()["verifier_key"])


async def _busy_ledger(world: World, disclosures: int = 3) -> tuple[Any, Any]:
    s, _ = await _setup(world)
    for _ in range(disclosures):
        assert (await s.officer.post("/v1/disclosures", json=_ask())).status_code == 200
    await s.officer.post("/v1/disclosures", json=_ask(subject_ref="PD-UNKNOWN"))
    return s, await _auditor(world)


async def test_sequencer_builds_gapless_tree_and_signs_on_growth_only(world: World) -> None:
    s, auditor = await _busy_ledger(world)
    added = await integrate_until_empty(world.rt)
    assert added > 5
    async with world.rt.sessionmaker() as session:
        assert await session.scalar(select(func.count()).select_from(LedgerPending)) == 0
        indices = (await session.scalars(select(LedgerEntry.idx).order_by(LedgerEntry.idx))).all()
        checkpoints = await session.scalar(select(func.count()).select_from(LedgerCheckpoint))
    assert indices == list(range(added))
    assert await integrate_until_empty(world.rt) == 0
    async with world.rt.sessionmaker() as session:
        again = await session.scalar(select(func.count()).select_from(LedgerCheckpoint))
    assert again == checkpoints, "no new checkpoint when the tree did not grow"

    cp = (await auditor.get("/v1/ledger/checkpoint")).json()
    assert cp["tree_size"] == added
    opened = open_checkpoint(cp["note"], await _vkey(world), origin=cp["origin"])
    assert opened.size == added and opened.root_hash == _b(cp["root_hash"])
    lines = cp["note"].splitlines()
    assert lines[0] == world.rt.settings.ledger_origin and lines[1] == str(added)
    assert lines[-1].startswith("\u2014 ")


async def test_ledger_routes_are_for_auditors(world: World) -> None:
    s, auditor = await _busy_ledger(world, disclosures=1)
    await integrate_until_empty(world.rt)
    paths = [
        "/v1/ledger/checkpoint",
        "/v1/ledger/entries",
        "/v1/ledger/proofs/inclusion?index=0",
        "/v1/ledger/proofs/consistency?first=1&second=2",
        "/v1/ledger/export",
    ]
    for path in paths:
        assert (await auditor.get(path)).status_code == 200, path
        for other in (s.officer, s.advocate, world.admin):
            assert other is not None
            denied = await other.get(path)
            assert denied.status_code == 403, path
            assert denied.headers["content-type"] == "application/problem+json"
        assert (await world.http.get(path)).status_code == 401
    key = (await world.http.get("/v1/ledger/key")).json()
    assert key["jwk"]["crv"] == "Ed25519" and "d" not in key["jwk"]


async def test_entries_filters_and_pagination(world: World) -> None:
    s, auditor = await _busy_ledger(world)
    await integrate_until_empty(world.rt)
    everything = (await auditor.get("/v1/ledger/entries", params={"limit": 1000})).json()
    total = len(everything["items"])
    assert everything["next_index"] is None

    seen: list[int] = []
    cursor: int | None = 0
    while cursor is not None:
        page = (
            await auditor.get("/v1/ledger/entries", params={"from_index": cursor, "limit": 3})
        ).json()
        seen += [item["index"] for item in page["items"]]
        cursor = page["next_index"]
    assert seen == list(range(total))

    permitted = (
        await auditor.get("/v1/ledger/entries", params={"type": "disclosure.permitted"})
    ).json()["items"]
    assert len(permitted) == 3
    assert all(i["entry"]["type"] == "disclosure.permitted" for i in permitted)

    by_agency = (await auditor.get("/v1/ledger/entries", params={"agency_id": s.police.id})).json()[
        "items"
    ]
    assert by_agency and all(i["entry"]["agency_id"] == s.police.id for i in by_agency)

    mine = (
        await auditor.get("/v1/ledger/entries", params={"subject_id": s.subject_id, "limit": 1000})
    ).json()["items"]
    types = {i["type"] for i in mine}
    assert {"subject.enrolled", "consent.granted", "disclosure.permitted"} <= types
    assert len({i["entry"]["subject"] for i in mine}) == 1
    assert all(s.subject_id not in json.dumps(i) for i in mine)

    window = (
        await auditor.get(
            "/v1/ledger/entries",
            params={"since": "2000-01-01T00:00:00Z", "until": "2000-01-02T00:00:00Z"},
        )
    ).json()["items"]
    assert window == []
    naive = await auditor.get("/v1/ledger/entries", params={"since": "2026-01-01T00:00:00"})
    assert naive.status_code == 422 and "time zone" in naive.json()["detail"]


async def test_every_served_proof_verifies_and_a_changed_leaf_does_not(world: World) -> None:
    """Property: for any (index, size) and (first, second) the API serves a proof that
    verifies against the roots of the stored tree; any changed leaf fails."""
    s, auditor = await _busy_ledger(world, disclosures=6)
    size = await integrate_until_empty(world.rt)
    entries = (await auditor.get("/v1/ledger/entries", params={"limit": 1000})).json()["items"]
    leaves = [leaf_hash(canonical_json(e["entry"])) for e in entries]
    assert [_b(e["leaf_hash"]) for e in entries] == leaves
    roots = {}
    for n in range(1, size + 1):
        first_proof = (
            await auditor.get("/v1/ledger/proofs/inclusion", params={"index": 0, "tree_size": n})
        ).json()
        roots[n] = _root_from_inclusion(0, n, leaves[0], [_b(h) for h in first_proof["hashes"]])
    final = (await auditor.get("/v1/ledger/checkpoint")).json()
    assert roots[size] == _b(final["root_hash"])
    # Every pair, from the same service calls the routes make (HTTP would hit the rate limit);
    # the routes themselves are exercised above and below.
    inclusion: dict[tuple[int, int], list[bytes]] = {}
    consistency: dict[tuple[int, int], list[bytes]] = {}
    async with world.rt.sessionmaker() as session:
        for n in range(1, size + 1):
            for i in range(n):
                inc = await ledger_service.inclusion(session, i, n)
                assert _b(inc.leaf_hash) == leaves[i]
                inclusion[(i, n)] = [_b(h) for h in inc.hashes]
            for m in range(1, n + 1):
                con = await ledger_service.consistency(session, m, n)
                consistency[(m, n)] = [_b(h) for h in con.hashes]
    served = (
        await auditor.get("/v1/ledger/proofs/consistency", params={"first": 3, "second": size})
    ).json()
    assert [_b(h) for h in served["hashes"]] == consistency[(3, size)]

    @settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
    @given(st.data())
    def check(data: st.DataObject) -> None:
        n = data.draw(st.integers(1, size))
        i = data.draw(st.integers(0, n - 1))
        assert verify_inclusion(leaves[i], i, n, inclusion[(i, n)], roots[n])
        flipped = bytearray(leaves[i])
        flipped[data.draw(st.integers(0, 31))] ^= 1 << data.draw(st.integers(0, 7))
        assert not verify_inclusion(bytes(flipped), i, n, inclusion[(i, n)], roots[n])
        m = data.draw(st.integers(1, n))
        proof = consistency[(m, n)]
        assert verify_consistency(m, n, roots[m], roots[n], proof)
        if m < n:  # a different first tree (one changed leaf) is not a prefix
            assert not verify_consistency(m, n, _changed_root(m, i % m), roots[n], proof)

    def _changed_root(m: int, at: int) -> bytes:
        tree = StreamingTree()
        for k, leaf in enumerate(leaves[:m]):
            tree.append(leaf if k != at else bytes(32))
        return tree.root()

    check()
    bad = await auditor.get(
        "/v1/ledger/proofs/inclusion", params={"index": size, "tree_size": size}
    )
    assert bad.status_code == 422
    beyond = await auditor.get(
        "/v1/ledger/proofs/consistency", params={"first": 1, "second": size + 1}
    )
    assert beyond.status_code == 422 and "exceeds" in beyond.json()["detail"]
    # Past the integrated tree, whatever nodes happen to exist: refused, never a proof
    # (proofs for a named size skip the size query when their nodes prove it).
    async with world.rt.sessionmaker() as session:
        for n in range(size + 1, 2 * size + 3):
            for i in (0, size - 1, n - 1):
                with pytest.raises(InvalidRequest, match="exceeds"):
                    await ledger_service.inclusion(session, i, n)
            for m in (1, size - 1, size, n - 1):
                with pytest.raises(InvalidRequest):
                    await ledger_service.consistency(session, m, n)


def _root_from_inclusion(index: int, size: int, leaf: bytes, path: list[bytes]) -> bytes:
    """RFC 9162 §2.1.3.2 root computation, written out again for the test."""
    import hashlib

    fn, sn, r = index, size - 1, leaf
    for p in path:
        if fn & 1 or fn == sn:
            r = hashlib.sha256(b"\x01" + p + r).digest()
            while not fn & 1 and fn:
                fn >>= 1
                sn >>= 1
        else:
            r = hashlib.sha256(b"\x01" + r + p).digest()
        fn >>= 1
        sn >>= 1
    return r


async def test_receipt_for_requester_and_auditor_only(world: World) -> None:
    s, _ = await _setup(world)
    made = await s.officer.post("/v1/disclosures", json=_ask())
    disclosure_id = made.json()["disclosure_id"]
    early = await s.officer.get(f"/v1/disclosures/{disclosure_id}/receipt")
    assert early.status_code == 409 and early.headers["retry-after"] == "1"
    await integrate_until_empty(world.rt)
    receipt = (await s.officer.get(f"/v1/disclosures/{disclosure_id}/receipt")).json()
    assert receipt["entry"]["entry_id"] == made.json()["ledger_entry"]
    proof, cp = receipt["inclusion_proof"], receipt["checkpoint"]
    opened = open_checkpoint(cp["note"], await _vkey(world))
    leaf = leaf_hash(canonical_json(receipt["entry"]["entry"]))
    assert verify_inclusion(
        leaf, proof["index"], opened.size, [_b(h) for h in proof["hashes"]], opened.root_hash
    )
    auditor = await _auditor(world)
    assert (await auditor.get(f"/v1/disclosures/{disclosure_id}/receipt")).status_code == 200
    stranger = await world.client(s.shelter.id, "agency", "shelter system")
    hidden = await stranger.get(f"/v1/disclosures/{disclosure_id}/receipt")
    missing = await stranger.get("/v1/disclosures/00000000-0000-0000-0000-000000000000/receipt")
    assert hidden.status_code == missing.status_code == 404
    assert hidden.json()["detail"] == missing.json()["detail"]
    assert (await s.advocate.get(f"/v1/disclosures/{disclosure_id}/receipt")).status_code == 403


async def test_export_verifies_offline_and_with_the_cli(
    world: World, tmp_path: Any, capsys: Any
) -> None:
    s, auditor = await _busy_ledger(world)
    await integrate_until_empty(world.rt)
    first_cp = (await auditor.get("/v1/ledger/checkpoint")).json()
    await s.officer.post("/v1/disclosures", json=_ask())
    size = (await integrate_until_empty(world.rt)) + first_cp["tree_size"]
    vkey = await _vkey(world)
    for mode in ("latest", "all"):
        export = await auditor.get("/v1/ledger/export", params={"checkpoints": mode})
        assert export.headers["content-type"].startswith("application/jsonl")
        report = verify_export(
            io.BytesIO(export.content), vkey, trusted_checkpoint=first_cp["note"]
        )
        assert report.ok, report.problems
        assert report.entries == size and report.checkpoints_verified >= 1
    path = tmp_path / "ledger.jsonl"
    path.write_bytes(export.content)
    saved = tmp_path / "checkpoint.txt"
    saved.write_text(first_cp["note"])
    assert (
        broker_main(["ledger", "verify", str(path), "--vkey", vkey, "--checkpoint", str(saved)])
        == 0
    )
    assert f"OK: {size} entries" in capsys.readouterr().out
    partial = await auditor.get("/v1/ledger/export", params={"end": first_cp["tree_size"]})
    assert partial.content.count(b'"kind":"entry"') == first_cp["tree_size"]


async def test_tampering_is_named_by_index(world: World, backend: str) -> None:
    """A superuser who bypasses the triggers is still caught: the verifier names the index,
    and proofs served from a doctored node no longer verify against the signed root."""
    s, auditor = await _busy_ledger(world)
    size = await integrate_until_empty(world.rt)
    vkey = await _vkey(world)
    cp = (await auditor.get("/v1/ledger/checkpoint")).json()
    victim = 3
    async with world.rt.engine.begin() as conn:
        if backend == "postgresql":
            await conn.execute(text("SET LOCAL session_replication_role = replica"))
        else:
            for table in ("ledger_entries", "ledger_nodes"):
                await conn.execute(text(f"DROP TRIGGER {table}_no_update"))
        await conn.execute(
            text("UPDATE ledger_entries SET body = replace(body, :old, :new) WHERE idx = :i"),
            {"old": '"v":1', "new": '"v":2', "i": victim},
        )
        await conn.execute(
            text("UPDATE ledger_nodes SET hash = :h WHERE level = 0 AND idx = 1"),
            {"h": b"\x07" * 32},
        )
    export = await auditor.get("/v1/ledger/export")
    report = verify_export(io.BytesIO(export.content), vkey)
    assert not report.ok
    assert report.first_bad_index == victim
    assert any(f"entry {victim}" in p for p in report.problems)
    proof = (
        await auditor.get("/v1/ledger/proofs/inclusion", params={"index": 0, "tree_size": size})
    ).json()
    entries = (await auditor.get("/v1/ledger/entries", params={"limit": 1})).json()["items"]
    leaf0 = leaf_hash(canonical_json(entries[0]["entry"]))
    assert not verify_inclusion(
        leaf0, 0, size, [_b(h) for h in proof["hashes"]], _b(cp["root_hash"])
    )


async def test_no_personal_data_in_any_entry_type(world: World) -> None:
    """Exercise every kind of entry, then scan all of them for the test's personal data."""
    s, grant = await _setup(world)
    await s.officer.post("/v1/disclosures", json=_ask())
    await s.officer.post("/v1/disclosures", json=_ask(subject_ref="PD-UNKNOWN"))
    await s.officer.post("/v1/disclosures", json=_ask(purpose="prosecution"))
    gid = grant["id"]
    life = {"attestation": attestation("verbal_witnessed"), "reason": "Call with survivor"}
    revision = consent_body(fields={"shelter": ["intake_date"]}, source_agency_ids=[s.shelter.id])
    revised = await s.advocate.post(f"/v1/consents/{gid}/versions", json=revision)
    assert revised.status_code == 201, revised.text
    for change in ("pause", "resume", "revoke"):
        done = await s.advocate.post(f"/v1/consents/{gid}/{change}", json=life)
        assert done.status_code == 200, done.text
    assert world.admin is not None
    await world.admin.patch(f"/v1/agencies/{s.police.id}", json={"status": "suspended"})
    erased = await world.subject(s.advocate, {s.shelter.id: "HH-ERASE-77"})
    taken = {"agency_id": s.police.id, "reference": "PD-24-0193"}
    refused = await s.advocate.post(f"/v1/subjects/{erased}/references", json=taken)
    assert refused.status_code == 409, refused.text
    gone = await s.advocate.request("DELETE", f"/v1/subjects/{erased}", json=life)
    assert gone.status_code == 200, gone.text
    await integrate_until_empty(world.rt)
    async with world.rt.sessionmaker() as session:
        rows = (await session.execute(select(LedgerEntry.entry_type, LedgerEntry.body))).all()
    types = {t for t, _ in rows}
    assert {
        "agency.registered",
        "agency.updated",
        "client.issued",
        "subject.enrolled",
        "subject.reference_linked",
        "subject.reference_refused",
        "subject.erased",
        "record.deposited",
        "consent.granted",
        "consent.paused",
        "consent.resumed",
        "consent.revised",
        "consent.revoked",
        "disclosure.permitted",
        "disclosure.denied",
    } <= types, types
    values = [v for v in SHELTER_RECORD.values() if isinstance(v, str) and len(v) > 3]
    # Short enumerations ("assigned") are also field-name fragments: match them as JSON strings.
    secrets = [*SECRET_VALUES, "PD-UNKNOWN", "HH-ERASE-77", "PD-24-0193", s.subject_id, erased]
    secrets += [v if len(v) > 10 else json.dumps(v) for v in values]
    for entry_type, body in rows:
        for secret in secrets:
            assert secret not in body, (entry_type, secret)


async def test_every_agency_has_its_registration_entry(world: World) -> None:
    """Agencies registered over the API and the operators' agency made from the shell."""
    await _setup(world)
    await integrate_until_empty(world.rt)
    async with world.rt.sessionmaker() as session:
        agencies = set((await session.execute(select(Agency.id))).scalars())
        rows = (
            await session.execute(
                select(LedgerEntry.agency_id, LedgerEntry.body).where(
                    LedgerEntry.entry_type == "agency.registered"
                )
            )
        ).all()
    assert world.ops_agency_id in agencies and len(agencies) > 1
    assert sorted(str(agency_id) for agency_id, _ in rows) == sorted(agencies)
    ops = next(json.loads(body) for agency_id, body in rows if agency_id == world.ops_agency_id)
    assert ops["actor"] is None and ops["kind"] == "oversight" and ops["key_ids"] == []


async def test_two_runtimes_in_one_process_keep_separate_trees(
    world: World, sqlite_template: Any, tmp_path: Any
) -> None:
    """The sequencer's cached frontier belongs to its runtime: two databases never mix."""
    import shutil

    from broker.app import create_app
    from broker.ledger.entries import append_entry

    other_db = tmp_path / "other.db"
    shutil.copyfile(sqlite_template, other_db)
    other = create_app(
        world.rt.settings.model_copy(update={"database_url": f"sqlite+aiosqlite:///{other_db}"})
    )
    async with other.router.lifespan_context(other):
        runtimes = [world.rt, other.state.runtime]
        for round_ in range(4):
            for n, rt in enumerate(runtimes):
                async with rt.sessionmaker() as session, session.begin():
                    for _ in range(round_ + n + 1):
                        await append_entry(
                            session,
                            hmac_key=rt.keys.subject_hmac,
                            entry_type="test.probe",
                            actor=None,
                            agency_id=None,
                        )
                await integrate_until_empty(rt)
        vkey = await _vkey(world)
        for rt in runtimes:
            lines = [
                line
                async for chunk in ledger_service.export_lines(rt, 0, None, True)
                for line in chunk.splitlines(keepends=True)
            ]
            report = verify_export(lines, vkey)
            assert report.ok, report.problems
            assert report.checkpoints_verified >= 4
