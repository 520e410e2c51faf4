"""Per-caller request-rate limit of the task routes: a token bucket per API key (or client address), 429 beyond it.

Each ingress replica keeps its own buckets, so with R replicas a caller's ceiling is about
R × `limits.rate_limit_rps` (Serve spreads requests evenly): set the rate per replica.
Buckets live in a bounded LRU map, so a flood of distinct callers cannot grow memory.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable

from serving.errors import RateLimited


def caller_id(api_key: str | None, client_host: str | None) -> str:
    """The bucket name of a caller: a digest of its API key (never the key itself), else its address."""
    if api_key:
        return "key:" + hashlib.sha256(api_key.encode()).hexdigest()[:16]
    return f"addr:{client_host or '-'}"


class RateLimiter:
    """Token buckets: `rate` requests per second on average, bursts of up to `burst`."""

    def __init__(
        self, rate: float, burst: int, max_callers: int = 10_000, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate = rate
        self.burst = max(1, burst)
        self.max_callers = max_callers
        self.clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # caller → (tokens, last time)

    @property
    def enabled(self) -> bool:
        """False when `rate` is 0 (no limit)."""
        return self.rate > 0

    def check(self, caller: str) -> None:
        """Take one token for `caller`.

        Raises:
            RateLimited: the caller's bucket is empty (429, Retry-After: when a token is back).
        """
        if not self.enabled:
            return
        now = self.clock()
        tokens, last = self._buckets.pop(caller, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) * self.rate)
        if tokens < 1.0:
            self._buckets[caller] = (tokens, now)
            wait = (1.0 - tokens) / self.rate
            raise RateLimited(
                f"rate limit of {self.rate:g} requests/s (burst {self.burst}) exceeded "
                "(limits.rate_limit_rps): slow down and retry after the Retry-After delay",
                retry_after=wait,
            )
        self._buckets[caller] = (tokens - 1.0, now)
        while len(self._buckets) > self.max_callers:
            self._buckets.popitem(last=False)
