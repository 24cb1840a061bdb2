"""jobs.lifecycle.announce: one record of every change, in order, and a job ends exactly once."""

from __future__ import annotations

import json

import pytest
from redis import Redis
from rq import Queue
from rq.serializers import JSONSerializer

from jobs.lifecycle import announce, events_key
from jobs.metrics import read_outcomes
from jobs.queue import ErrorCode, JobStatus, fetch_job


@pytest.fixture
def redis(redis_port):
    connection = Redis(port=redis_port, db=12)
    connection.flushdb()
    yield connection
    connection.flushdb()


def make_job(redis: Redis):
    queue = Queue("lifecycle-test", connection=redis, serializer=JSONSerializer)
    return queue.enqueue_call("builtins.print", meta={"owner": "public", "progress": 0.0}, result_ttl=600)


def read_events(redis: Redis, job_id: str) -> list[dict]:
    return [json.loads(fields[b"data"]) for _, fields in redis.xrange(events_key(job_id))]


def test_changes_are_recorded_in_order_and_the_first_ending_wins(redis):
    job = make_job(redis)
    announce(job, JobStatus.RUNNING)
    announce(job, JobStatus.RUNNING, progress=0.5)
    assert announce(job, JobStatus.SUCCEEDED, result={"key": "outputs/x.wav"})
    assert not announce(job, JobStatus.CANCELED, error=(ErrorCode.CANCELED, "too late"))

    events = read_events(redis, job.id)
    assert [(e["event"], e["status"], e["progress"]) for e in events] == [
        ("start", "running", 0.0),
        ("progress", "running", 0.5),
        ("completed", "succeeded", 1.0),
    ]
    stored = fetch_job(redis, job.id).meta
    assert stored["result"] == {"key": "outputs/x.wav"} and stored["progress"] == 1.0 and "error" not in stored
    assert read_outcomes(redis) == {"succeeded": 1}
    assert 0 < redis.ttl(events_key(job.id)) <= 600


def test_an_error_is_saved_with_its_code(redis):
    job = make_job(redis)
    announce(job, JobStatus.FAILED, error=(ErrorCode.INVALID_INPUT, "not an image"))
    assert fetch_job(redis, job.id).meta["error"] == {"code": "invalid_input", "message": "not an image"}
    assert read_events(redis, job.id)[-1]["event"] == "completed"
