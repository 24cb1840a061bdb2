"""docker-compose.yml and the Dockerfiles have the deployment properties the service relies on (parsed; no
Docker engine needed)."""

from __future__ import annotations

import re

import pytest
import yaml

from embedded.processes import PROJECT_ROOT

COMPOSE_TEXT = (PROJECT_ROOT / "docker-compose.yml").read_text()
SERVICES = yaml.safe_load(COMPOSE_TEXT)["services"]
WORKERS = {name: service for name, service in SERVICES.items()
           if service.get("build", {}).get("dockerfile") == "docker/Dockerfile.worker"}  # fmt: skip


def seconds(duration: str) -> int:
    units = {"h": 3600, "m": 60, "s": 1}
    return sum(int(value) * units[unit] for value, unit in re.findall(r"(\d+)([hms])", duration))


def test_redis_keeps_jobs():
    command = " ".join(SERVICES["redis"]["command"])
    assert "--appendonly yes" in command and "--maxmemory-policy noeviction" in command
    assert any(volume.endswith(":/data") for volume in SERVICES["redis"]["volumes"])


def test_s3_store_and_bucket_init():
    s3 = SERVICES["s3"]
    assert "seaweedfs" in s3["image"] and "-s3.config" in s3["command"][0]
    init = SERVICES["s3-init"]
    assert init["depends_on"]["s3"]["condition"] == "service_healthy"
    assert "create-bucket" in init["command"][0]
    for name in ("api", *WORKERS):
        assert SERVICES[name]["depends_on"]["s3-init"]["condition"] == "service_completed_successfully"


def test_api_is_the_slim_image_with_public_s3_endpoint():
    api = SERVICES["api"]
    assert api["build"]["dockerfile"] == "docker/Dockerfile.api"
    env = api["environment"]
    assert env["MELFUSION_S3_PUBLIC_ENDPOINT_URL"] != env["MELFUSION_S3_ENDPOINT_URL"]
    dockerfile = (PROJECT_ROOT / "docker" / "Dockerfile.api").read_text()
    assert "python:3.11-slim@sha256:" in dockerfile and not re.search(r"pip install[^\n]*\btorch\b", dockerfile)
    assert "download.pytorch.org/whl/cu" in (PROJECT_ROOT / "docker" / "Dockerfile.worker").read_text()


def test_one_worker_service_per_gpu_from_one_anchor():
    assert len(WORKERS) >= 2
    assert "x-worker: &worker" in COMPOSE_TEXT
    assert COMPOSE_TEXT.count("<<: *worker") == len(WORKERS)
    device_ids = []
    for service in WORKERS.values():
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["capabilities"] == ["gpu"] and len(device["device_ids"]) == 1
        device_ids += device["device_ids"]
    assert len(set(device_ids)) == len(WORKERS)


@pytest.mark.parametrize("name", ["api", "worker-gpu0", "worker-gpu1"])
def test_bundle_volume_is_read_only(name):
    (bundle,) = [
        v for v in SERVICES[name]["volumes"] if v["target"] == SERVICES[name]["environment"]["MELFUSION_BUNDLE_DIR"]
    ]
    assert bundle["read_only"] is True


@pytest.mark.parametrize("name", ["redis", "s3", "api", "worker-gpu0", "worker-gpu1"])
def test_healthchecks(name):
    assert SERVICES[name]["healthcheck"]["test"]


def test_workers_get_longer_to_stop_than_a_job_may_run():
    for service in WORKERS.values():
        timeout = int(service["environment"]["MELFUSION_JOB_TIMEOUT_SECONDS"])
        assert seconds(service["stop_grace_period"]) > timeout
        assert service["stop_signal"] == "SIGTERM"
