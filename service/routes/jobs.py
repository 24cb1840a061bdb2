"""/jobs routes. Built per app because the form's ranges come from the loaded bundle and the settings,
and stating them in the route signature is what puts them in the OpenAPI document. (No
`from __future__ import annotations` here: FastAPI must see the closure's types, not strings.)"""

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, File, Form, Header, Path, Response, UploadFile
from fastapi.responses import FileResponse, RedirectResponse
from sse_starlette import EventSourceResponse
from starlette.concurrency import run_in_threadpool

from jobs.lifecycle import TERMINAL
from jobs.queue import JobStatus
from jobs.settings import Settings
from jobs.storage import LocalStorage
from jobs.webhooks import DEFAULT_EVENTS as DEFAULT_WEBHOOK_EVENTS
from jobs.webhooks import EVENTS as WEBHOOK_EVENTS
from jobs.webhooks import read_attempts
from melfusion.limits import IMAGE_GUIDANCE_MODES, MAX_GUIDANCE_SCALE, SAMPLING_PRESETS, GenerationLimits
from melfusion.audio import AUDIO_FORMATS
from melfusion.request import DEFAULT_LOUDNESS_LUFS, LOUDNESS_OFF, MAX_SEED, GenerationRequest, parse_loudness

from ..deps import AsyncRedisDep, BaseUrlDep, OwnerDep, QueueDep, RedisDep, SettingsDep, StorageDep, enforce_rate_limit
from ..errors import ErrorResponse, JobStateConflict
from ..events import EVENTS_DOC, parse_prefer_wait, sse_events, wait_for_end
from ..forms import StrictFormRoute
from ..operations import cancel_job, describe_job, find_job, submit_job
from ..schemas import JobPublic, WebhookAttempts, WebhookSubscription
from ..uploads import read_image_upload

ImageGuidance = Literal[IMAGE_GUIDANCE_MODES]  # type: ignore[valid-type]
Preset = Literal[tuple(SAMPLING_PRESETS)]  # type: ignore[valid-type]
AudioFormatName = Literal[tuple(AUDIO_FORMATS)]  # type: ignore[valid-type]
WebhookEvent = Literal[WEBHOOK_EVENTS]  # type: ignore[valid-type]
JobId = Annotated[str, Path(max_length=64, description="the id returned by POST /jobs")]
ERRORS = {code: {"model": ErrorResponse} for code in (401, 404, 503)}


def describe(name: str, bundle_default: float | None = None) -> str:
    """A form field's description: GenerationRequest's help, plus the bundle's default where it has one."""
    text = GenerationRequest.describe(name)
    return text if bundle_default is None else f"{text}; default {bundle_default} (or the preset's)"


def build_jobs_router(limits: GenerationLimits, settings: Settings) -> APIRouter:
    router = APIRouter(prefix="/jobs", tags=["jobs"], route_class=StrictFormRoute)
    Scheduler = Literal[limits.schedulers]  # type: ignore[valid-type]

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
    )
    async def create_job(
        response: Response,
        redis: RedisDep,
        async_redis: AsyncRedisDep,
        queue: QueueDep,
        storage: StorageDep,
        owner: OwnerDep,
        base_url: BaseUrlDep,
        image: Annotated[
            UploadFile,
            File(
                description=f"JPEG, PNG or WebP, ≤ {settings.max_upload_bytes} bytes, "
                f"≤ {settings.max_image_pixels} pixels"
            ),
        ],
        caption: Annotated[str, Form(min_length=1, max_length=settings.max_caption_chars)],
        seconds: Annotated[
            float | None, Form(gt=0, le=limits.max_seconds, description=describe("seconds", limits.default_seconds))
        ] = None,
        steps: Annotated[
            int | None, Form(ge=1, le=limits.max_steps, description=describe("steps", limits.default_steps))
        ] = None,
        guidance_scale: Annotated[
            float | None,
            Form(ge=0, le=MAX_GUIDANCE_SCALE, description=describe("guidance_scale", limits.default_guidance_scale)),
        ] = None,
        image_strength: Annotated[float | None, Form(ge=0, le=1, description=describe("image_strength"))] = None,
        image_guidance: Annotated[ImageGuidance | None, Form(description=describe("image_guidance"))] = None,
        scheduler: Annotated[Scheduler | None, Form(description=describe("scheduler"))] = None,
        seed: Annotated[int | None, Form(ge=0, le=MAX_SEED, description=describe("seed"))] = None,
        preset: Annotated[Preset | None, Form(description=describe("preset"))] = None,
        image_steps: Annotated[
            int | None, Form(ge=1, le=limits.max_steps, description=describe("image_steps"))
        ] = None,
        loop: Annotated[bool | None, Form(description=describe("loop"))] = None,
        format: Annotated[AudioFormatName | None, Form(description=describe("format"))] = None,
        loudness_lufs: Annotated[
            str | None,
            Form(max_length=16, pattern=rf"^(-?[0-9]+(\.[0-9]+)?|{'|'.join(LOUDNESS_OFF)})$",
                 description=describe("loudness_lufs"), examples=[str(DEFAULT_LOUDNESS_LUFS), "off"]),
        ] = None,
        webhook_url: Annotated[
            str | None,
            Form(max_length=2048, description="POST the job JSON here, signed per Standard Webhooks "
                 "(`webhook-id`, `webhook-timestamp`, `webhook-signature`); public http(s) addresses only"),
        ] = None,
        webhook_events: Annotated[
            list[WebhookEvent] | None,
            Form(description="repeat the field to choose several; progress is sent at most twice a second; "
                 f"default {', '.join(DEFAULT_WEBHOOK_EVENTS)}"),
        ] = None,
        idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
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
        data, image_type = await run_in_threadpool(read_image_upload, image, max_bytes=settings.max_upload_bytes)
        request = GenerationRequest(
            caption=caption, seconds=seconds, steps=steps, guidance_scale=guidance_scale,
            image_strength=image_strength, image_guidance=image_guidance, scheduler=scheduler, seed=seed, preset=preset,
            image_steps=image_steps, loop=loop, format=format,
            loudness_lufs=DEFAULT_LOUDNESS_LUFS if loudness_lufs is None else parse_loudness(loudness_lufs),
        )  # fmt: skip
        webhook = None
        if webhook_url is not None:
            webhook = WebhookSubscription(url=webhook_url, events=webhook_events or list(DEFAULT_WEBHOOK_EVENTS))
        job, replayed = await run_in_threadpool(
            submit_job, redis=redis, queue=queue, storage=storage, settings=settings, limits=limits, owner=owner,
            image=data, image_type=image_type, request=request, webhook=webhook, idempotency_key=idempotency_key,
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
        if isinstance(storage, LocalStorage):
            return FileResponse(storage.path(job.meta["result"]["key"]), media_type="audio/wav")
        return RedirectResponse(public.result.url, status_code=307)

    return router
