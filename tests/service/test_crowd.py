"""One API process under a crowd: 300 event streams and 120 `Prefer: wait` requests at once, all served
from its one job-events subscription, with /livez answering meanwhile and the per-caller cap answering
429; /readyz among a million unrelated Redis keys; a `completed` webhook that is the final job even while
RQ has not recorded the end yet."""

from __future__ import annotations

import asyncio
import json
import statistics
import time

import httpx
import pytest
from rq import Queue
from servers import ALICE, BOB, SAMPLE_IMAGE, WEBHOOK_SECRET, Receiver, launch_stack, wait_until

from bench.load import probe_livez
from jobs.heartbeat import write_heartbeat
from jobs.lifecycle import announce
from jobs.queue import JobStatus, fetch_job

STREAMS, WAITS, STREAM_JOBS = 300, 120, 10
SHORT = {"caption": "crowd", "seconds": "0.5", "steps": "1"}


@pytest.fixture(scope="module")
def crowd_stack(workdir, redis_port, tiny_bundle):
    """No worker (jobs stay queued until canceled), room for exactly the crowd's streams and waits per key."""
    stack = launch_stack("crowd", workdir=workdir, redis_port=redis_port, db=14, bundle=tiny_bundle,
                         with_worker=False, storage_dir=workdir / "crowd-storage", api_keys=f"{ALICE},{BOB}",
                         max_streams_per_client=STREAMS + WAITS, webhook_secret=WEBHOOK_SECRET,
                         webhook_allow_private="true")  # fmt: skip
    yield stack
    stack.stop()


def queued_ids(stack) -> list[str]:
    return [job_id.decode() for job_id in stack.redis.lrange("rq:queue:melfusion", 0, -1)]


async def read_stream(http: httpx.AsyncClient, job_id: str, opened: list) -> list[tuple[str, dict]]:
    events, name = [], None
    async with http.stream("GET", f"/jobs/{job_id}/events") as response:
        assert response.status_code == 200, await response.aread()
        async for line in response.aiter_lines():
            if line.startswith("event:"):
                name = line.removeprefix("event:").strip()
            elif line.startswith("data:"):
                events.append((name, json.loads(line.removeprefix("data:"))))
                if len(events) == 1:
                    opened.append(job_id)
    return events


async def crowd(stack) -> dict:
    """Open the streams, then the waits; probe the cap and /livez while all are held; end every job."""
    limits = httpx.Limits(max_connections=STREAMS + WAITS + 20, max_keepalive_connections=0)
    alice = httpx.AsyncClient(base_url=stack.base_url, headers={"Authorization": f"Bearer {ALICE}"},
                              timeout=120, limits=limits)  # fmt: skip
    image = SAMPLE_IMAGE.read_bytes()
    stop_probing = asyncio.Event()

    async def post(prefer: str | None) -> httpx.Response:
        headers = {"Prefer": prefer} if prefer else {}
        return await alice.post("/jobs", data=SHORT, files={"image": ("s.png", image, "image/png")}, headers=headers)

    async with alice:
        prober = asyncio.create_task(probe_livez(stack.base_url, stop_probing))  # from another process
        stream_jobs = [(await post(None)).json()["id"] for _ in range(STREAM_JOBS)]
        opened: list[str] = []
        streams = [asyncio.create_task(read_stream(alice, stream_jobs[i % STREAM_JOBS], opened))
                   for i in range(STREAMS)]  # fmt: skip
        await asyncio_wait_until(lambda: len(opened) == STREAMS, timeout=120, what="every stream's first event")
        waits = [asyncio.create_task(post("wait=60")) for _ in range(WAITS)]
        await asyncio_wait_until(lambda: len(queued_ids(stack)) == STREAM_JOBS + WAITS, timeout=120,
                                 what="every waiting POST's job queued")  # fmt: skip
        async with alice.stream("GET", f"/jobs/{stream_jobs[0]}/events") as over_cap:  # one too many
            await over_cap.aread()
        wait_over_cap = await post("wait=60")  # refused before its job is made
        queued_at_cap = len(queued_ids(stack))
        async with httpx.AsyncClient(base_url=stack.base_url, headers={"Authorization": f"Bearer {BOB}"}) as bob:
            bob_job = (await bob.post("/jobs", data=SHORT, files={"image": ("s.png", image, "image/png")})).json()
            async with bob.stream("GET", f"/jobs/{bob_job['id']}/events") as bobs_stream:
                bob_status = bobs_stream.status_code
            await bob.post(f"/jobs/{bob_job['id']}/cancel")
        wait_jobs = [job_id for job_id in queued_ids(stack) if job_id not in stream_jobs]
        cancels = await asyncio.gather(*(alice.post(f"/jobs/{job_id}/cancel") for job_id in wait_jobs + stream_jobs))
        answers = await asyncio.gather(*waits)
        followed = await asyncio.gather(*streams)
        stop_probing.set()
        livez = await prober
        after = await alice.get(f"/jobs/{stream_jobs[0]}/events")  # every hold was given back
    return {"over_cap": over_cap, "wait_over_cap": wait_over_cap, "queued_at_cap": queued_at_cap,
            "bob_status": bob_status, "cancels": cancels, "answers": answers,
            "followed": followed, "livez": livez, "after": after}  # fmt: skip


