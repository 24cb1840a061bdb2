"""A distilled student bundle through the real service: a worker serves and batches its few-step jobs, the API
states its samplers and bounds, and what only a teacher serves is refused by name."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from servers import launch_stack, wait_for_job

from melfusion.bundle import load_pipeline
from melfusion.student import student_unet_from
from melfusion.training.distill import write_student_bundle

BLOCKER = {"seconds": 30.0, "steps": 8}  # the student's longest job: keeps the worker busy while others queue


@pytest.fixture(scope="module")
def student_bundle(tiny_bundle, tmp_path_factory) -> Path:
    """An undistilled student of the tiny bundle (its UNet with a zero guidance input): a real student bundle
    in seconds; what distillation makes of it is tests/train_eval/test_distill.py's business."""
    teacher = load_pipeline(tiny_bundle)
    return write_student_bundle(tiny_bundle, student_unet_from(teacher.music_unet), tmp_path_factory.mktemp("student") / "bundle",
                                teacher_steps=40, default_steps=4, max_steps=8, origin={"teacher": {"bundle": str(tiny_bundle)},
                                        "distillation": {"steps": 0}})  # fmt: skip


@pytest.fixture(scope="module")
def student_stack(workdir, redis_port, student_bundle):
    stack = launch_stack("student", workdir=workdir, redis_port=redis_port, db=14, bundle=student_bundle,
                         storage_dir=workdir / "student-storage", max_batch=4, batch_wait_ms=20)  # fmt: skip
    yield stack
    stack.stop()


def test_a_worker_serves_and_batches_a_students_few_step_jobs(student_stack, sample_png):
    client = student_stack.client()
    blocker = client.submit(sample_png, "blocker", **BLOCKER)
    wait_for_job(client, blocker.id, lambda j: j.status == "running", what="running")
    requests = [{"caption": "calm piano", "seed": 1, "guidance_scale": 2.0},
                {"caption": "rainy jazz", "seed": 2, "guidance_scale": 7.0, "image_strength": 0.5},
                {"caption": "upbeat drums", "seed": 3, "preset": "fast"}]  # fmt: skip
    ids = [client.submit(sample_png, seconds=0.5, **request).id for request in requests]
    assert client.get(blocker.id).status == "running", "the blocker ended before the jobs were queued"
    jobs = [client.wait(job_id, timeout=180) for job_id in ids]
    assert all(job.status == "succeeded" for job in jobs), [job.raw for job in jobs]
    assert [(job.params["scheduler"], job.params["steps"]) for job in jobs] == [("tcd", 4)] * 3  # the student's own
    log = student_stack.workers[0].log_path.read_text()
    batches = [found.split(", ") for found in re.findall(r"batch of \d+ jobs led by \S+: (.*)", log)]
    assert ids in batches  # other guidance scales, one call: guidance is an input, not a CFG batch
    assert client.wait(blocker.id, timeout=180).status == "succeeded"


def test_the_api_states_and_checks_a_students_samplers_and_bounds(student_stack, sample_png):
    with student_stack.http() as http:
        form = http.get("/openapi.json").json()["components"]["schemas"]["JobCreate"]["properties"]
        assert form["scheduler"]["anyOf"][0]["enum"] == ["tcd", "lcm"]
        assert form["steps"]["anyOf"][0]["maximum"] == 8
        refusals = [({"preset": "paper"}, "preset", "needs a teacher bundle"),
                    ({"scheduler": "ddim"}, "scheduler", ""),
                    ({"steps": "50"}, "steps", ""),
                    ({"guidance_end": "0.5"}, "guidance_end", "no CFG batch")]  # fmt: skip
        for fields, field, words in refusals:
            response = http.post("/jobs", data={"caption": "x", **fields}, files={"image": ("i.png", sample_png)})
            assert response.status_code == 422, (fields, response.text)
            error = response.json()["error"]
            assert error["field"] == field and words in error["message"], (fields, error)
