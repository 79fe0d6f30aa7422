"""Export a grant version as an HL7 FHIR R4 ``Consent`` resource.

Agencies with a FHIR stack can import the survivor's terms as they stand; the
broker stays the authority (the resource is a snapshot, ``meta.versionId`` is
the grant version).
"""

from __future__ import annotations

from typing import Any

from broker.ledger.entries import iso_now
from broker.models import ConsentGrant, ConsentVersion

_STATUS = {"active": "active", "paused": "inactive", "revoked": "inactive", "expired": "inactive"}
_PARTICIPATION = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
_IRCP = {"coding": [{"system": _PARTICIPATION, "code": "IRCP", "display": "information recipient"}]}
_PROV = {
    "coding": [
        {"system": _PARTICIPATION, "code": "PRCP", "display": "primary information recipient"}
    ]
}


def _org(agency_id: str) -> dict[str, str]:
    return {"reference": f"Organization/{agency_id}"}


def consent_resource(head: ConsentGrant, version: ConsentVersion, status: str) -> dict[str, Any]:
    attestation = version.attestation
    category_provisions = [
        {
            "type": "permit",
            "class": [{"system": "urn:consent-broker:category", "code": category}],
            "code": [
                {"coding": [{"system": f"urn:consent-broker:field:{category}", "code": name}]}
                for name in names
            ],
        }
        for category, names in sorted(version.fields.items())
    ]
    exclusions = [
        {
            "type": "deny",
            "actor": [{"role": _IRCP, "reference": {"reference": f"Device/{client_id}"}}],
        }
        for client_id in version.excluded_client_ids
    ]
    resource: dict[str, Any] = {
        "resourceType": "Consent",
        "id": head.id,
        "meta": {"versionId": str(version.version), "lastUpdated": iso_now(version.created_at)},
        "status": _STATUS.get(status, "inactive"),
        "scope": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/consentscope",
                    "code": "patient-privacy",
                }
            ]
        },
        "category": [
            {
                "coding": [
                    {"system": "http://loinc.org", "code": "59284-0", "display": "Patient Consent"}
                ]
            }
        ],
        "patient": {
            "identifier": {"system": "urn:consent-broker:subject", "value": head.subject_id}
        },
        "dateTime": iso_now(version.created_at),
        "organization": [_org(a) for a in version.source_agency_ids],
        "policyRule": {
            "coding": [
                {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "OPTIN"}
            ]
        },
        "verification": [
            {
                "verified": True,
                "verificationDate": attestation.get("signed_at"),
                "extension": [
                    {
                        "url": "urn:consent-broker:attestation-method",
                        "valueCode": attestation.get("method"),
                    },
                    {
                        "url": "urn:consent-broker:document-sha256",
                        "valueString": attestation.get("document_sha256"),
                    },
                ],
            }
        ],
        "provision": {
            "type": "permit",
            "period": {"start": iso_now(version.valid_from), "end": iso_now(version.expires_at)},
            "actor": [
                {"role": _PROV, "reference": _org(version.recipient_agency_id)},
                *({"role": _IRCP, "reference": _org(a)} for a in version.source_agency_ids),
            ],
            "purpose": [
                {"system": "urn:consent-broker:purpose", "code": p} for p in version.purposes
            ],
            "provision": category_provisions + exclusions,
        },
    }
    extensions = []
    if version.max_uses is not None:
        extensions.append({"url": "urn:consent-broker:max-uses", "valueInteger": version.max_uses})
    if version.data_life_days is not None:
        extensions.append(
            {"url": "urn:consent-broker:data-life-days", "valueInteger": version.data_life_days}
        )
    if extensions:
        resource["extension"] = extensions
    return resource
