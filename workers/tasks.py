"""The job function RQ names (`jobs.queue.TASK`) and the batch every job runs in: fetch the images, generate
all clips in one pipeline call, store each clip (mastered, in its format), and end every job on its own.

Each job of a batch keeps its own status, progress, cancel flag, result and error: an undecodable image
fails only its job; a clip with NaN/inf fails only its job (`non_finite_output`, naming the component); a
canceled job ends (canceled) at the next step while its row, which no other row depends on, is computed to
the end and thrown away; the pipeline stops early only when every row is canceled. A batch that runs the
device out of memory is split in halves, run one after the other. Storing a clip and ending its job run on
the worker's writer thread (`workers.writer`), so the next batch starts at once. Every change (start,
progress, outcome) is announced through `jobs.lifecycle.announce`; progress at most
`PROGRESS_INTERVAL_SECONDS` apart per job (the final value is always saved with the outcome). Errors are
recorded as `{code, message}` for the API; tracebacks stay in the worker's log.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch
from redis import Redis
from redis.exceptions import RedisError
from rq.exceptions import AbandonedJobError
from rq.job import Job
from rq.utils import now

from jobs.lifecycle import announce
from jobs.metrics import QUEUE_WAIT, RUN_TIME, observe
from jobs.queue import CANCEL_AT, ErrorCode, JobStatus, cancel_key
from jobs.storage import PNG, StorageUnavailable, output_key, retry_storage, spectrogram_key
from melfusion.formats import audio_format
from melfusion.errors import GenerationCancelled, InputError
from melfusion.images import load_image
from melfusion.mastering import deliver
from melfusion.precision import NonFiniteOutput
from melfusion.request import GenerationRequest

from .warm import Runtime, get_runtime

log = logging.getLogger(__name__)

REDIS_RETRY_SECONDS = 30.0  # how long an outcome write waits out a Redis outage before giving up
PROGRESS_INTERVAL_SECONDS = 0.25  # at most 4 progress writes a second per job, not one per UNet step
CANCELED = {"canceled": True}  # the return value of a canceled job (RQ: finished; API: canceled)

class Aborted(Exception):
    """A job that must not start any more (its Cancel-After deadline passed while it waited)."""


# How a job ended, handed to the caller that records it in RQ: a return value or the exception it failed with.
Outcome = dict | BaseException
FinishJob = Callable[[Job, Outcome], None]
WriteResult = Callable[[str, Callable[[], None]], None]  # (job id, task): run the task off the generating thread


def generate_clip(*, image_key: str | None, params: dict) -> dict:
    """The function every job names. `MelFusionWorker` runs each job inside a batch (`run_batch`, a lone job
    being a batch of one), never through this; a plain RQ worker that picks the job up fails it here."""
    raise RuntimeError("MelFusion jobs run on `python -m workers` (MelFusionWorker), not on a plain RQ worker")


@dataclass
class _Row:
    """One job's place in a batch."""

    job: Job
    request: GenerationRequest  # resolved against the worker's bundle (a payload of an older API gets defaults)
    image_key: str | None  # None: caption only
    started: float = field(default_factory=time.perf_counter)
    saved_progress_at: float = float("-inf")
    progress: float = 0.0
    ended: bool = False  # ended, or handed to the writer thread: no longer this thread's to end

    def deadline_passed(self) -> bool:
        """Whether the job's Cancel-After deadline (`meta.cancel_at`, set by the API) is behind us."""
        deadline = self.job.meta.get(CANCEL_AT)
        return deadline is not None and time.time() >= deadline

    def report_progress(self, fraction: float) -> None:
        """Announce progress; never backwards (the halves of a batch split for memory start again at 0)."""
        if fraction <= self.progress:
            return
        self.progress = fraction
        self.job.meta["progress"] = round(fraction, 4)  # always current in memory: the outcome write saves it
        if time.monotonic() - self.saved_progress_at >= PROGRESS_INTERVAL_SECONDS:
            self.saved_progress_at = time.monotonic()
            try:
                announce(self.job, JobStatus.RUNNING, progress=fraction)
            except RedisError as exc:  # a Redis blip skips a progress write, never the job
                log.warning("job %s: progress not saved (%s)", self.job.id, exc)


