"""Whether a token's client and agency are still active, checked on every request.

Tokens live for minutes; a withdrawal or suspension must take effect at once, so
each request reads both statuses. ``STANDING`` is that read; the disclosure path
folds it into the statement that resolves the survivor (one round trip less).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Select, bindparam, select

from broker.errors import Unauthenticated
from broker.models import Agency, Client

STANDING: Select[str, str] = (
    select(Client.status, Agency.status)
    .join(Agency, Agency.id == Client.agency_id)
    .where(Client.id == bindparam("client_id"), Agency.id == bindparam("agency_id"))
)


def require_standing(row: Sequence[Any] | None) -> None:
    """Refuse unless ``row`` (client status, agency status) shows both active."""
    if row is None or row[0] != "active":
        raise Unauthenticated("This client has been withdrawn.")
    if row[1] != "active":
        raise Unauthenticated("This client's agency is suspended.")
