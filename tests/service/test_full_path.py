"""POST -> 202 -> poll -> succeeded -> download a valid WAV whose sha256 the job reported, for both stores."""

from __future__ import annotations

import hashlib
import io

import httpx
import pytest
import soundfile as sf
from servers import ALICE, S3_BUCKET

SECONDS, STEPS = 1.0, 3


@pytest.fixture(params=["local", "s3"])
def stack_and_key(request):
    if request.param == "local":
        return request.getfixturevalue("local_stack"), ALICE
    return request.getfixturevalue("s3_stack"), None


def test_full_path(stack_and_key, sample_png, tmp_path):
    stack, api_key = stack_and_key
    with stack.http(api_key) as http:
        response = http.post(
            "/jobs",
            data={"caption": "calm piano at sunset", "seconds": str(SECONDS), "steps": str(STEPS), "image_guidance": "both",
                  "preset": "tango"},
            files={"image": ("sample.png", sample_png, "image/png")},
        )
    assert response.status_code == 202, response.text
    created = response.json()
    assert response.headers["Location"] == f"/jobs/{created['id']}"
    assert created["status"] in ("queued", "running")
    assert created["params"]["seed"] >= 0  # chosen by the service and echoed
    assert created["params"]["image_guidance"] == "both"
    assert {name: created["params"][name] for name in ("preset", "scheduler", "guidance_scale", "steps")} == {
        "preset": "tango", "scheduler": "ddpm", "guidance_scale": 3.0, "steps": STEPS}  # own steps beat the preset's

    client = stack.client(api_key)
    seen = []
    job = client.wait(created["id"], timeout=120, poll_seconds=0.05, on_progress=seen.append)
    assert job.status == "succeeded", job.raw
    assert [j.progress for j in seen] == sorted(j.progress for j in seen)
    assert job.progress == 1.0
    assert job.raw["started_at"] and job.raw["finished_at"] and job.error is None
    assert job.result["content_type"] == "audio/wav" and job.result["sample_rate"] == 16000
    if api_key is not None:  # local store, no MELFUSION_PUBLIC_URL: relative, never the client's Host header
        assert job.result["url"].startswith("/files/outputs/")

    path = client.download(job, tmp_path / "clip.wav")
    data = path.read_bytes()
    assert hashlib.sha256(data).hexdigest() == job.result["sha256"]
    assert len(data) == job.result["bytes"]
    waveform, rate = sf.read(io.BytesIO(data))
    assert rate == 16000 and len(waveform) == round(SECONDS * 16000)

    # /jobs/{id}/audio gives the same bytes: streamed from the local store, redirected to S3
    with stack.http(api_key) as http:
        audio = http.get(f"/jobs/{job.id}/audio")
        if api_key is None:
            assert audio.status_code == 307
            assert audio.headers["location"].startswith(
                stack.env["MELFUSION_S3_PUBLIC_ENDPOINT_URL"] + f"/{S3_BUCKET}/"
            )
            audio = httpx.get(audio.headers["location"])
        assert audio.status_code == 200
        assert audio.headers["content-type"] == "audio/wav"
        assert hashlib.sha256(audio.content).hexdigest() == job.result["sha256"]

        metrics = http.get("/metrics").text
    assert 'melfusion_jobs_finished_total{status="succeeded"}' in metrics
    assert "melfusion_queue_wait_seconds_count" in metrics and "melfusion_run_seconds_bucket" in metrics
