"""Dynamic batching in a real worker: compatible queued jobs share one pipeline call, and each keeps its own
status, progress, cancel, result, error and RQ registry entry. Jobs are queued behind a running "blocker"
job (another shape, so it runs alone) so that they are all waiting when the worker next dequeues."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from rq.registry import FailedJobRegistry, FinishedJobRegistry, StartedJobRegistry
from servers import launch_stack, wait_for_job, wait_until

from jobs.heartbeat import write_heartbeat
from jobs.queue import fetch_job
from service.readiness import check_workers

SHAPE = {"seconds": 0.5, "steps": 3}
LONG = {"seconds": 0.5, "steps": 150}  # long enough to cancel mid-run
BLOCKER = {"seconds": 0.5, "steps": 120}


@pytest.fixture(scope="module")
def batching_stack(workdir, redis_port, tiny_bundle):
    stack = launch_stack("batching", workdir=workdir, redis_port=redis_port, db=4, bundle=tiny_bundle,
                         storage_dir=workdir / "batching-storage", max_batch=4, batch_wait_ms=20,
                         warmup_batch_sizes="1,2", warmup_seconds=0.5)  # fmt: skip
    yield stack
    stack.stop()


def queued_behind_blocker(stack, sample_png, requests: list[dict]) -> list[str]:
    """Submit `requests` while a blocker job runs; returns their ids, oldest first."""
    client = stack.client()
    blocker = client.submit(sample_png, "blocker", **BLOCKER)
    wait_for_job(client, blocker.id, lambda j: j.status == "running", what="running")
    ids = [client.submit(sample_png, **request).id for request in requests]
    assert client.get(blocker.id).status == "running", "the blocker ended before the batch was queued"
    return ids


def batch_lines(stack) -> list[list[str]]:
    """The job ids of every batch the worker ran, leader first, from its log."""
    log = stack.workers[0].log_path.read_text()
    return [ids.split(", ") for ids in re.findall(r"batch of \d+ jobs led by \S+: (.*)", log)]


def audio(stack, job) -> np.ndarray:
    with stack.http() as http:  # relative to the API for the local store
        data = http.get(job.result["url"]).content
    return sf.read(io.BytesIO(data), dtype="int16")[0]


def test_worker_warms_up_before_taking_jobs(batching_stack):
    log = batching_stack.workers[0].log_path.read_text()
    shapes = r"batch sizes \[1, 2\] x seconds \[0.5\] x caption tokens \[32, 128\]"
    assert re.search(rf"warmed up over 4 calls \({shapes}\) in [\d.]+ s", log)


def test_warming_up_workers_do_not_make_the_service_ready(redis_port):
    from redis import Redis

    redis = Redis(port=redis_port, db=9)
    write_heartbeat(redis, "cold", {"queues": ["q"], "warming_up": True}, ttl_seconds=30)
    check, available = check_workers(redis, "q")
    assert not check.ok and "1 worker(s) warming up" in check.detail and available == 0
    write_heartbeat(redis, "warm", {"queues": ["q"], "warming_up": False}, ttl_seconds=30)
    check, available = check_workers(redis, "q")
    assert check.ok and available == 1
    redis.flushdb()


def test_queued_jobs_share_batches_and_the_oldest_always_leads(batching_stack, sample_png):
    # a, c and e share a shape; b and d share another: two batches, each led by the oldest job left
    other = {"seconds": 0.5, "steps": 2}
    shapes = [SHAPE, other, SHAPE, other, SHAPE]
    requests = [{"caption": f"job {i}", "seed": 10 + i, "guidance_scale": 2.0 + i, "image_strength": i / 4, **shape}
                for i, shape in enumerate(shapes)]  # each row its own guidance and strength
    a, b, c, d, e = ids = queued_behind_blocker(batching_stack, sample_png, requests)
    client = batching_stack.client()
    jobs = [client.wait(job_id, timeout=180) for job_id in ids]
    assert all(job.status == "succeeded" for job in jobs), [job.raw for job in jobs]
    assert len({job.result["sha256"] for job in jobs}) == 5  # each its own clip
    assert [a, c, e] in batch_lines(batching_stack) and [b, d] in batch_lines(batching_stack)

    redis = batching_stack.redis
    for job_id in ids:  # RQ's own records agree (a moment after the job's ending): finished, with a result
        rq_job = wait_until(lambda job_id=job_id: (job := fetch_job(redis, job_id)).get_status() == "finished" and job,
                            timeout=10, what=f"RQ finishing {job_id}")  # fmt: skip
        assert rq_job.return_value()["key"].endswith(f"{job_id}.wav")
    queue_name = batching_stack.env.get("MELFUSION_QUEUE_NAME", "melfusion")
    assert set(ids) <= set(FinishedJobRegistry(queue_name, connection=redis).get_job_ids())
    assert not set(ids) & set(StartedJobRegistry(queue_name, connection=redis).get_job_ids())


def test_an_undecodable_image_fails_only_its_own_job(batching_stack, sample_png):
    requests = [{"caption": f"row {i}", **SHAPE} for i in range(3)]
    good, bad, other = ids = queued_behind_blocker(batching_stack, sample_png, requests)
    (Path(batching_stack.env["MELFUSION_STORAGE_DIR"]) / "inputs" / f"{bad}.png").write_bytes(b"not an image")
    client = batching_stack.client()
    jobs = {job_id: client.wait(job_id, timeout=180) for job_id in ids}
    assert ids in batch_lines(batching_stack)
    assert jobs[good].status == jobs[other].status == "succeeded"
    assert jobs[bad].status == "failed" and jobs[bad].error["code"] == "invalid_input"
    queue_name = batching_stack.env.get("MELFUSION_QUEUE_NAME", "melfusion")
    assert bad in FailedJobRegistry(queue_name, connection=batching_stack.redis).get_job_ids()


def test_a_canceled_job_leaves_the_batch_and_the_others_go_on(batching_stack, sample_png):
    requests = [{"caption": f"long {i}", "seed": i, **LONG} for i in range(3)]
    ids = queued_behind_blocker(batching_stack, sample_png, requests)
    client = batching_stack.client()
    for job_id in ids:
        wait_for_job(client, job_id, lambda j: j.status == "running" and j.progress > 0, what="running", timeout=180)
    queue_name = batching_stack.env.get("MELFUSION_QUEUE_NAME", "melfusion")
    started = StartedJobRegistry(queue_name, connection=batching_stack.redis).get_job_ids()
    assert set(ids) <= set(started)  # every job of a running batch is visibly started (recoverable if it dies)

    client.cancel(ids[1])
    canceled = wait_for_job(client, ids[1], lambda j: j.status == "canceled", what="canceled", timeout=30)
    assert 0 < canceled.progress < 1 and canceled.error["code"] == "canceled"
    assert [client.get(job_id).status for job_id in (ids[0], ids[2])] == ["running", "running"]
    finished = [client.wait(job_id, timeout=300) for job_id in (ids[0], ids[2])]
    assert [job.status for job in finished] == ["succeeded", "succeeded"]
    assert ids in batch_lines(batching_stack)


def test_a_seed_gives_the_same_clip_alone_and_batched(batching_stack, sample_png):
    client = batching_stack.client()
    request = {"caption": "same seed", "seed": 1234, **SHAPE}
    alone = client.wait(client.submit(sample_png, **request).id, timeout=120)
    partner = {"caption": "another row", "seed": 99, **SHAPE}
    ids = queued_behind_blocker(batching_stack, sample_png, [partner, request])
    batched = [client.wait(job_id, timeout=180) for job_id in ids][1]
    assert ids in batch_lines(batching_stack)
    # Within one 16-bit step: CPU kernels may round a batch of 2 differently from a batch of 1 (the engine's
    # own tolerance for a batch item vs the same request alone is 1e-4 on the float waveform).
    assert np.abs(audio(batching_stack, alone).astype(int) - audio(batching_stack, batched)).max() <= 2


def test_image_passes_reach_the_pipeline_and_keep_apart_in_batches(batching_stack, sample_png):
    client = batching_stack.client()
    full = {"caption": "image passes", "seed": 7, **SHAPE}
    coarse, explicit = {**full, "image_steps": 1}, {**full, "image_steps": SHAPE["steps"]}
    ids = queued_behind_blocker(batching_stack, sample_png, [full, coarse, explicit])
    jobs = [client.wait(job_id, timeout=180) for job_id in ids]
    assert [job.params["image_steps"] for job in jobs] == [3, 1, 3]
    assert [ids[0], ids[2]] in batch_lines(batching_stack)  # the coarse grid cannot share their call
    assert [ids[1]] in batch_lines(batching_stack)  # alone: a batch of one
    clips = [audio(batching_stack, job).astype(int) for job in jobs]
    assert np.array_equal(clips[0], clips[2])  # one image pass per step is the default
    assert np.abs(clips[1] - clips[0]).max() > 2  # one image pass for three steps is another clip


def test_clips_of_the_trained_length_longer_ones_and_loops_share_one_batch(batching_stack, sample_png):
    """The tiny bundle's window is 10 s: a 10 s clip, a 12 s clip (two windows) and a 3 s loop (two circular
    windows) all meet the UNet as 10 s windows, so the worker runs them as one batch; each keeps its length."""
    shapes = [{"seconds": 10.0}, {"seconds": 12.0}, {"seconds": 3.0, "loop": True}]
    requests = [{"caption": f"row {i}", "steps": 2, "seed": 30 + i, **shape} for i, shape in enumerate(shapes)]
    ids = queued_behind_blocker(batching_stack, sample_png, requests)
    client = batching_stack.client()
    jobs = [client.wait(job_id, timeout=300) for job_id in ids]
    assert all(job.status == "succeeded" for job in jobs), [job.raw for job in jobs]
    assert ids in batch_lines(batching_stack)
    assert [job.result["seconds"] for job in jobs] == [10.0, 12.0, 3.0]