def run_batch(jobs: list[Job], runtime: Runtime, *, finish: FinishJob, write: WriteResult) -> None:
    """Generate every job's clips (`num_outputs` each) in one pipeline call; every job ends through `finish` once.

    Args:
        jobs: started jobs whose requests share one `batch_key`; the oldest first.
        runtime: the worker's pipeline, storage and settings.
        finish: records a job's outcome in RQ (called as soon as the job ends, mid-batch for a cancel).
        write: runs a generated job's last steps (store the clip, end the job) on the writer thread.
    """
    redis = jobs[0].connection
    limits = runtime.get_pipeline().limits
    for job in jobs:
        if job.enqueued_at and job.started_at:
            with contextlib.suppress(RedisError):  # a metric is not worth failing a job over
                observe(redis, QUEUE_WAIT, (job.started_at - job.enqueued_at).total_seconds())

    def end(row: _Row, outcome: Outcome) -> None:
        row.ended = True
        retry_redis(lambda: record_outcome(row.job, outcome), what=f"job {row.job.id}: recording its outcome")
        discard_input(runtime, row.image_key, job_id=row.job.id)
        retry_redis(
            lambda: finish(row.job, CANCELED if isinstance(outcome, GenerationCancelled | Aborted) else outcome),
            what=f"job {row.job.id}: finishing it in RQ",
        )
        try:
            observe(redis, RUN_TIME, time.perf_counter() - row.started)
        except RedisError:
            log.warning("job %s: run time not observed (Redis unavailable)", row.job.id)

    def end_canceled_rows(reason: str) -> None:
        live = [row for row in rows if not row.ended]
        try:
            with redis.pipeline(transaction=False) as pipe:
                for row in live:
                    pipe.exists(cancel_key(row.job.id))
                flags = pipe.execute()
        except RedisError as exc:  # cancel flags are read again at the next step
            log.warning("cancel flags unreadable (%s); continuing", exc)
            return
        for row, canceled in zip(live, flags, strict=True):
            if canceled:
                log.info("job %s canceled: %s", row.job.id, reason)
                end(row, GenerationCancelled(reason))
            elif row.deadline_passed():
                log.info("job %s canceled at its Cancel-After deadline: %s", row.job.id, reason)
                end(row, GenerationCancelled(f"Cancel-After deadline passed; {reason}"))

    rows = []
    for job in jobs:
        row = _Row(job, GenerationRequest.from_dict(job.kwargs["params"]), job.kwargs["image_key"])
        rows.append(row)
        try:
            row.request = row.request.resolved(limits)
        except InputError as exc:  # a payload this worker's bundle cannot serve
            end(row, exc)
    for row in rows:
        if not row.ended and row.deadline_passed():  # Replicate's Cancel-After: not started in time, never runs
            end(row, Aborted("not started before its Cancel-After deadline"))
    end_canceled_rows("canceled before start")  # canceled while queued: do no work at all
    images = {}
    resolution = runtime.get_pipeline().image_resolution  # decoded images shrink to about this at once
    for row in rows:
        if not row.ended and row.image_key is None:
            images[row.job.id] = None
        elif not row.ended:
            try:
                data = retry_storage(
                    lambda key=row.image_key: runtime.storage.get(key),
                    for_seconds=runtime.settings.storage_retry_seconds,
                    what=f"job {row.job.id}: reading {row.image_key}",
                )
                images[row.job.id] = load_image(
                    data, max_pixels=runtime.settings.max_image_pixels, min_side=resolution
                )
            except Exception as exc:  # one bad or missing image fails only its own job
                end(row, exc)
    batch = [row for row in rows if not row.ended]
    if not batch:
        return
    for row in batch:
        announce(row.job, JobStatus.RUNNING)

    def finish_row(row: _Row, audios, sampling_rate: int, errors: list[NonFiniteOutput | None]) -> None:
        """On the writer thread: store the job's clips (unless one came out non-finite) and end the job; the
        result is the first clip's record plus `outputs`, every clip's."""
        error = next((error for error in errors if error is not None), None)
        try:
            if error is not None:
                outcome = error
            else:
                outputs = [store_clip(runtime, row.job.id, index, row.request, audio, sampling_rate)
                           for index, audio in enumerate(audios)]  # fmt: skip
                outcome = {**outputs[0], "outputs": outputs}
        except Exception as exc:
            outcome = exc
        end(row, outcome)

    def generate_part(part: list[_Row]) -> None:
        """One pipeline call for `part`; if it runs the device out of memory, its halves one after the other."""
        part = [row for row in part if not row.ended]
        if not part:
            return

        def on_step(step) -> None:
            end_canceled_rows(f"canceled after {step.step} of {step.total} steps")
            for row in part:
                if not row.ended:
                    row.report_progress(step.fraction)

        try:
            output = runtime.get_pipeline().generate(
                [row.request for row in part],
                [images[row.job.id] for row in part],
                callback=on_step,
                should_cancel=lambda: all(row.ended for row in part),
            )
        except GenerationCancelled:
            return  # every row was canceled, and each has ended
        except torch.cuda.OutOfMemoryError as exc:  # torch.OutOfMemoryError, whatever the device
            if len(part) == 1:
                if not part[0].ended:  # a cancel or Cancel-After may have ended it during the call
                    end(part[0], exc)
                return
            log.warning("batch of %d (%s) ran out of device memory; running its halves", len(part),
                        ", ".join(row.job.id for row in part))  # fmt: skip
        except Exception as exc:
            for row in part:
                if not row.ended:
                    end(row, exc)
            return
        else:
            first, errors = 0, output.errors or [None] * len(output.audios)
            for row in part:  # a job's `num_outputs` clips are consecutive rows
                clips = slice(first, first + row.request.num_outputs)
                first = clips.stop
                if not row.ended:
                    row.ended = True  # the writer ends it from here on
                    audios = [output.clip(index) for index in range(clips.start, clips.stop)]  # each at its length
                    write(row.job.id, partial(finish_row, row, audios, output.sampling_rate, errors[clips]))
            return
        # Out of memory: the exception (and the frames holding the failed call's tensors) is gone by now.
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        half = len(part) // 2
        generate_part(part[:half])
        generate_part(part[half:])

    generate_part(batch)


