"""The one table a run prints, and the dated entry it appends to ``bench/RESULTS.md``."""

from __future__ import annotations

import os
import platform
import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from bench.infra import REPO, pg_version


@dataclass
class Row:
    measurement: str
    result: str
    target: str = ""
    verdict: str = ""


def ms(value: float) -> str:
    return f"{value:.2f} ms" if value < 10 else f"{value:.1f} ms"


def us(seconds: float) -> str:
    return f"{seconds * 1e6:.1f} µs" if seconds < 1e-4 else f"{seconds * 1e6:,.0f} µs"


def verdict_at_most(value: float, limit: float, unit: str = "") -> str:
    """'met' or 'missed by N %' for a must-not-exceed target."""
    if value <= limit:
        return f"met ({value / limit:.0%} of limit)"
    return f"**missed** by {value / limit - 1:.0%} ({value:,.2f}{unit} vs {limit:,g}{unit})"


def verdict_at_least(value: float, floor: float, unit: str = "") -> str:
    if value >= floor:
        return f"met ({value / floor:.2f}x the floor)"
    return f"**missed** by {1 - value / floor:.0%} ({value:,.2f}{unit} vs {floor:,g}{unit})"


def render(rows: list[Row]) -> str:
    header = ["Measurement", "Result", "Target (DESIGN.md §9)", "Verdict"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    for r in rows:
        cells = [r.measurement, r.result, r.target, r.verdict]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git(*args: str) -> str:
    try:
        out = subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, text=True, check=False, timeout=10
        )
    except OSError:
        return ""
    return out.stdout.strip()


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def machine_facts() -> dict[str, str]:
    """Taken when the run starts, so the commit is the one that was measured."""
    commit = _git("rev-parse", "--short=12", "HEAD") or "unknown"
    if _git("status", "--porcelain", "--untracked-files=no"):
        commit += " (with uncommitted changes)"
    mem_kb = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    except OSError:
        pass
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "load average (1/5/15 min) at start": load_average(),
        "cpu": _cpu_model(),
        "cores": str(os.cpu_count()),
        "memory": f"{mem_kb / 1024 / 1024:.0f} GiB",
        "python": platform.python_version(),
        "postgresql": pg_version(),
        "commit": commit,
    }


def append_results(path: Path, title: str, facts: dict[str, str], table: str, notes: str) -> None:
    """Append one dated run; the file keeps every run, newest last."""
    head = "" if path.exists() else _PREAMBLE
    facts_line = "; ".join(f"{k}: {v}" for k, v in facts.items())
    entry = f"\n## {facts['date']} — {title}\n\n{facts_line}\n\n{table}\n\n{notes.strip()}\n"
    with path.open("a", encoding="utf-8") as fh:
        fh.write(head + entry)


_PREAMBLE = """# Benchmark results

Appended by `make bench` (`python -m bench.run`; `--quick` for a short run).
Each entry is one run on one machine: the broker and every other server ran on
127.0.0.1, load came from separate processes, ratios were taken within the run.
"""
