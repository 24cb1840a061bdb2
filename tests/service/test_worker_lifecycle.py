"""SIGTERM lets the running job finish; with no worker jobs wait and /readyz says why (yet stays ready); a new
worker runs them."""

from __future__ import annotations

import datetime as dt
import signal
from pathlib import Path

import pytest
from servers import launch_stack, wait_for_job

SHORT = {"seconds": 0.5, "steps": 2}


@pytest.fixture(scope="module")
def lifecycle_stack(workdir, redis_port, tiny_bundle):
    stack = launch_stack("lifecycle", workdir=workdir, redis_port=redis_port, db=3, bundle=tiny_bundle,
                         storage_dir=workdir / "lifecycle-storage")  # fmt: skip
    yield stack
    stack.stop()


def test_sigterm_finishes_the_current_job_then_exits(lifecycle_stack, sample_png):
    client = lifecycle_stack.client()
    job = client.submit(sample_png, "finish me", seconds=1.0, steps=300)  # seconds of work left after the signal
    wait_for_job(client, job.id, lambda j: j.status == "running" and 0 < j.progress < 0.75, what="running")
    worker = lifecycle_stack.workers[0]
    signalled_at = dt.datetime.now(dt.UTC)
    worker.popen.send_signal(signal.SIGTERM)

    assert worker.popen.wait(timeout=180) == 0
    finished = client.get(job.id)
    assert finished.status == "succeeded", finished.raw
    assert dt.datetime.fromisoformat(finished.raw["finished_at"]) > signalled_at


def test_jobs_wait_without_a_worker_and_run_when_one_comes(lifecycle_stack, sample_png):
    assert not any(worker.is_running() for worker in lifecycle_stack.workers)
    with lifecycle_stack.http() as http:
        readiness = http.get("/readyz")
        assert readiness.status_code == 200  # losing every worker must not take polling and downloads down
        assert readiness.json()["ready"] and readiness.json()["workers_available"] == 0
        checks = readiness.json()["checks"]
        assert checks["redis"]["ok"] and checks["storage"]["ok"]
        assert not checks["workers"]["ok"] and "no fresh worker heartbeat" in checks["workers"]["detail"]
        assert http.get("/livez").status_code == 200

    client = lifecycle_stack.client()
    waiting = [client.submit(sample_png, f"waiting {i}", **SHORT) for i in range(3)]
    assert [client.get(job.id).queue_position for job in waiting] == [0, 1, 2]
    assert all(client.get(job.id).status == "queued" for job in waiting)
    lost_input = waiting.pop()
    (Path(lifecycle_stack.env["MELFUSION_STORAGE_DIR"]) / "inputs" / f"{lost_input.id}.png").unlink()

    lifecycle_stack.add_worker()  # returns once /readyz counts a worker
    for job in waiting:
        assert client.wait(job.id, timeout=120).status == "succeeded"
    failed = client.wait(lost_input.id, timeout=120)
    assert failed.status == "failed" and failed.result is None
    assert failed.error == {"code": "internal_error", "message": "generation failed; see the worker log"}
    assert "FileNotFoundError" in lifecycle_stack.workers[-1].log_path.read_text()  # the details stay in the log
