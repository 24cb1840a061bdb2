"""The job contract: queue, task name, statuses, `job.meta` fields and the cancel flag, shared by both sides.

An RQ job is the record. The API writes `meta.owner` and `meta.params` when it enqueues; the worker
writes `meta.progress`, then `meta.result` or `meta.error`. Cancelling is a separate Redis key, not a
meta field, because the worker rewrites meta at every step and would erase it.
"""

from __future__ import annotations

import datetime as dt
from enum import Enum

from redis import Redis
from rq import Queue
from rq.job import Job
from rq.job import JobStatus as RQStatus
from rq.serializers import JSONSerializer

from .settings import Settings

TASK = "workers.tasks.generate_clip"  # by name, so the API never imports the worker
ON_FAILURE = "workers.tasks.on_job_failure"  # RQ calls it when the janitor finds a job's worker lost
KEY_PREFIX = "melfusion"
CANCEL_AT = "cancel_at"  # job.meta: the Cancel-After deadline (Unix time), written by the API, obeyed by the worker


class JobStatus(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"
    ABORTED = "aborted"  # its Cancel-After deadline passed before it started: it never ran


class ErrorCode(str, Enum):
    CANCELED = "canceled"
    ABORTED = "aborted"
    INVALID_INPUT = "invalid_input"
    INTERNAL = "internal_error"
    STORAGE_UNAVAILABLE = "storage_unavailable"
    WORKER_LOST = "worker_lost"


_FROM_RQ = {
    RQStatus.CREATED: JobStatus.QUEUED,
    RQStatus.QUEUED: JobStatus.QUEUED,
    RQStatus.DEFERRED: JobStatus.QUEUED,
    RQStatus.SCHEDULED: JobStatus.QUEUED,
    RQStatus.READY_TO_ENQUEUE: JobStatus.QUEUED,
    RQStatus.RATE_LIMITED: JobStatus.QUEUED,
    RQStatus.STARTED: JobStatus.RUNNING,
    RQStatus.FINISHED: JobStatus.SUCCEEDED,
    RQStatus.FAILED: JobStatus.FAILED,
    RQStatus.STOPPED: JobStatus.CANCELED,
    RQStatus.CANCELED: JobStatus.CANCELED,
}


def open_redis(settings: Settings) -> Redis:
    """A client whose every call gives up after `redis_timeout_seconds` (RQ lengthens a worker's read
    timeout for its blocking dequeue; connecting stays short)."""
    timeout = settings.redis_timeout_seconds
    return Redis.from_url(settings.redis_url, socket_timeout=timeout, socket_connect_timeout=timeout)


def open_queue(redis: Redis, settings: Settings) -> Queue:
    return Queue(settings.queue_name, connection=redis, serializer=JSONSerializer)


def fetch_job(redis: Redis, job_id: str) -> Job | None:
    """The job, or None if it does not exist (or has expired)."""
    return Job.fetch(job_id, connection=redis, serializer=JSONSerializer) if Job.exists(job_id, redis) else None


def get_status(job: Job) -> JobStatus:
    """The public status; a job the worker stopped on a cancel request ends 'finished' in RQ, 'canceled' here."""
    status = _FROM_RQ.get(job.get_status(refresh=False), JobStatus.QUEUED)
    ended = status in (JobStatus.SUCCEEDED, JobStatus.FAILED)  # failed: canceled while its worker was lost
    code = job.meta.get("error", {}).get("code")
    if ended and code in (ErrorCode.CANCELED, ErrorCode.ABORTED):
        return JobStatus(code)
    return status


def get_queue_position(job: Job, *, owner: str) -> int | None:
    """How many of `owner`'s jobs are queued ahead of `job` (0 = none); None if it is not queued. Other
    owners' jobs are not counted: a client learns nothing about anyone else's load."""
    queue = Queue(job.origin, connection=job.connection, serializer=JSONSerializer)
    position = queue.get_job_position(job.id)
    if position is None:
        return None
    ahead = queue.get_job_ids(0, position) if position else []
    with job.connection.pipeline(transaction=False) as pipe:
        for job_id in ahead:
            pipe.hget(Job.key_for(job_id), "meta")
        metas = pipe.execute()
    return sum(1 for meta in metas if meta and JSONSerializer.loads(meta).get("owner") == owner)


def requeue_started(job: Job, queue: Queue) -> None:
    """Put a started job back at the head of its queue (a worker shutting down hands it on, then removes
    its execution from the started registry: the job is never in neither); the caller announces it."""
    queue.enqueue_job(job, at_front=True)


def get_attempts(job: Job) -> int:
    """How many times the job has been started (a lost worker's job runs again while retries are left)."""
    retries_used = job.meta.get("max_retries", 0) - (job.retries_left or 0)
    return retries_used + (0 if get_status(job) is JobStatus.QUEUED else 1)


def cancel_key(job_id: str) -> str:
    return f"{KEY_PREFIX}:cancel:{job_id}"


def request_cancel(redis: Redis, job_id: str, *, ttl_seconds: int) -> None:
    """Raise the job's cancel flag; the first request's time is the one kept (`get_cancel_requested_at`)."""
    redis.set(cancel_key(job_id), dt.datetime.now(dt.UTC).isoformat(), nx=True, ex=ttl_seconds)


def get_cancel_requested_at(redis: Redis, job_id: str) -> dt.datetime | None:
    value = redis.get(cancel_key(job_id))
    return dt.datetime.fromisoformat(value.decode()) if value else None
