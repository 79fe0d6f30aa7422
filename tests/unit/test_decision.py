"""Property tests of the pure consent decision (no database needed)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.disclosure.decision import Denied, DisclosureRequest, GrantView, decide

NOW = datetime(2026, 6, 1, tzinfo=UTC)
FIELDS = ["a", "b", "c", "d", "loc", "e"]
NEVER = frozenset({"loc"})


@dataclass(frozen=True)
class FakePolicy:
    rules: dict[tuple[str, str], frozenset[str]] = field(default_factory=dict)
    never: frozenset[str] = NEVER

    def permitted_fields(self, category: str, purpose: str) -> frozenset[str]:
        return self.rules.get((category, purpose), frozenset())

    def never_disclosable(self, category: str) -> frozenset[str]:
        return self.never


def grant(**over: object) -> GrantView:
    base = GrantView(
        grant_id="g1",
        version=1,
        status="active",
        recipient_agency_id="R",
        source_agency_ids=("S",),
        fields={"shelter": frozenset({"a", "b"})},
        purposes=frozenset({"p"}),
        valid_from=NOW - timedelta(days=1),
        expires_at=NOW + timedelta(days=1),
        max_uses=None,
        uses=0,
        excluded_client_ids=frozenset(),
        data_life_days=30,
    )
    return replace(base, **over)  # type: ignore[arg-type]


def request(**over: object) -> DisclosureRequest:
    base = DisclosureRequest(
        agency_id="R", client_id="c1", category="shelter", purpose="p", fields=None
    )
    return replace(base, **over)  # type: ignore[arg-type]


POLICY = FakePolicy({("shelter", "p"): frozenset(FIELDS)})


def reason(req: DisclosureRequest, grants: list[GrantView], policy: FakePolicy = POLICY) -> str:
    with pytest.raises(Denied) as info:
        decide(req, grants, policy, NOW)
    return info.value.reason


def test_each_denial_reason() -> None:
    assert reason(request(), []) == "no_grant"
    assert reason(request(agency_id="X"), [grant()]) == "no_grant"
    assert reason(request(), [grant(status="revoked")]) == "revoked"
    assert reason(request(), [grant(status="paused")]) == "paused"
    assert reason(request(), [grant(status="weird")]) == "revoked"
    assert reason(request(), [grant(valid_from=NOW + timedelta(seconds=1))]) == "not_yet_valid"
    assert reason(request(), [grant(expires_at=NOW)]) == "expired"
    assert reason(request(category="medical"), [grant()]) == "category_not_granted"
    assert reason(request(purpose="q"), [grant()]) == "purpose_not_granted"
    assert reason(request(), [grant(max_uses=2, uses=2)]) == "uses_exhausted"
    assert reason(request(), [grant(excluded_client_ids=frozenset({"c1"}))]) == "recipient_excluded"
    assert reason(request(), [grant(fields={"shelter": frozenset()})]) == "no_permitted_fields"
    assert reason(request(), [grant()], FakePolicy()) == "no_permitted_fields", (
        "empty policy permits nothing"
    )


def test_exclusion_overrides_another_permit() -> None:
    other = grant(grant_id="g2", excluded_client_ids=frozenset({"c1"}))
    assert reason(request(), [grant(), other]) == "recipient_excluded"


def test_closest_reason_is_reported() -> None:
    grants = [grant(status="revoked"), grant(grant_id="g2", max_uses=1, uses=1)]
    assert reason(request(), grants) == "uses_exhausted"


def test_never_disclosable_needs_grant_and_explicit_request() -> None:
    g = grant(fields={"shelter": frozenset({"a", "loc"})})
    assert decide(request(), [g], POLICY, NOW).disclosed == {"a"}
    assert decide(request(fields=frozenset({"a", "loc"})), [g], POLICY, NOW).disclosed == {
        "a",
        "loc",
    }
    assert decide(request(fields=frozenset({"loc", "a"})), [grant()], POLICY, NOW).disclosed == {
        "a"
    }


names = st.frozensets(st.sampled_from(FIELDS))


@settings(max_examples=400, deadline=None)
@given(
    granted=names,
    policy_fields=names,
    requested=st.one_of(st.none(), names.filter(bool)),
    never=names,
    status=st.sampled_from(["active", "paused", "revoked", "expired", "x"]),
    uses=st.integers(0, 3),
    max_uses=st.one_of(st.none(), st.integers(1, 3)),
    offset=st.integers(-3, 3),
)
def test_disclosed_fields_are_minimal(
    granted: frozenset[str],
    policy_fields: frozenset[str],
    requested: frozenset[str] | None,
    never: frozenset[str],
    status: str,
    uses: int,
    max_uses: int | None,
    offset: int,
) -> None:
    policy = FakePolicy({("shelter", "p"): policy_fields}, never)
    g = grant(
        fields={"shelter": granted},
        status=status,
        uses=uses,
        max_uses=max_uses,
        expires_at=NOW + timedelta(days=offset),
    )
    req = request(fields=requested)
    try:
        permit = decide(req, [g], policy, NOW)
    except Denied as denial:
        assert denial.reason
        return
    assert g.status == "active" and g.expires_at > NOW
    assert max_uses is None or uses < max_uses
    wanted = requested if requested is not None else granted
    assert permit.disclosed, "a permit always discloses something"
    assert permit.disclosed <= wanted & granted & policy_fields
    for name in permit.disclosed & never:
        assert name in granted and requested is not None and name in requested
    assert (
        permit.withheld == (wanted if requested is not None else granted - never) - permit.disclosed
    )


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.builds(
            lambda s, e: grant(status=s, excluded_client_ids=e),
            st.sampled_from(["active", "paused", "revoked"]),
            st.frozensets(st.sampled_from(["c1", "c2"])),
        ),
        max_size=4,
    )
)
def test_any_exclusion_denies(grants: list[GrantView]) -> None:
    if any("c1" in g.excluded_client_ids for g in grants):
        assert reason(request(), grants) == "recipient_excluded"
