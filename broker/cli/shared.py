"""What the ``broker`` commands share: settings from the environment, and a runtime or
a database session for one command, closed whatever happens."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

from broker.settings import Settings

if TYPE_CHECKING:  # imported where used: the command starts without the whole broker
    from sqlalchemy.ext.asyncio import AsyncSession

    from broker.runtime import Runtime

T = TypeVar("T")


def settings_from_env() -> Settings:
    return Settings()


async def on_runtime(
    work: Callable[[Runtime], Awaitable[T]], settings: Settings | None = None
) -> T:
    """``work`` on a runtime built for one shell command, closed whatever happens."""
    from broker.runtime import build_runtime

    rt = build_runtime(settings or settings_from_env())
    try:
        return await work(rt)
    finally:
        await rt.aclose()


async def on_database(work: Callable[[AsyncSession], Awaitable[T]]) -> T:
    """``work`` in one transaction on the configured database; no keys needed."""
    from broker.db import make_engine, make_sessionmaker

    engine = make_engine(settings_from_env().database_url)
    try:
        async with make_sessionmaker(engine)() as session, session.begin():
            return await work(session)
    finally:
        await engine.dispose()
