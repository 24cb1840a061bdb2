"""Following a job live: the Server-Sent Events of `GET /jobs/{id}/events` and the wait of `Prefer: wait`.

One subscription per API process: `JobEvents` listens on the channel `jobs.lifecycle.announce` publishes
every change to, and wakes the streams and waits of this process that follow the job concerned. A stream
or a wait holds no Redis connection and no thread while it waits (hundreds of them used to hold one
connection each, and the pool ran out at 100). The job itself is read (in a request thread) when its
status changes, when the queue ahead of a queued job moves (at most once a second per stream), after the
subscription was re-established (changes in between were missed), and every `RECHECK_SECONDS` anyway (a
job that ended without an announcement, or expired).

Events (`event:` / `data:`):
- `status`: the job JSON, first on connect and then at every status change;
- `progress`: `{"id", "status", "progress", "queue_position"}`;
- `completed`: the job JSON with its result or error; the stream then ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from redis.asyncio import Redis as AsyncRedis
from redis.exceptions import RedisError
from sse_starlette import ServerSentEvent
from starlette.concurrency import run_in_threadpool

from jobs.lifecycle import EVENTS_CHANNEL, TERMINAL, Event
from jobs.queue import JobStatus

from .schemas import JobPublic

log = logging.getLogger(__name__)

RECHECK_SECONDS = 15.0  # a followed job is read at least this often, whatever was heard
POSITION_REFRESH_SECONDS = 1.0  # a queued job's position is read again at most this often
RESUBSCRIBE_SECONDS = 1.0  # wait before subscribing again after losing Redis
QUEUE_MOVES = frozenset({Event.START.value, Event.QUEUED.value, Event.COMPLETED.value})
EVENTS_DOC = (
    "`text/event-stream`. `event: status`, data the job JSON (JobPublic): on connect and at every status "
    "change. `event: progress`, data `{id, status, progress, queue_position}`: as the job runs or moves up "
    "the queue. `event: completed`, data the job JSON with `result` or `error`; then the stream ends."
)


@dataclass(eq=False)
class Watch:
    """What one follower of a job has heard since it last looked (news coalesce: only the latest counts)."""

    job_id: str
    woken: asyncio.Event = field(default_factory=asyncio.Event)
    progress: float | None = None  # the latest progress the job reported
    changed: bool = False  # its status changed, or changes may have been missed
    queue_moved: bool = False  # a job started, ended or went back to the queue

    async def wait(self, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.0, timeout)):
                await self.woken.wait()
        self.woken.clear()

    def take(self) -> tuple[float | None, bool, bool]:
        news = self.progress, self.changed, self.queue_moved
        self.progress, self.changed, self.queue_moved = None, False, False
        return news


class JobEvents:
    """The API process's one subscription to job changes, fanned out to every `Watch` of the process."""

    def __init__(self, aredis: AsyncRedis):
        self.aredis = aredis
        self.watches: dict[str, set[Watch]] = defaultdict(set)
        self.listener: asyncio.Task | None = None

    def start(self) -> None:
        self.listener = asyncio.create_task(self._listen(), name="job-events")

    async def stop(self) -> None:
        if self.listener is not None:
            self.listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.listener

    @contextlib.asynccontextmanager
    async def watch(self, job_id: str) -> AsyncIterator[Watch]:
        """Follow `job_id` for the duration of the block; register before reading the job, so that no
        change falls between the read and the first news."""
        watch = Watch(job_id)
        self.watches[job_id].add(watch)
        try:
            yield watch
        finally:
            followers = self.watches[job_id]
            followers.discard(watch)
            if not followers:
                del self.watches[job_id]

    async def _listen(self) -> None:
        while True:
            try:
                async with self.aredis.pubsub() as pubsub:
                    await pubsub.subscribe(EVENTS_CHANNEL)
                    async for message in pubsub.listen():
                        if message["type"] == "message":
                            self._dispatch(json.loads(message["data"]))
                        elif message["type"] == "subscribe":  # first, or again after redis-py reconnected:
                            self._tell_all(changed=True)  # anything announced while we were away was missed
            except (RedisError, OSError) as exc:
                log.warning("job events: subscription lost (%s); subscribing again in %g s", exc, RESUBSCRIBE_SECONDS)
                await asyncio.sleep(RESUBSCRIBE_SECONDS)

    def _dispatch(self, record: dict) -> None:
        for watch in self.watches.get(record["id"], ()):
            if record["event"] == Event.PROGRESS.value:
                watch.progress = max(watch.progress or 0.0, record["progress"])
            else:
                watch.changed = True
            watch.woken.set()
        if record["event"] in QUEUE_MOVES:
            self._tell_all(queue_moved=True)

    def _tell_all(self, *, changed: bool = False, queue_moved: bool = False) -> None:
        for followers in self.watches.values():
            for watch in followers:
                watch.changed |= changed
                watch.queue_moved |= queue_moved
                watch.woken.set()


