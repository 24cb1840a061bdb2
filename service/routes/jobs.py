"""/jobs routes. Built per app because the form's ranges come from the loaded bundle and the settings,
and stating them in the route signature is what puts them in the OpenAPI document. (No
`from __future__ import annotations` here: FastAPI must see the closure's types, not strings.)"""

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, File, Form, Header, Path, Response, UploadFile
from fastapi.responses import FileResponse, RedirectResponse

from jobs.queue import JobStatus
from jobs.settings import Settings
from jobs.storage import LocalStorage
from melfusion.limits import IMAGE_GUIDANCE_MODES, MAX_GUIDANCE_SCALE, SAMPLING_PRESETS, GenerationLimits
from melfusion.request import MAX_SEED, GenerationRequest

from ..deps import BaseUrlDep, OwnerDep, QueueDep, RedisDep, SettingsDep, StorageDep, enforce_rate_limit
from ..errors import ErrorResponse, JobStateConflict
from ..forms import StrictFormRoute
from ..operations import cancel_job, describe_job, find_job, submit_job
from ..schemas import JobPublic
from ..uploads import read_image_upload

ImageGuidance = Literal[IMAGE_GUIDANCE_MODES]  # type: ignore[valid-type]
Preset = Literal[tuple(SAMPLING_PRESETS)]  # type: ignore[valid-type]
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
        responses={**ERRORS, **{code: {"model": ErrorResponse} for code in (409, 413, 415, 422, 429)}},
        dependencies=[Depends(enforce_rate_limit)],
    )
    def create_job(
        response: Response,
        redis: RedisDep,
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
        idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
    ) -> JobPublic:
        """Queue a generation; poll the returned job (its URL is in `Location`). 429 (rate limit per API key),
        503 (queue full or a backend down) and a 409 idempotency race carry `Retry-After`."""
        data, image_type = read_image_upload(image, max_bytes=settings.max_upload_bytes)
        request = GenerationRequest(
            caption=caption, seconds=seconds, steps=steps, guidance_scale=guidance_scale,
            image_strength=image_strength, image_guidance=image_guidance, scheduler=scheduler, seed=seed, preset=preset,
        )  # fmt: skip
        job, replayed = submit_job(
            redis=redis, queue=queue, storage=storage, settings=settings, limits=limits, owner=owner,
            image=data, image_type=image_type, request=request, idempotency_key=idempotency_key,
        )  # fmt: skip
        response.headers["Location"] = f"/jobs/{job.id}"
        if replayed:
            response.headers["Idempotent-Replayed"] = "true"
        return describe_job(job, redis=redis, storage=storage, base_url=base_url, owner=owner)

    @router.get("/{job_id}", response_model=JobPublic, responses=ERRORS)
    def get_job(
        job_id: JobId, redis: RedisDep, storage: StorageDep, owner: OwnerDep, base_url: BaseUrlDep
    ) -> JobPublic:
        job = find_job(redis=redis, job_id=job_id, owner=owner)
        return describe_job(job, redis=redis, storage=storage, base_url=base_url, owner=owner)

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
        return describe_job(job, redis=redis, storage=storage, base_url=base_url, owner=owner)

    @router.get(
        "/{job_id}/audio",
        response_class=Response,
        responses={**ERRORS, 200: {"content": {"audio/wav": {}}}, 307: {"description": "to the storage URL"},
                   409: {"model": ErrorResponse}},
    )  # fmt: skip
    def get_audio(job_id: JobId, redis: RedisDep, storage: StorageDep, owner: OwnerDep, base_url: BaseUrlDep):
        """The WAV: streamed from the local store, or a redirect to a presigned S3 URL."""
        job = find_job(redis=redis, job_id=job_id, owner=owner)
        public = describe_job(job, redis=redis, storage=storage, base_url=base_url, owner=owner)
        if public.status is not JobStatus.SUCCEEDED:
            raise JobStateConflict(f"job {job_id} is {public.status.value}, there is no audio", field="id")
        if isinstance(storage, LocalStorage):
            return FileResponse(storage.path(job.meta["result"]["key"]), media_type="audio/wav")
        return RedirectResponse(public.result.url, status_code=307)

    return router