def store_clip(runtime: Runtime, job_id: str, index: int, request: GenerationRequest, audio, sampling_rate: int) -> dict:
    """Master and encode output `index` as the request asks (format, loudness, loop), write it, then its
    spectrogram PNG, to storage; returns the record the API reads."""
    audio, encoded = deliver(audio, sampling_rate, request)
    kind = audio_format(request.format)
    key = output_key(job_id, index, request.format)
    picture = spectrogram_key(job_id, index)
    png = runtime.get_pipeline().spectrogram_png(audio)
    for stored_key, data, content_type in ((key, encoded, kind.content_type), (picture, png, PNG)):
        retry_storage(
            lambda: runtime.storage.put(stored_key, data, content_type=content_type),
            for_seconds=runtime.settings.storage_retry_seconds,
            what=f"job {job_id}: storing {stored_key}",
        )
    return {
        "key": key,
        "spectrogram_key": picture,
        "content_type": kind.content_type,
        "format": kind.name,
        "seconds": audio.shape[-1] / sampling_rate,
        "sample_rate": sampling_rate,
        "bytes": len(encoded),
        "sha256": hashlib.sha256(encoded).hexdigest(),
    }


def discard_input(runtime: Runtime, image_key: str | None, *, job_id: str) -> None:
    """The uploaded photo is needed only while its job runs; keep storage from filling with them (a delete
    that fails now is the sweep's to repeat)."""
    if image_key is None:
        return
    try:
        runtime.storage.delete(image_key)
    except StorageUnavailable as exc:
        log.warning("job %s: could not delete input %s: %s", job_id, image_key, exc)


