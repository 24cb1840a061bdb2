"""Every bad input gets a 4xx JSON error naming the field; API keys isolate jobs; idempotency keys."""

from __future__ import annotations

import io
import select
import socket
import struct
import zlib

import pytest
from PIL import Image
from servers import ALICE, BOB

GOOD_FORM = {"caption": "calm piano", "seconds": "0.5", "steps": "2"}


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(width: int = 10_000, height: int = 10_000) -> bytes:
    """A few hundred bytes whose header claims 100 MP: must be refused before decoding."""
    header = png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + png_chunk(b"IDAT", zlib.compress(b"\0" * 1024)) + png_chunk(b"IEND", b"")


def encoded(fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), "red").save(buffer, fmt)
    return buffer.getvalue()


def post_job(stack, files, data, api_key=ALICE, headers=None):
    with stack.http(api_key) as http:
        return http.post("/jobs", data=data, files=files, headers=headers or {})


def assert_error(response, status: int, field: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["field"] == field, error
    assert "Traceback" not in response.text
    return error


@pytest.mark.parametrize(
    ("name", "image", "content_type", "status"),
    [
        ("text-as-png", b"hello, not an image at all", "image/png", 415),
        ("gif", encoded("GIF"), "image/gif", 415),
        ("png-labelled-jpeg", encoded("PNG"), "image/jpeg", 415),
        ("truncated-png", encoded("PNG")[:60], "image/png", 422),
        ("decompression-bomb", bomb_png(), "image/png", 422),
    ],
)
def test_bad_image(local_stack, name, image, content_type, status):
    assert_error(post_job(local_stack, {"image": (name, image, content_type)}, GOOD_FORM), status, "image")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("caption", "   "),
        ("negative_caption", "   "),
        ("num_outputs", "0"),
        ("num_outputs", "9"),
        ("expires_in", "0"),
        ("expires_in", "86401"),
        ("caption", "x" * 1001),
        ("seconds", "0"),
        ("seconds", "31"),
        ("seconds", "long"),
        ("steps", "0"),
        ("steps", "1001"),
        ("steps", "2.5"),
        ("guidance_scale", "51"),
        ("image_strength", "1.5"),
        ("image_strength", "-0.1"),
        ("scheduler", "euler"),
        ("seed", "-1"),
        ("image_guidance", "unconditional"),
        ("preset", "fast"),
        ("image_steps", "0"),
        ("image_steps", "1001"),
        ("guidance_start", "1"),
        ("guidance_end", "0"),
        ("guidance_end", "1.5"),
    ],
)
def test_out_of_range_parameter(local_stack, sample_png, field, value):
    form = {**GOOD_FORM, field: value}
    assert_error(post_job(local_stack, {"image": ("s.png", sample_png, "image/png")}, form), 422, field)


def test_more_image_passes_than_steps_names_image_steps(local_stack, sample_png):
    form = {**GOOD_FORM, "steps": "4", "image_steps": "5"}
    assert_error(post_job(local_stack, {"image": ("s.png", sample_png, "image/png")}, form), 422, "image_steps")


def test_a_guidance_interval_ending_before_it_starts_names_guidance_end(local_stack, sample_png):
    form = {**GOOD_FORM, "guidance_start": "0.6", "guidance_end": "0.4"}
    assert_error(post_job(local_stack, {"image": ("s.png", sample_png, "image/png")}, form), 422, "guidance_end")


def test_a_caption_or_an_image_is_needed(local_stack, sample_png):
    image = {"image": ("s.png", sample_png, "image/png")}
    form = {name: (None, value) for name, value in GOOD_FORM.items() if name != "caption"}
    assert_error(post_job(local_stack, form, {}), 422, "caption")  # neither
    assert_error(post_job(local_stack, {**form, "caption": (None, "")}, {}), 422, "caption")  # "" is not given
    image_only = post_job(local_stack, {**form, **image}, {})
    assert image_only.status_code == 202 and image_only.json()["params"]["caption"] is None
    caption_only = post_job(local_stack, {**form, "caption": (None, "calm piano")}, {})  # multipart, no photo
    assert caption_only.status_code == 202 and caption_only.json()["params"]["caption"] == "calm piano"
    assert_error(post_job(local_stack, None, GOOD_FORM), 415, "Content-Type")  # urlencoded: not the strict parser


def test_unknown_form_fields_are_named(local_stack, sample_png):
    form = {**GOOD_FORM, "negative_prompt": "noise", "cfg": "3"}
    error = assert_error(post_job(local_stack, {"image": ("s.png", sample_png, "image/png")}, form), 422, "cfg")
    assert "cfg, negative_prompt" in error["message"] and "negative_caption" in error["message"]


def test_image_over_size_limit_is_413(local_stack, sample_png):
    limit = 10 * 1024 * 1024
    big = sample_png + b"\0" * (limit - len(sample_png) + 1)
    assert_error(post_job(local_stack, {"image": ("big.png", big, "image/png")}, GOOD_FORM), 413, "image")


def raw_request(stack, head: str, body_chunks) -> tuple[bytes, int]:
    """Send a request by hand, stopping as soon as the server answers; returns (answer, body bytes sent)."""
    port = int(stack.env["MELFUSION_PORT"])
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head.encode())
        for chunk in body_chunks:
            if select.select([sock], [], [], 0)[0]:
                break
            try:
                sock.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(chunk)
        answer = b""
        while not answer.endswith(b"}"):  # the JSON error body closes the answer
            if not (part := sock.recv(65536)):
                break
            answer += part
        return answer, sent


