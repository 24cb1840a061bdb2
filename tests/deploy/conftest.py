"""Fixtures of the deploy tests: every overlay rendered, and an API for live /metrics scrapes.

No cluster: everything checked here is offline. The server fixtures are those of tests/service.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
from rendering import KUBERNETES, OVERLAYS, kustomize

SERVICE_TESTS = Path(__file__).parents[1] / "service"


def _load_service_fixtures():
    """tests/service/conftest.py under another module name, so its server fixtures serve these tests too."""
    sys.path.insert(0, str(SERVICE_TESTS))  # its `servers` helper module
    spec = importlib.util.spec_from_file_location("service_fixtures", SERVICE_TESTS / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_service = _load_service_fixtures()
workdir, redis_port, sample_png = _service.workdir, _service.redis_port, _service.sample_png


@pytest.fixture(scope="session")
def rendered() -> dict[str, list[dict]]:
    """Every overlay's objects, by overlay name."""
    return {name: kustomize(KUBERNETES / "overlays" / name) for name in OVERLAYS}


@pytest.fixture(scope="session")
def metrics_stack(workdir, redis_port, tiny_bundle):
    """An API without workers on its own Redis database (a real redis-server), for /metrics scrapes."""
    from servers import launch_stack

    stack = launch_stack("deploy", workdir=workdir, redis_port=redis_port, db=11, bundle=tiny_bundle,
                         with_worker=False, storage_dir=workdir / "deploy-storage")  # fmt: skip
    yield stack
    stack.stop()
