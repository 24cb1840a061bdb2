"""What the routes do, below HTTP: submit, look up, describe and cancel jobs (keyword-only arguments)."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import time
import uuid
from urllib.parse import urljoin

from redis import Redis
from rq import Callback, Queue, Retry
from rq.exceptions import InvalidJobOperation
from rq.job import Job

from jobs.lifecycle import announce
from jobs.queue import (
    CANCEL_AT,
    KEY_PREFIX,
    ON_FAILURE,
    TASK,
    ErrorCode,
    JobStatus,
    fetch_job,
    get_attempts,
    get_cancel_requested_at,
    get_ending,
    get_queue_position,
    get_status,
    status_of,
)
from jobs.queue import request_cancel as raise_cancel_flag
from jobs.settings import Settings
from jobs.storage import Storage, input_key
from jobs.webhooks import get_subscription
from melfusion.images import check_image
from melfusion.request import GenerationRequest

from .errors import IdempotencyConflict, JobNotFound, JobStateConflict, Overloaded, TargetRefused
from .schemas import JobError, JobPublic, JobResult
from .store_guard import GuardedStore
from .submission import Submission
from .webhooks import check_target


log = logging.getLogger(__name__)
QUEUE_FULL_RETRY_AFTER_SECONDS = 30  # a full queue drains in minutes, not seconds
IDEMPOTENCY_RACE_RETRY_AFTER_SECONDS = 1  # the first request is between storing the photo and enqueueing


def _idempotency_record_key(owner: str, key: str) -> str:
    return f"{KEY_PREFIX}:idempotency:{owner}:{hashlib.sha256(key.encode()).hexdigest()}"


def _fingerprint(image: bytes | None, request: GenerationRequest) -> str:
    """The photo and the fields the caller set (unset ones left out, so a field added by an upgrade does not
    turn a retry that spans it into a conflict)."""
    digest = hashlib.sha256(image if image is not None else b"no image")
    given = {name: value for name, value in request.to_dict().items() if value is not None}
    digest.update(json.dumps(given, sort_keys=True).encode())
    return digest.hexdigest()


def submit_job(
    *,
    redis: Redis,
    queue: Queue,
    store: GuardedStore,
    settings: Settings,
    owner: str,
    submission: Submission,
    idempotency_key: str | None,
    cancel_after: float | None = None,
) -> tuple[Job, bool]:
    """Validate, store the image, enqueue; returns (job, replayed) where replayed means an earlier same request.
    The image is stored only once everything else accepted the job, and deleted again if enqueueing fails
    (or if the store did not take it in time: a 503, never a long wait).

    Raises:
        InputError: a bad image or parameter (names the field).
        TargetRefused: webhooks are off, or the webhook URL is not a public http(s) address.
        Overloaded: more than `max_queue_depth` jobs are queued.
        IdempotencyConflict: the key was used before with a different request.
    """
    image, request, webhook = submission.image, submission.request, submission.webhook
    if image is not None:
        check_image(image, max_pixels=settings.max_image_pixels)  # header + structure, no full decode: bounded memory
    kept_for = submission.expires_in or settings.job_ttl_seconds  # RQ's result_ttl: the job's `expires_in`
    meta = {"owner": owner, "progress": 0.0, "max_retries": settings.max_retries}
    if cancel_after is not None:
        meta[CANCEL_AT] = time.time() + cancel_after
    if webhook is not None:
        if settings.webhook_secret is None:
            raise TargetRefused("webhooks are off: the server has no MELFUSION_WEBHOOK_SECRET", field="webhook_url")
        check_target(webhook.url, allow_private=settings.webhook_allow_private)
        meta["webhook"] = webhook.model_dump()
    if queue.count >= settings.max_queue_depth:
        raise Overloaded(
            f"more than {settings.max_queue_depth} jobs are waiting; retry later",
            retry_after=QUEUE_FULL_RETRY_AFTER_SECONDS,
        )
    job_id = str(uuid.uuid4())
    record_key = None
    if idempotency_key is not None:
        record_key = _idempotency_record_key(owner, idempotency_key)
        fingerprint = _fingerprint(image, request)
        record = json.dumps({"job_id": job_id, "fingerprint": fingerprint})
        if not redis.set(record_key, record, nx=True, ex=settings.job_ttl_seconds):
            return _replay(redis, record_key, fingerprint=fingerprint), True
    image_key = input_key(job_id, submission.image_type.extension) if image is not None else None
    try:
        if image_key is not None:  # if it fails, the guard deletes what landed
            store.put(image_key, image, content_type=submission.image_type.mime)
        try:
            job = queue.enqueue_call(
                TASK,
                kwargs={"image_key": image_key, "params": submission.params.to_dict()},
                job_id=job_id,
                timeout=settings.job_timeout_seconds,
                result_ttl=kept_for,
                failure_ttl=kept_for,
                meta=meta,
                retry=Retry(max=settings.max_retries) if settings.max_retries else None,
                on_failure=Callback(ON_FAILURE),
                description=f"melfusion job {job_id}",
            )
        except BaseException:
            if image_key is not None:
                store.delete(image_key)  # a photo whose job was never queued
            raise
    except BaseException:
        if record_key is not None:
            redis.delete(record_key)  # let the client retry with the same key
        raise
    return job, False


def _replay(redis: Redis, record_key: str, *, fingerprint: str) -> Job:
    record = json.loads(redis.get(record_key) or "{}")
    if record.get("fingerprint") != fingerprint:
        raise IdempotencyConflict("this key was used with a different request", field="Idempotency-Key")
    job = fetch_job(redis, record["job_id"])
    if job is None:
        raise JobStateConflict(
            "the first request with this key is still being created; retry",
            field="Idempotency-Key",
            retry_after=IDEMPOTENCY_RACE_RETRY_AFTER_SECONDS,
        )
    return job


def find_job(*, redis: Redis, job_id: str, owner: str) -> Job:
    """The caller's job; someone else's is reported exactly like a missing one."""
    job = fetch_job(redis, job_id)
    if job is None or job.meta.get("owner") != owner:
        raise JobNotFound(f"no job {job_id}", field="id")
    return job


def describe_job(job: Job, *, redis: Redis, storage: Storage, base_url: str) -> JobPublic:
    """The public view of a job, with a fresh download URL if it succeeded (its queue position counts only
    its owner's jobs). Once the job has ended, status, result, error and finish time all come from its
    ending, so the view is final the moment anyone can hear of the end."""
    ending = get_ending(job)
    status = status_of(job, ending)
    finished_at = None
    if ending is not None:
        finished_at = ending.at or get_cancel_requested_at(redis, job.id)
    expires_at = finished_at and finished_at + dt.timedelta(seconds=job.result_ttl)
    outputs = None
    if status is JobStatus.SUCCEEDED:
        stored_outputs = ending.result.get("outputs", [ending.result])  # a job from before `outputs`: its one
        outputs = [_public_result(output, storage=storage, base_url=base_url, not_after=expires_at)
                   for output in stored_outputs]  # fmt: skip
    error = None
    if status is JobStatus.FAILED:
        error = JobError(**(ending.error or {"code": ErrorCode.INTERNAL.value, "message": "the job failed"}))
    elif status is JobStatus.CANCELED:
        error = JobError(**(ending.error or {"code": ErrorCode.CANCELED.value, "message": "canceled before start"}))
    elif status is JobStatus.ABORTED:
        error = JobError(**ending.error)
    return JobPublic(
        id=job.id,
        status=status,
        progress=ending.progress if ending is not None else job.meta.get("progress", 0.0),
        attempts=get_attempts(job, status),
        queue_position=get_queue_position(job, owner=job.meta.get("owner")) if status is JobStatus.QUEUED else None,
        created_at=job.created_at,
        started_at=None if status is JobStatus.ABORTED else job.started_at,  # a worker took it, but it never ran
        finished_at=finished_at,
        expires_at=expires_at,
        params=GenerationRequest.from_dict(job.kwargs["params"]),
        result=outputs and outputs[0],
        outputs=outputs,
        error=error,
        webhook=get_subscription(job.meta),
    )


def _public_result(stored: dict, *, storage: Storage, base_url: str, not_after: dt.datetime | None) -> JobResult:
    """One stored clip as the API shows it, with fresh signed URLs (none outliving the job)."""
    signed = storage.signed_url(stored["key"], not_after=not_after)
    fields = {name: stored[name] for name in ("content_type", "seconds", "sample_rate", "bytes", "sha256")}
    fields["format"] = stored.get("format", "wav")  # a clip stored before formats existed is a WAV
    picture = None
    if "spectrogram_key" in stored:
        picture = storage.signed_url(stored["spectrogram_key"], not_after=not_after).url
    return JobResult(
        url=urljoin(base_url, signed.url),
        spectrogram_url=picture and urljoin(base_url, picture),
        expires_at=signed.expires_at,
        **fields,
    )


def result_key(job: Job) -> str:
    """Where a succeeded job's (first) WAV is stored."""
    return get_ending(job).result["key"]


def cancel_job(job: Job, *, redis: Redis, store: GuardedStore, settings: Settings) -> None:
    """A queued job leaves the queue; a running one stops before its next step (the worker polls the flag).

    Raises:
        JobStateConflict: the job already succeeded or failed.
    """
    status = get_status(job)
    if status in (JobStatus.SUCCEEDED, JobStatus.FAILED):
        raise JobStateConflict(f"job {job.id} already {status.value}", field="id")
    if status in (JobStatus.CANCELED, JobStatus.ABORTED):
        return
    raise_cancel_flag(redis, job.id, ttl_seconds=settings.job_ttl_seconds)
    if status is JobStatus.QUEUED:
        try:
            job.cancel()
        except InvalidJobOperation:  # canceled by a concurrent request
            pass
        redis.expire(job.key, job.result_ttl)  # RQ keeps canceled jobs forever otherwise
        if job.kwargs["image_key"] is not None:
            store.delete(job.kwargs["image_key"])  # it will never run: its photo is not needed
        announce(job, JobStatus.CANCELED, error=(ErrorCode.CANCELED, "canceled before start"))


def withdraw_job(job: Job, *, redis: Redis, store: GuardedStore, settings: Settings, owner: str,
                 idempotency_key: str | None) -> None:  # fmt: skip
    """Take back a job whose submission is answered with an error (the client never learns its id): it is
    canceled (a queued job leaves the queue and its photo goes; a running one stops at its next step) and
    its idempotency key is freed, so a retry makes a new job instead of a duplicate. Best effort: with Redis
    down too, it is logged."""
    try:
        if idempotency_key is not None:
            redis.delete(_idempotency_record_key(owner, idempotency_key))
        cancel_job(job, redis=redis, store=store, settings=settings)
    except JobStateConflict:
        pass  # it already ended
    except Exception as exc:
        log.error("job %s: could not withdraw it after a failed submission: %s", job.id, exc)
