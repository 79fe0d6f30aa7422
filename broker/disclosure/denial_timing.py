"""Denials leave on a fixed grid of time, so timing cannot tell who is known.

Invariant 6 wants a denial for a survivor the broker knows to look like one for a
reference nobody knows, timing included. The two paths do different work (a known
survivor's grants and agencies are read and her row is locked by the disclosure
row's foreign key), and ``bench/oracle.py`` measured it: unloaded, a known survivor
without consent was denied about 0.1 ms later than an unknown reference, one with
consent for another purpose about 0.2 ms later, which 300 requests tell apart.
Making every path do the same work would break with the next change to any of them;
instead a denial is answered at the first multiple of ``denial_quantum_ms`` after
the request arrived. Below the quantum every denial takes the same time; above it
(an overloaded broker) only the multiple shows, and the noise of the load hides that.
Denials cost no more CPU: the wait is a sleep, taken after the database connection
went back to the pool. The disclosure route puts its denials and its refusals for
the caller's standing on the grid, the deposit route its refusals (``endpoints``).
"""

from __future__ import annotations

import asyncio
import math


def wait_for_grid(elapsed: float, quantum: float) -> float:
    """Seconds from ``elapsed`` (since the request arrived) to the next multiple of
    ``quantum`` strictly after it; 0 when ``quantum`` is 0 (no grid)."""
    if quantum <= 0:
        return 0.0
    wait = (math.floor(elapsed / quantum) + 1) * quantum - elapsed
    return wait if wait > 0 else wait + quantum  # elapsed a multiple, give or take rounding


def arrival() -> float:
    """The time a request arrived, on the event loop's clock (``answer_on_grid``'s)."""
    return asyncio.get_running_loop().time()


async def answer_on_grid(started: float, quantum: float) -> None:
    """Wait until the next multiple of ``quantum`` seconds after ``started`` (``arrival()``).

    The wake-up is set as an instant on the loop's own clock (``call_at``), not as a
    delay from now: uvloop keeps time in whole milliseconds cached per turn, so a delay
    counted from the moment the work ended would carry that moment's phase within the
    millisecond, and with it a trace of how long the work took.
    """
    loop = asyncio.get_running_loop()
    now = loop.time()
    wait = wait_for_grid(now - started, quantum)
    if wait <= 0:
        return
    woken: asyncio.Future[None] = loop.create_future()
    timer = loop.call_at(now + wait, _wake, woken)  # started + a whole number of quanta
    try:
        await woken
    finally:
        timer.cancel()


def _wake(woken: asyncio.Future[None]) -> None:
    if not woken.done():
        woken.set_result(None)
