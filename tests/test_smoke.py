"""The smallest end-to-end slice: admin token, agency registration, a grant."""

from __future__ import annotations

from tests.support import World, story_one


async def test_story_one_grant(world: World) -> None:
    s = await story_one(world)
    grant = await world.grant(
        s.advocate,
        subject_id=s.subject_id,
        source_agency_ids=[s.shelter.id],
        recipient_agency_id=s.police.id,
    )
    assert grant["version"] == 1
    assert grant["status"] == "active"
    assert grant["fields"] == {"shelter": ["bed_status", "intake_date"]}
