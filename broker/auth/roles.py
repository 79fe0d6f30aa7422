"""Roles and the scopes each one carries."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum


class Role(StrEnum):
    agency = "agency"
    advocate = "advocate"
    auditor = "auditor"
    admin = "admin"


ROLE_SCOPES: dict[Role, tuple[str, ...]] = {
    Role.agency: ("disclosures:request", "records:deposit", "receipts:read"),
    Role.advocate: ("subjects:manage", "consents:manage", "accounting:read"),
    Role.auditor: ("ledger:read", "receipts:read"),
    Role.admin: ("agencies:manage", "clients:manage"),
}

ALL_SCOPES: tuple[str, ...] = tuple(sorted({s for scopes in ROLE_SCOPES.values() for s in scopes}))


@dataclass(frozen=True, slots=True)
class Principal:
    """The authenticated caller: always a client (credential) of one agency."""

    client_id: str
    agency_id: str
    role: Role
    scopes: frozenset[str]
    expires_at: datetime
