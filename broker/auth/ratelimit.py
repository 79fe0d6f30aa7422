"""Per-client token buckets: a flood from one credential cannot starve the others.

Buckets live in each process (no shared store to depend on), so with N broker
processes the effective ceiling is N times the setting: tune per deployment.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict

from broker.errors import RateLimited


class RateLimiter:
    def __init__(self, per_second: float, burst: int, max_clients: int = 100_000) -> None:
        self.per_second = per_second
        self.burst = float(burst)
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._max = max_clients

    def hit(self, key: str) -> None:
        """Take one token for ``key`` or raise ``RateLimited`` with a Retry-After hint."""
        if self.per_second <= 0:
            return
        now = time.monotonic()
        tokens, last = self._buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.per_second)
        if tokens < 1.0:
            retry = max(1, math.ceil((1.0 - tokens) / self.per_second))
            self._buckets[key] = (tokens, now)
            raise RateLimited(
                f"Too many requests from this client; retry in {retry} s.", retry_after=retry
            )
        self._buckets[key] = (tokens - 1.0, now)
        self._buckets.move_to_end(key)
        if len(self._buckets) > self._max:
            self._buckets.popitem(last=False)
