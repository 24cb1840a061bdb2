"""Webhooks against a real local receiver: signatures verified with `standardwebhooks`, retries on 500,
on a hanging target and on a refused connection, while the job itself finishes on time; SSRF refusal."""

from __future__ import annotations

import datetime as dt
import json
import socket
import threading
import time
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from servers import ALICE, WEBHOOK_SECRET, wait_until
from standardwebhooks import Webhook

from embedded.processes import free_port
from service.webhooks import post_to_checked_address

FAST = {"seconds": 1, "steps": 4}


class Receiver:
    """Records every request per path. `/ok` answers 204; `/flaky` 500 twice then 204; `/hang` sleeps
    past the sender's 1 s timeout on the first request, then 204."""

    def __init__(self):
        self.requests: dict[str, list[tuple[dict, bytes]]] = defaultdict(list)
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["content-length"]))
                seen = receiver.requests[self.path]
                seen.append((dict(self.headers), body))
                if self.path == "/hang" and len(seen) == 1:
                    time.sleep(2.5)
                status = 500 if self.path == "/flaky" and len(seen) <= 2 else 204
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture(scope="module")
def receiver():
    receiver = Receiver()
    yield receiver
    receiver.server.shutdown()


def test_events_arrive_signed_and_verify_with_the_library(live_stack, receiver, sample_png):
    client = live_stack.client()
    job = client.submit(sample_png, "webhook piano", **FAST, webhook_url=f"{receiver.url}/ok",
                        webhook_events=["start", "progress", "completed"])  # fmt: skip
    assert job.raw["webhook"] == {"url": f"{receiver.url}/ok", "events": ["start", "progress", "completed"]}
    job = client.wait(job.id, timeout=120)
    assert job.status == "succeeded"

    def completed_received():
        bodies = [json.loads(body) for _, body in receiver.requests["/ok"]]
        return [body for body in bodies if body["id"] == job.id and body["status"] == "succeeded"]

    final = wait_until(completed_received, timeout=20, what="the completed webhook")[-1]
    assert final["result"]["sha256"] == job.result["sha256"] and final["params"]["seed"] == job.params["seed"]
    verifier = Webhook(WEBHOOK_SECRET)
    ids = set()
    for headers, body in receiver.requests["/ok"]:
        verifier.verify(body, {name.lower(): value for name, value in headers.items()})  # raises if forged
        ids.add(headers["webhook-id"])

    def all_attempts_logged():  # the sender logs an attempt once the receiver has answered
        data = live_stack.http().get(f"/jobs/{job.id}/webhooks").json()["data"]
        return data if {a["webhook_id"] for a in data} == ids else None

    attempts = wait_until(all_attempts_logged, timeout=10, what="every delivery in GET /jobs/{id}/webhooks")
    assert {a["event"] for a in attempts} >= {"start", "completed"} and len(attempts) == len(ids)
    assert all(a["outcome"] == "delivered" and a["status_code"] == 204 for a in attempts)


@pytest.mark.parametrize("target", ["flaky", "hang", "refuse"])
def test_failing_targets_are_retried_and_never_delay_the_job(live_stack, receiver, sample_png, target):
    url = f"http://127.0.0.1:{free_port()}/" if target == "refuse" else f"{receiver.url}/{target}"
    client = live_stack.client()
    started = time.monotonic()
    job = client.wait(client.submit(sample_png, f"retry {target}", **FAST, webhook_url=url).id, timeout=120)
    assert job.status == "succeeded"
    started_at, finished_at = (dt.datetime.fromisoformat(job.raw[name]) for name in ("started_at", "finished_at"))
    run_seconds = (finished_at - started_at).total_seconds()
    assert run_seconds < 15, f"the job took {run_seconds:.1f} s with a {target} webhook target"

    def attempts_done():
        data = live_stack.http().get(f"/jobs/{job.id}/webhooks").json()["data"]
        return data if data and data[-1]["outcome"] != "retrying" else None

    attempts = wait_until(attempts_done, timeout=30, what=f"webhook attempts to {target} to end")
    assert len(attempts) >= 2 and attempts[0]["outcome"] == "retrying"
    assert len({a["webhook_id"] for a in attempts}) == 1  # one event, retried under one id
    if target == "refuse":
        assert attempts[-1]["outcome"] == "gave_up" and "Connect" in attempts[-1]["error"]
    else:
        assert attempts[-1]["outcome"] == "delivered"
    if target == "hang":
        assert "Timeout" in attempts[0]["error"]
    assert time.monotonic() - started < 60


@pytest.mark.parametrize("url", ["http://127.0.0.1:9/hook", "http://10.1.2.3/hook", "http://169.254.169.254/latest",
                                 "http://localhost/hook", "ftp://example.com/hook"])  # fmt: skip
def test_private_and_odd_targets_are_refused_naming_webhook_url(local_stack, sample_png, url):
    response = local_stack.http(ALICE).post("/jobs", data={"caption": "x", "webhook_url": url},
                                            files={"image": ("i.png", sample_png, "image/png")})  # fmt: skip
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["field"] == "webhook_url" and "MELFUSION_WEBHOOK_SECRET" not in error["message"]


@pytest.fixture
def rebinding_name(monkeypatch):
    """`rebind.test` answers the listed addresses in turn, then loopback for ever (a DNS-rebinding attacker);
    returns the list, to which the test appends the first answers, and the count of lookups."""
    real, answers, lookups = socket.getaddrinfo, [], []

    def resolve(host, *args, **kwargs):
        if host != "rebind.test":
            return real(host, *args, **kwargs)
        lookups.append(host)
        return real(answers.pop(0) if answers else "127.0.0.1", *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    return answers, lookups


def test_a_delivery_connects_to_the_address_that_passed_the_check(receiver, rebinding_name):
    answers, lookups = rebinding_name
    answers.append("8.8.8.8")  # public at the check; loopback (the receiver) on any later lookup
    url = f"http://rebind.test:{receiver.server.server_port}/rebind"
    with httpx.Client(timeout=1) as http, pytest.raises(httpx.TransportError):
        post_to_checked_address(http, url, allow_private=False, content="{}", headers={})
    assert lookups == ["rebind.test"] and not receiver.requests["/rebind"]


def test_a_pinned_delivery_still_names_its_host(receiver, rebinding_name):
    _, lookups = rebinding_name
    url = f"http://rebind.test:{receiver.server.server_port}/named"
    with httpx.Client(timeout=5) as http:
        response = post_to_checked_address(http, url, allow_private=True, content="{}", headers={"x-probe": "1"})
    assert response.status_code == 204 and lookups == ["rebind.test"]
    headers = {name.lower(): value for name, value in receiver.requests["/named"][0][0].items()}
    assert headers["host"] == f"rebind.test:{receiver.server.server_port}" and headers["x-probe"] == "1"
