"""The background loops' pause: a wake event cuts it short (revocation notices)."""

from __future__ import annotations

import asyncio
import contextlib

from broker.workers import _loop, _pause


async def test_a_wake_ends_the_pause_and_is_consumed() -> None:
    wake = asyncio.Event()
    pausing = asyncio.create_task(_pause(60.0, wake))
    await asyncio.sleep(0.01)
    assert not pausing.done()
    wake.set()
    await asyncio.wait_for(pausing, 5.0)  # far sooner than the 60 s pause
    assert not wake.is_set()


async def test_a_wake_set_before_the_pause_skips_it() -> None:
    wake = asyncio.Event()
    wake.set()
    await asyncio.wait_for(_pause(60.0, wake), 5.0)
    assert not wake.is_set()


async def test_without_a_wake_event_the_pause_runs_out() -> None:
    await asyncio.wait_for(_pause(0.01, None), 5.0)


async def test_an_idle_loop_steps_again_when_woken() -> None:
    """An idle loop backs off to 4x its interval; a wake makes it step at once."""
    wake = asyncio.Event()
    steps = asyncio.Queue[int]()

    async def step() -> int:
        steps.put_nowait(1)
        return 0  # nothing to do: the loop backs off

    loop = asyncio.create_task(_loop("test", 30.0, step, wake))
    try:
        await asyncio.wait_for(steps.get(), 5.0)  # the first step runs at once
        wake.set()
        await asyncio.wait_for(steps.get(), 5.0)  # not after 60 s of idle pause
    finally:
        loop.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loop
