"""MelFusionWorker: an RQ SimpleWorker (jobs run in this process, so the pipeline stays loaded and CUDA
is never forked) that batches compatible jobs, plus a heartbeat thread the API's /readyz can read while a
long job runs or the worker warms up.

Dynamic batching: the job RQ dequeues is the oldest queued one and leads the batch, so no job starves.
For up to `batch_wait_ms` the worker looks for partners among the next queued jobs (same `batch_key`) and
claims each in one Redis transaction that removes it from the queue and registers its execution in RQ's
StartedJobRegistry, so a job is always either queued or visibly started: if the worker dies, RQ recovers
each job of the batch as it recovers any single job. Every job is then started, finished or failed
through RQ's own methods, as a job run alone is. A lone job is a batch of one: every job goes through
`perform_batch`, whose generated clips are stored and their jobs ended on the writer thread
(`workers.writer`) while the next batch already runs. RQ's timeouts use a timer thread instead of SIGALRM,
so RQ's bookkeeping may run on the writer thread too.

After every batch a compiled worker reports the calls that missed its warmed shapes and any graph
compiled after warm-up (log and `melfusion_compile_misses_total`).

SIGTERM/SIGINT use RQ's warm shutdown: the current batch finishes, then the worker exits. If the batch is
still running after `shutdown_grace_seconds`, or on a second SIGTERM, its unfinished jobs go back to the
head of the queue and the worker exits at once: no job is lost to a shutdown.

While the store is unreachable the worker takes no job, so queued jobs wait instead of failing.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time

from redis.exceptions import RedisError
from rq import SimpleWorker
from rq.executions import Execution
from rq.job import Job
from rq.queue import Queue
from rq.timeouts import JobTimeoutException, TimerDeathPenalty
from rq.worker import WorkerStatus

from jobs.heartbeat import clear_heartbeat, write_heartbeat
from jobs.lifecycle import announce
from jobs.metrics import count_compile_misses
from jobs.queue import JobStatus, fetch_job, requeue_started
from jobs.storage import StorageUnavailable
from melfusion.request import GenerationRequest

from .janitor import Janitor
from .tasks import Outcome, run_batch
from .warm import Runtime
from .writer import ResultWriter

log = logging.getLogger(__name__)

PARTNER_POLL_SECONDS = 0.002
STORAGE_POLL_MAX_SECONDS = 5.0
LOOKAHEAD = 4  # queued jobs inspected per batch slot: partners need not be adjacent in the queue


class MelFusionWorker(SimpleWorker):
    # Job timeouts and RQ's callbacks must work off the main thread (the writer ends jobs): no SIGALRM.
    death_penalty_class = TimerDeathPenalty

    def __init__(self, *args, runtime: Runtime, **kwargs):
        super().__init__(*args, **kwargs)
        self.runtime = runtime
        self.jobs_done = 0
        self.batches_done = 0
        self._stop_beating = threading.Event()
        self.writer: ResultWriter | None = None  # started by `work`
        self.janitor = Janitor(redis=self.connection, storage=runtime.storage, settings=runtime.settings,
                               queues=self.queues, worker_name=self.name)  # fmt: skip

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        """Short: the heartbeat thread renews every running job's entry, so an entry outlives its worker
        by at most this (RQ's default, job timeout + 60 s, left a killed worker's job running for an hour)."""
        return self.runtime.settings.started_ttl_seconds

    def _finalize_failure(self, job: Job, queue: Queue, execution: Execution, exc_info) -> None:
        """Retries are for jobs whose worker was lost (see tasks.on_job_failure); a job that failed here
        would fail the same way again."""
        job.retries_left = 0
        super()._finalize_failure(job, queue, execution, exc_info)

    def renew_running_jobs(self) -> None:
        """Keep every running job's started-registry entry (the whole batch) from expiring while we live."""
        ttl = self.runtime.settings.started_ttl_seconds
        with self.connection.pipeline() as pipe:
            for execution in list(self.executions.values()):
                execution.heartbeat(self.queues[0].started_job_registry, ttl, pipe)
            pipe.execute()

    def dequeue_job_and_maintain_ttl(self, timeout: int | None, max_idle_time: int | None = None):
        """Take the next job only while the store answers: a job taken during a storage outage would fail."""
        self.wait_for_storage()
        return super().dequeue_job_and_maintain_ttl(timeout, max_idle_time)

    def wait_for_storage(self) -> None:
        delay = 0.5
        while True:
            try:
                self.runtime.storage.check()
                return
            except StorageUnavailable as exc:
                log.warning("worker %s: storage unavailable (%s); taking no job for %.1f s", self.name, exc, delay)
                time.sleep(delay)
                delay = min(2 * delay, STORAGE_POLL_MAX_SECONDS)

    def request_stop(self, signum, frame) -> None:
        """First SIGTERM: RQ's warm shutdown, bounded by the grace period (then as a second SIGTERM)."""
        grace = self.runtime.settings.shutdown_grace_seconds
        timer = threading.Timer(grace, os.kill, (os.getpid(), signal.SIGTERM))
        timer.daemon = True
        timer.start()
        log.info("worker %s: shutting down after the current batch (at most %g s)", self.name, grace)
        super().request_stop(signum, frame)

    def request_force_stop(self, signum, frame) -> None:
        """Second SIGTERM or grace period over: the running jobs go back to the head of the queue, and the
        process exits at once (no half-written outcome can follow)."""
        try:
            for execution in list(self.executions.values()):
                job = fetch_job(self.connection, execution.job_id)
                if job is not None and not job.is_finished and not job.is_failed:
                    queue = Queue(job.origin, connection=self.connection, serializer=self.serializer)
                    requeue_started(job, queue)
                    announce(job, JobStatus.QUEUED, progress=0.0)
                    with self.connection.pipeline() as pipe:
                        self.cleanup_execution(job, pipeline=pipe, execution=execution)
                        pipe.execute()
                    log.warning("worker %s: job %s put back in the queue", self.name, job.id)
            clear_heartbeat(self.connection, self.name)
            self.register_death()
        except Exception:  # Redis down: the jobs come back as abandoned instead
            log.exception("worker %s: could not hand the running jobs back", self.name)
            os._exit(1)
        os._exit(0)

    def execute_job(self, job: Job, queue: Queue) -> None:
        """Run `job` as the leader of a batch of compatible queued jobs (alone: a batch of one)."""
        partners = self.claim_partners(job, queue)
        self.perform_batch(job, partners, queue)
        self.jobs_done += 1 + len(partners)
        self.batches_done += 1
        self.report_compile_misses()

    def report_compile_misses(self) -> None:
        """Calls outside the warmed shapes and graphs compiled since warm-up: each a compile while serving."""
        misses = dict(self.runtime.get_pipeline().shape_misses)
        self.runtime.get_pipeline().shape_misses.clear()
        if graphs := self.runtime.take_new_graphs():
            misses["recompile"] = graphs
            log.error("worker %s: %d graph(s) compiled after warm-up; warm the shapes that miss", self.name, graphs)
        if misses:
            try:
                count_compile_misses(self.connection, misses)
            except RedisError:
                log.warning("worker %s: compile misses %s not counted (Redis unavailable)", self.name, misses)

    def abandon(self, job_id: str) -> None:
        """Stop renewing a job whose outcome could not be recorded: the janitor reclaims it (retry or
        worker_lost), as it would had this worker died."""
        for execution_id, execution in list(self.executions.items()):
            if execution.job_id == job_id:
                self.executions.pop(execution_id, None)

    def claim_partners(self, leader: Job, queue: Queue) -> dict[Job, Execution]:
        """Queued jobs sharing the leader's batch key, each claimed with its execution, while all their clips
        (a job makes `num_outputs`) fit in max_batch rows."""
        settings = self.runtime.settings
        leading = GenerationRequest.from_dict(leader.kwargs["params"])
        wanted = settings.max_batch - leading.num_outputs  # rows left for partners
        claimed: dict[Job, Execution] = {}
        if wanted <= 0:
            return claimed
        limits = self.runtime.get_pipeline().limits
        key = leading.batch_key(limits)
        judged: set[str] = {leader.id}
        deadline = time.monotonic() + settings.batch_wait_ms / 1000
        while True:
            ids = [i for i in queue.get_job_ids(0, LOOKAHEAD * settings.max_batch) if i not in judged]
            for candidate in Job.fetch_many(ids, connection=self.connection, serializer=self.serializer):
                if wanted == 0:
                    break
                if candidate is None:
                    continue
                judged.add(candidate.id)
                request = GenerationRequest.from_dict(candidate.kwargs["params"])
                if request.batch_key(limits) == key and request.num_outputs <= wanted:
                    execution = self._claim(candidate, queue)
                    if execution is not None:
                        claimed[candidate] = execution
                        wanted -= request.num_outputs
            if wanted == 0 or time.monotonic() >= deadline:
                return claimed
            time.sleep(min(PARTNER_POLL_SECONDS, max(0.0, deadline - time.monotonic())))

    def _claim(self, job: Job, queue: Queue) -> Execution | None:
        """Take `job` off the queue and into the started registry in one transaction; None if another
        worker (or a cancel) took it first."""
        with self.connection.pipeline() as pipe:
            pipe.lrem(queue.key, 1, job.id)
            execution = Execution.create(job, self.get_heartbeat_ttl(job), pipeline=pipe, worker_name=self.name)
            removed = pipe.execute()[0]
        if removed:
            self.executions[execution.id] = execution
            return execution
        with self.connection.pipeline() as pipe:
            self.cleanup_execution(job, pipeline=pipe, execution=execution)
            pipe.execute()
        return None

    def perform_batch(self, leader: Job, partners: dict[Job, Execution], queue: Queue) -> None:
        """Start every job, run them in one pipeline call, and finish each through RQ as it ends."""
        executions = {leader: self.prepare_execution(leader), **partners}
        for job in executions:
            self.prepare_job_execution(job, remove_from_intermediate_queue=job is leader and len(self.queues) == 1)
        log.info("batch of %d jobs led by %s: %s", len(executions), leader.id, ", ".join(j.id for j in executions))

        def finish(job: Job, outcome: Outcome) -> None:
            if isinstance(outcome, BaseException):
                self._finalize_failure(job, queue, executions[job], (type(outcome), outcome, outcome.__traceback__))
            else:
                self._finalize_success(job, queue, executions[job], outcome)

        timeout = leader.timeout or self.queue_class.DEFAULT_TIMEOUT
        with self.death_penalty_class(timeout, JobTimeoutException, job_id=leader.id):
            run_batch(list(executions), self.runtime, finish=finish, write=self.writer.submit)
        self.set_state(WorkerStatus.IDLE)

    def get_heartbeat_state(self) -> dict:
        """What /readyz and the tests see of this worker."""
        state = self.get_state()  # "starting" (a plain str) until RQ's loop begins, then a WorkerStatus
        return {
            "name": self.name,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "queues": self.queue_names(),
            "state": getattr(state, "value", state),  # "idle" / "busy", not the enum's repr
            "current_job": self.get_current_job_id(),
            "jobs_done": self.jobs_done,
            "batches_done": self.batches_done,
            "pipeline_loads": self.runtime.pipeline_loads,
            "warming_up": self.runtime.warming_up,
            "device": self.runtime.settings.device,
        }

    def _beat_until_stopped(self) -> None:
        interval = self.runtime.settings.heartbeat_seconds
        while not self._stop_beating.is_set():
            try:
                write_heartbeat(self.connection, self.name, self.get_heartbeat_state(), ttl_seconds=3 * interval)
                self.renew_running_jobs()
                self.janitor.run_due()
            except Exception:  # a Redis or storage blip must not kill the beat; the next one retries
                log.warning("worker %s: heartbeat or housekeeping failed", self.name, exc_info=True)
            self._stop_beating.wait(interval)

    def work(self, *args, **kwargs) -> bool:
        """Beat, warm up (visible as "warming up" in /readyz), then take jobs; on the way out, the clips
        already generated are stored and their jobs ended."""
        beat = threading.Thread(target=self._beat_until_stopped, name="heartbeat", daemon=True)
        beat.start()
        self.writer = ResultWriter(max_pending=2 * self.runtime.settings.max_batch, on_failure=self.abandon)
        try:
            self.runtime.warm_up()
            return super().work(*args, **kwargs)
        finally:
            self.writer.close()
            self._stop_beating.set()
            beat.join()
            clear_heartbeat(self.connection, self.name)
            log.info("worker %s: stopped after %d jobs in %d batches", self.name, self.jobs_done, self.batches_done)
