"""The API side and the shared contract stay light: `jobs` imports neither torch nor numpy nor soundfile,
and `service`, with its app built for a bundle on disk, does not import torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "numpy", "soundfile", "diffusers", "transformers")

PROBE = r"""
import json, sys

import jobs.heartbeat, jobs.lifecycle, jobs.metrics, jobs.queue, jobs.settings, jobs.storage, jobs.webhooks
after_jobs = sorted(name for name in sys.argv[3].split(",") if name in sys.modules)

from jobs.settings import load_settings
from service.app import create_app

app = create_app(load_settings(bundle_dir=sys.argv[1], storage_dir=sys.argv[2], redis_url="redis://127.0.0.1:1"))
app.openapi()
print(json.dumps({"jobs": after_jobs, "service": sorted(name for name in ("torch",) if name in sys.modules)}))
"""


def test_jobs_and_service_import_no_engine(tmp_path, limits_only_bundle):
    probe = subprocess.run(
        [sys.executable, "-c", PROBE, str(limits_only_bundle), str(tmp_path / "store"), ",".join(HEAVY)],
        cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert probe.returncode == 0, probe.stderr
    assert json.loads(probe.stdout) == {"jobs": [], "service": []}
