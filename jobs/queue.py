"""The job contract: queue, task name, statuses, `job.meta` fields, the ending and the cancel flag, shared
by both sides.

An RQ job is the record. The API writes `meta.owner` and `meta.params` when it enqueues; the worker
writes `meta.progress`. How a job ended (status, result or error, when) is one record, its `Ending`,
written once by `jobs.lifecycle.announce` before anyone is told, so a job reads final the instant its
`completed` event exists (RQ's own status follows a moment later). Cancelling is a separate Redis key, not
a meta field, because the worker rewrites meta at every step and would erase it.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import asdict, dataclass
from enum import Enum

from redis import BlockingConnectionPool, Redis
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
    NON_FINITE_OUTPUT = "non_finite_output"  # NaN/inf in the clip; the message names the component
    OUT_OF_MEMORY = "out_of_memory"  # the device ran out of memory even for this job alone
    STORAGE_UNAVAILABLE = "storage_unavailable"
    WORKER_LOST = "worker_lost"


TERMINAL = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED, JobStatus.ABORTED})

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


def open_redis(settings: Settings, *, max_connections: int | None = None) -> Redis:
    """A client whose every call gives up after `redis_timeout_seconds` (RQ lengthens a worker's read
    timeout for its blocking dequeue; connecting stays short). With `max_connections`, a caller that finds
    them all in use waits for one (up to the same timeout) instead of failing at once."""
    timeout = settings.redis_timeout_seconds
    if max_connections is None:
        return Redis.from_url(settings.redis_url, socket_timeout=timeout, socket_connect_timeout=timeout)
    pool = BlockingConnectionPool.from_url(settings.redis_url, max_connections=max_connections, timeout=timeout,
                                           socket_timeout=timeout, socket_connect_timeout=timeout)  # fmt: skip
    return Redis(connection_pool=pool)


def open_queue(redis: Redis, settings: Settings) -> Queue:
    return Queue(settings.queue_name, connection=redis, serializer=JSONSerializer)


def fetch_job(redis: Redis, job_id: str) -> Job | None:
    """The job, or None if it does not exist (or has expired)."""
    return Job.fetch(job_id, connection=redis, serializer=JSONSerializer) if Job.exists(job_id, redis) else None


def ended_key(job_id: str) -> str:
    return f"{KEY_PREFIX}:ended:{job_id}"


@dataclass(frozen=True)
class Ending:
    """How a job ended; `result` is the stored clip's record (succeeded), `error` `{code, message}`."""

    status: JobStatus
    at: dt.datetime | None
    progress: float = 0.0
    result: dict | None = None
    error: dict | None = None

    def encode(self) -> str:
        return json.dumps({**asdict(self), "status": self.status.value, "at": self.at and self.at.isoformat()})

    @classmethod
    def decode(cls, raw: bytes | None) -> Ending | None:
        """None for no record, or for one written before endings held more than the status."""
        if not raw or not raw.startswith(b"{"):
            return None
        fields = json.loads(raw)
        at = fields.pop("at")
        return cls(**{**fields, "status": JobStatus(fields["status"]), "at": at and dt.datetime.fromisoformat(at)})


def get_ending(job: Job) -> Ending | None:
    """The job's ending, or None while it has not ended. A job RQ ended without one (failed by RQ before our
    code ran, or ended before endings were recorded) gets one rebuilt from its meta."""
    recorded = Ending.decode(job.connection.get(ended_key(job.id)))
    if recorded is not None:
        return recorded
    status = _FROM_RQ.get(job.get_status(refresh=False), JobStatus.QUEUED)
    if status not in TERMINAL:
        return None
    meta = job.meta
    code = meta.get("error", {}).get("code")
    if code in (ErrorCode.CANCELED, ErrorCode.ABORTED):  # a job the worker stopped or never ran ends 'finished'
        status = JobStatus(code)
    return Ending(status, job.ended_at, meta.get("progress", 0.0), meta.get("result"), meta.get("error"))


def status_of(job: Job, ending: Ending | None) -> JobStatus:
    """The public status: the ending's, or, while the job goes on, queued or running as RQ says."""
    return ending.status if ending is not None else _FROM_RQ.get(job.get_status(refresh=False), JobStatus.QUEUED)


def get_status(job: Job) -> JobStatus:
    return status_of(job, get_ending(job))


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


def get_attempts(job: Job, status: JobStatus) -> int:
    """How many times the job (now `status`) has been started (a lost worker's job runs again while
    retries are left): a job canceled while queued, or aborted at its deadline before it ran, has none."""
    retries_used = job.meta.get("max_retries", 0) - (job.retries_left or 0)
    never_ran = status in (JobStatus.QUEUED, JobStatus.ABORTED) or job.started_at is None
    return retries_used + (0 if never_ran else 1)


def cancel_key(job_id: str) -> str:
    return f"{KEY_PREFIX}:cancel:{job_id}"


def request_cancel(redis: Redis, job_id: str, *, ttl_seconds: int) -> None:
    """Raise the job's cancel flag; the first request's time is the one kept (`get_cancel_requested_at`)."""
    redis.set(cancel_key(job_id), dt.datetime.now(dt.UTC).isoformat(), nx=True, ex=ttl_seconds)


def get_cancel_requested_at(redis: Redis, job_id: str) -> dt.datetime | None:
    value = redis.get(cancel_key(job_id))
    return dt.datetime.fromisoformat(value.decode()) if value else None
