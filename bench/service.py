"""The real service for benchmarks: a private redis-server, the API and one worker on loopback, and bursts of
concurrent jobs through them, timed from the job records the service keeps."""

from __future__ import annotations

import datetime as dt
import math
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from embedded.processes import Child, free_port, settings_env, start_api, start_redis, start_worker, wait_until
from melfusion_client import Job, MelFusionClient

Request = tuple[bytes, dict]  # photo bytes, form fields (caption included)


@contextmanager
def private_redis(work: Path) -> Iterator[int]:
    """A redis-server of its own for the benchmark; yields its port."""
    port = free_port()
    redis = start_redis(port=port, data_dir=work / "redis")
    try:
        yield port
    finally:
        redis.stop()


@dataclass
class Service:
    client: MelFusionClient
    worker: Child

    def metrics(self) -> str:
        return self.client.http.get("/metrics").text

    def compile_misses(self) -> int:
        """Calls the worker ran outside its warmed shapes plus graphs compiled after warm-up (/metrics)."""
        counts = re.findall(r"^melfusion_compile_misses_total\{.*\} (\S+)$", self.metrics(), re.MULTILINE)
        return sum(int(float(count)) for count in counts)

    def warm_up_seconds(self) -> float | None:
        """How long the worker's warm-up took, from its log (None if it ran none)."""
        found = re.search(r"warmed up over \d+ calls .* in ([\d.]+) s", self.worker.log_path.read_text())
        return float(found.group(1)) if found else None


@contextmanager
def running_service(
    work: Path, *, redis_port: int, db: int, bundle: Path, ready_timeout: float = 600, **worker_settings
) -> Iterator[Service]:
    """The API and one worker (MELFUSION_* `worker_settings`) on Redis database `db`, local storage; yields
    once the worker is ready (warmed up)."""
    env = settings_env(redis_url=f"redis://127.0.0.1:{redis_port}/{db}", bundle_dir=bundle,
                       storage_dir=work / f"storage-{db}", host="127.0.0.1", port=free_port(),
                       **worker_settings)  # fmt: skip
    api = start_api(env=env, log_dir=work, name=f"api-{db}")
    worker = start_worker(env=env, log_dir=work, name=f"worker-{db}")
    client = MelFusionClient(f"http://127.0.0.1:{env['MELFUSION_PORT']}")
    try:
        wait_until(client.workers_available, timeout=ready_timeout, what="a warmed-up worker", process=worker)
        yield Service(client, worker)
    finally:
        client.http.close()
        worker.stop()
        api.stop()


@dataclass
class Burst:
    """A burst of concurrent jobs through the service."""

    jobs: list[Job]
    seconds: float  # from the first job's creation to the last one's end (the service's own clocks)

    @property
    def clips_per_second(self) -> float:
        return len(self.jobs) / self.seconds

    def latency(self, quantile: float) -> float:
        """Seconds from a job's creation to its end (queue wait included) at `quantile` of the burst."""
        latencies = sorted(_seconds_between(job.raw["created_at"], job.raw["finished_at"]) for job in self.jobs)
        return latencies[max(0, math.ceil(quantile * len(latencies)) - 1)]  # nearest rank

    @property
    def failed(self) -> list[Job]:
        return [job for job in self.jobs if job.status != "succeeded"]


def run_burst(
    client: MelFusionClient, requests: list[Request], *, submitters: int = 16, timeout: float = 1800
) -> Burst:
    """Submit every request at once (`submitters` in flight), then wait for all of them to end."""
    with ThreadPoolExecutor(submitters) as pool:
        ids = list(pool.map(lambda request: client.submit(request[0], **request[1]).id, requests))
    jobs = [client.wait(job_id, timeout=timeout) for job_id in ids]
    first = min(dt.datetime.fromisoformat(job.raw["created_at"]) for job in jobs)
    last = max(dt.datetime.fromisoformat(job.raw["finished_at"]) for job in jobs)
    return Burst(jobs, (last - first).total_seconds())


def _seconds_between(start: str, end: str) -> float:
    return (dt.datetime.fromisoformat(end) - dt.datetime.fromisoformat(start)).total_seconds()
