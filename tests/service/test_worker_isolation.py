"""One bad row fails one job, and results are written off the generating thread.

A MelFusionWorker runs in this process (real Redis, API, local storage, tiny pipeline), so that faults can
be injected where a device raises them, with hooks on the real modules and no stand-in model: T5 turning
one caption's states into NaN (as float16 overflow does), the music UNet raising torch's
OutOfMemoryError above a number of rows (as a full GPU does), a store that takes a second per upload.
"""

from __future__ import annotations

import datetime as dt
import json
import signal
import threading
import time

import pytest
import torch
from rq.serializers import JSONSerializer
from servers import SAMPLE_IMAGE, launch_stack

from jobs.lifecycle import EVENTS_CHANNEL
from jobs.queue import open_queue, open_redis
from jobs.settings import load_settings
from jobs.storage import open_storage
from workers.warm import Runtime, install_runtime
from workers.worker import MelFusionWorker

SHAPE = {"seconds": 0.5, "steps": 2, "guidance_scale": 3.0}


@pytest.fixture(scope="module")
def api_only(workdir, redis_port, tiny_bundle):
    stack = launch_stack("isolation", workdir=workdir, redis_port=redis_port, db=15, bundle=tiny_bundle,
                         storage_dir=workdir / "isolation-storage", with_worker=False, max_batch=4,
                         batch_wait_ms=50)  # fmt: skip
    yield stack
    stack.stop()


def run_worker_here(stack, monkeypatch, caplog, prepare=lambda runtime: None) -> str:
    """Run a worker in this process until the queue is empty, after `prepare(runtime)`; returns its log."""
    for name, value in stack.env.items():
        if name.startswith("MELFUSION_"):
            monkeypatch.setenv(name, value)
    settings = load_settings()
    runtime = Runtime(settings=settings, storage=open_storage(settings))
    prepare(runtime)
    install_runtime(runtime)
    redis = open_redis(settings)
    worker = MelFusionWorker([open_queue(redis, settings)], connection=redis, serializer=JSONSerializer,
                             runtime=runtime)  # fmt: skip
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with caplog.at_level("INFO"):
            worker.work(burst=True)
    finally:
        for sig, handler in handlers.items():  # RQ installs its own
            signal.signal(sig, handler)
    return caplog.text


def submit(stack, captions: list[str], **fields) -> list[str]:
    client = stack.client()
    request = {**SHAPE, **fields}
    return [client.submit(SAMPLE_IMAGE, caption, seed=i, **request).id for i, caption in enumerate(captions)]


def test_a_row_with_nan_fails_only_its_job_naming_the_component(api_only, monkeypatch, caplog):
    party = None

    def overflow_on_party(runtime):
        """T5 overflows (NaN) on captions holding the word "party", as float16 T5 did before `wo` stayed float32."""
        nonlocal party
        pipe = runtime.get_pipeline()
        party = pipe.tokenizer.convert_tokens_to_ids("▁party")

        def hook(module, args, kwargs, output):
            output[0][(kwargs["input_ids"] == party).any(1)] = float("nan")

        pipe.text_encoder.register_forward_hook(hook, with_kwargs=True)

    ids = submit(api_only, ["calm piano", "happy party drums", "rainy jazz", "soft guitar"])
    log = run_worker_here(api_only, monkeypatch, caplog, overflow_on_party)
    assert "batch of 4 jobs" in log
    client = api_only.client()
    jobs = [client.get(job_id) for job_id in ids]
    assert [job.status for job in jobs] == ["succeeded", "failed", "succeeded", "succeeded"], [j.raw for j in jobs]
    assert jobs[1].error["code"] == "non_finite_output"
    assert "text_encoder" in jobs[1].error["message"]


def test_out_of_memory_splits_the_batch_and_a_row_too_large_alone_fails(api_only, monkeypatch, caplog):
    limit = {"rows": 2}

    def device_of_two_rows(runtime):
        """The music UNet raises what torch raises on a full device when a call has more rows than `limit`."""

        def hook(module, args):
            if args[0].shape[0] > limit["rows"]:
                raise torch.OutOfMemoryError(f"out of memory: {args[0].shape[0]} rows (device holds {limit['rows']})")

        runtime.get_pipeline().music_unet.register_forward_pre_hook(hook)

    ids = submit(api_only, ["calm piano", "happy drums", "rainy jazz", "soft guitar"])  # 8 UNet rows with CFG
    log = run_worker_here(api_only, monkeypatch, caplog, device_of_two_rows)
    assert "batch of 4 jobs" in log
    assert log.count("ran out of device memory; running its halves") == 3  # 4 -> 2 + 2 -> 1 + 1 + 1 + 1
    client = api_only.client()
    assert [client.get(job_id).status for job_id in ids] == ["succeeded"] * 4

    limit["rows"] = 1  # now even one row with CFG (2 UNet rows) is too much; one without CFG fits
    too_large, fits = submit(api_only, ["calm piano"]) + submit(api_only, ["rainy jazz"], guidance_scale=1.0)
    run_worker_here(api_only, monkeypatch, caplog, device_of_two_rows)
    failed = client.get(too_large)
    assert failed.status == "failed" and failed.error["code"] == "out_of_memory"
    assert client.get(fits).status == "succeeded"


def test_results_are_written_off_the_generating_thread_in_order(api_only, monkeypatch, caplog):
    writes = []

    def slow_store(runtime):
        """A store a second away (as a distant S3): the next batch must not wait for it."""
        put = runtime.storage.put

        def slow_put(key, data, *, content_type):
            if key.startswith("outputs/"):
                time.sleep(1.0)
                writes.append((key, threading.current_thread().name, time.time()))
            put(key, data, content_type=content_type)

        runtime.storage.put = slow_put

    first = submit(api_only, ["calm piano", "happy drums"])
    second = submit(api_only, ["rainy jazz", "soft guitar"], steps=3)  # another batch key: the next batch
    listener = api_only.redis.pubsub()
    listener.subscribe(EVENTS_CHANNEL)  # every announced change, in the order it was published
    run_worker_here(api_only, monkeypatch, caplog, slow_store)
    announced = []
    while (message := listener.get_message(timeout=1.0)) is not None:  # the subscription's confirmation first
        if message["type"] == "message":
            announced.append(json.loads(message["data"]))
    listener.close()
    client = api_only.client()
    jobs = {job_id: client.get(job_id) for job_id in first + second}
    assert all(job.status == "succeeded" for job in jobs.values()), [job.raw for job in jobs.values()]
    assert {thread for _, thread, _ in writes} == {"result-writer"} and len(writes) == 8  # WAV + PNG per job
    # The second batch started before the first batch's results were all stored.
    last_write_of_first = max(at for key, _, at in writes if any(job_id in key for job_id in first))
    started = min(dt.datetime.fromisoformat(jobs[job_id].raw["started_at"]).timestamp() for job_id in second)
    assert started < last_write_of_first
    for job_id in first + second:  # per job: start, progress never backwards, then the outcome, last
        events = [record for record in announced if record["id"] == job_id]
        kinds = [record["event"] for record in events]
        assert kinds[0] == "start" and kinds[-1] == "completed" and kinds.count("completed") == 1, kinds
        progress = [record["progress"] for record in events]
        assert progress == sorted(progress)
