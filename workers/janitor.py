"""Housekeeping that must happen even when nobody asks: run from every worker's heartbeat thread, each task
at most once per interval across all workers (a Redis lock per task).

- Abandoned jobs: RQ's own cleanup of the started registry, run every `janitor_interval_seconds` rather
  than RQ's 10 minutes. An entry a worker stopped renewing has expired: the job is retried (`Retry`) or
  moved to the FailedJobRegistry with AbandonedJobError; `tasks.on_job_failure` writes why.
- The sweep deletes uploaded photos whose job is gone or has ended (a delete that failed during an
  outage, a worker killed mid-job) and WAVs whose job record has expired (`job_ttl_seconds`): nothing a
  client uploaded outlives its job for longer than one sweep interval.
"""

from __future__ import annotations

import datetime as dt
import logging
import time

from redis import Redis
from rq import Queue
from rq.registry import StartedJobRegistry
from rq.timeouts import TimerDeathPenalty

from jobs.queue import KEY_PREFIX, JobStatus, fetch_job, get_status
from jobs.settings import Settings
from jobs.storage import Storage, job_id_of

log = logging.getLogger(__name__)

LIVE = (JobStatus.QUEUED, JobStatus.RUNNING)


def sweep_orphans(*, redis: Redis, storage: Storage, grace_seconds: float) -> int:
    """Delete inputs whose job is gone or ended and outputs whose job is gone; objects younger than
    `grace_seconds` are kept (a POST between storing its photo and enqueueing). Returns how many went."""
    cutoff = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=grace_seconds)
    removed = 0
    for prefix in ("inputs/", "outputs/"):
        for key, modified in list(storage.list_keys(prefix)):
            if modified > cutoff:
                continue
            job = fetch_job(redis, job_id_of(key))
            if job is None or (prefix == "inputs/" and get_status(job) not in LIVE):
                storage.delete(key)
                removed += 1
    return removed


class Janitor:
    def __init__(self, *, redis: Redis, storage: Storage, settings: Settings, queues: list[Queue], worker_name: str):
        self.redis, self.storage, self.settings, self.worker_name = redis, storage, settings, worker_name
        self.queues = queues
        self._next_sweep = self._next_reclaim = 0.0

    def _take_turn(self, task: str, interval: float) -> bool:
        """True for exactly one worker per `interval` (the lock expires on its own)."""
        return bool(self.redis.set(f"{KEY_PREFIX}:janitor:{task}", self.worker_name, nx=True, px=int(interval * 1000)))

    def run_due(self) -> None:
        """Run whatever is due; called every heartbeat. Errors are logged: the next beat tries again."""
        now = time.monotonic()
        if now >= self._next_reclaim:
            interval = self.settings.janitor_interval_seconds
            self._next_reclaim = now + interval
            if self._take_turn("abandoned", interval):
                for queue in self.queues:
                    # RQ's own maintenance (at worker start, then every maintenance interval) cleans the same
                    # registry: two cleanups at once would both retry a lost job, which then runs twice. Its
                    # lock keeps them apart; a turn it holds is skipped (it does the work).
                    if not queue.acquire_maintenance_lock():
                        continue
                    try:  # a thread: callbacks get a timer, not SIGALRM, as their timeout
                        StartedJobRegistry(queue=queue, death_penalty_class=TimerDeathPenalty).cleanup()
                    finally:
                        queue.release_maintenance_lock()
        if now >= self._next_sweep:
            interval = self.settings.sweep_interval_seconds
            self._next_sweep = now + interval
            if self._take_turn("sweep", interval):
                removed = sweep_orphans(redis=self.redis, storage=self.storage,
                                        grace_seconds=self.settings.sweep_grace_seconds)  # fmt: skip
                log.info("worker %s: sweep removed %d orphaned object(s)", self.worker_name, removed)
