"""`GET /jobs/{id}/events` (order, termination, nothing left behind on disconnect), `Prefer: wait`, and
the client's `wait` over the stream."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import httpx
import pytest
import uvicorn
from servers import wait_until

from embedded.processes import free_port
from jobs.settings import load_settings
from service.app import create_app

FAST = {"seconds": 1, "steps": 6}
LONG = {"seconds": 10, "steps": 400}  # tens of seconds on the tiny bundle: still running when the test looks


def read_events(lines: httpx.Response | Iterator[str], *, stop_after: int | None = None) -> list[tuple[str, dict]]:
    """Events from a response (read to its end) or from its open line iterator (left open at `stop_after`)."""
    events, name = [], None
    for line in lines.iter_lines() if isinstance(lines, httpx.Response) else lines:
        if line.startswith("event:"):
            name = line.removeprefix("event:").strip()
        elif line.startswith("data:"):
            events.append((name, json.loads(line.removeprefix("data:"))))
            if stop_after is not None and len(events) >= stop_after:
                break
    return events


def test_events_arrive_in_order_and_the_stream_ends_at_the_result(live_stack, sample_png):
    job = live_stack.client().submit(sample_png, "stream me", **FAST)
    with live_stack.http().stream("GET", f"/jobs/{job.id}/events") as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = read_events(response)  # returns only because the server closed the stream
    names = [name for name, _ in events]
    assert names[0] == "status" and names[-1] == "completed" and names.count("completed") == 1
    assert set(names) <= {"status", "progress", "completed"}
    progress = [data["progress"] for _, data in events]
    assert progress == sorted(progress), "progress went backwards"
    statuses = [data["status"] for _, data in events]
    order = ["queued", "running", "succeeded"]
    assert [order.index(s) for s in statuses] == sorted(order.index(s) for s in statuses)
    final = events[-1][1]
    assert final["status"] == "succeeded" and final["result"]["url"]
    umask = os.umask(0o022)
    os.umask(umask)  # the stack's processes inherit this process's umask
    outputs = Path(live_stack.env["MELFUSION_STORAGE_DIR"]) / "outputs"
    for stored in (outputs / f"{job.id}.wav", outputs / f"{job.id}.png"):
        assert stat.S_IMODE(stored.stat().st_mode) == 0o666 & ~umask  # readable by a server that serves them
    picture = live_stack.http().get(final["result"]["spectrogram_url"], timeout=10)  # relative: no public URL set
    assert picture.headers["content-type"] == "image/png" and picture.content.startswith(b"\x89PNG")
    # a finished job's stream is just its result
    with live_stack.http().stream("GET", f"/jobs/{job.id}/events") as response:
        assert [name for name, _ in read_events(response)] == ["completed"]


def test_an_unknown_job_has_no_stream(live_stack):
    assert live_stack.http().get("/jobs/nope/events").status_code == 404


@dataclass
class InProcessAPI:
    """The live stack's API, run in this process so the test can count its asyncio tasks."""

    url: str
    server: uvicorn.Server
    loop: asyncio.AbstractEventLoop

    def count_tasks(self) -> int:
        async def count() -> int:
            return len(asyncio.all_tasks()) - 1  # not this one

        return asyncio.run_coroutine_threadsafe(count(), self.loop).result()

    def requests_in_flight(self) -> int:
        return len(self.server.server_state.tasks)


@pytest.fixture
def in_process_api(live_stack):
    with mock.patch.dict(os.environ, live_stack.env):
        settings = load_settings(port=free_port())
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=settings.port,
                                           log_level="warning"))  # fmt: skip
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_until_complete, args=(server.serve(),), daemon=True)
    thread.start()
    wait_until(lambda: server.started, timeout=30, what="the in-process API")
    yield InProcessAPI(f"http://127.0.0.1:{settings.port}", server, loop)
    server.should_exit = True
    thread.join(timeout=10)


def test_a_client_leaving_mid_stream_leaves_no_task_behind(live_stack, in_process_api, sample_png):
    api = in_process_api
    with httpx.Client(base_url=api.url, timeout=30) as http:
        done = live_stack.client().wait(live_stack.client().submit(sample_png, "warm", **FAST).id, timeout=120)
        with http.stream("GET", f"/jobs/{done.id}/events") as response:
            read_events(response)  # starts sse-starlette's one shutdown watcher per event loop (not per stream)
        wait_until(lambda: api.requests_in_flight() == 0, timeout=10, what="the warm-up stream's request to end")
        baseline = api.count_tasks()
        job = live_stack.client().submit(sample_png, "leave early", **LONG)
        try:
            for _ in range(3):
                with http.stream("GET", f"/jobs/{job.id}/events") as response:
                    lines = response.iter_lines()  # held, so stopping reading does not close the connection yet
                    assert read_events(lines, stop_after=2)
                    assert api.count_tasks() > baseline  # the stream is being served
                # leaving the block unread hangs up mid-stream
            wait_until(lambda: api.count_tasks() <= baseline, timeout=10, what=f"tasks back to {baseline}")
        finally:
            live_stack.client().cancel(job.id)


def test_prefer_wait_returns_a_short_job_finished(live_stack, sample_png):
    response = live_stack.http().post("/jobs", data={"caption": "quick", **FAST}, headers={"Prefer": "wait=5"},
                                      files={"image": ("i.png", sample_png, "image/png")})  # fmt: skip
    assert response.status_code == 201, response.text
    assert response.json()["status"] == "succeeded" and response.headers["Preference-Applied"] == "wait=5"


def test_prefer_wait_returns_a_long_job_unfinished_at_the_cap(live_stack, sample_png):
    started = time.monotonic()
    response = live_stack.http().post("/jobs", data={"caption": "slow", **LONG}, headers={"Prefer": "wait=60"},
                                      files={"image": ("i.png", sample_png, "image/png")})  # fmt: skip
    elapsed = time.monotonic() - started
    job = response.json()
    live_stack.client().cancel(job["id"])
    assert response.status_code == 202 and job["status"] in ("queued", "running")
    assert response.headers["Preference-Applied"] == "wait=5"  # capped by MELFUSION_PREFER_WAIT_MAX_SECONDS
    assert 5 <= elapsed < 9


def test_client_wait_follows_the_stream(live_stack, sample_png):
    client = live_stack.client()
    seen = []
    job = client.wait(client.submit(sample_png, "client", **FAST).id, timeout=120, on_progress=seen.append)
    assert job.status == "succeeded" and seen[-1].status == "succeeded"
    assert [j.progress for j in seen] == sorted(j.progress for j in seen)
