"""Liveness and readiness for load balancers and orchestrators.

``/livez`` says only that the process answers (restart it if not). ``/readyz``
also reads the database's schema revision and (PostgreSQL) its role's grants, so
an instance cut off from its database, started on one ``broker migrate`` has not
brought up to date, or connected as a role missing a grant, stops getting traffic
instead of failing requests. Neither says more than a status: both are public, so
what is missing goes to the log.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter
from pydantic import BaseModel

from broker.db_privileges import MISSING_HINT, missing_privileges, report_missing
from broker.errors import ServiceUnavailable, error_responses
from broker.runtime import RuntimeDep
from broker.schema_version import SchemaBehind, check_schema

router = APIRouter(tags=["operations"])

#: Well under the probes' usual timeouts, so a hung database fails the probe cleanly.
DATABASE_TIMEOUT_SECONDS = 2.0


class Health(BaseModel):
    status: str


@router.get("/livez", summary="The process answers")
async def livez() -> Health:
    return Health(status="alive")


@router.get(
    "/readyz",
    responses=error_responses(ServiceUnavailable),
    summary="The process answers, reaches its database, the schema is up to date and "
    "the database role has the grants it needs",
)
async def readyz(rt: RuntimeDep) -> Health:
    try:
        async with asyncio.timeout(DATABASE_TIMEOUT_SECONDS):
            # Grants first: a role that may not read alembic_version fails the schema
            # check with an error that would not say why.
            missing = await missing_privileges(rt.engine)
            if not missing:
                await check_schema(rt.engine)
    except SchemaBehind:
        raise ServiceUnavailable(
            "The database schema is behind this broker (run `broker migrate`); not ready."
        ) from None
    except Exception as exc:  # whatever the failure, the instance is not ready
        raise ServiceUnavailable(
            f"The database cannot be reached ({type(exc).__name__}); not ready."
        ) from None
    if missing:
        report_missing(missing)
        raise ServiceUnavailable(
            f"The database role lacks privileges this broker needs ({MISSING_HINT}; the log "
            "names them); not ready."
        )
    return Health(status="ready")
