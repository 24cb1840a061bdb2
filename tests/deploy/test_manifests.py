"""The Kubernetes manifests render, validate, and keep the properties the service relies on (no cluster)."""

from __future__ import annotations

import re

import jsonschema
import kubernetes_validate
import pytest
from keda_schema import SCHEMAS, TRIGGER_METADATA
from pydantic import SecretStr
from redis import Redis
from rendering import KUBERNETES_VERSION, OVERLAYS, find

from jobs.queue import open_queue
from jobs.settings import Settings
from service.app import create_app

SECRET_SETTINGS = {f"MELFUSION_{name.upper()}" for name, field in Settings.model_fields.items()
                   if field.annotation in (SecretStr, SecretStr | None)} | {"MELFUSION_API_KEYS",
                   "MELFUSION_S3_ACCESS_KEY", "MELFUSION_WEBHOOK_SECRET"}  # fmt: skip


def container(workload: dict, name: str) -> dict:
    (match,) = [c for c in workload["spec"]["template"]["spec"]["containers"] if c["name"] == name]
    return match


# Stands in for every Secret value; shaped like a Standard Webhooks secret, which Settings validates.
SECRET_PLACEHOLDER = "whsec_cGxhY2Vob2xkZXItc2VjcmV0LTMyLWJ5dGVzLWxvbmc="


