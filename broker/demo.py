"""`broker demo`: the whole loop of story 1 and story 4 against a running broker.

It bootstraps an admin credential directly in the broker's database (as
`broker clients add` does, so run it with the same BROKER_* settings as the
server), then does everything else over HTTP with fresh keys, like real agencies.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import secrets
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from joserfc.jwk import ECKey, OKPKey

from broker.ledger.canonical import canonical_json
from broker.ledger.checkpoint import open_checkpoint
from broker.ledger.merkle import leaf_hash, verify_inclusion
from broker.sdk import BrokerClient

if TYPE_CHECKING:
    from broker.runtime import Runtime


def _keys(use: str) -> tuple[dict[str, Any], dict[str, Any]]:
    key: ECKey | OKPKey = (
        OKPKey.generate_key("X25519", auto_kid=True)
        if use == "enc"
        else ECKey.generate_key("P-256", auto_kid=True)
    )
    public = key.as_dict(private=False) | {"use": use}
    if use == "enc":
        public["alg"] = "ECDH-ES+A256KW"
    return key.as_dict(private=True), {"keys": [public]}


def _say(step: str, detail: object = "") -> None:
    text = detail if isinstance(detail, str) else json.dumps(detail, indent=2, default=str)
    print(f"\n== {step}\n{text}" if text else f"\n== {step}")


def _ok(resp: Any, status: int = 200) -> dict[str, Any]:
    if resp.status_code != status:
        raise RuntimeError(
            f"{resp.request.method} {resp.request.url.path} -> {resp.status_code}: {resp.text}"
        )
    body: dict[str, Any] = resp.json()
    return body


async def _bootstrap_admin() -> tuple[str, dict[str, Any]]:
    from broker.agencies.service import issue_operator_client
    from broker.auth.roles import Role
    from broker.cli.shared import on_runtime

    private, public = _keys("sig")

    async def issue(rt: Runtime) -> str:
        async with rt.sessionmaker() as session, session.begin():
            client = await issue_operator_client(
                session,
                rt,
                role=Role.admin,
                name="demo-admin",
                jwks=public,
                agency_name="Demo operations",
            )
            return client.id

    return await on_runtime(issue), private


async def run_demo(url: str) -> int:
    """Keys live only in memory for the run: the demo leaves no private key on disk."""
    run = secrets.token_hex(3)
    admin_id, admin_key = await _bootstrap_admin()
    admin = BrokerClient(url, admin_id, admin_key)
    clients: list[BrokerClient] = [admin]
    try:
        return await _story(url, run, admin, clients)
    finally:
        for c in clients:
            await c.aclose()


async def _agency(admin: BrokerClient, name: str, kind: str) -> tuple[str, dict[str, Any]]:
    enc_private, enc_public = _keys("enc")
    body = _ok(
        await admin.post(
            "/v1/agencies", json={"name": name, "kind": kind, "encryption_jwks": enc_public}
        ),
        201,
    )
    return str(body["id"]), enc_private


async def _client(
    url: str, admin: BrokerClient, agency_id: str, role: str, name: str, clients: list[BrokerClient]
) -> BrokerClient:
    private, public = _keys("sig")
    body = _ok(
        await admin.post(
            "/v1/clients", json={"agency_id": agency_id, "role": role, "name": name, "jwks": public}
        ),
        201,
    )
    client = BrokerClient(url, body["client_id"], private)
    clients.append(client)
    return client


async def _story(url: str, run: str, admin: BrokerClient, clients: list[BrokerClient]) -> int:
    from broker.crypto.payload import open_payload

    shelter_id, _ = await _agency(admin, f"Harbor House ({run})", "shelter")
    police_id, police_enc = await _agency(
        admin, f"Eastside Police DV Unit ({run})", "law_enforcement"
    )
    _say("registered agencies", {"Harbor House": shelter_id, "Eastside DV Unit": police_id})
    advocate = await _client(url, admin, shelter_id, "advocate", "hotline advocate", clients)
    shelter_system = await _client(url, admin, shelter_id, "agency", "shelter case system", clients)
    dv_unit = await _client(url, admin, police_id, "agency", "DV unit case system", clients)

    subject_id = _ok(await advocate.post("/v1/subjects", json={}), 201)["subject_id"]
    police_ref, shelter_ref = f"PD-24-0193-{run}", f"HH-{run}"
    for agency_id, ref in ((police_id, police_ref), (shelter_id, shelter_ref)):
        _ok(
            await advocate.post(
                f"/v1/subjects/{subject_id}/references",
                json={"agency_id": agency_id, "reference": ref},
            ),
            201,
        )
    _say("enrolled survivor M.", {"subject_id": subject_id, "police case": police_ref})

    record = {
        "intake_date": "2024-03-02",
        "bed_status": "assigned",
        "shelter_location": "(confidential)",
        "safety_plan_on_file": True,
    }
    _ok(
        await shelter_system.post(
            "/v1/records",
            json={"subject_ref": shelter_ref, "category": "shelter", "record": record},
        ),
        201,
    )
    now = datetime.now(UTC)
    grant = _ok(
        await advocate.post(
            "/v1/consents",
            json={
                "subject_id": subject_id,
                "source_agency_ids": [shelter_id],
                "recipient_agency_id": police_id,
                "fields": {"shelter": ["intake_date", "bed_status"]},
                "purposes": ["safety_planning"],
                "expires_at": (now + timedelta(days=30)).isoformat(),
                "data_life_days": 30,
                "attestation": {
                    "method": "written",
                    "signed_at": now.isoformat(),
                    "document_sha256": hashlib.sha256(b"demo consent form").hexdigest(),
                },
                "reason": "M. agreed in writing during the hotline call",
            },
        ),
        201,
    )
    _say(
        "consent granted (version 1)",
        {k: grant[k] for k in ("id", "fields", "purposes", "expires_at")},
    )

    ask = {
        "subject_ref": police_ref,
        "category": "shelter",
        "purpose": "safety_planning",
        "fields": ["intake_date", "bed_status", "shelter_location"],
    }
    disclosed = _ok(await dv_unit.post("/v1/disclosures", json=ask))
    jwks = (await dv_unit.http.get("/.well-known/jwks.json")).json()
    claims = open_payload(disclosed["payload"], police_enc, jwks)
    _say(
        "DV Unit receives (decrypted with its own key)",
        {
            "fields_disclosed": disclosed["fields_disclosed"],
            "fields_withheld": disclosed["fields_withheld"],
            "data": claims["data"],
            "data_life_days": claims["data_life_days"],
            "notice": claims["notice"],
        },
    )

    _say(
        "the DV Unit's receipt from the ledger", await _receipt(dv_unit, disclosed["disclosure_id"])
    )

    revoke = {
        "attestation": {
            "method": "verbal",
            "signed_at": datetime.now(UTC).isoformat(),
            "document_sha256": hashlib.sha256(b"call note").hexdigest(),
        },
        "reason": "M. phoned: stop sharing with the police",
    }
    _ok(await advocate.post(f"/v1/consents/{grant['id']}/revoke", json=revoke))
    denied = await dv_unit.post("/v1/disclosures", json=ask)
    _say(f"after revocation the DV Unit gets HTTP {denied.status_code}", denied.json())

    accounting = _ok(await advocate.get(f"/v1/subjects/{subject_id}/disclosures"))
    _say(
        "accounting of disclosures for M.",
        [
            {
                k: i[k]
                for k in (
                    "at",
                    "outcome",
                    "reason",
                    "requester_agency_id",
                    "fields_disclosed",
                    "purpose",
                    "grant_version",
                )
            }
            for i in accounting["items"]
        ],
    )
    return 0 if denied.status_code == 403 else 1


async def _receipt(client: BrokerClient, disclosure_id: str) -> dict[str, Any]:
    """Fetch the receipt once the sequencer has integrated it, and check it locally."""
    for _ in range(50):
        resp = await client.get(f"/v1/disclosures/{disclosure_id}/receipt")
        if resp.status_code != 409:
            break
        await asyncio.sleep(0.1)
    receipt = _ok(resp)
    vkey = (await client.http.get("/v1/ledger/key")).json()["verifier_key"]
    checkpoint = open_checkpoint(receipt["checkpoint"]["note"], vkey)
    proof = receipt["inclusion_proof"]
    ok = verify_inclusion(
        leaf_hash(canonical_json(receipt["entry"]["entry"])),
        proof["index"],
        checkpoint.size,
        [base64.b64decode(h) for h in proof["hashes"]],
        checkpoint.root_hash,
    )
    return {
        "ledger_index": proof["index"],
        "tree_size": checkpoint.size,
        "entry": receipt["entry"]["entry"],
        "inclusion_proof": "verified against the signed checkpoint" if ok else "DOES NOT VERIFY",
    }
