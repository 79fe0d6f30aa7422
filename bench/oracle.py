"""Existence-oracle timing (DESIGN.md invariant 6), measured on the running broker.

A denial for a survivor the broker knows, asked for by an agency without consent,
must look exactly like a denial for a reference nobody knows: same status and body
(the tests check that) and the same timing, which only a measurement can show. Two
pairs of request streams alternate on one keep-alive connection each, sequentially:

* Harbor House, which holds a case reference for every survivor and no grant to
  itself, asks for its own references (known, no consent) and for references that
  were never linked (unknown);
* the police, who hold a grant for every survivor but only for safety planning, ask
  for a protective order (known, consent for something else) and for unknown
  references.

An A/A pair (unknown against unknown) shows what the host's noise alone produces.
Each pair is compared by the median of the paired differences and by the two-sample
Kolmogorov-Smirnov statistic D, against its 5 % critical value. Denials are answered
on a 25 ms grid (``broker.disclosure.denial_timing``), so each stream takes about
25 ms a request.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass

import orjson

from bench.disclosure import BrokerSetup
from bench.loadgen import percentile
from bench.report import Row
from bench.sequential import KeepAliveConn
from bench.world import fetch_token

Progress = Callable[[str], None]
WARMUP = 50


@dataclass(frozen=True)
class Pair:
    """One comparison: stream A against stream B, alternating, ``n`` requests each."""

    label: str
    a: list[float]  # ms, in request order
    b: list[float]

    @property
    def median_difference_us(self) -> float:
        return statistics.median(x - y for x, y in zip(self.a, self.b, strict=True)) * 1000

    @property
    def ks(self) -> float:
        return ks_statistic(self.a, self.b)

    @property
    def ks_critical(self) -> float:
        """D beyond which the two samples differ at the 5 % level (asymptotic)."""
        n, m = len(self.a), len(self.b)
        return 1.358 * math.sqrt((n + m) / (n * m))


def ks_statistic(a: list[float], b: list[float]) -> float:
    """The largest gap between the two samples' empirical distribution functions."""
    xs, ys = sorted(a), sorted(b)
    i = j = 0
    gap = 0.0
    while i < len(xs) and j < len(ys):
        step = min(xs[i], ys[j])
        while i < len(xs) and xs[i] == step:
            i += 1
        while j < len(ys) and ys[j] == step:
            j += 1
        gap = max(gap, abs(i / len(xs) - j / len(ys)))
    return gap


def _never_linked(ref: str, mark: str) -> str:
    """A reference of the same length as ``ref`` that no survivor has: ``HH-000123``
    becomes ``HH-X00012``."""
    return ref.replace("-", "-" + mark, 1)[: len(ref)]


def _body(ref: str, purpose: str) -> str:
    return orjson.dumps({"subject_ref": ref, "category": "shelter", "purpose": purpose}).decode()


def _alternate(
    conn: KeepAliveConn, first: list[str], second: list[str], label: str
) -> tuple[list[float], list[float]]:
    """Each pair of requests in turn, neither stream always first; every answer a 403
    of one and the same length."""
    times: tuple[list[float], list[float]] = ([], [])
    lengths: set[int] = set()
    for i, pair in enumerate(zip(first, second, strict=True)):
        order = (0, 1) if i % 2 == 0 else (1, 0)
        for side in order:
            status, elapsed = conn.post(pair[side])
            if status != 403:
                raise RuntimeError(f"{label}: a denial was expected, got {status}")
            lengths.add(len(conn.last_body))
            times[side].append(elapsed * 1000)
    if len(lengths) != 1:
        raise RuntimeError(f"{label}: denial bodies of {len(lengths)} different lengths")
    return times


def measure(setup: BrokerSetup, requests: int, progress: Progress) -> list[Pair]:
    world, server = setup.world, setup.server
    n = min(requests, world.survivors)
    pairs: list[Pair] = []
    for requester, purpose, who, with_aa in (
        ("harbor", "safety_planning", "known survivor, no grant to the caller", True),
        ("police", "protective_order", "known survivor, grant for another purpose", False),
    ):
        conn = KeepAliveConn(server.port, fetch_token(world.url, world.clients[requester]))
        refs = [world.ref(requester, i) for i in range(n)]
        known = [_body(ref, purpose) for ref in refs]
        unknown = [_body(_never_linked(ref, "X"), purpose) for ref in refs]
        _alternate(conn, known[:WARMUP], unknown[:WARMUP], "warm-up")
        progress(f"existence oracle: {requester}, {who} vs unknown, {n:,} each, alternating")
        a, b = _alternate(conn, known, unknown, requester)
        pairs.append(Pair(f"{who} ({requester}) vs unknown reference", a, b))
        if with_aa:
            other = [_body(_never_linked(ref, "Y"), purpose) for ref in refs]
            a, b = _alternate(conn, unknown, other, f"{requester} A/A")
            pairs.append(Pair("A/A: unknown vs unknown, the noise alone", a, b))
        conn.sock.close()
    return pairs


def oracle_rows(setup: BrokerSetup, backend: str, requests: int, progress: Progress) -> list[Row]:
    rows = []
    for pair in measure(setup, requests, progress):
        a, b = sorted(pair.a), sorted(pair.b)
        differs = pair.ks > pair.ks_critical
        rows.append(
            Row(
                f"Existence oracle, {backend}: denial time, {pair.label} "
                f"({len(a):,} alternating sequential requests each)",
                f"p50 {percentile(a, 0.5):.3f} vs {percentile(b, 0.5):.3f} ms, "
                f"p90 {percentile(a, 0.9):.3f} vs {percentile(b, 0.9):.3f} ms; median paired "
                f"difference {pair.median_difference_us:+.0f} µs; KS D = {pair.ks:.3f} "
                f"(5 % critical {pair.ks_critical:.3f})",
                "" if pair.label.startswith("A/A") else "same timing (invariant 6)",
                ""
                if pair.label.startswith("A/A")
                else ("**distinguishable**" if differs else "not distinguishable at 5 %"),
            )
        )
    return rows
