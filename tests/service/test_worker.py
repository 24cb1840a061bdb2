"""The worker: models loaded once per process, per-step progress, cancellation before and during a run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from servers import ALICE, wait_for_job

from embedded.processes import PROJECT_ROOT, wait_until
from jobs.heartbeat import read_heartbeats

SHORT = {"seconds": 0.5, "steps": 2}
LONG = {"seconds": 1.0, "steps": 1000}  # 3000 UNet steps: minutes, so it is surely mid-run when canceled


def worker_state(stack) -> dict:
    (state,) = read_heartbeats(stack.redis)
    return state


def test_second_job_does_not_reload_models(local_stack, sample_png):
    client = local_stack.client(ALICE)
    before = worker_state(local_stack)
    for caption in ("first job", "second job"):
        job = client.wait(client.submit(sample_png, caption, **SHORT).id, timeout=120)
        assert job.status == "succeeded", job.raw
    # the heartbeat is written every 0.5 s: wait for one that counts both jobs
    after = wait_until(lambda: (state := worker_state(local_stack))["jobs_done"] >= before["jobs_done"] + 2 and state,
                       timeout=30, what="heartbeat counting both jobs")  # fmt: skip
    assert after["pid"] == before["pid"]
    assert after["pipeline_loads"] == 1
    log = local_stack.workers[0].log_path.read_text()
    assert log.count("loaded pipeline from") == 1
    assert "Loading pipeline components" not in log and "it/s]" not in log  # no libraries' loading bars


def test_cancel_running_job_stops_it_and_queued_job_never_runs(local_stack, sample_png):
    client = local_stack.client(ALICE)
    running = client.submit(sample_png, "a long one", **LONG)
    wait_for_job(client, running.id, lambda j: j.status == "running" and j.progress > 0, what="running")
    queued = client.submit(sample_png, "waits behind it", **SHORT)
    assert client.get(queued.id).queue_position == 0

    inputs = Path(local_stack.env["MELFUSION_STORAGE_DIR"]) / "inputs"
    assert any(inputs.glob(f"{queued.id}.*"))
    canceled = client.cancel(queued.id)
    assert canceled.status == "canceled" and canceled.raw["finished_at"] is not None and canceled.raw["attempts"] == 0
    assert not any(inputs.glob(f"{queued.id}.*"))  # a job that will never run keeps no photo
    client.cancel(running.id)
    stopped = wait_for_job(client, running.id, lambda j: j.status == "canceled", what="canceled")
    assert 0 < stopped.progress < 1
    assert stopped.error["code"] == "canceled" and stopped.result is None

    after = client.wait(client.submit(sample_png, "runs next", **SHORT).id, timeout=120)
    assert after.status == "succeeded"
    photos_left = lambda: any(inputs.glob(f"{after.id}.*")) or any(inputs.glob(f"{running.id}.*"))  # noqa: E731
    wait_until(lambda: not photos_left(), timeout=10, what="done jobs' photos deleted")  # just after their end
    never_ran = client.get(queued.id)
    assert never_ran.status == "canceled" and never_ran.raw["started_at"] is None and never_ran.progress == 0
    assert never_ran.queue_position is None
    with local_stack.http(ALICE) as http:
        response = http.post(f"/jobs/{after.id}/cancel")
        assert response.status_code == 409 and response.json()["error"]["field"] == "id"
        assert http.post(f"/jobs/{queued.id}/cancel").json()["status"] == "canceled"  # canceling twice is fine
        assert 'melfusion_jobs_finished_total{status="canceled"}' in http.get("/metrics").text


def test_container_healthcheck_sees_the_worker(local_stack):
    check = subprocess.run([sys.executable, "-m", "workers.healthcheck"], env=local_stack.env, cwd=PROJECT_ROOT,
                           capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert check.returncode == 0, check.stdout + check.stderr
    assert "1 fresh worker heartbeat(s)" in check.stdout
