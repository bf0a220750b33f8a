"""Per-tenant rate limit on writes that cost the service work (``POST /jobs``, cancels): a token bucket per
tenant and action, ``HIPP_RATE_LIMIT_BURST`` requests at once and ``HIPP_RATE_LIMIT_PER_MINUTE`` sustained,
in the API process (each API process counts on its own). Beyond it: 429 ``rate_limited`` with
``Retry-After`` (whole seconds until the next request would be accepted).

Together with the active-job quota (app/services/jobs.py), the fair publishing order (app/queue.py) and the
worker dropping cancelled jobs before they cost a process (worker/tasks.py), one tenant cannot starve the
others by submitting and cancelling in a loop.
"""

from __future__ import annotations

import math
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Depends

from app.deps import CurrentTenant, SettingsDep
from app.errors import ApiError


class TokenBuckets:
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


buckets = TokenBuckets()


def rate_limit(action: str) -> Callable[..., Awaitable[None]]:
    async def check(who: CurrentTenant, settings: SettingsDep) -> None:
        if settings.rate_limit_per_minute <= 0:
            return
        wait = buckets.take(action, who.tenant_id, settings.rate_limit_per_minute, settings.rate_limit_burst)
        if wait > 0:
            retry = max(1, math.ceil(wait))
            raise ApiError(
                429,
                "rate_limited",
                f"too many {action} requests for this tenant (limit {settings.rate_limit_per_minute:g} per minute, "
                f"bursts of {settings.rate_limit_burst}); retry in {retry} s",
                detail={"retry_after_s": retry, "action": action},
                headers={"Retry-After": str(retry)},
            )

    return check


SubmitRateLimit = Annotated[None, Depends(rate_limit("submit"))]
CancelRateLimit = Annotated[None, Depends(rate_limit("cancel"))]
