"""Public JSON shapes (the OpenAPI document is generated from these)."""

from __future__ import annotations

import datetime as dt

from typing import Literal

from pydantic import BaseModel, Field

from jobs.queue import JobStatus
from jobs.webhooks import EVENTS as WEBHOOK_EVENTS
from melfusion.request import GenerationRequest


class JobResult(BaseModel):
    url: str = Field(
        description="time-limited download URL of the clip (in the job's `format`): absolute for S3 or when "
        "MELFUSION_PUBLIC_URL is set, else relative to this API"
    )
    spectrogram_url: str | None = Field(
        None, description="time-limited URL of a PNG of the clip's mel spectrogram (time and frequency axes), "
        "absolute or relative like `url`"
    )
    content_type: str = Field("audio/wav", description="of the clip: audio/wav, audio/flac, audio/ogg (Vorbis), "
                              "audio/ogg; codecs=opus, audio/mpeg (MP3)")
    format: str = Field("wav", description="the clip's file format, as asked for")
    seconds: float
    sample_rate: int
    bytes: int
    sha256: str
    expires_at: dt.datetime = Field(description="when `url` stops working; GET the job again for a fresh one")


class JobError(BaseModel):
    code: str
    message: str


class WebhookSubscription(BaseModel):
    url: str = Field(description="where the job JSON is POSTed, signed per Standard Webhooks")
    events: list[str] = Field(description=f"any of {', '.join(WEBHOOK_EVENTS)}")


class WebhookAttempt(BaseModel):
    webhook_id: str = Field(description="the `webhook-id` header; the same on every retry of one event")
    event: str = Field(description="start, progress or completed")
    attempt: int = Field(description="1 for the first try")
    at: dt.datetime
    status_code: int | None = Field(description="the target's answer; null if none came")
    error: str | None = Field(description="why the attempt failed (timeout, refused connection, HTTP status...)")
    duration_ms: float
    outcome: Literal["delivered", "retrying", "gave_up"]
    next_attempt_in_seconds: float | None = None


class WebhookAttempts(BaseModel):
    data: list[WebhookAttempt]
    count: int


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
    expires_at: dt.datetime | None = Field(
        None, description="when the job and its files are deleted: `finished_at` + the request's `expires_in`"
    )
    params: GenerationRequest = Field(description="every value resolved (defaults applied, seed chosen)")
    result: JobResult | None = Field(description="the first of `outputs` (what clients before `num_outputs` read)")
    outputs: list[JobResult] | None = Field(None, description="one clip per output (`num_outputs`), in seed order")
    error: JobError | None
    webhook: WebhookSubscription | None = None


class Check(BaseModel):
    ok: bool
    detail: str


class Readiness(BaseModel):
    """`ready` (the HTTP status) needs Redis and storage only: without workers, jobs queue, and status,
    polling and downloads keep working; `workers_available` says whether anything will run them."""

    ready: bool
    workers_available: int | None  # fresh, warmed-up worker heartbeats on the queue; None if unreadable
    checks: dict[str, Check]
