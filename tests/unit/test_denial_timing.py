"""The time grid denials are answered on (``broker.disclosure.denial_timing``)."""

from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st

from broker.disclosure.denial_timing import wait_for_grid


@given(
    elapsed=st.floats(min_value=0, max_value=3600, allow_nan=False),
    quantum=st.floats(min_value=1e-4, max_value=1.0, allow_nan=False),
)
def test_a_denial_waits_for_the_next_multiple_of_the_quantum(
    elapsed: float, quantum: float
) -> None:
    wait = wait_for_grid(elapsed, quantum)
    assert 0 < wait <= quantum + 1e-9  # floating point: elapsed is up to an hour
    ticks = (elapsed + wait) / quantum
    assert math.isclose(ticks, round(ticks), rel_tol=0, abs_tol=1e-6)
    # Two requests that took different times below the same multiple leave together.
    assert math.isclose(elapsed + wait, (math.floor(elapsed / quantum) + 1) * quantum)


def test_no_grid_answers_at_once() -> None:
    assert wait_for_grid(0.0123, 0.0) == 0.0
