"""Public JSON shapes (the OpenAPI document is generated from these)."""

from __future__ import annotations

import datetime as dt

from pydantic import BaseModel, Field

from jobs.queue import JobStatus
from melfusion.request import GenerationRequest


class JobResult(BaseModel):
    url: str = Field(
        description="time-limited download URL of the WAV: absolute for S3 or when MELFUSION_PUBLIC_URL is set, "
        "else relative to this API"
    )
    content_type: str = "audio/wav"
    seconds: float
    sample_rate: int
    bytes: int
    sha256: str
    expires_at: dt.datetime = Field(description="when `url` stops working; GET the job again for a fresh one")


class JobError(BaseModel):
    code: str
    message: str


class JobPublic(BaseModel):
    id: str
    status: JobStatus
    progress: float = Field(ge=0, le=1, description="fraction of denoising steps done, updated up to 4 times a second")
    attempts: int = Field(ge=0, description="times started: a job whose worker was lost is retried (bounded)")
    queue_position: int | None = Field(
        description="jobs of the same API key queued ahead of this one (0 = none); null unless queued"
    )
    created_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    params: GenerationRequest = Field(description="every value resolved (defaults applied, seed chosen)")
    result: JobResult | None
    error: JobError | None


class Check(BaseModel):
    ok: bool
    detail: str


class Readiness(BaseModel):
    ready: bool
    checks: dict[str, Check]
