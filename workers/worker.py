"""MelFusionWorker: an RQ SimpleWorker (jobs run in this process, so the pipeline stays loaded and CUDA
is never forked) plus a heartbeat thread the API's /readyz can read while a long job runs.

SIGTERM/SIGINT use RQ's warm shutdown: the current job finishes, then the worker exits.
"""

from __future__ import annotations

import logging
import os
import socket
import threading

from rq import SimpleWorker
from rq.worker import WorkerStatus

from jobs.heartbeat import clear_heartbeat, write_heartbeat

from .warm import Runtime

log = logging.getLogger(__name__)


class MelFusionWorker(SimpleWorker):
    def __init__(self, *args, runtime: Runtime, **kwargs):
        super().__init__(*args, **kwargs)
        self.runtime = runtime
        self.jobs_done = 0
        self._stop_beating = threading.Event()

    def execute_job(self, job, queue) -> None:
        super().execute_job(job, queue)
        self.jobs_done += 1

    def get_heartbeat_state(self) -> dict:
        """What /readyz and the tests see of this worker."""
        return {
            "name": self.name,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "queues": self.queue_names(),
            "state": WorkerStatus(self.get_state()).value,  # "idle" / "busy", not the enum's repr
            "current_job": self.get_current_job_id(),
            "jobs_done": self.jobs_done,
            "pipeline_loads": self.runtime.pipeline_loads,
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
        beat = threading.Thread(target=self._beat_until_stopped, name="heartbeat", daemon=True)
        beat.start()
        try:
            return super().work(*args, **kwargs)
        finally:
            self._stop_beating.set()
            beat.join()
            clear_heartbeat(self.connection, self.name)
            log.info("worker %s: stopped after %d jobs", self.name, self.jobs_done)
