"""The request fields through the real service (API, queue, worker, storage): caption-only and image-only
jobs, negative_caption, num_outputs, expires_in, the Cancel-After header, and a job queued by an older API."""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import time

import httpx
import numpy as np
import soundfile as sf
from rq import Queue
from rq.serializers import JSONSerializer
from servers import ALICE, wait_for_job

from jobs.queue import TASK

FAST = {"seconds": 0.5, "steps": 2, "guidance_scale": 3.0}
PCM_STEP = 2 / 32768  # two 16-bit quantisation steps: batch rows agree within ~1e-7 before rounding


def fetch_audio(client, job, index: int = 0) -> np.ndarray:
    url = httpx.URL(client.http.base_url).join(job.outputs[index]["url"])
    data = httpx.get(url, follow_redirects=True).content
    assert hashlib.sha256(data).hexdigest() == job.outputs[index]["sha256"]
    return sf.read(io.BytesIO(data))[0]


def test_caption_only_and_image_only_jobs_succeed(local_stack, sample_png):
    client = local_stack.client(ALICE)
    caption_only = client.submit(caption="calm piano", seed=5, **FAST)
    image_only = client.submit(sample_png, seed=5, **FAST)
    both = client.submit(sample_png, "calm piano", seed=5, **FAST)
    jobs = [client.wait(job.id, timeout=180) for job in (caption_only, image_only, both)]
    assert [job.status for job in jobs] == ["succeeded"] * 3, [job.raw for job in jobs]
    assert jobs[0].params["caption"] == "calm piano" and jobs[1].params["caption"] is None
    assert len({job.result["sha256"] for job in jobs}) == 3  # each condition is heard


def test_num_outputs_are_seeded_variations_in_one_job(local_stack, sample_png):
    client = local_stack.client(ALICE)
    several = client.submit(sample_png, "strings", seed=40, num_outputs=3, **FAST)
    alone = client.submit(sample_png, "strings", seed=41, **FAST)  # what the second output must match
    several, alone = client.wait(several.id, timeout=180), client.wait(alone.id, timeout=180)
    assert several.status == alone.status == "succeeded", several.raw
    assert len(several.outputs) == 3 and several.result == several.outputs[0]
    assert len({output["sha256"] for output in several.outputs}) == 3
    assert several.params["num_outputs"] == 3 and several.params["seed"] == 40
    second, reference = fetch_audio(client, several, 1), fetch_audio(client, alone)
    assert np.abs(second - reference).max() <= PCM_STEP


def test_negative_caption_replaces_the_unconditional_caption(local_stack):
    client = local_stack.client(ALICE)
    plain = client.submit(caption="warm pads", seed=9, **FAST)
    negative = client.submit(caption="warm pads", negative_caption="drums", seed=9, **FAST)
    plain, negative = client.wait(plain.id, timeout=180), client.wait(negative.id, timeout=180)
    assert plain.status == negative.status == "succeeded"
    assert negative.params["negative_caption"] == "drums"
    assert np.abs(fetch_audio(client, plain) - fetch_audio(client, negative)).max() > 10 * PCM_STEP


def test_expires_in_sets_when_the_job_and_its_links_end(local_stack):
    client = local_stack.client(ALICE)
    job = client.wait(client.submit(caption="brief", expires_in=4, **FAST).id, timeout=180)
    assert job.status == "succeeded", job.raw
    finished = dt.datetime.fromisoformat(job.raw["finished_at"])
    expires = dt.datetime.fromisoformat(job.raw["expires_at"])
    assert expires - finished == dt.timedelta(seconds=4)
    assert dt.datetime.fromisoformat(job.result["expires_at"]) <= expires  # no link outlives the job
    time.sleep(max(0.0, (expires - dt.datetime.now(dt.UTC)).total_seconds()) + 1.0)
    with local_stack.http(ALICE) as http:
        assert http.get(f"/jobs/{job.id}").status_code == 404
        assert http.get(job.result["url"]).status_code == 403  # the signed link has expired too
    default = client.wait(client.submit(caption="kept", **FAST).id, timeout=180)
    kept = dt.datetime.fromisoformat(default.raw["expires_at"]) - dt.datetime.fromisoformat(default.raw["finished_at"])
    assert kept == dt.timedelta(seconds=86_400)  # MELFUSION_JOB_TTL_SECONDS


def test_cancel_after_aborts_a_job_not_started_and_cancels_a_running_one(local_stack, sample_png):
    client = local_stack.client(ALICE)
    running = client.submit(sample_png, "a long one", seconds=1.0, steps=1000, cancel_after="6s")
    wait_for_job(client, running.id, lambda j: j.status == "running" and j.progress > 0, what="running")
    waiting = client.submit(caption="waits behind it", cancel_after=0.5, **FAST)
    canceled = wait_for_job(client, running.id, lambda j: j.is_done, what="ended", timeout=60)
    assert canceled.status == "canceled" and 0 < canceled.progress < 1, canceled.raw
    assert "Cancel-After" in canceled.error["message"]
    created, finished = (dt.datetime.fromisoformat(canceled.raw[name]) for name in ("created_at", "finished_at"))
    assert dt.timedelta(seconds=5.5) <= finished - created < dt.timedelta(seconds=30)  # created: just after the deadline
    aborted = client.wait(waiting.id, timeout=60)
    assert aborted.status == "aborted" and aborted.error["code"] == "aborted", aborted.raw
    assert aborted.raw["started_at"] is None and aborted.raw["attempts"] == 0  # a worker took it; it never ran
    assert aborted.progress == 0 and aborted.result is None
    in_time = client.wait(client.submit(caption="in time", cancel_after="10m", **FAST).id, timeout=180)
    assert in_time.status == "succeeded"
    with local_stack.http(ALICE) as http:
        for bad in ("soon", "-5s", "0", "5x"):
            answer = http.post("/jobs", files={"caption": (None, "x")}, headers={"Cancel-After": bad})
            assert answer.status_code == 422 and answer.json()["error"]["field"] == "Cancel-After", bad


def test_a_job_queued_by_an_older_api_runs(local_stack):
    """A payload from before image_steps, negative_caption and num_outputs (and with no photo key change):
    the worker gives each missing field its declared default."""
    owner = hashlib.sha256(ALICE.encode()).hexdigest()[:24]  # as service.deps.get_owner digests the key
    old_params = {"caption": "from the old API", "seconds": 0.5, "steps": 2, "guidance_scale": 3.0,
                  "image_strength": 1.0, "image_guidance": "conditional", "scheduler": "ddim", "seed": 3,
                  "preset": None}  # fmt: skip
    queue = Queue("melfusion", connection=local_stack.redis, serializer=JSONSerializer)
    job = queue.enqueue_call(TASK, kwargs={"image_key": None, "params": old_params}, result_ttl=600,
                             meta={"owner": owner, "progress": 0.0, "max_retries": 0})  # fmt: skip
    done = local_stack.client(ALICE).wait(job.id, timeout=180)
    assert done.status == "succeeded", done.raw
    assert len(done.outputs) == 1 and done.params["caption"] == "from the old API"
