"""Prometheus metrics, read from Redis at scrape time so they cover every worker and API replica."""

from __future__ import annotations

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from redis import Redis
from redis.exceptions import RedisError
from rq import Queue

from jobs.heartbeat import read_heartbeats
from jobs.metrics import QUEUE_WAIT, RUN_TIME, read_histogram, read_outcomes
from jobs.queue import JobStatus


class JobMetricsCollector(Collector):
    def __init__(self, redis: Redis, queue: Queue):
        self.redis, self.queue = redis, queue

    def collect(self):
        try:
            yield from self._collect()
        except RedisError:  # a scrape during a Redis outage shows no job metrics rather than failing
            return

    def _collect(self):
        jobs = GaugeMetricFamily("melfusion_jobs", "Jobs by status (queued/running now)", labels=["status"])
        jobs.add_metric([JobStatus.QUEUED.value], self.queue.count)
        jobs.add_metric([JobStatus.RUNNING.value], self.queue.started_job_registry.count)
        yield jobs
        finished = CounterMetricFamily("melfusion_jobs_finished", "Jobs that ended, by status", labels=["status"])
        for status, count in sorted(read_outcomes(self.redis).items()):
            finished.add_metric([status], count)
        yield finished
        yield GaugeMetricFamily("melfusion_queue_depth", "Jobs waiting in the queue", value=self.queue.count)
        workers = [beat for beat in read_heartbeats(self.redis) if self.queue.name in beat.get("queues", [])]
        yield GaugeMetricFamily("melfusion_workers_alive", "Workers with a fresh heartbeat", value=len(workers))
        for name, help_text in ((QUEUE_WAIT, "Seconds from enqueue to start"), (RUN_TIME, "Seconds a job ran")):
            buckets, total = read_histogram(self.redis, name)
            yield HistogramMetricFamily(f"melfusion_{name}", help_text, buckets=buckets, sum_value=total)
