"""Per-caller limits (per API key, or per client address when keys are off): job submissions, counted in
the service's own Redis with the `limits` library so every API replica shares one count (and stated in the
IETF draft's RateLimit headers); and event streams and `Prefer: wait` requests held open at once, counted
per API process (what they hold is the process's)."""

from __future__ import annotations

import math
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

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

    def hit(self, caller: str) -> SubmitBudget:
        """Count one submission by `caller` against every limit it is still within; returns what is left."""
        quotas, exhausted = [], None
        for item in self.items:
            allowed = exhausted is None and self.limiter.hit(item, "submit", caller)
            stats = self.limiter.get_window_stats(item, "submit", caller)
            reset = max(0, math.ceil(stats.reset_time - time.time()))
            quotas.append(Quota(policy_name(item), item.amount, item.get_expiry(), stats.remaining, reset))
            if not allowed and exhausted is None:
                exhausted = item
        return SubmitBudget(quotas, exhausted)


def policy_name(item) -> str:
    """A limit's name in the RateLimit headers: "second" for 10/second, "5minute" for 10 per 5 minutes."""
    return f"{item.multiples if item.multiples != 1 else ''}{item.GRANULARITY.name}"


@dataclass(frozen=True)
class Quota:
    """One limit as draft-ietf-httpapi-ratelimit-headers states it: quota and window (seconds), then what
    is left of it and the seconds until its window frees a slot."""

    name: str
    quota: int
    window: int
    remaining: int
    reset: int


@dataclass(frozen=True)
class SubmitBudget:
    quotas: list[Quota]
    exhausted: object | None  # the first limit this submission broke (a `limits` item), or None

    def headers(self) -> dict[str, str]:
        """`RateLimit-Policy` and `RateLimit` (IETF draft), one item per limit; none when limits are off."""
        if not self.quotas:
            return {}
        return {
            "RateLimit-Policy": ", ".join(f'"{q.name}";q={q.quota};w={q.window}' for q in self.quotas),
            "RateLimit": ", ".join(f'"{q.name}";r={q.remaining};t={q.reset}' for q in self.quotas),
        }

    def raise_if_exhausted(self, *, described_as: str) -> None:
        """Refuse the submission if it broke a limit.

        Raises:
            RateLimited: a limit is exhausted; `retry_after` is when its window frees a slot.
        """
        if self.exhausted is not None:
            reset = next(q.reset for q in self.quotas if q.name == policy_name(self.exhausted))
            message = f"more than {self.exhausted} job submissions from {described_as}"
            raise RateLimited(message, retry_after=max(1, reset))


class RateLimitHeaders:
    """ASGI middleware: adds the RateLimit headers a dependency left in `request.state.rate_limit_headers`
    to the answer, whichever it is (accepted, refused by a later check, or the 429 itself)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message) -> None:
            if message["type"] == "http.response.start":
                headers = scope.get("state", {}).get("rate_limit_headers", {})
                message["headers"] = [*message.get("headers", []),
                                      *((name.lower().encode(), value.encode()) for name, value in headers.items())]
            await send(message)

        await self.app(scope, receive, send_with_headers)


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
