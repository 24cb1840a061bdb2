"""The job function RQ runs (`jobs.queue.TASK`): fetch the image, generate, store the WAV, report.

Progress goes to `job.meta` after every UNet step; the engine polls the job's cancel flag before every
step, so a cancel stops a running job within one step. Errors are recorded as `{code, message}` in
meta for the API; tracebacks stay in the worker's log.
"""

from __future__ import annotations

import hashlib
import logging
import time

from rq import get_current_job
from rq.job import Job

from jobs.metrics import QUEUE_WAIT, RUN_TIME, count_outcome, observe
from jobs.queue import ErrorCode, JobStatus, cancel_key
from jobs.storage import WAV, StorageUnavailable, output_key
from melfusion.audio import encode_wav
from melfusion.errors import GenerationCancelled, InputError
from melfusion.images import load_image
from melfusion.request import GenerationRequest

from .warm import Runtime, get_runtime

log = logging.getLogger(__name__)


def generate_clip(*, image_key: str, params: dict) -> dict:
    """Run one job inside a worker; returns the result record also stored in `job.meta["result"]`."""
    job = get_current_job()
    redis = job.connection
    if job.enqueued_at and job.started_at:
        observe(redis, QUEUE_WAIT, (job.started_at - job.enqueued_at).total_seconds())
    started = time.perf_counter()
    try:
        result = perform_generation(job, get_runtime(), image_key=image_key, request=GenerationRequest.from_dict(params))
    except GenerationCancelled as exc:
        log.info("job %s canceled: %s", job.id, exc)
        record_outcome(job, JobStatus.CANCELED, error=(ErrorCode.CANCELED, str(exc)))
        return {"canceled": True}
    except InputError as exc:
        log.info("job %s rejected: %s", job.id, exc)
        record_outcome(job, JobStatus.FAILED, error=(ErrorCode.INVALID_INPUT, str(exc)))
        raise
    except Exception:
        log.exception("job %s failed", job.id)
        record_outcome(job, JobStatus.FAILED, error=(ErrorCode.INTERNAL, "generation failed; see the worker log"))
        raise
    finally:
        observe(redis, RUN_TIME, time.perf_counter() - started)
        discard_input(get_runtime(), image_key, job_id=job.id)
    record_outcome(job, JobStatus.SUCCEEDED, result=result)
    return result


def perform_generation(job: Job, runtime: Runtime, *, image_key: str, request: GenerationRequest) -> dict:
    redis = job.connection

    def is_cancel_requested() -> bool:
        return bool(redis.exists(cancel_key(job.id)))

    def report_progress(step) -> None:
        job.meta["progress"] = round(step.fraction, 4)
        job.save_meta()

    if is_cancel_requested():  # canceled while queued: do no work at all
        raise GenerationCancelled("canceled before start")
    image = load_image(runtime.storage.get(image_key), max_pixels=runtime.settings.max_image_pixels)
    output = runtime.get_pipeline().generate(
        [request], [image], callback=report_progress, should_cancel=is_cancel_requested
    )
    wav = encode_wav(output.audios[0], output.sampling_rate)
    key = output_key(job.id)
    runtime.storage.put(key, wav, content_type=WAV)
    return {
        "key": key,
        "content_type": WAV,
        "seconds": output.audios.shape[-1] / output.sampling_rate,
        "sample_rate": output.sampling_rate,
        "bytes": len(wav),
        "sha256": hashlib.sha256(wav).hexdigest(),
    }


def discard_input(runtime: Runtime, image_key: str, *, job_id: str) -> None:
    """The uploaded photo is needed only while its job runs; keep storage from filling with them."""
    try:
        runtime.storage.delete(image_key)
    except StorageUnavailable as exc:
        log.warning("job %s: could not delete input %s: %s", job_id, image_key, exc)


def record_outcome(
    job: Job, status: JobStatus, *, result: dict | None = None, error: tuple[ErrorCode, str] | None = None
) -> None:
    """Final meta for the API (result or {code, message}) and the outcome counter for /metrics."""
    if result is not None:
        job.meta.update(progress=1.0, result=result)
    if error is not None:
        job.meta["error"] = {"code": error[0].value, "message": error[1]}
    job.save_meta()
    count_outcome(job.connection, status.value)