def settings_of(objects: list[dict], deployment: str, name: str, monkeypatch) -> Settings:
    """The Settings a container would load: its ConfigMap and literal env, placeholders for Secret values."""
    spec = container(find(objects, "Deployment", deployment), name)
    for source in spec.get("envFrom", []):
        if "configMapRef" in source:
            for key, value in find(objects, "ConfigMap", source["configMapRef"]["name"])["data"].items():
                monkeypatch.setenv(key, value)
    for entry in spec["env"]:
        monkeypatch.setenv(entry["name"], entry.get("value", SECRET_PLACEHOLDER))
    if not any("secretRef" in source for source in spec.get("envFrom", [])):
        return Settings()
    return Settings(s3_endpoint_url="http://s3.example", s3_access_key="k", s3_secret_key="s")  # melfusion-s3


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_validates(rendered, overlay):
    """Kubernetes kinds against the pinned release's strict schemas; KEDA's against the fields KEDA documents."""
    kinds = set()
    for obj in rendered[overlay]:
        kinds.add(obj["kind"])
        if obj["apiVersion"].startswith("keda.sh/"):
            jsonschema.validate(obj, SCHEMAS[obj["kind"]])
            for trigger in obj["spec"].get("triggers", []):
                jsonschema.validate(trigger["metadata"], TRIGGER_METADATA[trigger["type"]])
        else:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    assert {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler", "StatefulSet",
            "PersistentVolumeClaim", "Job", "ScaledObject", "TriggerAuthentication"} <= kinds  # fmt: skip


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_worker_outlives_its_longest_job(rendered, overlay, monkeypatch):
    worker = find(rendered[overlay], "Deployment", "melfusion-worker")
    settings = settings_of(rendered[overlay], "melfusion-worker", "worker", monkeypatch)
    assert worker["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > settings.job_timeout_seconds


def test_gpu_workers_get_one_gpu_on_gpu_nodes(rendered, monkeypatch):
    objects = rendered["gpu"]
    pod = find(objects, "Deployment", "melfusion-worker")["spec"]["template"]["spec"]
    resources = container(find(objects, "Deployment", "melfusion-worker"), "worker")["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == 1
    assert any(t["key"] == "nvidia.com/gpu" and t["effect"] == "NoSchedule" for t in pod["tolerations"])
    assert pod["nodeSelector"]
    settings = settings_of(objects, "melfusion-worker", "worker", monkeypatch)
    assert settings.device == "cuda" and settings.dtype == "float16"


def test_cpu_trial_needs_no_gpu(rendered):
    worker = find(rendered["cpu-trial"], "Deployment", "melfusion-worker")
    assert "nodeSelector" not in worker["spec"]["template"]["spec"]
    assert "nvidia.com/gpu" not in str(worker)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_api_probes_hit_real_routes(rendered, overlay, monkeypatch, tiny_bundle):
    api = container(find(rendered[overlay], "Deployment", "melfusion-api"), "api")
    settings = settings_of(rendered[overlay], "melfusion-api", "api", monkeypatch)
    openapi = create_app(settings.model_copy(update={"bundle_dir": tiny_bundle})).openapi()
    routes = {path for path, operations in openapi["paths"].items() if "get" in operations}
    assert api["livenessProbe"]["httpGet"]["path"] == "/livez" and api["readinessProbe"]["httpGet"]["path"] == "/readyz"
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert api[probe]["httpGet"]["path"] in routes
        assert api[probe]["httpGet"]["port"] in {port["name"] for port in api["ports"]}
    assert api["ports"][0]["containerPort"] == settings.port
    assert api["resources"]["requests"] and api["resources"]["limits"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_scaled_object_watches_the_queue_the_settings_name(rendered, overlay, monkeypatch):
    objects = rendered[overlay]
    settings = settings_of(objects, "melfusion-worker", "worker", monkeypatch)
    scaled = find(objects, "ScaledObject", "melfusion-worker")
    assert scaled["spec"]["scaleTargetRef"]["name"] == "melfusion-worker"
    (redis_trigger,) = [t for t in scaled["spec"]["triggers"] if t["type"] == "redis"]
    list_name = redis_trigger["metadata"]["listName"]
    assert list_name == open_queue(Redis(), settings).key == f"rq:queue:{settings.queue_name}"
    assert int(redis_trigger["metadata"]["listLength"]) >= 1
    # KEDA's operator runs in another namespace: the address is the Redis Service's full name.
    redis_service = find(objects, "Service", "melfusion-redis")
    host, port = redis_trigger["metadata"]["address"].rsplit(":", 1)
    assert host == f"melfusion-redis.{redis_service['metadata']['namespace']}.svc.cluster.local"
    assert int(port) == redis_service["spec"]["ports"][0]["port"]
    auth = find(objects, "TriggerAuthentication", redis_trigger["authenticationRef"]["name"])
    assert auth["spec"]["secretTargetRef"] == [{"parameter": "password", "name": "melfusion-redis", "key": "password"}]
    assert scaled["spec"]["minReplicaCount"] >= 1  # /readyz wants a live worker: zero would stall intake


def test_gpu_scaling_also_counts_running_jobs(rendered):
    scaled = find(rendered["gpu"], "ScaledObject", "melfusion-worker")
    (running,) = [t for t in scaled["spec"]["triggers"] if t["type"] == "prometheus"]
    assert running["metadata"]["query"] == 'max(melfusion_jobs{status="running"})'
    assert running["metadata"]["threshold"] == "1"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_secrets_are_referenced_never_inlined(rendered, overlay):
    objects = rendered[overlay]
    assert not [obj for obj in objects if obj["kind"] == "Secret"]
    for obj in objects:
        assert not SECRET_SETTINGS & set(obj.get("data", {})), f"{obj['metadata']['name']} holds a secret setting"
    secret_names = set()
    for obj in objects:
        pod = obj.get("spec", {}).get("template", {}).get("spec")
        for spec in (pod or {}).get("containers", []) + (pod or {}).get("initContainers", []):
            secret_names |= {s["secretRef"]["name"] for s in spec.get("envFrom", []) if "secretRef" in s}
            from_secrets = {e["name"] for e in spec.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})}
            for entry in spec.get("env", []):
                secret_names |= {entry["valueFrom"]["secretKeyRef"]["name"]} if entry["name"] in from_secrets else set()
                if "value" not in entry:
                    continue
                assert entry["name"] not in SECRET_SETTINGS and not re.search("PASSWORD|SECRET|TOKEN", entry["name"])
                # Secret values reach other variables only as $(VAR) references to secret-sourced variables.
                assert set(re.findall(r"\$\((\w+)\)", entry["value"])) <= from_secrets
                assert not re.search(r"://[^/$]*:[^/@$]+@", entry["value"]), f"credentials inlined in {entry['name']}"
    assert {"melfusion-redis", "melfusion-api"} <= secret_names


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_bundle_is_read_only_where_it_is_served(rendered, overlay):
    for name in ("melfusion-api", "melfusion-worker"):
        pod = find(rendered[overlay], "Deployment", name)["spec"]["template"]["spec"]
        claims = {v["name"]: v["persistentVolumeClaim"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
        (volume,) = [volume for volume, claim in claims.items() if claim["claimName"] == "melfusion-bundle"]
        assert claims[volume]["readOnly"] is True
        for spec in pod["containers"] + pod.get("initContainers", []):
            assert all(m["readOnly"] for m in spec["volumeMounts"] if m["name"] == volume)
    job = find(rendered[overlay], "Job", "melfusion-bundle-init")
    assert "python -m model_store verify /models/bundle" in container(job, "bundle")["args"][0]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_redis_keeps_jobs_on_a_volume(rendered, overlay):
    redis = find(rendered[overlay], "StatefulSet", "melfusion-redis")
    args = " ".join(container(redis, "redis")["args"])
    assert "--appendonly yes" in args and "--maxmemory-policy noeviction" in args and "--requirepass" in args
    assert redis["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
