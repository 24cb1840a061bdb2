"""Webhooks against a real local receiver: signatures verified with `standardwebhooks`, retries on 500,
on a hanging target and on a refused connection, while the job itself finishes on time; SSRF refusal."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import socket
import time
from collections import defaultdict

import httpx
import pytest
from servers import ALICE, WEBHOOK_SECRET, Receiver, wait_until
from standardwebhooks import Webhook

from embedded.processes import free_port
from service.webhooks import check_target, delivery_client, post_to_checked_address

FAST = {"seconds": 1, "steps": 4}
# IPv6 forms that lead to 127.0.0.1 although Python's `is_global` calls them public (or may, by version):
# NAT64 well-known and local-use (RFC 6052 /96 and /48 layouts), 6to4, IPv4-compatible, IPv4-mapped, Teredo,
# IPv4-translated (SIIT)
EMBEDDING_LOOPBACK = [f"http://[{address}]/hook" for address in (
    "64:ff9b::7f00:1", "64:ff9b:1::7f00:1", "64:ff9b:1:7f00:0:100::", "2002:7f00:1::", "::127.0.0.1",
    "::ffff:127.0.0.1", "2001:0:808:808:0:0:80ff:fffe", "::ffff:0:7f00:1",
)]  # fmt: skip


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
                                 "http://localhost/hook", "ftp://example.com/hook", *EMBEDDING_LOOPBACK])  # fmt: skip
def test_private_and_odd_targets_are_refused_naming_webhook_url(local_stack, sample_png, url):
    response = local_stack.http(ALICE).post("/jobs", data={"caption": "x", "webhook_url": url},
                                            files={"image": ("i.png", sample_png, "image/png")})  # fmt: skip
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["field"] == "webhook_url" and "MELFUSION_WEBHOOK_SECRET" not in error["message"]


@pytest.mark.parametrize("address", ["64:ff9b::808:808", "2002:808:808::", "::ffff:8.8.8.8", "2606:4700::1111"])
def test_ipv6_forms_embedding_a_public_ipv4_are_accepted(address):
    assert check_target(f"https://[{address}]/hook", allow_private=False) == [ipaddress.ip_address(address)]


@pytest.fixture
def fake_dns(monkeypatch):
    """Names under `.test` resolve to the addresses queued for them in `answers` (one list per lookup),
    else to loopback; `lookups` lists every name looked up. Addresses themselves resolve as usual."""
    real, answers, lookups = socket.getaddrinfo, defaultdict(list), []

    def resolve(host, port, *args, **kwargs):
        if not host.endswith(".test"):
            return real(host, port, *args, **kwargs)
        lookups.append(host)
        queued = answers[host].pop(0) if answers[host] else ["127.0.0.1"]
        return [info for address in queued for info in real(address, port, *args, **kwargs)]

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    return answers, lookups


def test_a_delivery_goes_to_the_address_that_passed_the_check(fake_dns):
    answers, lookups = fake_dns
    answers["rebind.test"] = [["93.184.216.34"]]  # public at the check; loopback on any later lookup
    sent = []
    transport = httpx.MockTransport(lambda request: sent.append(request) or httpx.Response(204))
    with httpx.Client(transport=transport) as http:
        post_to_checked_address(http, "https://rebind.test:8443/hook", allow_private=False, content="{}", headers={})
    assert lookups == ["rebind.test"]  # no second lookup for a rebinding name to answer differently
    (request,) = sent
    assert request.url == "https://93.184.216.34:8443/hook" and request.headers["host"] == "rebind.test:8443"
    assert request.extensions["sni_hostname"] == "rebind.test"  # TLS checks the name, not the address


def test_pinned_deliveries_name_their_host_and_never_share_a_connection(receiver, fake_dns):
    answers, lookups = fake_dns
    port = receiver.server.server_port
    answers["two.test"] = [["127.0.0.2", "127.0.0.1"]]  # the first address refuses (the receiver is on .1)
    with delivery_client(5) as http:
        for name in ("one.test", "two.test", "bücher.test"):
            url = f"http://{name}:{port}/named"
            assert post_to_checked_address(http, url, allow_private=True, content="{}", headers={}).status_code == 204
    assert lookups == ["one.test", "two.test", "xn--bcher-kva.test"]
    hosts = [headers.get("Host") or headers.get("host") for headers, _ in receiver.requests["/named"]]
    assert hosts == [f"one.test:{port}", f"two.test:{port}", f"xn--bcher-kva.test:{port}"]
    peers = receiver.peers["/named"]
    assert len(set(peers)) == 3, "a connection opened for one name carried another name's delivery"
