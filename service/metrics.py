"""Prometheus metrics, read from Redis at scrape time so they cover every worker and API replica.

Every API replica exports the same cluster-wide numbers (they come from Redis), so queries aggregate
replicas with `max`, never `sum`; only `melfusion_ready` is this replica's own view.
"""

from __future__ import annotations

import asyncio

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from redis import Redis
from redis.exceptions import RedisError
from rq import Queue
from rq.exceptions import AbandonedJobError
from rq.results import Result

from jobs.heartbeat import read_heartbeats
from jobs.metrics import QUEUE_WAIT, RUN_TIME, read_compile_misses, read_histogram, read_outcomes
from jobs.queue import JobStatus
from jobs.storage import Storage

from .readiness import ReadinessProbe, check_readiness


class JobMetricsCollector(Collector):
    def __init__(self, redis: Redis, queue: Queue, storage: Storage, *, probe: ReadinessProbe):
        self.redis, self.queue, self.storage, self.probe = redis, queue, storage, probe

    def collect(self):
        yield self._readiness()
        try:
            yield from self._collect()
        except RedisError:  # a scrape during a Redis outage shows readiness only, rather than failing
            return

    def _readiness(self) -> GaugeMetricFamily:
        """The /readyz checks as 1/0, so alerts can say which dependency failed and for how long."""
        readiness = asyncio.run(  # scrapes run in a request thread, without an event loop
            check_readiness(redis=self.redis, storage=self.storage, queue_name=self.queue.name, probe=self.probe,
                            show_internal=False)
        )  # fmt: skip
        ready = GaugeMetricFamily("melfusion_ready", "This API replica's /readyz checks (1 = ok)", labels=["check"])
        for name, check in readiness.checks.items():
            ready.add_metric([name], float(check.ok))
        return ready

    def _collect(self):
        jobs = GaugeMetricFamily("melfusion_jobs", "Jobs by status (queued/running now)", labels=["status"])
        jobs.add_metric([JobStatus.QUEUED.value], self.queue.count)
        # No cleanup here: reclaiming abandoned jobs is the workers' janitors' work (their failure callback
        # needs a worker's runtime), and a scrape must stay a read.
        jobs.add_metric([JobStatus.RUNNING.value], self.queue.started_job_registry.get_job_count(cleanup=False))
        yield jobs
        finished = CounterMetricFamily("melfusion_jobs_finished", "Jobs that ended, by status", labels=["status"])
        for status, count in sorted(read_outcomes(self.redis).items()):
            finished.add_metric([status], count)
        yield finished
        misses = CounterMetricFamily(
            "melfusion_compile_misses",
            "Calls a compiled worker ran outside its warmed shapes (by what missed) and graphs compiled after warm-up",
            labels=["what"],
        )
        for what, count in sorted(read_compile_misses(self.redis).items()):
            misses.add_metric([what], count)
        yield misses
        yield GaugeMetricFamily("melfusion_queue_depth", "Jobs waiting in the queue", value=self.queue.count)
        workers = [beat for beat in read_heartbeats(self.redis) if self.queue.name in beat.get("queues", [])]
        yield GaugeMetricFamily("melfusion_workers_alive", "Workers with a fresh heartbeat", value=len(workers))
        # KEDA scales on this, not on running jobs: a worker runs up to MELFUSION_MAX_BATCH jobs at once.
        busy = sum(beat.get("state") == "busy" for beat in workers)
        yield GaugeMetricFamily("melfusion_workers_busy", "Workers running a job or batch now", value=busy)
        for name, help_text in ((QUEUE_WAIT, "Seconds from enqueue to start"), (RUN_TIME, "Seconds a job ran")):
            buckets, total = read_histogram(self.redis, name)
            yield HistogramMetricFamily(f"melfusion_{name}", help_text, buckets=buckets, sum_value=total)
        yield GaugeMetricFamily(
            "melfusion_jobs_abandoned",
            "Failed jobs RQ still keeps (for the job TTL) that it failed as abandoned: their worker died mid-job",
            value=count_abandoned(self.queue),
        )
        yield GaugeMetricFamily(
            "melfusion_jobs_retry_scheduled",
            "Jobs in RQ's scheduled registry: failed or abandoned jobs waiting out a retry interval",
            value=self.queue.scheduled_job_registry.get_job_count(cleanup=False),
        )


def count_abandoned(queue: Queue) -> int:
    """Jobs in the failed registry whose latest RQ result is an AbandonedJobError (one Redis round trip).

    RQ records that error when a registry cleanup finds a job whose worker stopped renewing it; the job
    function never ran to its end, so these jobs are missing from melfusion_jobs_finished.
    """
    job_ids = queue.failed_job_registry.get_job_ids(cleanup=False)
    with queue.connection.pipeline(transaction=False) as pipe:
        for job_id in job_ids:
            pipe.xrevrange(Result.get_key(job_id), "+", "-", count=1)
        latest = pipe.execute()
    abandoned = 0
    for job_id, entries in zip(job_ids, latest):
        if entries:
            result_id, payload = entries[0]
            result = Result.restore(job_id, result_id.decode(), payload, queue.connection, queue.serializer)
            abandoned += AbandonedJobError.__name__ in (result.exc_string or "")
    return abandoned
