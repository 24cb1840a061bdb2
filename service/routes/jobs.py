"""/jobs routes. Built per app because the form's ranges come from the loaded bundle and the settings,
and stating them in the route signature is what puts them in the OpenAPI document. (No
`from __future__ import annotations` here: FastAPI must see the closure's types, not strings.)"""

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Header, Path, Response
from fastapi.responses import FileResponse, RedirectResponse
from sse_starlette import EventSourceResponse
from starlette.concurrency import run_in_threadpool

from jobs.lifecycle import TERMINAL
from jobs.queue import JobStatus
from jobs.settings import Settings
from jobs.webhooks import read_attempts
from melfusion.limits import GenerationLimits

from ..deps import AsyncRedisDep, BaseUrlDep, OwnerDep, QueueDep, RedisDep, SettingsDep, StorageDep, enforce_rate_limit
from ..errors import ErrorResponse, JobStateConflict
from ..events import EVENTS_DOC, parse_prefer_wait, sse_events, wait_for_end
from ..operations import cancel_job, describe_job, find_job, submit_job
from ..schemas import JobPublic, WebhookAttempts
from ..submission import CANCEL_AFTER_DOC, FORM_SCHEMA_NAME, SubmissionDep, parse_cancel_after

JobId = Annotated[str, Path(max_length=64, description="the id returned by POST /jobs")]
ERRORS = {code: {"model": ErrorResponse} for code in (401, 404, 503)}
FORM_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"$ref": f"#/components/schemas/{FORM_SCHEMA_NAME}"}}
}}}  # fmt: skip


def build_jobs_router(limits: GenerationLimits, settings: Settings) -> APIRouter:
    router = APIRouter(prefix="/jobs", tags=["jobs"])

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
        redis: RedisDep,
        async_redis: AsyncRedisDep,
        queue: QueueDep,
        storage: StorageDep,
        owner: OwnerDep,
        base_url: BaseUrlDep,
        submission: SubmissionDep,
        idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
        cancel_after: Annotated[str | None, Header(max_length=64, description=CANCEL_AFTER_DOC)] = None,
        prefer: Annotated[
            str | None,
            Header(description="`wait=N`: hold the request up to N seconds (at most "
                   f"{settings.prefer_wait_max_seconds:g}) and answer 201 with the finished job, else 202"),
        ] = None,
    ) -> JobPublic:
        """Queue a generation; follow the returned job (its URL is in `Location`) with GET, its event
        stream or a webhook, or hold this request with `Prefer: wait=N`. 429 (rate limit per API key, or
        per client address without keys), 503 (queue full or a backend down) and a 409 idempotency race
        carry `Retry-After`."""
        job, replayed = await run_in_threadpool(
            submit_job, redis=redis, queue=queue, storage=storage, settings=settings, limits=limits, owner=owner,
            submission=submission, idempotency_key=idempotency_key, cancel_after=parse_cancel_after(cancel_after),
        )  # fmt: skip
        response.headers["Location"] = f"/jobs/{job.id}"
        if replayed:
            response.headers["Idempotent-Replayed"] = "true"
        describe = lambda: describe_job(find_job(redis=redis, job_id=job.id, owner=owner), redis=redis,
                                        storage=storage, base_url=base_url)  # fmt: skip
        wait = parse_prefer_wait(prefer)
        if wait is not None:
            wait = min(wait, settings.prefer_wait_max_seconds)
            await wait_for_end(async_redis, job.id, describe, seconds=wait)
            response.headers["Preference-Applied"] = f"wait={wait:g}"
        public = await run_in_threadpool(describe)
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
        responses={**ERRORS, 200: {"description": EVENTS_DOC, "content": {"text/event-stream": {}}}},
    )
    async def get_job_events(
        job_id: JobId, redis: RedisDep, async_redis: AsyncRedisDep, storage: StorageDep, owner: OwnerDep,
        base_url: BaseUrlDep,
    ) -> EventSourceResponse:  # fmt: skip
        """Server-Sent Events until the job ends: `status`, `progress`, then `completed` (see below)."""
        describe = lambda: describe_job(find_job(redis=redis, job_id=job_id, owner=owner), redis=redis,
                                        storage=storage, base_url=base_url)  # fmt: skip
        await run_in_threadpool(describe)  # 404 before the stream starts
        return EventSourceResponse(sse_events(async_redis, job_id, describe), ping=15)

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
        owner: OwnerDep,
        base_url: BaseUrlDep,
        settings: SettingsDep,
    ) -> JobPublic:
        """A queued job never runs; a running one stops at its next step, then reads `canceled`."""
        cancel_job(find_job(redis=redis, job_id=job_id, owner=owner), redis=redis, storage=storage, settings=settings)
        job = find_job(redis=redis, job_id=job_id, owner=owner)
        return describe_job(job, redis=redis, storage=storage, base_url=base_url)

    @router.get(
        "/{job_id}/audio",
        response_class=Response,
        responses={**ERRORS, 200: {"content": {"audio/wav": {}}}, 307: {"description": "to the storage URL"},
                   409: {"model": ErrorResponse}},
    )  # fmt: skip
    def get_audio(job_id: JobId, redis: RedisDep, storage: StorageDep, owner: OwnerDep, base_url: BaseUrlDep):
        """The WAV: streamed from the local store, or a redirect to a presigned S3 URL."""
        job = find_job(redis=redis, job_id=job_id, owner=owner)
        public = describe_job(job, redis=redis, storage=storage, base_url=base_url)
        if public.status is not JobStatus.SUCCEEDED:
            raise JobStateConflict(f"job {job_id} is {public.status.value}, there is no audio", field="id")
        if storage.serves_via_api:  # the signed link would lead back here: send the file at once
            return FileResponse(storage.path(job.meta["result"]["key"]), media_type="audio/wav")
        return RedirectResponse(public.result.url, status_code=307)

    return router
