"""Hostile and heavy clients: the image probe's memory bound, backpressure, the per-key rate limit,
per-key queue positions and strict forms. Each refusal is a 4xx/503 naming its field or saying when to retry."""

from __future__ import annotations

import io
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image
from servers import ALICE, BOB, launch_stack

SHORT = {"caption": "calm piano", "seconds": "0.5", "steps": "1"}
# The stated bound: an API request holds its upload (<= MELFUSION_MAX_UPLOAD_BYTES) a few times over and never
# the decoded pixels, so a burst of 8 forty-megapixel PNGs of ~126 KB raises the API's peak RSS by < 64 MB.
BURST, BURST_PEAK_MB = 8, 64


def resident_mb(pid: int, field: str) -> float:
    """VmRSS (now) or VmHWM (peak) of a process, in MB."""
    line = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith(field))
    return int(line.split()[1]) / 1024


def forty_megapixel_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8000, 5000), (40, 90, 160)).save(buffer, "PNG")
    return buffer.getvalue()


def test_forty_megapixel_burst_stays_within_the_memory_bound(local_stack):
    png = forty_megapixel_png()
    pid = local_stack.api.popen.pid
    before = resident_mb(pid, "VmRSS:")

    def submit(i: int):
        with local_stack.http(ALICE) as http:
            return http.post("/jobs", data=SHORT, files={"image": (f"big{i}.png", png, "image/png")})

    with ThreadPoolExecutor(BURST) as pool:
        responses = list(pool.map(submit, range(BURST)))
    assert [r.status_code for r in responses] == [202] * BURST, responses[0].text
    peak = resident_mb(pid, "VmHWM:")
    print(f"API RSS before {before:.0f} MB, peak {peak:.0f} MB over a burst of {BURST} x {len(png)} B 40-MP PNGs")
    assert peak - before < BURST_PEAK_MB
    with local_stack.http(ALICE) as http:  # do not make the shared worker decode them all
        for response in responses:
            http.post(f"/jobs/{response.json()['id']}/cancel")


@pytest.fixture(scope="module")
def guarded_stack(workdir, redis_port, tiny_bundle):
    """No worker, so jobs stay queued; a queue of at most 3 and 5 submissions a minute per key."""
    stack = launch_stack("guarded", workdir=workdir, redis_port=redis_port, db=5, bundle=tiny_bundle,
                         with_worker=False, storage_dir=workdir / "guarded-storage", api_keys=f"{ALICE},{BOB}",
                         max_queue_depth=3, rate_limit="5/minute")  # fmt: skip
    yield stack
    stack.stop()


def test_positions_backpressure_and_rate_limit(guarded_stack, sample_png):
    def post(key: str):
        with guarded_stack.http(key) as http:
            return http.post("/jobs", data=SHORT, files={"image": ("s.png", sample_png, "image/png")})

    alice_first, bob_first, alice_second = post(ALICE), post(BOB), post(ALICE)
    assert [r.status_code for r in (alice_first, bob_first, alice_second)] == [202] * 3
    # draft-ietf-httpapi-ratelimit-headers: the policy, and what is left of it, on every counted answer
    assert alice_second.headers["RateLimit-Policy"] == '"minute";q=5;w=60'
    assert re.fullmatch(r'"minute";r=3;t=(\d+)', alice_second.headers["RateLimit"])
    assert bob_first.headers["RateLimit"].startswith('"minute";r=4;')
    # positions count only the caller's own jobs: Bob learns nothing about Alice's load
    assert [r.json()["queue_position"] for r in (alice_first, bob_first, alice_second)] == [0, 0, 1]

    full = post(BOB)  # 3 queued = max_queue_depth
    assert full.status_code == 503 and full.json()["error"]["code"] == "overloaded"
    assert int(full.headers["Retry-After"]) > 0
    inputs = Path(guarded_stack.env["MELFUSION_STORAGE_DIR"]) / "inputs"
    assert len(list(inputs.iterdir())) == 3  # the refused photo was never stored

    answers = [post(ALICE) for _ in range(4)]  # Alice's 3rd to 6th submission within a minute
    assert [r.status_code for r in answers] == [503, 503, 503, 429]
    assert answers[-1].json()["error"]["code"] == "rate_limited"
    assert 1 <= int(answers[-1].headers["Retry-After"]) <= 60
    assert [r.headers["RateLimit"].split(";")[1] for r in answers] == ["r=2", "r=1", "r=0", "r=0"]
    assert int(answers[-1].headers["RateLimit"].split("t=")[1]) == int(answers[-1].headers["Retry-After"])
    with guarded_stack.http(ALICE) as http:
        assert "RateLimit" not in http.get(f"/jobs/{alice_first.json()['id']}").headers  # a read counts nothing
    assert post(BOB).status_code == 503  # Bob's own budget is untouched: still only the full queue


