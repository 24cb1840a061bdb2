"""Schemathesis against the live API's /openapi.json: every operation, valid and invalid data, a bounded
number of examples each. No 5xx, and every response (status, headers, body) as the document says."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from servers import ALICE

EXAMPLES = 25  # per operation and mode; about a minute in all on two cores


@pytest.mark.skipif(shutil.which("schemathesis") is None, reason="pip install schemathesis (in the dev extra)")
def test_openapi_fuzzing_finds_no_server_error(local_stack):
    command = [
        "schemathesis", "run", f"{local_stack.base_url}/openapi.json",
        "--checks", "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance",
        "--mode", "all", "--max-examples", str(EXAMPLES), "--seed", "9", "--generation-deterministic",
        "--header", f"Authorization: Bearer {ALICE}", "--request-timeout", "30",
        "--suppress-health-check", "all", "--phases", "examples,coverage,fuzzing",
    ]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
