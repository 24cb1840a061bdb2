"""The one place where a job's life is announced: every status change, progress update and final result
goes through `announce`, whoever makes it (the worker, the API's cancel, a recovery pass for an abandoned
job), so what `GET /jobs/{id}`, the event stream and the webhooks say can never drift apart.

`announce` records an ending first (`jobs.queue.Ending`: status, result or error, when; one Redis key
written only if absent), then writes the job's meta (progress, result, error), publishes the change on one
Redis channel (`EVENTS_CHANNEL`: each API process subscribes once and wakes the streams and waits of the
jobs it follows), queues the webhook deliveries the job asked for and counts outcomes for /metrics. A job
ends exactly once: the first terminal announcement wins and later ones (a worker finishing a job the API
already canceled, say) change nothing. Since the ending comes first, whoever hears of the end (a webhook,
a stream, a poll) reads the final job.

RQ's own status (queued, started, finished...) is still moved by RQ's methods where it is today; this
module records what the service adds on top. It imports neither FastAPI nor the worker.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from enum import Enum

from rq.job import Job

from .metrics import count_outcome
from .queue import KEY_PREFIX, TERMINAL, Ending, ErrorCode, JobStatus, ended_key
from .webhooks import queue_delivery

EVENTS_CHANNEL = f"{KEY_PREFIX}:job-events"  # pub/sub: every announced change of every job, as `{"id", ...record}`
DEFAULT_TTL_SECONDS = 86_400


class Event(str, Enum):
    """What kind of change an announcement is (also the webhook event names, plus `queued`)."""

    QUEUED = "queued"
    START = "start"
    PROGRESS = "progress"
    COMPLETED = "completed"


def classify(status: JobStatus, *, progress: float | None) -> Event:
    if status in TERMINAL:
        return Event.COMPLETED
    if status is JobStatus.QUEUED:
        return Event.QUEUED
    return Event.START if progress is None else Event.PROGRESS


def announce(
    job: Job,
    status: JobStatus,
    *,
    progress: float | None = None,
    result: dict | None = None,
    error: tuple[ErrorCode, str] | None = None,
) -> bool:
    """Record one change in `job`'s life and tell everyone listening.

    Args:
        job: the RQ job; its `meta` is updated and saved.
        status: the job's public status after the change: `running` with no progress when it starts and
            with `progress` as it goes, a terminal status when it ends, `queued` if it goes back to the queue
            (a job is born queued: enqueuing is not announced, the job's own record says it).
        progress: fraction of steps done (a progress update); a success always ends at 1.0.
        result: the stored clip's record (`succeeded` only).
        error: `(code, message)` for `failed` and `canceled`.

    Returns:
        False if the job had already ended (nothing changed), else True.
    """
    redis = job.connection
    ttl = job.result_ttl if job.result_ttl and job.result_ttl > 0 else DEFAULT_TTL_SECONDS
    event = classify(status, progress=progress)
    if status is JobStatus.SUCCEEDED:
        progress = 1.0
    progress = round(progress, 4) if progress is not None else None
    error_record = {"code": error[0].value, "message": error[1]} if error is not None else None
    if event is Event.COMPLETED:
        final = progress if progress is not None else job.meta.get("progress", 0.0)
        ending = Ending(status, dt.datetime.now(dt.UTC), final, result, error_record)
        if not redis.set(ended_key(job.id), ending.encode(), nx=True, ex=ttl):
            return False
    if progress is not None:
        job.meta["progress"] = progress
    if result is not None:
        job.meta["result"] = result
    if error_record is not None:
        job.meta["error"] = error_record
    if progress is not None or error is not None:  # a bare start changes nothing in meta: no stale overwrite
        job.save_meta()
    progress_now = job.meta.get("progress", 0.0)
    record = {"id": job.id, "event": event.value, "status": status.value, "progress": progress_now, "at": time.time()}
    redis.publish(EVENTS_CHANNEL, json.dumps(record))
    queue_delivery(redis, job_id=job.id, meta=job.meta, event=event.value)
    if event is Event.COMPLETED:
        count_outcome(redis, status.value)
    return True
