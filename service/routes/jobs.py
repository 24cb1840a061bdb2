"""/jobs routes: thin, with typed dependencies. The POST form is not in the signature: it is derived from
`GenerationRequest` with the loaded bundle's bounds (`service.submission`), read by the `SubmissionDep`
dependency and documented as `components/schemas/JobCreate`."""

from __future__ import annotations

import weakref
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Path, Response
from fastapi.responses import FileResponse, RedirectResponse
from sse_starlette import EventSourceResponse
from starlette.concurrency import run_in_threadpool

from jobs.queue import TERMINAL, JobStatus, ended_key
from jobs.storage import AUDIO_CONTENT_TYPES
from jobs.webhooks import read_attempts

from ..deps import (
    AsyncRedisDep,
    BaseUrlDep,
    CallerDep,
    GuardedStoreDep,
    JobEventsDep,
    OwnerDep,
    QueueDep,
    RedisDep,
    SettingsDep,
    StorageDep,
    StreamLimitDep,
    enforce_rate_limit,
)
from ..errors import ErrorResponse, JobStateConflict
from ..events import EVENTS_DOC, parse_prefer_wait, sse_events, wait_for_end
from ..operations import cancel_job, describe_job, find_job, result_key, submit_job, withdraw_job
from ..rate_limit import Hold
from ..schemas import JobPublic, WebhookAttempts
from ..submission import CANCEL_AFTER_DOC, FORM_SCHEMA_NAME, SubmissionDep, parse_cancel_after

JobId = Annotated[str, Path(max_length=64, description="the id returned by POST /jobs")]
ERRORS = {code: {"model": ErrorResponse} for code in (401, 404, 503)}
FORM_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"$ref": f"#/components/schemas/{FORM_SCHEMA_NAME}"}}
}}}  # fmt: skip
PREFER_DOC = (
    "`wait=N`: hold the request up to N seconds (at most MELFUSION_PREFER_WAIT_MAX_SECONDS) and answer 201 "
    "with the finished job, else 202"
)

router = APIRouter(prefix="/jobs", tags=["jobs"])


def held_for_the_stream(stream: AsyncIterator, hold: Hold) -> AsyncIterator:
    """`stream`, with `hold` released when it ends, fails, is closed by a departing client, or is dropped
    without ever being started."""

    async def iterate():
        with hold:
            async for item in stream:
                yield item

    iterator = iterate()
    weakref.finalize(iterator, hold.release)
    return iterator


@router.post(
    "",
    status_code=202,
    response_model=JobPublic,
    responses={
        **ERRORS,
        **{code: {"model": ErrorResponse} for code in (409, 413, 415, 422, 429)},
        201: {"model": JobPublic, "description": "with `Prefer: wait=N`: the job ended within the wait"},
    },
    dependencies=[Depends(enforce_rate_limit)],
    openapi_extra=FORM_BODY,
)
async def create_job(
    response: Response,
    submission: SubmissionDep,
    redis: RedisDep,
    async_redis: AsyncRedisDep,
    events: JobEventsDep,
    stream_limit: StreamLimitDep,
    queue: QueueDep,
    storage: StorageDep,
    store: GuardedStoreDep,
    settings: SettingsDep,
    owner: OwnerDep,
    caller: CallerDep,
    base_url: BaseUrlDep,
    idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
    cancel_after: Annotated[str | None, Header(max_length=64, description=CANCEL_AFTER_DOC)] = None,
    prefer: Annotated[str | None, Header(description=PREFER_DOC)] = None,
) -> JobPublic:
    """Queue a generation; follow the returned job (its URL is in `Location`) with GET, its event
    stream or a webhook, or hold this request with `Prefer: wait=N`. 429 (rate limit per API key, or
    per client address without keys; too many open streams and waits), 503 (queue full or a backend
    down) and a 409 idempotency race carry `Retry-After`. A request answered with an error leaves no job."""
    deadline = parse_cancel_after(cancel_after)
    wait = parse_prefer_wait(prefer)
    hold = Hold(lambda: None)
    if wait is not None:  # counted before the job exists: a refused wait queues nothing
        wait = min(wait, settings.prefer_wait_max_seconds)
        hold = stream_limit.hold(caller.key, described_as=caller.described_as)
    with hold:
        job, replayed = await run_in_threadpool(
            submit_job, redis=redis, queue=queue, store=store, settings=settings, owner=owner,
            submission=submission, idempotency_key=idempotency_key, cancel_after=deadline,
        )  # fmt: skip
        describe = lambda: describe_job(find_job(redis=redis, job_id=job.id, owner=owner), redis=redis,
                                        storage=storage, base_url=base_url)  # fmt: skip
        try:
            if wait is not None:
                has_ended = lambda: async_redis.exists(ended_key(job.id))
                await wait_for_end(events, job.id, has_ended, seconds=wait)
                response.headers["Preference-Applied"] = f"wait={wait:g}"
            public = await run_in_threadpool(describe)
        except Exception:
            if not replayed:  # the client learns no job id: take the job back rather than leave it queued
                await run_in_threadpool(withdraw_job, job, redis=redis, store=store, settings=settings,
                                        owner=owner, idempotency_key=idempotency_key)  # fmt: skip
            raise
    response.headers["Location"] = f"/jobs/{job.id}"
    if replayed:
        response.headers["Idempotent-Replayed"] = "true"
    if public.status in TERMINAL:
        response.status_code = 201
    return public