async def asyncio_wait_until(predicate, *, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:g} s")
        await asyncio.sleep(0.1)


def test_300_streams_and_120_waits_on_one_process_are_all_served(crowd_stack):
    outcome = asyncio.run(crowd(crowd_stack))
    over_cap = outcome["over_cap"]
    assert over_cap.status_code == 429 and over_cap.json()["error"]["code"] == "rate_limited", over_cap.text
    assert "420 open event streams" in over_cap.json()["error"]["message"] and over_cap.headers["Retry-After"]
    assert outcome["wait_over_cap"].status_code == 429 and outcome["queued_at_cap"] == STREAM_JOBS + WAITS
    assert outcome["bob_status"] == 200  # the cap is per caller
    assert [r.status_code for r in outcome["cancels"]] == [200] * (STREAM_JOBS + WAITS)
    answers = outcome["answers"]
    assert [r.status_code for r in answers] == [201] * WAITS, {r.status_code for r in answers}  # woken, not timed out
    assert {r.json()["status"] for r in answers} == {"canceled"}
    for events in outcome["followed"]:
        names = [name for name, _ in events]
        assert names[0] == "status" and names[-1] == "completed" and events[-1][1]["status"] == "canceled", names
    assert outcome["after"].status_code == 200
    print(f"/livez over {len(outcome['livez'])} probes: max {max(outcome['livez']) * 1000:.0f} ms")
    assert max(outcome["livez"]) < 1.0
    assert queued_ids(crowd_stack) == []  # nothing left queued, no duplicate


def test_a_completed_webhook_and_stream_carry_the_final_job_before_rq_records_it(crowd_stack):
    receiver = Receiver()
    try:
        with crowd_stack.http(ALICE) as http:
            job_id = http.post("/jobs", data={**SHORT, "webhook_url": f"{receiver.url}/ok"},
                               files={"image": ("s.png", SAMPLE_IMAGE.read_bytes(), "image/png")}).json()["id"]
            with http.stream("GET", f"/jobs/{job_id}/events") as stream:
                lines = stream.iter_lines()
                assert next(lines) == "event: status"
                # What a worker does, with its last write (RQ's own record of the end) held back
                job = fetch_job(crowd_stack.redis, job_id)
                announce(job, JobStatus.RUNNING)
                announce(job, JobStatus.SUCCEEDED, result={
                    "key": f"outputs/{job_id}.wav", "spectrogram_key": f"outputs/{job_id}.png",
                    "content_type": "audio/wav", "seconds": 0.5, "sample_rate": 16000, "bytes": 16044,
                    "sha256": "ab" * 32,
                })  # fmt: skip
                completed = next(json.loads(line.removeprefix("data:")) for line in lines
                                 if line.startswith("data:") and '"result"' in line and '"sha256"' in line)  # fmt: skip
        delivered = wait_until(lambda: receiver.requests["/ok"], timeout=20, what="the completed webhook")
        assert fetch_job(crowd_stack.redis, job_id).get_status() == "queued"  # RQ still has not heard
        for body in (json.loads(delivered[0][1]), completed):
            assert body["status"] == "succeeded" and body["progress"] == 1.0 and body["finished_at"], body
            assert body["result"]["sha256"] == "ab" * 32 and body["result"]["url"]
    finally:
        receiver.server.shutdown()
        Queue("melfusion", connection=crowd_stack.redis).remove(job_id)


def test_readyz_stays_fast_among_a_million_unrelated_keys(crowd_stack):
    redis = crowd_stack.redis
    fill = "for i = ARGV[1], ARGV[2] do redis.call('SET', 'filler:' .. i, 'x') end"
    for start in range(0, 1_000_000, 100_000):  # in slices: the session's other stacks share this Redis
        redis.eval(fill, 0, start, start + 99_999)
    write_heartbeat(redis, "a-worker", {"queues": ["melfusion"], "warming_up": False}, ttl_seconds=60)
    scans_before = redis.info("commandstats").get("cmdstat_scan", {}).get("calls", 0)
    try:
        times = []
        with crowd_stack.http() as http:
            for _ in range(5):
                started = time.monotonic()
                response = http.get("/readyz")
                times.append(time.monotonic() - started)
                assert response.status_code == 200 and response.json()["checks"]["workers"]["ok"], response.text
        print(f"/readyz with {redis.dbsize()} keys: median {statistics.median(times) * 1000:.0f} ms")
        assert statistics.median(times) < 0.3
        assert redis.info("commandstats").get("cmdstat_scan", {}).get("calls", 0) == scans_before
    finally:
        drop = "for i = ARGV[1], ARGV[2] do redis.call('DEL', 'filler:' .. i) end"
        for start in range(0, 1_000_000, 100_000):
            redis.eval(drop, 0, start, start + 99_999)
