"""Counters behind ``tests/RELIABILITY.md``.

Tests call :func:`record` with what they tried and what survived; when the
environment variable ``RELIABILITY_RECORD`` names a file, each call appends one
JSON line to it, otherwise nothing happens (the tests pass or fail the same way).
``python -m tests.reliability.report`` sets the variable, reruns the tests and
turns the lines into the Markdown report.
"""

from __future__ import annotations

import json
import os
import threading
from typing import Any

RECORD_ENV = "RELIABILITY_RECORD"

_lock = threading.Lock()


def record_path() -> str | None:
    path = os.environ.get(RECORD_ENV, "").strip()
    return path or None


def record(kind: str, name: str, *, tried: int, survived: int, **extra: Any) -> None:
    """Append ``{"kind", "name", "tried", "survived", ...}`` to the record file, if any.

    ``kind`` groups rows in the report (``matrix``, ``fuzz``, ``ledger``, ``fault`` …);
    ``survived`` counts the cases that behaved as expected, so ``tried - survived``
    are failures. Call it only with counts of cases that actually ran.
    """
    path = record_path()
    if path is None:
        return
    line = json.dumps(
        {"kind": kind, "name": name, "tried": int(tried), "survived": int(survived), **extra},
        sort_keys=True,
        default=str,
    )
    with _lock, open(path, "a", encoding="utf-8") as fh:
        fh.write(line + "\n")
