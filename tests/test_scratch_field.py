"""Adding a field touches melfusion/request.py only (and the engine, to use it): a copy of the code with one
more declared field shows it in the HTTP form and its validation, the OpenAPI document, the CLI's flags, the
client's parameters and the queue payload, with nothing else edited. CONTRIBUTING.md walks the same path."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("melfusion", "jobs", "service", "melfusion_client")
ANCHOR = "    @staticmethod\n    def field_names()"
SCRATCH = '''    scratch_level: int | None = declare("a scratch field of the test", ge=0, le=3)

'''

PROBE = r"""
import json, sys

import httpx
from starlette.datastructures import FormData

from jobs.settings import load_settings
from melfusion.cli import build_parser
from melfusion.limits import read_limits
from melfusion.request import GenerationRequest
from melfusion_client import MelFusionClient
from service.app import create_app

bundle, storage = sys.argv[1], sys.argv[2]
settings = load_settings(bundle_dir=bundle, storage_dir=storage, redis_url="redis://127.0.0.1:1")
app = create_app(settings)  # connects to nothing before a request
form = app.openapi()["components"]["schemas"]["JobCreate"]["properties"]["scratch_level"]
job_form = app.state.job_form
good = job_form.validate(FormData([("caption", "x"), ("scratch_level", "2")]))
try:
    job_form.validate(FormData([("scratch_level", "9")]))
    refused = None
except Exception as exc:  # RequestValidationError: the 422 names the field
    refused = exc.errors()[0]["loc"][-1]
cli = build_parser().parse_args(["generate", "--caption", "x", "--out", "o.wav", "--scratch-level", "3"])
sent = []
transport = httpx.MockTransport(lambda request: (sent.append(request.read()), httpx.Response(500))[1])
client = MelFusionClient("http://service", transport=transport)
try:
    client.submit(caption="x", scratch_level=1)
except Exception:
    pass  # the fake server answers 500: only what the client sent matters here
payload = GenerationRequest(caption="x", scratch_level=2).resolved(read_limits(bundle)).to_dict()
print(json.dumps({
    "openapi": [form["anyOf"][0].get("minimum"), form["anyOf"][0].get("maximum"), form["description"]],
    "form": good.get("scratch_level"), "refused": refused, "cli": cli.scratch_level,
    "client_sent": b'name="scratch_level"\r\n\r\n1' in sent[0],
    "payload": GenerationRequest.from_dict(json.loads(json.dumps(payload))).scratch_level,
    "torch": "torch" in sys.modules,
}))
"""


def test_a_field_declared_in_request_py_reaches_every_interface(tmp_path, limits_only_bundle):
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / "code" / package, ignore=shutil.ignore_patterns("__pycache__"))
    request_py = tmp_path / "code" / "melfusion" / "request.py"
    source = request_py.read_text()
    assert source.count(ANCHOR) == 1
    request_py.write_text(source.replace(ANCHOR, SCRATCH + ANCHOR))
    probe = subprocess.run(
        [sys.executable, "-c", PROBE, str(limits_only_bundle), str(tmp_path / "store")],
        cwd=tmp_path, env={"PYTHONPATH": str(tmp_path / "code"), "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert probe.returncode == 0, probe.stderr
    seen = json.loads(probe.stdout)
    assert seen["openapi"] == [0, 3, "a scratch field of the test"]
    assert (seen["form"], seen["refused"], seen["cli"]) == (2, "scratch_level", 3)
    assert seen["client_sent"] and seen["payload"] == 2
    assert not seen["torch"]  # the API side, the CLI's parser and the client stay torch-free
