"""Following a job live: the Server-Sent Events of `GET /jobs/{id}/events` and the wait of `Prefer: wait`.

Both tail the job's event stream (written by `jobs.lifecycle.announce`) with a blocking XREAD on an
asyncio Redis client: no polling loop, no thread held while waiting, and a client that goes away cancels
the one task that reads for it. Every second without news the job itself is read, so a queued job's
position is reported as it moves and a job ended outside the stream (expired, recovered) still ends it.

Events (`event:` / `data:`):
- `status`: the job JSON, first on connect and then at every status change;
- `progress`: `{"id", "status", "progress", "queue_position"}`;
- `completed`: the job JSON with its result or error; the stream then ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable

from redis.asyncio import Redis as AsyncRedis
from sse_starlette import ServerSentEvent
from starlette.concurrency import run_in_threadpool

from jobs.lifecycle import TERMINAL, events_key

from .schemas import JobPublic

IDLE_CHECK_MS = 1000
EVENTS_DOC = (
    "`text/event-stream`. `event: status`, data the job JSON (JobPublic): on connect and at every status "
    "change. `event: progress`, data `{id, status, progress, queue_position}`: as the job runs or moves up "
    "the queue. `event: completed`, data the job JSON with `result` or `error`; then the stream ends."
)


async def _latest_id(aredis: AsyncRedis, job_id: str) -> bytes:
    last = await aredis.xrevrange(events_key(job_id), count=1)
    return last[0][0] if last else b"0-0"


async def follow_job(aredis: AsyncRedis, job_id: str, describe: Callable[[], JobPublic]) -> AsyncIterator[
    tuple[str, dict]
]:
    """Yield `(event name, data)` from now until the job ends; `describe()` reads the job (sync, off-loop)."""
    cursor = await _latest_id(aredis, job_id)  # read before the snapshot: no change can fall in between
    job = await run_in_threadpool(describe)
    if job.status in TERMINAL:
        yield "completed", job.model_dump(mode="json")
        return
    yield "status", job.model_dump(mode="json")
    last_status, last_position = job.status, job.queue_position
    while True:
        replies = await aredis.xread({events_key(job_id): cursor}, block=IDLE_CHECK_MS, count=100)
        changes = [json.loads(fields[b"data"]) for _, entries in replies for _, fields in entries]
        if replies:
            cursor = replies[0][1][-1][0]
        if changes and all(change["event"] == "progress" for change in changes):
            latest = changes[-1]
            yield "progress", {"id": job_id, "status": latest["status"], "progress": latest["progress"],
                               "queue_position": None}  # fmt: skip
            continue
        job = await run_in_threadpool(describe)
        if job.status in TERMINAL:
            yield "completed", job.model_dump(mode="json")
            return
        if job.status != last_status:
            yield "status", job.model_dump(mode="json")
        elif job.queue_position != last_position:
            yield "progress", {"id": job_id, "status": job.status.value, "progress": job.progress,
                               "queue_position": job.queue_position}  # fmt: skip
        last_status, last_position = job.status, job.queue_position


async def sse_events(aredis: AsyncRedis, job_id: str, describe: Callable[[], JobPublic]) -> AsyncIterator[
    ServerSentEvent
]:
    async for name, data in follow_job(aredis, job_id, describe):
        yield ServerSentEvent(json.dumps(data), event=name)


async def wait_for_end(aredis: AsyncRedis, job_id: str, describe: Callable[[], JobPublic], *, seconds: float) -> None:
    """Return when the job ends or after `seconds`, whichever is first."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            async for name, _ in follow_job(aredis, job_id, describe):
                if name == "completed":
                    return


def parse_prefer_wait(header: str | None) -> float | None:
    """N from `Prefer: wait=N` (RFC 7240; other preferences ignored), or None."""
    for preference in (header or "").split(","):
        name, _, value = preference.split(";")[0].strip().partition("=")
        if name.lower() == "wait" and value.strip().isdigit():
            return float(value)
    return None
