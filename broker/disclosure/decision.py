"""The consent decision: a pure function of (request, grant versions, policy, time).

It permits with the exact field set, or raises ``Denied`` with a reason code.
Deny by default (no grant, empty lists, unknown anything), deny overrides (an
exclusion on any grant beats a permit on another), and minimum necessary:

    disclosed = requested ∩ grant fields ∩ policy fields(category, purpose)

where a never-disclosable field (shelter location, a confidential address) goes
out only if the grant lists it *and* the request names it explicitly: it is
never part of a default "everything I may have" request.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol


class PolicyView(Protocol):
    def permitted_fields(self, category: str, purpose: str) -> frozenset[str]: ...

    def never_disclosable(self, category: str) -> frozenset[str]: ...


@dataclass(frozen=True, slots=True)
class GrantView:
    """The version in force of one grant, as the decision needs it."""

    grant_id: str
    version: int
    status: str
    recipient_agency_id: str
    source_agency_ids: tuple[str, ...]
    fields: Mapping[str, frozenset[str]]
    purposes: frozenset[str]
    valid_from: datetime
    expires_at: datetime
    max_uses: int | None
    uses: int
    excluded_client_ids: frozenset[str]
    data_life_days: int | None


@dataclass(frozen=True, slots=True)
class DisclosureRequest:
    agency_id: str
    client_id: str
    category: str
    purpose: str
    fields: frozenset[str] | None  # None: "what I may have", never-disclosable excluded


@dataclass(frozen=True, slots=True)
class Permit:
    grant: GrantView
    disclosed: frozenset[str]
    withheld: frozenset[str]


class Denied(Exception):
    """A refusal with a reason code for the ledger; callers answer one uniform 403."""

    def __init__(self, reason: str, grant: GrantView | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.grant = grant


# Checks in order; a candidate failing later got "closer" to a permit, and the
# denial reports the closest candidate's reason (most useful to the advocate).
_STAGES = (
    "revoked",
    "paused",
    "not_yet_valid",
    "expired",
    "category_not_granted",
    "purpose_not_granted",
    "uses_exhausted",
    "no_permitted_fields",
)


def _requested(
    request: DisclosureRequest, granted: frozenset[str], never: frozenset[str]
) -> frozenset[str]:
    if request.fields is None:
        return granted - never
    return request.fields


def _evaluate(
    request: DisclosureRequest, grant: GrantView, policy: PolicyView, now: datetime
) -> Permit | str:
    if grant.status == "revoked":
        return "revoked"
    if grant.status == "paused":
        return "paused"
    if grant.status != "active":
        return "revoked"  # any unknown status is treated as the strictest
    if now < grant.valid_from:
        return "not_yet_valid"
    if now >= grant.expires_at:
        return "expired"
    granted = grant.fields.get(request.category)
    if granted is None:
        return "category_not_granted"
    if request.purpose not in grant.purposes:
        return "purpose_not_granted"
    if grant.max_uses is not None and grant.uses >= grant.max_uses:
        return "uses_exhausted"
    never = policy.never_disclosable(request.category)
    requested = _requested(request, granted, never)
    disclosed = requested & granted & policy.permitted_fields(request.category, request.purpose)
    if request.fields is None:
        disclosed -= never
    if not disclosed:
        return "no_permitted_fields"
    return Permit(grant=grant, disclosed=disclosed, withheld=requested - disclosed)


def decide(
    request: DisclosureRequest, grants: Sequence[GrantView], policy: PolicyView, now: datetime
) -> Permit:
    """Permit or raise ``Denied``; ``grants`` are the latest versions for this subject."""
    candidates = [g for g in grants if g.recipient_agency_id == request.agency_id]
    if not candidates:
        raise Denied("no_grant")
    for grant in candidates:
        if request.client_id in grant.excluded_client_ids:
            raise Denied("recipient_excluded", grant)
    permits: list[Permit] = []
    closest: tuple[int, GrantView] | None = None
    for grant in candidates:
        outcome = _evaluate(request, grant, policy, now)
        if isinstance(outcome, Permit):
            permits.append(outcome)
            continue
        rank = _STAGES.index(outcome)
        if closest is None or rank > closest[0]:
            closest = (rank, grant)
    if permits:
        return max(permits, key=lambda p: (len(p.disclosed), p.grant.version, p.grant.grant_id))
    assert closest is not None
    raise Denied(_STAGES[closest[0]], closest[1])
