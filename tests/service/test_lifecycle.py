"""jobs.lifecycle.announce: one record of every change, in order, and a job ends exactly once."""

from __future__ import annotations

import json

import pytest
from redis import Redis
from rq import Queue
from rq.serializers import JSONSerializer

from jobs.lifecycle import EVENTS_CHANNEL, announce
from jobs.metrics import read_outcomes
from jobs.queue import ErrorCode, JobStatus, fetch_job, get_ending, get_status


@pytest.fixture
def redis(redis_port):
    connection = Redis(port=redis_port, db=12)
    connection.flushdb()
    yield connection
    connection.flushdb()


def make_job(redis: Redis):
    queue = Queue("lifecycle-test", connection=redis, serializer=JSONSerializer)
    return queue.enqueue_call("builtins.print", meta={"owner": "public", "progress": 0.0}, result_ttl=600)


@pytest.fixture
def heard(redis):
    """Every change published on the job-events channel, as the API processes hear them."""
    pubsub = redis.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(EVENTS_CHANNEL)
    pubsub.get_message(timeout=1)  # the subscription's confirmation

    def messages() -> list[dict]:
        received = []
        while (message := pubsub.get_message(timeout=0.2)) is not None:
            received.append(json.loads(message["data"]))
        return received

    yield messages
    pubsub.close()


def test_changes_are_recorded_in_order_and_the_first_ending_wins(redis, heard):
    job = make_job(redis)
    announce(job, JobStatus.RUNNING)
    announce(job, JobStatus.RUNNING, progress=0.5)
    assert announce(job, JobStatus.SUCCEEDED, result={"key": "outputs/x.wav"})
    assert not announce(job, JobStatus.CANCELED, error=(ErrorCode.CANCELED, "too late"))

    events = heard()
    assert {e["id"] for e in events} == {job.id}
    assert [(e["event"], e["status"], e["progress"]) for e in events] == [
        ("start", "running", 0.0),
        ("progress", "running", 0.5),
        ("completed", "succeeded", 1.0),
    ]
    stored = fetch_job(redis, job.id).meta
    assert stored["result"] == {"key": "outputs/x.wav"} and stored["progress"] == 1.0 and "error" not in stored
    assert read_outcomes(redis) == {"succeeded": 1}


def test_an_error_is_saved_with_its_code(redis, heard):
    job = make_job(redis)
    announce(job, JobStatus.FAILED, error=(ErrorCode.INVALID_INPUT, "not an image"))
    assert get_ending(fetch_job(redis, job.id)).error == {"code": "invalid_input", "message": "not an image"}
    assert heard()[-1]["event"] == "completed"


def test_a_job_reads_final_from_its_ending_before_rq_records_it(redis):
    """The worker announces, then RQ finishes the job: in between, readers already see the final job."""
    job = make_job(redis)
    announce(job, JobStatus.RUNNING, progress=0.4)
    announce(job, JobStatus.SUCCEEDED, result={"key": "outputs/x.wav"})
    fetched = fetch_job(redis, job.id)
    assert fetched.get_status() == "queued"  # RQ has not been told (the worker is between the two writes)
    ending = get_ending(fetched)
    assert get_status(fetched) is JobStatus.SUCCEEDED and ending.progress == 1.0 and ending.at is not None
    assert ending.result == {"key": "outputs/x.wav"} and ending.error is None
