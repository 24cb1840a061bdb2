"""Per-caller limits (per API key, or per client address when keys are off): job submissions, counted in
the service's own Redis with the `limits` library so every API replica shares one count; and event streams
and `Prefer: wait` requests held open at once, counted per API process (what they hold is the process's)."""

from __future__ import annotations

import math
import threading
import time
from collections import Counter
from collections.abc import Callable

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


OPEN_STREAM_RETRY_AFTER_SECONDS = 5  # a stream ends when its job does; a wait within a minute


class Hold:
    """One open stream or wait, counted until `release()` (idempotent; also on leaving a `with` block)."""

    def __init__(self, release: Callable[[], None]):
        self._release: Callable[[], None] | None = release

    def release(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()

    def __enter__(self) -> Hold:
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()


class OpenStreamLimit:
    """At most `limit` event streams and `Prefer: wait` requests open per caller on this API process."""

    def __init__(self, limit: int):
        self.limit = limit
        self.open: Counter[str] = Counter()
        self.lock = threading.Lock()  # released from the event loop, or by the garbage collector

    def hold(self, caller: str, *, described_as: str) -> Hold:
        """Count one more open stream or wait for `caller`.

        Raises:
            RateLimited: the caller already holds `limit` of them here.
        """
        with self.lock:
            if self.open[caller] >= self.limit:
                raise RateLimited(
                    f"{described_as} already holds {self.limit} open event streams and Prefer: wait requests on "
                    "this server; close one, or poll GET /jobs/{id}", retry_after=OPEN_STREAM_RETRY_AFTER_SECONDS,
                )  # fmt: skip
            self.open[caller] += 1
        return Hold(lambda: self._release(caller))

    def _release(self, caller: str) -> None:
        with self.lock:
            self.open[caller] -= 1
            if not self.open[caller]:
                del self.open[caller]
