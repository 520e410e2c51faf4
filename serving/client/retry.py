"""When and how long the clients wait before trying a call again: capped exponential backoff with jitter.

Every API call is idempotent, so the clients retry what a later try can fix: HTTP 429 and
503 (gRPC RESOURCE_EXHAUSTED and UNAVAILABLE) and a connection that failed before an
answer. A server's `Retry-After` (HTTP header, gRPC `retry-after` trailing metadata) is a
floor: the client never tries earlier than it asks.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

RETRY_HTTP_STATUSES = frozenset({429, 503})
RETRY_GRPC_STATUSES = frozenset({"RESOURCE_EXHAUSTED", "UNAVAILABLE"})
# RESOURCE_EXHAUSTED also means "too big": a retry cannot fix these.
NEVER_RETRY_CODES = frozenset({"payload_too_large"})


@dataclass(frozen=True)
class Retry:
    """How a client retries.

    Attributes:
        max_retries: tries after the first one (0: never retry).
        backoff_s: the first wait; each retry doubles it, up to `max_backoff_s`.
        max_backoff_s: the cap of the exponential wait.
        max_retry_after_s: a server asking for a longer wait than this is not retried: the error is raised.
    """

    max_retries: int = 3
    backoff_s: float = 0.5
    max_backoff_s: float = 8.0
    max_retry_after_s: float = 60.0

    def delay(self, retry: int, retry_after: float | None = None, rng: random.Random | None = None) -> float | None:
        """Seconds to wait before retry number `retry` (1-based), or None to give up and raise.

        The wait is uniform in [cap/2, cap] with cap = min(max_backoff_s, backoff_s * 2**(retry-1)),
        so clients refused together do not come back together; with `retry_after` it is
        `retry_after` plus up to half a cap, never less than the server asked for.
        """
        if retry > self.max_retries:
            return None
        cap = min(self.max_backoff_s, self.backoff_s * 2 ** (retry - 1))
        r = rng or random
        if retry_after is None:
            return r.uniform(cap / 2, cap)
        if retry_after > self.max_retry_after_s:
            return None
        return retry_after + r.uniform(0, cap / 2)


NO_RETRY = Retry(max_retries=0)


def retryable_http(status: int) -> bool:
    """An HTTP status a later try can fix (overloaded, unavailable)."""
    return status in RETRY_HTTP_STATUSES


def retryable_grpc(status: str, code: str, details: str = "") -> bool:
    """A gRPC status (name) a later try can fix; not a message over a size limit."""
    if status not in RETRY_GRPC_STATUSES or code in NEVER_RETRY_CODES:
        return False
    return not (status == "RESOURCE_EXHAUSTED" and "larger than max" in details)
