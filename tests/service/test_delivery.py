"""Format, loudness and loops through the real service (API, Redis, worker, local storage): what a job asks
for is what the download is, with the right content type, at the asked loudness."""

from __future__ import annotations

import io

import pytest
import soundfile as sf
from servers import ALICE

from melfusion.mastering import TRUE_PEAK_CEILING_DBTP, integrated_loudness, true_peak_dbtp

STEPS = 2


def download(stack, job) -> tuple[bytes, str]:
    with stack.http(ALICE) as http:
        response = http.get(job.result["url"])
    assert response.status_code == 200, response.text
    return response.content, response.headers["content-type"]


@pytest.mark.parametrize(("format", "content_type", "rate"), [("mp3", "audio/mpeg", 32000), ("flac", "audio/flac", 16000),
                                                          ("opus", "audio/ogg; codecs=opus", 48000)])  # fmt: skip
def test_a_job_is_delivered_in_its_format_at_its_loudness(local_stack, sample_png, format, content_type, rate):
    client = local_stack.client(ALICE)
    job = client.submit(sample_png, "calm piano", seconds=2.0, steps=STEPS, seed=1, format=format, loudness_lufs=-18.0)
    job = client.wait(job.id, timeout=180)
    assert job.status == "succeeded", job.raw
    assert (job.result["format"], job.result["content_type"]) == (format, content_type)
    assert job.raw["params"]["loudness_lufs"] == -18.0
    data, served_as = download(local_stack, job)
    assert served_as == content_type and len(data) == job.result["bytes"]
    with local_stack.http(ALICE) as http:  # /jobs/{id}/audio streams the same file, with the same type
        audio = http.get(f"/jobs/{job.id}/audio")
    assert (audio.content, audio.headers["content-type"]) == (data, content_type)
    waveform, decoded_rate = sf.read(io.BytesIO(data))
    assert decoded_rate == rate and abs(waveform.size / rate - 2.0) < 0.1
    assert abs(integrated_loudness(waveform, rate) - (-18.0)) <= 1.0


def test_loudness_off_keeps_the_generated_level_and_the_default_is_minus_14(local_stack, sample_png):
    client = local_stack.client(ALICE)
    common = {"seconds": 1.5, "steps": STEPS, "seed": 2}
    off = client.wait(client.submit(sample_png, "calm piano", loudness_lufs=None, **common).id, timeout=180)
    default = client.wait(client.submit(sample_png, "calm piano", **common).id, timeout=180)
    assert off.raw["params"]["loudness_lufs"] is None and default.raw["params"]["loudness_lufs"] == -14.0
    quiet = sf.read(io.BytesIO(download(local_stack, off)[0]))[0]
    normalised = sf.read(io.BytesIO(download(local_stack, default)[0]))[0]
    assert abs(integrated_loudness(normalised, 16000) - (-14.0)) <= 1.0
    assert true_peak_dbtp(normalised, 16000) <= TRUE_PEAK_CEILING_DBTP + 0.05
    assert integrated_loudness(quiet, 16000) < -20  # the tiny random model is quiet; off leaves it so


def test_a_long_clip_and_a_loop_through_the_service(local_stack, sample_png):
    """The tiny bundle was 'trained' on 10 s: 12 s runs as two windows; a 3 s loop lasts 75 frames of 40 ms."""
    client = local_stack.client(ALICE)
    long = client.submit(sample_png, "calm piano", seconds=12.0, steps=STEPS, seed=3, format="wav")
    loop = client.submit(sample_png, "drum loop", seconds=3.01, steps=STEPS, seed=4, loop=True, format="flac")
    long, loop = client.wait(long.id, timeout=300), client.wait(loop.id, timeout=300)
    assert long.status == loop.status == "succeeded", (long.raw, loop.raw)
    assert long.result["seconds"] == 12.0 and loop.raw["params"]["loop"] is True
    looped = sf.read(io.BytesIO(download(local_stack, loop)[0]))[0]
    assert looped.size == 75 * 640  # whole latent frames, so the loop period is exact
    steps = abs(looped[1:] - looped[:-1])
    assert abs(looped[0] - looped[-1]) <= 3 * steps.mean()  # no fade, no click at the wrap


@pytest.mark.parametrize(("field", "value"), [("format", "aiff"), ("loudness_lufs", "loud"), ("loudness_lufs", "0"),
                                              ("loop", "maybe")])  # fmt: skip
def test_bad_delivery_fields_are_422_naming_the_field(local_stack, sample_png, field, value):
    with local_stack.http(ALICE) as http:
        response = http.post("/jobs", data={"caption": "x", field: value},
                             files={"image": ("s.png", sample_png, "image/png")})  # fmt: skip
    assert response.status_code == 422, response.text
    assert response.json()["error"]["field"] == field


def test_the_form_documents_the_delivery_fields(local_stack):
    with local_stack.http(ALICE) as http:
        schema = http.get("/openapi.json").json()["components"]["schemas"]["JobCreate"]["properties"]
    assert set(schema["format"]["anyOf"][0]["enum"]) == {"wav", "flac", "ogg", "opus", "mp3"}
    assert "LUFS" in schema["loudness_lufs"]["description"] and "loop" in schema
