"""pytest plugin (``-p tests.reliability.plugin``): one record line per test outcome.

Only the report generator loads it. Call-phase outcomes are recorded; a setup or
teardown that fails or skips is recorded too, so a skipped test is never mistaken
for one that ran.
"""

from __future__ import annotations

import pytest

from tests.reliability import record


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when != "call" and report.passed:
        return
    record(
        "test",
        report.nodeid,
        tried=1,
        survived=1 if report.passed else 0,
        outcome=report.outcome,
        when=report.when,
        seconds=round(report.duration, 3),
    )
