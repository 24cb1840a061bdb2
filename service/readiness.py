"""The checks behind /readyz, each returning why it failed rather than raising."""

from __future__ import annotations

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


def check_workers(redis: Redis, queue_name: str) -> Check:
    try:
        workers = [beat for beat in read_heartbeats(redis) if queue_name in beat.get("queues", [])]
    except RedisError:
        return Check(ok=False, detail="cannot read worker heartbeats (redis unreachable)")
    if not workers:
        return Check(ok=False, detail=f"no fresh worker heartbeat on queue {queue_name!r}: jobs will wait")
    ready = [beat for beat in workers if not beat.get("warming_up")]
    if not ready:
        return Check(ok=False, detail=f"{len(workers)} worker(s) warming up on queue {queue_name!r}: jobs will wait")
    return Check(ok=True, detail=f"{len(ready)} worker(s) alive on queue {queue_name!r}")


def check_readiness(*, redis: Redis, storage: Storage, queue_name: str) -> Readiness:
    checks = {
        "redis": check_redis(redis),
        "storage": check_storage(storage),
        "workers": check_workers(redis, queue_name),
    }
    return Readiness(ready=all(check.ok for check in checks.values()), checks=checks)
