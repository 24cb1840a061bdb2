"""Per-caller limits on job submissions (per API key, or per client address when keys are off), counted in
the service's own Redis with the `limits` library, so every API replica shares one count."""

from __future__ import annotations

import math
import time
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
