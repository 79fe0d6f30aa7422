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
went back to the pool.
"""

from __future__ import annotations

import asyncio
import math
import time


def wait_for_grid(elapsed: float, quantum: float) -> float:
    """Seconds from ``elapsed`` (since the request arrived) to the next multiple of
    ``quantum`` strictly after it; 0 when ``quantum`` is 0 (no grid)."""
    if quantum <= 0:
        return 0.0
    wait = (math.floor(elapsed / quantum) + 1) * quantum - elapsed
    return wait if wait > 0 else wait + quantum  # elapsed a multiple, give or take rounding


async def answer_on_grid(started: float, quantum: float) -> None:
    """Sleep until the next multiple of ``quantum`` seconds after ``started``
    (``time.monotonic()`` when the request arrived)."""
    wait = wait_for_grid(time.monotonic() - started, quantum)
    if wait > 0:
        await asyncio.sleep(wait)
