"""The Kubernetes manifests render, validate, and keep the properties the service relies on (no cluster)."""

from __future__ import annotations

import re
import shutil

import jsonschema
import kubernetes_validate
import pytest
from keda_schema import SCHEMAS, TRIGGER_METADATA
from pod_security import restricted_violations
from pydantic import SecretStr
from redis import Redis
from rendering import KUBERNETES, KUBERNETES_VERSION, OVERLAYS, find, kustomize

from embedded.processes import PROJECT_ROOT

from jobs.queue import open_queue
from jobs.settings import Settings
from service.app import create_app

SECRET_SETTINGS = {f"MELFUSION_{name.upper()}" for name, field in Settings.model_fields.items()
                   if field.annotation in (SecretStr, SecretStr | None)} | {"MELFUSION_API_KEYS",
                   "MELFUSION_S3_ACCESS_KEY", "MELFUSION_WEBHOOK_SECRET"}  # fmt: skip


README = (PROJECT_ROOT / "README.md").read_text()
IMAGE_UID, REDIS_UID = 10001, 999  # docker/Dockerfile.*'s melfusion user; redis:7.4-alpine's redis user


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
            "PersistentVolumeClaim", "Job", "ScaledObject", "TriggerAuthentication", "NetworkPolicy"} <= kinds  # fmt: skip


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
    # The GPU request is what places the pod, so NVIDIA's device plugin suffices (README): no selector on a
    # label only GPU feature discovery sets.
    assert "nodeSelector" not in pod
    assert "device plugin" in README and "nvidia.com/gpu.present" not in README
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


def trigger(scaled: dict, name: str) -> dict:
    (match,) = [t for t in scaled["spec"]["triggers"] if t.get("name") == name]
    return match


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_scaled_object_watches_the_queue_the_settings_name(rendered, overlay, monkeypatch):
    objects = rendered[overlay]
    settings = settings_of(objects, "melfusion-worker", "worker", monkeypatch)
    scaled = find(objects, "ScaledObject", "melfusion-worker")
    assert scaled["spec"]["scaleTargetRef"]["name"] == "melfusion-worker"
    queue = open_queue(Redis(), settings)
    queued, running = trigger(scaled, "queued-jobs"), trigger(scaled, "running-jobs")
    assert queued["type"] == running["type"] == "redis"
    assert queued["metadata"]["listName"] == queue.key == f"rq:queue:{settings.queue_name}"
    assert int(queued["metadata"]["listLength"]) >= 1
    # RQ's started registry lists every job of a batch: divided by the batch size it never exceeds the busy
    # workers, and while any job runs it keeps a worker (KEDA reads the sorted set with ZCARD).
    assert running["metadata"]["listName"] == queue.started_job_registry.key == f"rq:wip:{settings.queue_name}"
    assert int(running["metadata"]["listLength"]) == settings.max_batch
    # KEDA's operator runs in another namespace: the address is the Redis Service's full name.
    redis_service = find(objects, "Service", "melfusion-redis")
    for redis_trigger in (queued, running):
        host, port = redis_trigger["metadata"]["address"].rsplit(":", 1)
        assert host == f"melfusion-redis.{redis_service['metadata']['namespace']}.svc.cluster.local"
        assert int(port) == redis_service["spec"]["ports"][0]["port"]
        assert redis_trigger["metadata"]["activationListLength"] == "0"
        auth = find(objects, "TriggerAuthentication", redis_trigger["authenticationRef"]["name"])
        assert auth["spec"]["secretTargetRef"] == [{"parameter": "password", "name": "melfusion-redis", "key": "password"}]
    # /readyz does not want a worker, so workers may scale to zero: the first queued job wakes one.
    assert scaled["spec"]["minReplicaCount"] == 0
    api = container(find(objects, "Deployment", "melfusion-api"), "api")
    assert api["readinessProbe"]["httpGet"]["path"] == "/readyz"


