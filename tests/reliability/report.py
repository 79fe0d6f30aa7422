"""Rerun the reliability tests and write ``tests/RELIABILITY.md``.

    python -m tests.reliability.report            # run, record, write the report
    python -m tests.reliability.report -- -x      # extra arguments go to pytest
    python -m tests.reliability.report --record F # write the report from an existing record

The tests themselves add counters (matrix cells, fuzz examples, ledger entries
verified) through :func:`tests.reliability.record`; the plugin adds one line per
test outcome. Nothing here needs more than the standard library and pytest.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tests.reliability import RECORD_ENV

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "RELIABILITY.md"


@dataclass(frozen=True)
class Suite:
    area: str
    path: str
    tried: str
    """What one test case of this file throws at the broker."""


SUITES = (
    Suite(
        "Authorization matrix",
        "tests/test_authz_matrix.py",
        "every route × anonymous/admin/agency/advocate/auditor/other agency",
    ),
    Suite("API fuzzing", "tests/test_fuzz.py", "schemathesis against `broker serve`, per role"),
    Suite(
        "Fuzz findings (regressions)",
        "tests/test_fuzz_findings.py",
        "each defect the fuzzer found, pinned",
    ),
    Suite(
        "Token attacks",
        "tests/test_auth.py",
        "forged, replayed, expired, wrong-audience, alg=none/HS256, foreign-key assertions; "
        "bad bearer tokens; suspended/withdrawn clients",
    ),
    Suite(
        "Hostile payloads",
        "tests/test_errors.py",
        "broken/invalid-UTF-8/deeply nested/duplicate-key/huge/injection bodies, oversized "
        "and streamed bodies, bad settings",
    ),
    Suite(
        "Hostile records endpoints",
        "tests/test_sources_endpoint.py",
        "records servers that fail, stall, trickle, redirect, lie about types, send huge "
        "bodies or unknown fields, or are unreachable",
    ),
    Suite("Rate limits", "tests/test_ratelimit.py", "a client flooding the API"),
    Suite(
        "Abuse signals",
        "tests/test_abuse.py",
        "an agency fishing for survivors; an advocate probing for taken case references",
    ),
    Suite("Faults injected", "tests/test_faults.py", "injected infrastructure faults"),
)


@dataclass
class Tally:
    passed: int = 0
    failed: int = 0
    skipped: int = 0
    failures: list[str] = field(default_factory=list)

    @property
    def ran(self) -> int:
        return self.passed + self.failed


FAULT_COLUMNS = {"kind", "name", "backend", "tried", "survived", "entries_verified", "lost"}


def load(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            rows.append(json.loads(line))
    return rows


def test_outcomes(rows: list[dict[str, Any]]) -> dict[str, str]:
    """nodeid -> worst outcome over its phases (failed > skipped > passed)."""
    rank = {"passed": 0, "skipped": 1, "failed": 2}
    worst: dict[str, str] = {}
    for r in rows:
        if r["kind"] != "test":
            continue
        prev = worst.get(r["name"], "passed")
        worst[r["name"]] = max(prev, r["outcome"], key=lambda o: rank.get(o, 2))
    return worst


def tally_files(outcomes: dict[str, str]) -> dict[str, Tally]:
    tallies: dict[str, Tally] = defaultdict(Tally)
    for nodeid, outcome in sorted(outcomes.items()):
        t = tallies[nodeid.split("::", 1)[0]]
        if outcome == "passed":
            t.passed += 1
        elif outcome == "skipped":
            t.skipped += 1
        else:
            t.failed += 1
            t.failures.append(nodeid)
    return tallies


def _sum(rows: list[dict[str, Any]], kind: str, key: str = "tried") -> int:
    return sum(int(r.get(key, 0)) for r in rows if r["kind"] == kind)


def _cell(ok: int, total: int) -> str:
    return f"{ok}/{total}"


def render(rows: list[dict[str, Any]], *, exit_status: int | None, ran_files: list[str]) -> str:
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    outcomes = test_outcomes(rows)
    files = tally_files(outcomes)
    total = Tally(
        sum(t.passed for t in files.values()),
        sum(t.failed for t in files.values()),
        sum(t.skipped for t in files.values()),
    )
    matrix = [r for r in rows if r["kind"] == "matrix"]
    fuzz = [r for r in rows if r["kind"] == "fuzz"]
    ledger = [r for r in rows if r["kind"] == "ledger"]
    faults = [r for r in rows if r["kind"] == "fault"]
    backends = sorted({r["backend"] for r in rows if r.get("backend")})

    out: list[str] = [
        "# Reliability record",
        "",
        f"Generated by `python -m tests.reliability.report` on **{now}** ({_commit()}).",
        f"pytest exit status: {exit_status if exit_status is not None else 'n/a (from a record)'}"
        f" — tests passed {total.passed}, failed {total.failed}, skipped {total.skipped}."
        f" Backends exercised: {', '.join(backends) or 'none recorded'}.",
        "",
        "Counts are of cases that actually ran; a skipped test is listed as skipped, never "
        "as survived. Regenerate rather than edit.",
        "",
        "## What was tried and what survived",
        "",
        "| Area | What was tried | Cases | Survived | Failed | Skipped tests |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]

    def file_row(suite: Suite, cases: int, survived: int, note: str = "") -> None:
        t = files.get(suite.path, Tally())
        out.append(
            f"| {suite.area} | {suite.tried}{note} | {cases} | {survived} | "
            f"{cases - survived} | {t.skipped} |"
        )

    by_path = {s.path: s for s in SUITES}
    for suite in SUITES:
        t = files.get(suite.path)
        if suite.path == "tests/test_authz_matrix.py" and matrix:
            oracle = _sum(matrix, "matrix", "oracle_checks")
            file_row(
                suite,
                _sum(matrix, "matrix"),
                _sum(matrix, "matrix", "survived"),
                f" (matrix cells; {oracle} of them also compared with a missing id)",
            )
        elif suite.path == "tests/test_fuzz.py" and fuzz:
            for role in sorted({r["name"] for r in fuzz}):
                mine = [r for r in fuzz if r["name"] == role]
                tried = sum(int(r["tried"]) for r in mine)
                known = sum(int(r.get("known_gaps", 0)) for r in mine)
                runs = ", ".join(sorted({str(r.get("backend", "?")) for r in mine}))
                note = f", as **{role}** (examples; {runs})"
                if known:
                    note += f"; {known} hit a known, reported schema gap"
                file_row(suite, tried, sum(int(r["survived"]) for r in mine), note)
        elif suite.path == "tests/test_faults.py" and faults:
            file_row(suite, _sum(faults, "fault"), _sum(faults, "fault", "survived"))
        elif t is not None:
            file_row(suite, t.ran, t.passed, " (test cases)")
        else:
            out.append(f"| {suite.area} | {suite.tried} | — | — | — | not present / not run |")
    if ledger:
        out.append(
            f"| Ledger verified after each run | drain the outbox, export, re-hash every entry "
            f"against the signed checkpoint ({len(ledger)} runs) | {_sum(ledger, 'ledger')} | "
            f"{_sum(ledger, 'ledger', 'survived')} | "
            f"{_sum(ledger, 'ledger') - _sum(ledger, 'ledger', 'survived')} | — |"
        )

    out += ["", "## Nothing lost", ""]
    if ledger:
        bad = [r for r in ledger if int(r["survived"]) != int(r["tried"]) or r.get("pending")]
        out.append(
            f"- Ledger: after each of {len(ledger)} matrix and fuzz runs the outbox drained "
            f"(pending left: {sum(int(r.get('pending', 0)) for r in ledger)}) and "
            f"{_sum(ledger, 'ledger', 'survived')} of {_sum(ledger, 'ledger')} stored entries "
            f"re-hashed to the signed checkpoint"
            + (f"; **{len(bad)} runs did not verify**." if bad else "; every run verified.")
        )
    if faults:
        lost = sum(int(r.get("lost", 0)) for r in faults)
        verified = sum(int(r.get("entries_verified", 0)) for r in faults)
        out.append(
            f"- Faults: {sum(int(r.get('faults', 1)) for r in faults)} faults injected in "
            f"{len(faults)} scenarios; {_sum(faults, 'fault', 'survived')} of "
            f"{_sum(faults, 'fault')} checked cases survived; ledger re-verified afterwards "
            f"({verified} entries); lost: **{lost}**."
        )
    if fuzz:
        statuses: Counter[str] = Counter()
        for r in fuzz:
            statuses.update({k: int(v) for k, v in r.get("statuses", {}).items()})
        five = sum(v for k, v in statuses.items() if k.startswith("5"))
        out.append(
            f"- Fuzzing: {_sum(fuzz, 'fuzz')} examples, {five} answered 5xx; every 4xx/5xx was "
            f"checked for `application/problem+json` with type, title and status. Statuses seen: "
            + ", ".join(f"{k}×{v}" for k, v in sorted(statuses.items()))
            + "."
        )
    if matrix:
        oracle = _sum(matrix, "matrix", "oracle_checks")
        out.append(
            f"- Authorization: {_sum(matrix, 'matrix', 'survived')} of {_sum(matrix, 'matrix')} "
            f"cells gave the expected status; {oracle} other-agency probes were compared "
            "byte-for-byte (type, title, status, detail) with the answer for a missing id."
        )
    failing = [n for t in files.values() for n in t.failures]
    out.append(
        "- Tests: " + (f"**{len(failing)} failed** (listed below)." if failing else "none failed.")
    )

    out += [
        "",
        "## By test file",
        "",
        "| File | Passed | Failed | Skipped |",
        "| --- | ---: | ---: | ---: |",
    ]
    for path in ran_files or sorted(files):
        t = files.get(path, Tally())
        label = by_path[path].area if path in by_path else path
        out.append(f"| `{path}` ({label}) | {t.passed} | {t.failed} | {t.skipped} |")

    if matrix:
        out += [
            "",
            "## Authorization matrix by caller",
            "",
            "| Caller | Backend | Cells | Held | Oracle checks |",
            "| --- | --- | ---: | ---: | ---: |",
        ]
        for r in matrix:
            out.append(
                f"| {r['name']} | {r.get('backend', '')} | {r['tried']} | {r['survived']} | "
                f"{r.get('oracle_checks', 0)} |"
            )
    if fuzz:
        out += [
            "",
            "## Fuzzing by role",
            "",
            "| Role | Backend | Operations | Examples | Survived | Known gap | Seconds | Seed |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for r in fuzz:
            out.append(
                f"| {r['name']} | {r.get('backend', '')} | {r.get('operations', '')} | "
                f"{r['tried']} | {r['survived']} | {r.get('known_gaps', 0)} | "
                f"{r.get('seconds', '')} | {r.get('seed', '')} |"
            )
        notes = sorted({n for r in fuzz for n in r.get("known_gap_notes", [])})
        if notes:
            out += [
                "",
                "Known gaps (reported to the owner of the file, not counted as survived):",
                "",
            ]
            out += [f"- {n}" for n in notes]
    if faults:
        out += [
            "",
            "## Faults injected",
            "",
            "| Fault | Backend | Cases | Survived | Ledger entries verified | Lost | Details |",
            "| --- | --- | ---: | ---: | ---: | ---: | --- |",
        ]
        for r in faults:
            details = ", ".join(
                f"{k}={v}"
                for k, v in sorted(r.items())
                if k not in FAULT_COLUMNS and not isinstance(v, (list, dict))
            )
            out.append(
                f"| {r['name']} | {r.get('backend', '—')} | {r['tried']} | {r['survived']} | "
                f"{r.get('entries_verified', '—')} | {r.get('lost', '—')} | {details} |"
            )
    if failing:
        out += ["", "## Failures", ""] + [f"- `{n}`" for n in failing]
    return "\n".join(out) + "\n"


def _commit() -> str:
    try:
        head = subprocess.run(  # noqa: S603
            ["git", "rev-parse", "--short", "HEAD"],  # noqa: S607
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(  # noqa: S603
            ["git", "status", "--porcelain", "--untracked-files=no"],  # noqa: S607
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "commit unknown"
    return f"commit {head}" + (" with uncommitted changes" if dirty else "")


def run_tests(record_file: Path, extra: list[str]) -> tuple[int, list[str]]:
    files = [s.path for s in SUITES if (ROOT / s.path).exists()]
    env = {**os.environ, RECORD_ENV: str(record_file)}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "tests.reliability.plugin", *files, *extra]
    print("$", " ".join(cmd), flush=True)
    return subprocess.call(cmd, cwd=ROOT, env=env), files  # noqa: S603


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.reliability.report", description=__doc__)
    parser.add_argument("--out", type=Path, default=OUT, help="where to write the report")
    parser.add_argument("--record", type=Path, help="render an existing record; run nothing")
    parser.add_argument("--save-record", type=Path, help="also keep the raw record here")
    parser.add_argument("pytest_args", nargs="*", help="after --: extra pytest arguments")
    args = parser.parse_args(argv)

    files: list[str] = []
    status: int | None = None
    if args.record is not None:
        rows = load(args.record)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            record_file = Path(tmp) / "record.jsonl"
            status, files = run_tests(record_file, args.pytest_args)
            rows = load(record_file)
            if args.save_record is not None and record_file.exists():
                args.save_record.write_text(record_file.read_text(encoding="utf-8"))
    args.out.write_text(render(rows, exit_status=status, ran_files=files), encoding="utf-8")
    print(f"wrote {args.out} ({len(rows)} record lines)")
    return status or 0


if __name__ == "__main__":
    raise SystemExit(main())