def test_declared_oversized_body_is_refused_before_it_is_sent(local_stack):
    head = (f"POST /jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ALICE}\r\n"
            "Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 1000000000\r\n\r\n")  # fmt: skip
    answer, sent = raw_request(local_stack, head, [])
    assert answer.startswith(b"HTTP/1.1 413") and b'"field":"image"' in answer
    assert sent == 0


def test_streamed_oversized_body_is_cut_off(local_stack):
    head = (f"POST /jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ALICE}\r\n"
            "Content-Type: multipart/form-data; boundary=b\r\nTransfer-Encoding: chunked\r\n\r\n")  # fmt: skip
    part = b'--b\r\nContent-Disposition: form-data; name="image"; filename="big.png"\r\n\r\n'
    chunk = lambda data: b"%x\r\n%s\r\n" % (len(data), data)
    answer, sent = raw_request(local_stack, head, [chunk(part)] + [chunk(b"\0" * 65536)] * 1600)  # 100 MB
    assert answer.startswith(b"HTTP/1.1 413") and b'"field":"image"' in answer
    assert sent < 30 * 1024 * 1024


def test_openapi_states_the_bundle_ranges(local_stack):
    with local_stack.http() as http:
        document = http.get("/openapi.json").json()
    body = document["paths"]["/jobs"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert body == {"$ref": "#/components/schemas/JobCreate"}
    schema = document["components"]["schemas"]["JobCreate"]
    form = schema["properties"]
    assert schema["additionalProperties"] is False and form["image"]["format"] == "binary"
    assert form["seconds"]["anyOf"][0]["maximum"] == 30.0
    assert form["steps"]["anyOf"][0]["maximum"] == 1000
    assert form["scheduler"]["anyOf"][0]["enum"] == ["ddim", "dpmpp", "ddpm"]
    assert form["image_guidance"]["anyOf"][0]["enum"] == ["conditional", "both"]
    assert form["preset"]["anyOf"][0]["enum"] == ["tango", "paper", "fast"]  # fast: a student bundle's (422 here)
    assert form["num_outputs"]["anyOf"][0]["maximum"] == 8 and form["num_outputs"]["default"] == 1
    assert form["caption"]["anyOf"][0]["maxLength"] == 1000 and "negative_caption" in form
    assert "TANGO" in form["preset"]["description"]  # the help text comes from GenerationRequest


def test_unknown_job_is_404(local_stack):
    with local_stack.http(ALICE) as http:
        assert_error(http.get("/jobs/no-such-job"), 404, "id")


def test_api_keys_isolate_jobs(local_stack, sample_png):
    created = post_job(local_stack, {"image": ("s.png", sample_png, "image/png")}, GOOD_FORM, api_key=ALICE)
    assert created.status_code == 202
    job_id = created.json()["id"]
    with local_stack.http(BOB) as bob, local_stack.http(ALICE) as alice, local_stack.http("wrong") as stranger:
        assert alice.get(f"/jobs/{job_id}").status_code == 200
        for path in (f"/jobs/{job_id}", f"/jobs/{job_id}/audio"):
            assert_error(bob.get(path), 404, "id")
        assert_error(bob.post(f"/jobs/{job_id}/cancel"), 404, "id")
        assert_error(stranger.get(f"/jobs/{job_id}"), 401, "Authorization")
    with local_stack.http() as anonymous:
        assert_error(anonymous.post("/jobs", data=GOOD_FORM), 401, "Authorization")


def test_idempotency_key(local_stack, sample_png):
    files = {"image": ("s.png", sample_png, "image/png")}
    first = post_job(local_stack, files, GOOD_FORM, headers={"Idempotency-Key": "order-42"})
    again = post_job(local_stack, files, GOOD_FORM, headers={"Idempotency-Key": "order-42"})
    assert first.status_code == again.status_code == 202
    assert again.json()["id"] == first.json()["id"] and again.headers["Idempotent-Replayed"] == "true"
    other_key = post_job(local_stack, files, GOOD_FORM, headers={"Idempotency-Key": "order-43"})
    assert other_key.json()["id"] != first.json()["id"]
    bob_same_key = post_job(local_stack, files, GOOD_FORM, api_key=BOB, headers={"Idempotency-Key": "order-42"})
    assert bob_same_key.json()["id"] != first.json()["id"]  # keys are per API key
    changed = post_job(
        local_stack, files, {**GOOD_FORM, "caption": "loud drums"}, headers={"Idempotency-Key": "order-42"}
    )
    assert_error(changed, 422, "Idempotency-Key")


def test_file_links_are_signed(local_stack, sample_png):
    client = local_stack.client(ALICE)
    job = client.wait(client.submit(sample_png, "signed", seconds=0.5, steps=2).id, timeout=120)
    url = job.result["url"]
    assert "/files/outputs/" in url and "signature=" in url
    with local_stack.http() as http:
        assert http.get(url).status_code == 200
        assert_error(http.get(url.replace("signature=", "signature=0")), 403, "signature")
        assert_error(http.get(url.replace("expires=", "expires=1")), 403, "signature")
        assert_error(http.get(url.replace("/outputs/", "/inputs/").replace(".wav", ".png")), 403, "signature")
