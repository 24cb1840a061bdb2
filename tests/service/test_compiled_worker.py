"""MELFUSION_COMPILE_MODE=check through a real worker process: warm-up traces every warmed shape with dynamo
(eager backend: no C++ compile), after which any new graph is an error that fails its job. Varied traffic
(new, repeated and no photos, strength 0, captions of 2-60 words, CFG on and off, a clip shorter than its
bucket) must all succeed on the warmed graphs; a caption past the last bucket fails loudly."""

from __future__ import annotations

import io
import random
import re
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image
from servers import launch_stack, wait_for_job

WORDS = ("calm happy sad upbeat slow fast piano guitar drums bass violin strings synth beat melody rhythm jazz "
         "rock pop ambient electronic orchestral acoustic soft loud dreamy epic sunset beach city night").split()  # fmt: skip
SHAPE = {"seconds": 0.5, "steps": 2}


@pytest.fixture(scope="module")
def check_stack(workdir, redis_port, tiny_bundle):
    # Batch sizes 1, 2, 4 (music-UNet rows 2, 4, 8 with or without CFG), clips up to 0.5 s, captions up
    # to 64 tokens: 3 music-UNet and 3 image-UNet graphs, traced before the worker says it is ready.
    stack = launch_stack("compile-check", workdir=workdir, redis_port=redis_port, db=14, bundle=tiny_bundle,
                         storage_dir=workdir / "check-storage", compile_mode="check", warmup_batch_sizes="1,2,4",
                         warmup_seconds="0.5", warmup_caption_tokens="64", max_batch=4, batch_wait_ms=50,
                         ready_timeout=900)  # fmt: skip
    yield stack
    stack.stop()


def photo(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (72, 96, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def traffic() -> list[tuple[bytes, dict]]:
    """16 requests: 8 new photos, 4 uploads of one other photo, strength 0 in 4 (photos of their own),
    captions of 2 to 60 words, guidance 1 (no CFG) to 12, strengths, seeds, and one 0.3 s clip."""
    rng = random.Random(16)
    lengths = [2, 60, 5, 9, 14, 20, 27, 33, 40, 47, 52, 56, 3, 11, 30, 60]
    requests = []
    for i, words in enumerate(lengths):
        fields = {
            "caption": " ".join(rng.choice(WORDS) for _ in range(words)),
            "seed": 1000 + i,
            "guidance_scale": [1.0, 2.5, 7.0, 12.0][i % 4],
            "image_strength": 0.0 if i % 4 == 3 else [1.0, 0.3, 0.7][i % 3],
            **SHAPE,
        }
        requests.append((photo(100) if i % 4 == 1 else photo(i), fields))
    requests[-1][1]["seconds"] = 0.3  # cut from the 0.5 s bucket
    return requests


def test_varied_traffic_stays_on_the_warmed_graphs(check_stack):
    worker = check_stack.workers[0]
    assert "compiled 6 graphs (both UNets) before taking jobs" in worker.log_path.read_text()
    client = check_stack.client()
    blocker = client.submit(photo(99), "blocker", seconds=0.5, steps=60)  # queue the traffic behind it
    wait_for_job(client, blocker.id, lambda j: j.status == "running", what="running", timeout=120)
    with ThreadPoolExecutor(8) as pool:
        ids = list(pool.map(lambda request: client.submit(request[0], **request[1]).id, traffic()))
    jobs = [client.wait(job_id, timeout=600) for job_id in [blocker.id, *ids]]
    assert all(job.status == "succeeded" for job in jobs), [job.raw for job in jobs if job.status != "succeeded"]
    assert jobs[-1].result["seconds"] == pytest.approx(0.3)

    log = worker.log_path.read_text()
    batches = [int(size) for size in re.findall(r"batch of (\d+) jobs", log)]
    assert max(batches) == 4 and sum(batches) == len(jobs)
    for miss in ("RecompileError", "compiled after warm-up", "outside the warmed shapes"):
        assert miss not in log
    with check_stack.http() as http:
        assert "melfusion_compile_misses_total{" not in http.get("/metrics").text

    # A caption past the last bucket (70 words, 71 tokens) misses: counted, logged, and in check mode an error.
    missed = client.wait(client.submit(photo(0), " ".join(["piano"] * 70), **SHAPE).id, timeout=300)
    assert missed.status == "failed" and missed.error["code"] == "internal_error"
    assert "caption_tokens outside the warmed shapes (71 tokens, warmed (64,))" in worker.log_path.read_text()
    with check_stack.http() as http:
        assert 'melfusion_compile_misses_total{what="caption_tokens"} 1.0' in http.get("/metrics").text
