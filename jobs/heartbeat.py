"""Worker heartbeats: a Redis key per worker that expires unless renewed, so a dead worker disappears.

RQ's own worker heartbeat stops while a SimpleWorker runs a job (the job runs in the worker's only
thread), so workers beat from a background thread and /readyz reads these keys instead.
"""

from __future__ import annotations

import json

from redis import Redis

from .queue import KEY_PREFIX

_PATTERN = f"{KEY_PREFIX}:workers:*"


def heartbeat_key(worker_name: str) -> str:
    return f"{KEY_PREFIX}:workers:{worker_name}"


def write_heartbeat(redis: Redis, worker_name: str, state: dict, *, ttl_seconds: float) -> None:
    redis.set(heartbeat_key(worker_name), json.dumps(state), px=int(ttl_seconds * 1000))


def clear_heartbeat(redis: Redis, worker_name: str) -> None:
    redis.delete(heartbeat_key(worker_name))


def read_heartbeats(redis: Redis) -> list[dict]:
    """The states of all workers that beat recently (expired keys are gone)."""
    keys = list(redis.scan_iter(match=_PATTERN, count=100))
    values = redis.mget(keys) if keys else []
    return [json.loads(value) for value in values if value]
