"""The webhook contract both sides share: what a job subscribed to, the queue of due deliveries and the
log of attempts. `jobs.lifecycle.announce` queues; the API's sender (`service/webhooks.py`) delivers.

Due deliveries are members of one Redis sorted set scored by when they are due, so they survive a
restart of any process, retries are just a later score, and several API replicas can drain the set:
whoever removes a member (ZREM returns 1) owns that attempt.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import asdict, dataclass, field, replace

from redis import Redis

from .queue import KEY_PREFIX

EVENTS = ("start", "progress", "completed")  # what a job may subscribe to (Replicate's names)
DEFAULT_EVENTS = ("completed",)
PROGRESS_INTERVAL_SECONDS = 0.5  # at most two progress webhooks a second per job
DUE = f"{KEY_PREFIX}:webhooks:due"


def attempts_key(job_id: str) -> str:
    return f"{KEY_PREFIX}:webhooks:attempts:{job_id}"


def _progress_gate_key(job_id: str) -> str:
    return f"{KEY_PREFIX}:webhooks:progress-gate:{job_id}"


@dataclass(frozen=True)
class Delivery:
    """One event to one target; retries keep the id (receivers deduplicate on `webhook-id`) and the body."""

    job_id: str
    event: str
    id: str = field(default_factory=lambda: f"msg_{uuid.uuid4().hex}")
    attempt: int = 1
    first_at: float = field(default_factory=time.time)
    body: str | None = None  # the job JSON, fixed at the first attempt

    def encode(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def decode(cls, member: bytes | str) -> Delivery:
        return cls(**json.loads(member))

    def next_attempt(self, body: str) -> Delivery:
        return replace(self, attempt=self.attempt + 1, body=body)


def get_subscription(meta: dict) -> dict | None:
    """`{"url", "events"}` if the job asked for webhooks."""
    return meta.get("webhook")


def queue_delivery(redis: Redis, *, job_id: str, meta: dict, event: str) -> bool:
    """Queue `event` for the job's webhook if it subscribed to it (progress: at most every 0.5 s)."""
    subscription = get_subscription(meta)
    if subscription is None or event not in subscription["events"]:
        return False
    if event == "progress":
        gate = int(PROGRESS_INTERVAL_SECONDS * 1000)
        if not redis.set(_progress_gate_key(job_id), 1, nx=True, px=gate):
            return False
    schedule(redis, Delivery(job_id=job_id, event=event), at=time.time())
    return True


def schedule(redis: Redis, delivery: Delivery, *, at: float) -> None:
    redis.zadd(DUE, {delivery.encode(): at})


def claim_due(redis: Redis, *, limit: int, skip_jobs: set[str]) -> list[Delivery]:
    """Deliveries due now that this process now owns (others' claims and `skip_jobs`' are left)."""
    claimed = []
    for member in redis.zrangebyscore(DUE, "-inf", time.time(), start=0, num=limit):
        delivery = Delivery.decode(member)
        if delivery.job_id not in skip_jobs and redis.zrem(DUE, member):
            claimed.append(delivery)
            skip_jobs = skip_jobs | {delivery.job_id}  # one delivery per job at a time keeps a job's events in order
    return claimed


def record_attempt(redis: Redis, job_id: str, attempt: dict, *, ttl_seconds: int) -> None:
    with redis.pipeline(transaction=False) as pipe:
        pipe.rpush(attempts_key(job_id), json.dumps(attempt))
        pipe.expire(attempts_key(job_id), ttl_seconds)
        pipe.execute()


def read_attempts(redis: Redis, job_id: str) -> list[dict]:
    return [json.loads(item) for item in redis.lrange(attempts_key(job_id), 0, -1)]
