"""Job timings and outcomes kept in Redis, so every worker adds to them and any API replica can export them.

Workers call `observe`, `count_outcome` and `count_compile_misses`; the API's Prometheus collector calls
`read_histogram`, `read_outcomes` and `read_compile_misses`. Buckets are fixed here so writers and readers
agree.
"""

from __future__ import annotations

from redis import Redis

from .queue import KEY_PREFIX

BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
QUEUE_WAIT = "queue_wait_seconds"
RUN_TIME = "run_seconds"
_OUTCOMES = f"{KEY_PREFIX}:metrics:outcomes"
_COMPILE_MISSES = f"{KEY_PREFIX}:metrics:compile_misses"


def _histogram_key(name: str) -> str:
    return f"{KEY_PREFIX}:metrics:{name}"


def observe(redis: Redis, name: str, seconds: float) -> None:
    """Add one observation to a cumulative histogram (one field per bucket, plus sum and count)."""
    with redis.pipeline() as pipe:
        for bound in BUCKETS:
            if seconds <= bound:
                pipe.hincrby(_histogram_key(name), str(bound), 1)
        pipe.hincrbyfloat(_histogram_key(name), "sum", seconds)
        pipe.hincrby(_histogram_key(name), "count", 1)
        pipe.execute()


def read_histogram(redis: Redis, name: str) -> tuple[list[tuple[str, int]], float]:
    """Cumulative (le, count) pairs ending with +Inf, and the sum, as Prometheus wants them."""
    fields = {k.decode(): v.decode() for k, v in redis.hgetall(_histogram_key(name)).items()}
    buckets = [(str(bound), int(fields.get(str(bound), 0))) for bound in BUCKETS]
    buckets.append(("+Inf", int(fields.get("count", 0))))
    return buckets, float(fields.get("sum", 0.0))


def count_outcome(redis: Redis, status: str) -> None:
    redis.hincrby(_OUTCOMES, status, 1)


def read_outcomes(redis: Redis) -> dict[str, int]:
    return {k.decode(): int(v) for k, v in redis.hgetall(_OUTCOMES).items()}


def count_compile_misses(redis: Redis, misses: dict[str, int]) -> None:
    """Add a compiled worker's misses: calls outside its warmed shapes (by what missed) and `recompile`s."""
    with redis.pipeline() as pipe:
        for what, count in misses.items():
            pipe.hincrby(_COMPILE_MISSES, what, count)
        pipe.execute()


def read_compile_misses(redis: Redis) -> dict[str, int]:
    return {k.decode(): int(v) for k, v in redis.hgetall(_COMPILE_MISSES).items()}
