"""Background loops run inside each broker process."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from broker.runtime import Runtime


def start_workers(rt: Runtime) -> list[asyncio.Task[None]]:
    return []
