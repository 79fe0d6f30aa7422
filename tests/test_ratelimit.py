"""Per-client rate limits answer 429 problem+json with Retry-After."""

from __future__ import annotations

import pytest

from broker.settings import Settings
from tests.support import World


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"rate_limit_per_second": 0.5, "rate_limit_burst": 5})


async def test_rate_limit_per_client(world: World) -> None:
    agency = await world.agency()
    advocate = await world.client(agency.id, "advocate")
    other = await world.client(agency.id, "advocate")
    statuses = [(await advocate.post("/v1/subjects", json={})).status_code for _ in range(6)]
    assert statuses[:5] == [201] * 5
    limited = await advocate.post("/v1/subjects", json={})
    assert limited.status_code == 429
    assert limited.headers["content-type"] == "application/problem+json"
    assert int(limited.headers["retry-after"]) >= 1
    assert (await other.post("/v1/subjects", json={})).status_code == 201, (
        "other clients unaffected"
    )
