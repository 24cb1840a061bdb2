"""The checks behind /readyz, each returning why it failed rather than raising, all within a deadline.

Each check runs on a thread of its own, one run at a time: probes that arrive while a check runs wait for
that run (at most the deadline) instead of starting another, so a hung backend holds one thread per
check however many probes come, and no probe queues behind request threads (40 parallel probes of a
SIGSTOPped store used to take 5.7 s at the median).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

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
CHECKS = ("redis", "storage", "workers")
INTERNAL_CHECKS = ("redis", "storage")  # what readiness requires; their details name internal endpoints
T = TypeVar("T")


class ReadinessProbe:
    """Runs checks by name, one run of each at a time, and waits for a run at most `timeout` seconds."""

    def __init__(self, timeout: float):
        self.timeout = timeout
        self.pool = ThreadPoolExecutor(len(CHECKS), thread_name_prefix="readiness")
        self.running: dict[str, tuple[Future, float]] = {}  # name -> the run, when it started
        self.lock = threading.Lock()  # probes come from the event loop and from metrics scrapes' threads

    def late(self) -> Check:
        return Check(ok=False, detail=f"no answer within {self.timeout:g} s")

    async def run(self, name: str, check: Callable[[], T], late: T) -> T:
        """The check's answer, or `late` if it has not answered within the timeout (the run goes on, bounded
        by its backend's own timeout; later probes wait for it, or answer at once once it is late)."""
        with self.lock:
            running, started = self.running.get(name, (None, 0.0))
            if running is None or running.done():
                running, started = self.running[name] = self.pool.submit(check), time.monotonic()
        waited = max(0.0, started + self.timeout - time.monotonic())
        try:
            return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(running)), waited)
        except TimeoutError:
            return late


async def check_readiness(
    *, redis: Redis, storage: Storage, queue_name: str, probe: ReadinessProbe, show_internal: bool
) -> Readiness:
    """All checks at once, each bounded by the probe's timeout; without `show_internal`, Redis and storage
    details say only reachable or not (they would name internal endpoints).

    Ready means Redis and storage answer. Workers are reported, not required: with none (scaled to zero,
    the GPU pool lost) jobs wait in the queue while status, polling and downloads keep being served.
    """
    late = probe.late()
    redis_check, storage_check, (workers_check, workers_available) = await asyncio.gather(
        probe.run("redis", lambda: check_redis(redis), late),
        probe.run("storage", lambda: check_storage(storage), late),
        probe.run("workers", lambda: check_workers(redis, queue_name), (late, None)),
    )
    checks = {"redis": redis_check, "storage": storage_check, "workers": workers_check}
    for name in INTERNAL_CHECKS:
        if not checks[name].ok:
            log.warning("readiness: %s: %s", name, checks[name].detail)
        if not show_internal:
            checks[name] = Check(ok=checks[name].ok, detail="reachable" if checks[name].ok else "unreachable")
    ready = all(checks[name].ok for name in INTERNAL_CHECKS)
    return Readiness(ready=ready, workers_available=workers_available, checks=checks)
