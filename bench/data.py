"""Record contents and consent terms shared by the seeding and the records endpoint.

Kept free of broker imports so the records-endpoint process stays small.
"""

from __future__ import annotations

from typing import Any

HELD_FIELDS = ["intake_date", "bed_status", "safety_plan_on_file", "lethality_screen_level"]
"""What survivors let the police DV unit see of Harbor House's (held) records."""

ENDPOINT_FIELDS = ["intake_date", "advocate_assigned", "language_preference"]
"""What survivors let legal aid see of Eastside Shelter's (endpoint) records."""


def shelter_record(i: int) -> dict[str, Any]:
    """A full, schema-valid shelter record; values vary with the survivor."""
    day = 1 + i % 28
    return {
        "shelter_client_id": f"C-{i:06d}",
        "intake_date": f"2024-03-{day:02d}",
        "bed_status": ("assigned", "waitlisted", "none")[i % 3],
        "program_type": "emergency_shelter",
        "shelter_location": "(confidential)",
        "children_in_residence": i % 4,
        "pets_accommodated": i % 5 == 0,
        "safety_plan_on_file": True,
        "lethality_screen_level": ("elevated", "high", "extreme")[i % 3],
        "advocate_assigned": f"ADV-{i % 17:02d}",
        "next_check_in": f"2024-04-{day:02d}T10:00:00Z",
        "language_preference": ("en", "es", "vi")[i % 3],
        "confidential_contact_number": f"+1-555-{i % 10000:04d}",
    }
