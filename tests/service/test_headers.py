"""Protective headers on the demo page, its files, the API's answers and the API reference pages."""

from __future__ import annotations

import base64
import hashlib
import re

import pytest

PROTECTIVE = {"x-content-type-options": "nosniff", "x-frame-options": "DENY", "referrer-policy": "no-referrer"}


def directives(policy: str) -> dict[str, list[str]]:
    return {name: values for name, *values in (part.split() for part in policy.split(";") if part.strip())}


@pytest.mark.parametrize("path", ["/", "/static/demo.js", "/livez", "/jobs/nope", "/openapi.json"])
def test_every_answer_carries_the_protective_headers(live_stack, path):
    response = live_stack.http().get(path)
    assert {name: response.headers.get(name) for name in PROTECTIVE} == PROTECTIVE, path
    policy = directives(response.headers["content-security-policy"])
    assert policy["script-src"] == ["'self'"] and policy["frame-ancestors"] == ["'none'"]  # no inline script
    assert policy["default-src"] == ["'none'"] and "'unsafe-inline'" not in policy["style-src"]


def test_the_demo_page_has_no_inline_script_or_style(live_stack):
    page = live_stack.http().get("/").text
    assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", page) and "<style" not in page and " style=" not in page
    assert not re.search(r"\son[a-z]+=", page)  # no inline event handlers either


def test_the_api_reference_admits_exactly_its_own_inline_script(live_stack):
    response = live_stack.http().get("/docs")
    (script,) = re.findall(r"<script>(.*?)</script>", response.text, re.DOTALL)
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    policy = directives(response.headers["content-security-policy"])
    assert f"'sha256-{digest}'" in policy["script-src"] and "'unsafe-inline'" not in policy["script-src"]
    assert policy["frame-ancestors"] == ["'none'"] and response.headers["x-content-type-options"] == "nosniff"