def retry_redis(action: Callable[[], None], *, what: str) -> None:
    """Run a Redis write, retrying through an outage of up to REDIS_RETRY_SECONDS (then it raises, and the
    job comes back through the janitor as abandoned)."""
    deadline = time.monotonic() + REDIS_RETRY_SECONDS
    while True:
        try:
            return action()
        except RedisError as exc:
            if time.monotonic() > deadline:
                raise
            log.warning("%s: Redis unavailable (%s); retrying", what, exc)
            time.sleep(0.5)


def on_job_failure(job: Job, connection: Redis, exc_type, exc_value, traceback) -> None:
    """RQ's failure callback; acts on AbandonedJobError only (the janitor found the job's worker gone):
    a job with retries left goes back to the queue (RQ requeues it after this), others end `failed` with
    worker_lost, or `canceled` if a cancel was asked; their photo is deleted."""
    if exc_type is not AbandonedJobError:
        return  # failures inside a worker are recorded by run_batch
    canceled = connection.exists(cancel_key(job.id))
    if job.retries_left and not canceled:
        log.warning("job %s: its worker was lost; retrying (%d retries left)", job.id, job.retries_left)
        announce(job, JobStatus.QUEUED, progress=0.0)
        return
    job.retries_left = 0
    job.ended_at = now()  # saved with the failure that RQ records next
    if canceled:
        announce(job, JobStatus.CANCELED, error=(ErrorCode.CANCELED, "canceled while its worker was lost"))
    else:
        log.error("job %s: its worker was lost and no retry is left", job.id)
        message = "the worker running this job was lost (killed or cut off) and no retry was left"
        announce(job, JobStatus.FAILED, error=(ErrorCode.WORKER_LOST, message))
    discard_input(get_runtime(), job.kwargs["image_key"], job_id=job.id)


def record_outcome(job: Job, outcome: Outcome) -> None:
    """Announce how the job ended: its result, or `{code, message}` for the API (tracebacks go to the log)."""
    if isinstance(outcome, GenerationCancelled):
        announce(job, JobStatus.CANCELED, error=(ErrorCode.CANCELED, str(outcome)))
    elif isinstance(outcome, Aborted):
        announce(job, JobStatus.ABORTED, error=(ErrorCode.ABORTED, str(outcome)))
    elif isinstance(outcome, InputError):
        log.info("job %s rejected: %s", job.id, outcome)
        announce(job, JobStatus.FAILED, error=(ErrorCode.INVALID_INPUT, str(outcome)))
    elif isinstance(outcome, NonFiniteOutput):
        log.error("job %s failed: %s", job.id, outcome)
        announce(job, JobStatus.FAILED, error=(ErrorCode.NON_FINITE_OUTPUT, str(outcome)))
    elif isinstance(outcome, torch.cuda.OutOfMemoryError):
        log.error("job %s failed: out of device memory even alone", job.id)
        message = "the device ran out of memory for this job; retry later"
        announce(job, JobStatus.FAILED, error=(ErrorCode.OUT_OF_MEMORY, message))
    elif isinstance(outcome, StorageUnavailable):
        log.error("job %s failed: storage stayed unavailable: %s", job.id, outcome)
        announce(job, JobStatus.FAILED, error=(ErrorCode.STORAGE_UNAVAILABLE, "the storage stayed unavailable; retry"))
    elif isinstance(outcome, BaseException):
        log.error("job %s failed", job.id, exc_info=outcome)
        announce(job, JobStatus.FAILED, error=(ErrorCode.INTERNAL, "generation failed; see the worker log"))
    else:
        announce(job, JobStatus.SUCCEEDED, result=outcome)
