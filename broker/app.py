"""The application factory."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from broker.agencies.endpoints import router as agencies_router
from broker.auth.endpoints import router as auth_router
from broker.consent.endpoints import router as consent_router
from broker.db_privileges import check_role_at_start
from broker.disclosure.endpoints import router as disclosure_router
from broker.disclosure.fast_path import DisclosureFastPath
from broker.disclosure.holds import refresh_holds_or_hold
from broker.errors import PROBLEM_SCHEMA, install_error_handlers
from broker.health import router as health_router
from broker.ledger.endpoints import router as ledger_router
from broker.middleware import BodyLimitMiddleware
from broker.runtime import Runtime, build_runtime
from broker.schema_version import SchemaBehind, check_schema
from broker.settings import Settings
from broker.subjects.endpoints import router as subjects_router

log = logging.getLogger("broker")


def create_app(settings: Settings | None = None, *, runtime: Runtime | None = None) -> FastAPI:
    settings = settings or Settings()
    rt = runtime or build_runtime(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            # Grants first: one the role lacks would fail the schema check unexplained.
            await check_role_at_start(rt.engine, production=settings.environment == "production")
            await check_schema(rt.engine)
        except SchemaBehind as exc:
            log.error("not starting: %s", exc)
            await rt.aclose()
            raise
        except Exception as exc:  # unreachable now: serve 503s, /readyz says not ready
            log.warning(
                "database not reachable at start (%s); checking again on /readyz",
                type(exc).__name__,
            )
        else:
            await refresh_holds_or_hold(rt, when="at start")
        if settings.run_background_workers:
            from broker.workers import start_workers

            rt.tasks.extend(start_workers(rt))
        if getattr(app.state, "freeze_gc", False):
            _freeze_startup_objects()
        try:
            yield
        finally:
            for task in rt.tasks:
                task.cancel()
            for task in rt.tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            rt.tasks.clear()
            await rt.aclose()

    app = FastAPI(
        title="Consent broker",
        version="1.0",
        description="Shares a survivor's data between agencies only as far as she consented, "
        "and proves afterwards what was shared.",
        lifespan=lifespan,
        # FastAPI's own OpenTelemetry hooks would record paths with survivors' ids and
        # exception messages wherever a global provider points; the broker logs
        # nothing personal, so they stay off whatever the environment says.
        telemetry={
            "tracing": False,
            "metrics": False,
            "logs": False,
            "operation_spans": False,
            "auto_configure": False,
        },
    )
    app.state.runtime = rt
    install_error_handlers(app)
    app.add_middleware(DisclosureFastPath)  # inside the body limit (added last = outermost)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    # Routes are matched in order: the disclosure router, the busiest, comes first.
    # No two routers share a path shape, so the order changes nothing else.
    for router in (
        disclosure_router,
        auth_router,
        agencies_router,
        subjects_router,
        consent_router,
        ledger_router,
        health_router,
    ):
        app.include_router(router)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title, version=app.version, description=app.description, routes=app.routes
            )
            schema.setdefault("components", {}).setdefault("schemas", {})["Problem"] = (
                PROBLEM_SCHEMA
            )
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def _freeze_startup_objects() -> None:
    """Keep the cyclic GC's full collections off the ~140,000 objects built at start.

    A full collection walks every tracked object: about 60 ms for this process,
    during which no request moves -- the worst latencies in ``bench/``. Modules, the
    app, schemas and compiled statements live as long as the process, so they go to
    the permanent generation (after one collection, so no garbage is frozen).
    """
    gc.collect()
    gc.freeze()


def app_from_env() -> FastAPI:
    """Factory for ``uvicorn --factory``: settings from the ``BROKER_*`` environment.

    A serving process freezes its start-up objects out of the GC; tests build many
    apps in one process and do not.
    """
    app = create_app(Settings())
    app.state.freeze_gc = True
    return app
