"""The checks behind /readyz, each returning why it failed rather than raising, all within a deadline."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TypeVar

import anyio
from redis import Redis
from redis.exceptions import RedisError

from jobs.heartbeat import read_heartbeats
from jobs.storage import Storage, StorageUnavailable

from .schemas import Check, Readiness


def check_redis(redis: Redis) -> Check:
    try:
        redis.ping()
        return Check(ok=True, detail="reachable")
    except RedisError as exc:
        return Check(ok=False, detail=f"redis unreachable: {exc}")


def check_storage(storage: Storage) -> Check:
    try:
        storage.check()
        return Check(ok=True, detail="reachable")
    except StorageUnavailable as exc:
        return Check(ok=False, detail=str(exc))


def check_workers(redis: Redis, queue_name: str) -> tuple[Check, int | None]:
    """Whether warmed-up workers beat on the queue, and how many (None if the heartbeats cannot be read)."""
    try:
        workers = [beat for beat in read_heartbeats(redis) if queue_name in beat.get("queues", [])]
    except RedisError:
        return Check(ok=False, detail="cannot read worker heartbeats (redis unreachable)"), None
    ready = [beat for beat in workers if not beat.get("warming_up")]
    if not workers:
        return Check(ok=False, detail=f"no fresh worker heartbeat on queue {queue_name!r}: jobs will wait"), 0
    if not ready:
        detail = f"{len(workers)} worker(s) warming up on queue {queue_name!r}: jobs will wait"
        return Check(ok=False, detail=detail), 0
    return Check(ok=True, detail=f"{len(ready)} worker(s) alive on queue {queue_name!r}"), len(ready)


log = logging.getLogger(__name__)
INTERNAL_CHECKS = ("redis", "storage")  # what readiness requires; their details name internal endpoints
T = TypeVar("T")


async def _within(check: Callable[[], T], timeout: float, late: T) -> T:
    """The check run in a worker thread, or `late` if it has not answered within `timeout` (the thread is
    left to its backend's own timeout)."""
    try:
        with anyio.fail_after(timeout):
            return await anyio.to_thread.run_sync(check, abandon_on_cancel=True)
    except TimeoutError:
        return late


async def check_readiness(
    *, redis: Redis, storage: Storage, queue_name: str, timeout: float, show_internal: bool
) -> Readiness:
    """All checks at once, each bounded by `timeout`; without `show_internal`, Redis and storage details
    say only reachable or not (they would name internal endpoints).

    Ready means Redis and storage answer. Workers are reported, not required: with none (scaled to zero,
    the GPU pool lost) jobs wait in the queue while status, polling and downloads keep being served.
    """
    late = Check(ok=False, detail=f"no answer within {timeout:g} s")
    redis_check, storage_check, (workers_check, workers_available) = await asyncio.gather(
        _within(lambda: check_redis(redis), timeout, late),
        _within(lambda: check_storage(storage), timeout, late),
        _within(lambda: check_workers(redis, queue_name), timeout, (late, None)),
    )
    checks = {"redis": redis_check, "storage": storage_check, "workers": workers_check}
    for name in INTERNAL_CHECKS:
        if not checks[name].ok:
            log.warning("readiness: %s: %s", name, checks[name].detail)
        if not show_internal:
            checks[name] = Check(ok=checks[name].ok, detail="reachable" if checks[name].ok else "unreachable")
    ready = all(checks[name].ok for name in INTERNAL_CHECKS)
    return Readiness(ready=ready, workers_available=workers_available, checks=checks)
