"""Per-caller limits on job submissions (per API key, or per client address when keys are off), counted in
the service's own Redis with the `limits` library, so every API replica shares one count."""

from __future__ import annotations

import math
import time

from limits import parse_many
from limits.storage import RedisStorage
from limits.strategies import MovingWindowRateLimiter

from jobs.queue import KEY_PREFIX
from jobs.settings import Settings

from .errors import RateLimited


class SubmitRateLimit:
    """`settings.rate_limit` (e.g. "10/second;300/minute") per caller, as moving windows."""

    def __init__(self, settings: Settings):
        self.items = parse_many(settings.rate_limit) if settings.rate_limit.strip() else []
        timeout = settings.redis_timeout_seconds
        storage = RedisStorage(settings.redis_url, key_prefix=f"{KEY_PREFIX}:limits",
                               socket_timeout=timeout, socket_connect_timeout=timeout)  # fmt: skip
        self.limiter = MovingWindowRateLimiter(storage)

    def hit(self, caller: str, *, described_as: str) -> None:
        """Count one submission by `caller` (`described_as` names it in the error, e.g. "this API key").

        Raises:
            RateLimited: a limit is exhausted; `retry_after` is when its window frees a slot.
        """
        for item in self.items:
            if not self.limiter.hit(item, "submit", caller):
                reset_at = self.limiter.get_window_stats(item, "submit", caller).reset_time
                retry_after = max(1, math.ceil(reset_at - time.time()))
                raise RateLimited(f"more than {item} job submissions from {described_as}", retry_after=retry_after)