@pytest.fixture(scope="module")
def keyless_stack(workdir, redis_port, tiny_bundle):
    """No API keys and no worker; 2 submissions a minute per client address."""
    stack = launch_stack("keyless", workdir=workdir, redis_port=redis_port, db=13, bundle=tiny_bundle,
                         with_worker=False, storage_dir=workdir / "keyless-storage", rate_limit="2/minute")  # fmt: skip
    yield stack
    stack.stop()


def test_without_api_keys_each_client_address_has_its_own_budget(keyless_stack, sample_png):
    def post(address: str):
        # the test connects from loopback, which uvicorn trusts as a proxy (FORWARDED_ALLOW_IPS' default)
        with keyless_stack.http() as http:
            return http.post("/jobs", data=SHORT, files={"image": ("s.png", sample_png, "image/png")},
                             headers={"X-Forwarded-For": address})  # fmt: skip

    busy = [post("203.0.113.5") for _ in range(3)]
    assert [r.status_code for r in busy] == [202, 202, 429]
    assert busy[-1].json()["error"]["message"] == "more than 2 per 1 minute job submissions from address 203.0.113.5"
    assert post("203.0.113.6").status_code == 202  # another client is not held back by the busy one
    # an IPv6 client is its /64: rotating addresses inside it does not buy a new budget
    assert [post(f"2001:db8:0:1::{i}").status_code for i in (1, 2, 3)] == [202, 202, 429]
    assert post("2001:db8:0:2::1").status_code == 202


def test_an_api_on_a_public_address_trusts_no_forwarded_for_by_default(workdir, redis_port, tiny_bundle,
                                                                      sample_png):  # fmt: skip
    """Listening beyond loopback, a client could pick its own rate-limit identity with X-Forwarded-For: unless
    FORWARDED_ALLOW_IPS names a proxy, the header is ignored and the peer's address counts."""
    stack = launch_stack("exposed", workdir=workdir, redis_port=redis_port, db=0, bundle=tiny_bundle,
                         with_worker=False, storage_dir=workdir / "exposed-storage", rate_limit="1/minute",
                         host="0.0.0.0")  # fmt: skip
    try:
        def post(address: str):
            with stack.http() as http:
                return http.post("/jobs", data=SHORT, files={"image": ("s.png", sample_png, "image/png")},
                                 headers={"X-Forwarded-For": address})  # fmt: skip

        first, second = post("203.0.113.7"), post("203.0.113.8")
        assert (first.status_code, second.status_code) == (202, 429), second.text
        assert second.json()["error"]["message"].endswith("from address 127.0.0.1")  # the peer, not the header
    finally:
        stack.stop()
        stack.redis.flushdb()


@pytest.mark.parametrize(
    ("field", "parts", "status"),
    [
        ("image", [("image", ("a.png", "PNG")), ("image", ("b.png", "PNG"))], 422),  # a second image part
        ("caption", [("caption", b"caf\xe9 latin-1")], 422),  # not UTF-8
        ("caption", [("caption", b"x" * 1_100_000)], 413),  # over 1 MB
        ("seconds", [("seconds", b"1"), ("seconds", b"2")], 422),
    ],
)
def test_strict_form_names_the_field(local_stack, sample_png, field, parts, status):
    files = [(name, (value[0], sample_png, "image/png")) if name == "image" else (name, (None, value))
             for name, value in parts]  # fmt: skip
    sent = {name for name, _ in parts}
    files += [(name, (None, value.encode())) for name, value in SHORT.items() if name not in sent]
    if "image" not in sent:
        files.append(("image", ("s.png", sample_png, "image/png")))
    with local_stack.http(ALICE) as http:
        response = http.post("/jobs", files=files)
    assert response.status_code == status, response.text
    assert response.json()["error"]["field"] == field