def test_gpu_scaling_counts_busy_workers_not_jobs(rendered):
    scaled = find(rendered["gpu"], "ScaledObject", "melfusion-worker")
    busy = trigger(scaled, "busy-workers")
    assert busy["type"] == "prometheus"
    assert busy["metadata"]["query"] == "max(melfusion_workers_busy)"
    assert busy["metadata"]["threshold"] == "1"
    assert busy["metadata"]["ignoreNullValues"] == "false"  # an empty answer must not read as 0 busy workers
    assert "busy-workers" not in {t.get("name") for t in find(rendered["cpu-trial"], "ScaledObject",
                                                               "melfusion-worker")["spec"]["triggers"]}  # fmt: skip


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
    (job,) = [obj for obj in rendered[overlay] if obj["kind"] == "Job"]
    assert container(job, "bundle")["args"][0].startswith("python -m model_store verify /models/bundle || ")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_redis_keeps_jobs_on_a_volume(rendered, overlay):
    redis = find(rendered[overlay], "StatefulSet", "melfusion-redis")
    args = " ".join(container(redis, "redis")["args"])
    assert "--appendonly yes" in args and "--maxmemory-policy noeviction" in args and "--requirepass" in args
    assert redis["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"


def byte_count(quantity: str) -> int:
    """A Kubernetes memory quantity (Mi, Gi) or a Redis one (mb, gb: powers of 1024) in bytes."""
    number, unit = re.fullmatch(r"(\d+)(\w*)", quantity).groups()
    return int(number) * {"": 1, "Mi": 2**20, "Gi": 2**30, "mb": 2**20, "gb": 2**30}[unit]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_redis_refuses_writes_before_its_memory_limit_kills_it(rendered, overlay):
    spec = container(find(rendered[overlay], "StatefulSet", "melfusion-redis"), "redis")
    args = spec["args"]
    maxmemory = byte_count(args[args.index("--maxmemory") + 1])
    limit = byte_count(spec["resources"]["limits"]["memory"])
    assert maxmemory <= 0.8 * limit  # headroom for the AOF rewrite's fork and Redis' own overhead


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_disruption_budgets(rendered, overlay):
    """Drains move workers one at a time; Redis (every queued job) only when an operator moves it."""
    budgets = {obj["metadata"]["name"]: obj["spec"] for obj in rendered[overlay] if obj["kind"] == "PodDisruptionBudget"}
    assert budgets["melfusion-worker"]["maxUnavailable"] == 1
    assert budgets["melfusion-redis"]["maxUnavailable"] == 0
    assert budgets["melfusion-api"]["minAvailable"] == 1
    for name, budget in budgets.items():
        assert budget["selector"]["matchLabels"] == {"app.kubernetes.io/name": name}


def pod_specs(objects: list[dict]) -> dict[str, dict]:
    return {f"{obj['kind']}/{obj['metadata']['name']}": obj["spec"]["template"]["spec"]
            for obj in objects if "template" in obj.get("spec", {})}  # fmt: skip


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_meets_pod_security_restricted(rendered, overlay):
    namespace = find(rendered[overlay], "Namespace", "melfusion")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    pods = pod_specs(rendered[overlay])
    assert {"Deployment/melfusion-api", "Deployment/melfusion-worker", "StatefulSet/melfusion-redis"} <= set(pods)
    for name, pod in pods.items():
        assert restricted_violations(pod) == [], name
        assert pod["automountServiceAccountToken"] is False, name
        volumes = {volume["name"]: volume for volume in pod.get("volumes", [])}
        for spec in pod["containers"] + pod.get("initContainers", []):
            assert spec["securityContext"]["readOnlyRootFilesystem"] is True, f"{name} {spec['name']}"
            writable = {m["mountPath"] for m in spec.get("volumeMounts", []) if not m.get("readOnly")}
            if spec in pod["containers"] and spec["image"].startswith("melfusion-"):
                assert "/tmp" in writable, f"{name} {spec['name']}: /tmp (HOME, temporary files) not writable"
                (tmp,) = [m["name"] for m in spec["volumeMounts"] if m["mountPath"] == "/tmp"]
                assert "emptyDir" in volumes[tmp]
        assert pod["securityContext"]["runAsUser"] in (IMAGE_UID, REDIS_UID), name


def test_pod_security_check_finds_what_it_should():
    """The checker itself: a pod as Kubernetes' defaults leave it fails on every count restricted adds."""
    loose = {"containers": [{"name": "app", "image": "x"}], "volumes": [{"name": "h", "hostPath": {"path": "/"}}]}
    problems = "\n".join(restricted_violations(loose))
    for expected in ("hostPath", "allowPrivilegeEscalation", "runAsNonRoot", "seccompProfile", "drop ALL"):
        assert expected in problems


def test_images_run_as_the_uid_the_pods_declare():
    for dockerfile in ("Dockerfile.api", "Dockerfile.worker"):
        assert f"USER {IMAGE_UID}:{IMAGE_UID}" in (PROJECT_ROOT / "docker" / dockerfile).read_text()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies(rendered, overlay):
    policies = {obj["metadata"]["name"]: obj["spec"] for obj in rendered[overlay] if obj["kind"] == "NetworkPolicy"}
    assert policies["melfusion-default-deny-ingress"] == {"podSelector": {}, "policyTypes": ["Ingress"]}
    api = policies["melfusion-api"]
    assert api["ingress"] == [{"ports": [{"port": "http", "protocol": "TCP"}]}]  # any source, its port only
    redis = policies["melfusion-redis"]["ingress"]
    (rule,) = redis
    sources = [peer.get("podSelector", peer.get("namespaceSelector"))["matchLabels"] for peer in rule["from"]]
    assert sources == [{"app.kubernetes.io/name": "melfusion-api"}, {"app.kubernetes.io/name": "melfusion-worker"},
                       {"kubernetes.io/metadata.name": "keda"}]  # fmt: skip
    worker = policies["melfusion-worker"]
    assert worker["policyTypes"] == ["Ingress", "Egress"] and "ingress" not in worker  # nothing inbound
    allowed = sorted((port["port"], port["protocol"]) for rule in worker["egress"] for port in rule["ports"])
    assert allowed == [(53, "TCP"), (53, "UDP"), (443, "TCP"), (6379, "TCP")]  # DNS, Redis, the object store


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_bundle_job_is_one_per_worker_tag_and_cleaned_up(rendered, overlay, tmp_path):
    """A Job's pod template is immutable: a new worker tag must make a new Job, or `kubectl apply` fails."""
    (job,) = [obj for obj in rendered[overlay] if obj["kind"] == "Job"]
    tag = container(job, "bundle")["image"].rsplit(":", 1)[1]
    assert job["metadata"]["name"] == f"melfusion-bundle-init-{tag}"
    assert job["spec"]["ttlSecondsAfterFinished"] > 0
    bumped = tmp_path / "kubernetes"
    shutil.copytree(KUBERNETES, bumped)
    kustomization = bumped / "base" / "kustomization.yaml"
    kustomization.write_text(kustomization.read_text().replace(f"newTag: {tag}", "newTag: 9.9.9"))
    (bumped_job,) = [obj for obj in kustomize(bumped / "overlays" / overlay) if obj["kind"] == "Job"]
    assert bumped_job["metadata"]["name"] == "melfusion-bundle-init-9.9.9"
    assert container(bumped_job, "bundle")["image"].endswith(":9.9.9")