def _progress(job: JobPublic) -> dict:
    return {"id": job.id, "status": job.status.value, "progress": job.progress, "queue_position": job.queue_position}


async def follow_job(events: JobEvents, job_id: str, describe: Callable[[], JobPublic]) -> AsyncIterator[
    tuple[str, dict]
]:
    """Yield `(event name, data)` from now until the job ends; `describe()` reads the job (sync, off-loop)."""
    async with events.watch(job_id) as watch:
        job = await run_in_threadpool(describe)
        if job.status not in TERMINAL:
            yield "status", job.model_dump(mode="json")
        while job.status not in TERMINAL:
            read_at, move_pending = time.monotonic(), False
            next_read = lambda: read_at + (POSITION_REFRESH_SECONDS if move_pending else RECHECK_SECONDS)  # noqa: B023
            while True:  # until the job must be read again, passing on the progress heard meanwhile
                await watch.wait(next_read() - time.monotonic())
                progress, changed, moved = watch.take()
                move_pending |= moved and job.status is JobStatus.QUEUED
                if changed or time.monotonic() >= next_read():
                    break
                if progress is not None and progress > job.progress:
                    job = job.model_copy(update={"progress": progress, "status": JobStatus.RUNNING})
                    yield "progress", _progress(job)
            previous, job = job, await run_in_threadpool(describe)
            if job.status in TERMINAL:
                break
            if job.status != previous.status:
                yield "status", job.model_dump(mode="json")
            elif job.queue_position != previous.queue_position or job.progress > previous.progress:
                yield "progress", _progress(job)
            elif job.progress < previous.progress:
                job = previous  # a progress heard before the read: never report it going back
        yield "completed", job.model_dump(mode="json")


async def sse_events(events: JobEvents, job_id: str, describe: Callable[[], JobPublic]) -> AsyncIterator[
    ServerSentEvent
]:
    async for name, data in follow_job(events, job_id, describe):
        yield ServerSentEvent(json.dumps(data), event=name)


async def wait_for_end(events: JobEvents, job_id: str, has_ended: Callable[[], Awaitable[bool]], *,
                       seconds: float) -> None:  # fmt: skip
    """Return when the job ends or after `seconds`, whichever is first; `has_ended()` asks Redis, which
    happens only at the start, when the job's status changes and every RECHECK_SECONDS (not at every
    progress step or queue move)."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds), events.watch(job_id) as watch:
            while not await has_ended():
                due = time.monotonic() + RECHECK_SECONDS
                while time.monotonic() < due:
                    await watch.wait(due - time.monotonic())
                    if watch.take()[1]:
                        break


def parse_prefer_wait(header: str | None) -> float | None:
    """N from `Prefer: wait=N` (RFC 7240; other preferences ignored), or None."""
    for preference in (header or "").split(","):
        name, _, value = preference.split(";")[0].strip().partition("=")
        if name.lower() == "wait" and value.strip().isdigit():
            return float(value)
    return None
