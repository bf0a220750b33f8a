"""Per-tenant rate limit on writes that cost the service work (``POST /jobs``, cancels): a token bucket per
tenant and action, ``HIPP_RATE_LIMIT_BURST`` requests at once and ``HIPP_RATE_LIMIT_PER_MINUTE`` sustained,
in the API process (each API process counts on its own). Beyond it: 429 ``rate_limited`` with
``Retry-After`` (whole seconds until the next request would be accepted).

Together with the active-job quota (app/services/jobs.py), the fair publishing order (app/queue.py) and the
worker dropping cancelled jobs before they cost a process (worker/tasks.py), one tenant cannot starve the
others by submitting and cancelling in a loop.

The buckets live in the API's runtime (app/runtime.py); the route dependency that takes a token is
``app.deps.rate_limit``.
"""

from __future__ import annotations

import threading
import time
import uuid


class TokenBuckets:
    """A token bucket per (action, tenant). Bounded: cleared past 100,000 buckets."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._buckets: dict[tuple[str, uuid.UUID], tuple[float, float]] = {}  # (tokens, at)

    def take(self, action: str, tenant: uuid.UUID, per_minute: float, burst: int) -> float:
        """Take a token; 0.0 when granted, else the seconds until one is available."""
        rate = per_minute / 60.0
        now = time.monotonic()
        with self._lock:
            if len(self._buckets) > 100_000:
                self._buckets.clear()
            tokens, at = self._buckets.get((action, tenant), (float(burst), now))
            tokens = min(float(burst), tokens + (now - at) * rate)
            if tokens >= 1.0:
                self._buckets[(action, tenant)] = (tokens - 1.0, now)
                return 0.0
            self._buckets[(action, tenant)] = (tokens, now)
            return (1.0 - tokens) / rate

    def clear(self) -> None:
        with self._lock:
            self._buckets.clear()
