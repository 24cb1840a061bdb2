"""MelFusionWorker: an RQ SimpleWorker (jobs run in this process, so the pipeline stays loaded and CUDA
is never forked) that batches compatible jobs, plus a heartbeat thread the API's /readyz can read while a
long job runs or the worker warms up.

Dynamic batching: the job RQ dequeues is the oldest queued one and leads the batch, so no job starves.
For up to `batch_wait_ms` the worker looks for partners among the next queued jobs (same `batch_key`) and
claims each in one Redis transaction that removes it from the queue and registers its execution in RQ's
StartedJobRegistry, so a job is always either queued or visibly started: if the worker dies, RQ recovers
each job of the batch as it recovers any single job. Every job is then started, finished or failed
through RQ's own methods, as a job run alone is.

SIGTERM/SIGINT use RQ's warm shutdown: the current batch finishes, then the worker exits.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time

from rq import SimpleWorker
from rq.executions import Execution
from rq.job import Job
from rq.queue import Queue
from rq.timeouts import JobTimeoutException
from rq.worker import WorkerStatus

from jobs.heartbeat import clear_heartbeat, write_heartbeat
from melfusion.request import GenerationRequest

from .tasks import Outcome, run_batch
from .warm import Runtime

log = logging.getLogger(__name__)

PARTNER_POLL_SECONDS = 0.002
LOOKAHEAD = 4  # queued jobs inspected per batch slot: partners need not be adjacent in the queue


class MelFusionWorker(SimpleWorker):
    def __init__(self, *args, runtime: Runtime, **kwargs):
        super().__init__(*args, **kwargs)
        self.runtime = runtime
        self.jobs_done = 0
        self.batches_done = 0
        self._stop_beating = threading.Event()

    def execute_job(self, job: Job, queue: Queue) -> None:
        """Run `job` alone through RQ, or as the leader of a batch of compatible queued jobs."""
        partners = self.claim_partners(job, queue)
        if partners:
            self.perform_batch(job, partners, queue)
        else:
            super().execute_job(job, queue)
        self.jobs_done += 1 + len(partners)
        self.batches_done += 1

    def claim_partners(self, leader: Job, queue: Queue) -> dict[Job, Execution]:
        """Up to max_batch - 1 queued jobs sharing the leader's batch key, each claimed with its execution."""
        settings = self.runtime.settings
        wanted = settings.max_batch - 1
        claimed: dict[Job, Execution] = {}
        if wanted == 0:
            return claimed
        key = GenerationRequest.from_dict(leader.kwargs["params"]).batch_key
        judged: set[str] = {leader.id}
        deadline = time.monotonic() + settings.batch_wait_ms / 1000
        while True:
            ids = [i for i in queue.get_job_ids(0, LOOKAHEAD * settings.max_batch) if i not in judged]
            for candidate in Job.fetch_many(ids, connection=self.connection, serializer=self.serializer):
                if len(claimed) == wanted:
                    break
                if candidate is None:
                    continue
                judged.add(candidate.id)
                if GenerationRequest.from_dict(candidate.kwargs["params"]).batch_key == key:
                    execution = self._claim(candidate, queue)
                    if execution is not None:
                        claimed[candidate] = execution
            if len(claimed) == wanted or time.monotonic() >= deadline:
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
            run_batch(list(executions), self.runtime, finish=finish)
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
            except Exception:  # a Redis blip must not kill the beat; the next one retries
                log.warning("worker %s: heartbeat failed", self.name, exc_info=True)
            self._stop_beating.wait(interval)

    def work(self, *args, **kwargs) -> bool:
        """Beat, warm up (visible as "warming up" in /readyz), then take jobs."""
        beat = threading.Thread(target=self._beat_until_stopped, name="heartbeat", daemon=True)
        beat.start()
        try:
            self.runtime.warm_up()
            return super().work(*args, **kwargs)
        finally:
            self._stop_beating.set()
            beat.join()
            clear_heartbeat(self.connection, self.name)
            log.info("worker %s: stopped after %d jobs in %d batches", self.name, self.jobs_done, self.batches_done)