@router.get("/{job_id}", response_model=JobPublic, responses=ERRORS)
def get_job(
    job_id: JobId, redis: RedisDep, storage: StorageDep, owner: OwnerDep, base_url: BaseUrlDep
) -> JobPublic:
    job = find_job(redis=redis, job_id=job_id, owner=owner)
    return describe_job(job, redis=redis, storage=storage, base_url=base_url)


@router.get(
    "/{job_id}/events",
    response_class=EventSourceResponse,
    responses={**ERRORS, 429: {"model": ErrorResponse},
               200: {"description": EVENTS_DOC, "content": {"text/event-stream": {}}}},  # fmt: skip
)
async def get_job_events(
    job_id: JobId, redis: RedisDep, events: JobEventsDep, stream_limit: StreamLimitDep, storage: StorageDep,
    owner: OwnerDep, caller: CallerDep, base_url: BaseUrlDep,
) -> EventSourceResponse:  # fmt: skip
    """Server-Sent Events until the job ends: `status`, `progress`, then `completed` (see below). 429 when
    the caller already holds `MELFUSION_MAX_STREAMS_PER_CLIENT` streams and waits on this server."""
    describe = lambda: describe_job(find_job(redis=redis, job_id=job_id, owner=owner), redis=redis,
                                    storage=storage, base_url=base_url)  # fmt: skip
    await run_in_threadpool(describe)  # 404 before the stream starts
    hold = stream_limit.hold(caller.key, described_as=caller.described_as)
    return EventSourceResponse(held_for_the_stream(sse_events(events, job_id, describe), hold), ping=15)


@router.get("/{job_id}/webhooks", response_model=WebhookAttempts, responses=ERRORS)
def get_webhook_attempts(job_id: JobId, redis: RedisDep, owner: OwnerDep) -> WebhookAttempts:
    """Every delivery attempt of this job's webhooks, oldest first, with the target's answer or the error."""
    job = find_job(redis=redis, job_id=job_id, owner=owner)
    attempts = read_attempts(redis, job.id)
    return WebhookAttempts(data=attempts, count=len(attempts))


@router.post("/{job_id}/cancel", response_model=JobPublic, responses={**ERRORS, 409: {"model": ErrorResponse}})
def cancel(
    job_id: JobId,
    redis: RedisDep,
    storage: StorageDep,
    store: GuardedStoreDep,
    owner: OwnerDep,
    base_url: BaseUrlDep,
    settings: SettingsDep,
) -> JobPublic:
    """A queued job never runs; a running one stops at its next step, then reads `canceled`."""
    cancel_job(find_job(redis=redis, job_id=job_id, owner=owner), redis=redis, store=store, settings=settings)
    job = find_job(redis=redis, job_id=job_id, owner=owner)
    return describe_job(job, redis=redis, storage=storage, base_url=base_url)


@router.get(
    "/{job_id}/audio",
    response_class=Response,
    responses={**ERRORS, 200: {"content": {kind: {} for kind in AUDIO_CONTENT_TYPES}},
               307: {"description": "to the storage URL"},
               409: {"model": ErrorResponse}},
)  # fmt: skip
def get_audio(job_id: JobId, redis: RedisDep, storage: StorageDep, owner: OwnerDep, base_url: BaseUrlDep):
    """The clip, in its format: streamed from the local store, or a redirect to a presigned S3 URL."""
    job = find_job(redis=redis, job_id=job_id, owner=owner)
    public = describe_job(job, redis=redis, storage=storage, base_url=base_url)
    if public.status is not JobStatus.SUCCEEDED:
        raise JobStateConflict(f"job {job_id} is {public.status.value}, there is no audio", field="id")
    if storage.serves_via_api:  # the signed link would lead back here: send the file at once
        return FileResponse(storage.path(result_key(job)), media_type=public.result.content_type)
    return RedirectResponse(public.result.url, status_code=307)

