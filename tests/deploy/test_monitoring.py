"""Alert rules, the Grafana dashboard and KEDA's Prometheus query against what a live API's /metrics exports."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from rq import Queue
from rq.job import JobStatus as RQStatus
from rq.serializers import JSONSerializer
from rendering import KUBERNETES_VERSION, MONITORING, find, kustomize, run_tool, scrape

from jobs.queue import fetch_job
from jobs.settings import Settings

ALERTS = MONITORING / "alerts.yaml"
ALERT_TESTS = Path(__file__).parent / "alerts_test.yaml"
DASHBOARD = MONITORING / "grafana-dashboard.json"
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created")}


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\bmelfusion_\w+", expr))


def alert_rules() -> list[dict]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def dashboard_queries() -> list[str]:
    return [target["expr"] for panel in json.loads(DASHBOARD.read_text())["panels"] for target in panel["targets"]]


def series_names(exposition: str) -> set[str]:
    """Every series name the exposition declares, including those of families with no sample yet."""
    names = set()
    for family in text_string_to_metric_families(exposition):
        names |= {family.name + suffix for suffix in SUFFIXES.get(family.type, ("",))}
        names |= {sample.name for sample in family.samples}
    return names


@pytest.fixture(scope="session")
def exported(metrics_stack) -> set[str]:
    return series_names(scrape(metrics_stack.base_url))


def test_alert_rules_pass_promtool():
    assert "SUCCESS" in run_tool("promtool", "check", "rules", str(ALERTS))
    assert "SUCCESS" in run_tool("promtool", "test", "rules", str(ALERT_TESTS))  # each alert fires when it should


def test_alerts_cover_what_operators_need():
    exprs = {rule["alert"]: rule["expr"] for rule in alert_rules()}
    wanted = {"melfusion_queue_depth", "melfusion_workers_alive", "melfusion_jobs_finished_total",
              "melfusion_jobs_abandoned", "melfusion_jobs_retry_scheduled", "melfusion_queue_wait_seconds_bucket",
              "melfusion_ready", "melfusion_compile_misses_total"}  # fmt: skip
    assert wanted <= set().union(*map(metric_names, exprs.values()))
    assert all(rule.get("labels", {}).get("severity") and rule["annotations"]["summary"] for rule in alert_rules())


def test_alert_expressions_name_exported_metrics(exported):
    for rule in alert_rules():
        names = metric_names(rule["expr"])
        assert names, f"{rule['alert']} names no MelFusion metric"
        assert names <= exported, f"{rule['alert']}: {names - exported} not in /metrics"


def test_dashboard_queries_name_exported_metrics(exported):
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["panels"]
    queries = dashboard_queries()
    for query in queries:
        assert metric_names(query) and metric_names(query) <= exported, query
    shown = set().union(*map(metric_names, queries))
    assert {"melfusion_jobs", "melfusion_queue_depth", "melfusion_queue_wait_seconds_bucket",
            "melfusion_run_seconds_bucket", "melfusion_workers_alive"} <= shown  # fmt: skip


def test_keda_query_names_exported_metrics(rendered, exported):
    for objects in rendered.values():
        for trigger in find(objects, "ScaledObject", "melfusion-worker")["spec"]["triggers"]:
            if trigger["type"] == "prometheus":
                assert metric_names(trigger["metadata"]["query"]) <= exported


def test_monitoring_config_maps_validate():
    objects = kustomize(MONITORING)
    for obj in objects:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    rules = find(objects, "ConfigMap", "melfusion-alerts")["data"]["melfusion.rules.yaml"]
    assert rules == ALERTS.read_text()
    assert find(objects, "ConfigMap", "melfusion-grafana-dashboard")["metadata"]["labels"]["grafana_dashboard"] == "1"


def abandon(stack, job_id: str, *, retry_interval: int | None = None) -> None:
    """Leave a queued job as a SIGKILLed worker leaves it: taken off the queue, marked started, and its
    started-registry entry already past its deadline (RQ's cleanup then fails or retries it)."""
    name = Settings.model_fields["queue_name"].default  # the stack does not set one
    queue = Queue(name, connection=stack.redis, serializer=JSONSerializer)
    job = fetch_job(stack.redis, job_id)
    job.retries_left, job.retry_intervals = (1, [retry_interval]) if retry_interval else (0, [])
    job._failure_callback_name = None  # the worker's lost-job callback needs a worker's runtime (tests/service)
    job.save()
    queue.remove(job_id)
    job.set_status(RQStatus.STARTED)
    stack.redis.zadd(queue.started_job_registry.key, {f"{job_id}:lost-execution": time.time() - 1})


def sample_value(exposition: str, name: str, labels: dict[str, str] | None = None) -> float:
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            if sample.name == name and (labels or {}).items() <= sample.labels.items():
                return sample.value
    raise AssertionError(f"{name}{labels or ''} not exported")


def test_abandoned_and_retried_jobs_and_readiness_are_exported(metrics_stack, sample_png):
    client = metrics_stack.client()
    lost = client.submit(sample_png, "its worker was killed", seconds=0.5, steps=2).id
    retried = client.submit(sample_png, "its worker was killed, one retry left", seconds=0.5, steps=2).id
    abandon(metrics_stack, lost)
    abandon(metrics_stack, retried, retry_interval=600)
    name = Settings.model_fields["queue_name"].default  # the stack does not set one
    queue = Queue(name, connection=metrics_stack.redis, serializer=JSONSerializer)
    queue.started_job_registry.cleanup()  # what a worker's janitor runs: RQ fails or retries the lost jobs
    exposition = scrape(metrics_stack.base_url)
    assert sample_value(exposition, "melfusion_jobs", {"status": "running"}) == 0
    assert sample_value(exposition, "melfusion_jobs_abandoned") == 1
    assert sample_value(exposition, "melfusion_jobs_retry_scheduled") == 1
    assert client.get(lost).status == "failed"
    assert sample_value(exposition, "melfusion_ready", {"check": "redis"}) == 1
    assert sample_value(exposition, "melfusion_ready", {"check": "storage"}) == 1
    assert sample_value(exposition, "melfusion_ready", {"check": "workers"}) == 0  # this stack has no worker


def test_busy_workers_are_counted_once_however_many_jobs_they_batch(metrics_stack):
    """KEDA scales on melfusion_workers_busy: a worker running a batch of 8 jobs is one busy worker."""
    from jobs.heartbeat import clear_heartbeat, write_heartbeat

    queue = Settings.model_fields["queue_name"].default
    beats = {"batching": {"state": "busy", "current_job": "a"}, "alone": {"state": "busy", "current_job": "b"},
             "idle": {"state": "idle"}, "other-queue": {"state": "busy", "queues": ["other"]}}  # fmt: skip
    for name, state in beats.items():
        write_heartbeat(metrics_stack.redis, name, {"queues": [queue], **state}, ttl_seconds=60)
    try:
        exposition = scrape(metrics_stack.base_url)
    finally:
        for name in beats:
            clear_heartbeat(metrics_stack.redis, name)
    assert sample_value(exposition, "melfusion_workers_busy") == 2
    assert sample_value(exposition, "melfusion_workers_alive") == 3
