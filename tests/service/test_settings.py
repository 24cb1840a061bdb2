"""Settings come from MELFUSION_* variables; bad ones stop the start with a message naming the variable."""

from __future__ import annotations

import subprocess
import sys

import pytest

from embedded.processes import PROJECT_ROOT, settings_env
from jobs.settings import load_settings


def test_bad_setting_stops_the_api_naming_the_variable(tmp_path):
    env = settings_env(storage_dir=tmp_path, port="eighty")
    start = subprocess.run([sys.executable, "-m", "service"], env=env, cwd=PROJECT_ROOT, capture_output=True,
                           text=True, timeout=120, check=False)  # fmt: skip
    assert start.returncode != 0
    assert "MELFUSION_PORT" in start.stderr and "Traceback" not in start.stderr


def test_a_storage_back_end_is_required(monkeypatch):
    for name in ("MELFUSION_STORAGE_DIR", "MELFUSION_S3_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(SystemExit, match="MELFUSION_STORAGE_DIR"):
        load_settings()


def test_api_keys_are_comma_separated(monkeypatch, tmp_path):
    monkeypatch.setenv("MELFUSION_STORAGE_DIR", str(tmp_path))
    monkeypatch.setenv("MELFUSION_API_KEYS", "alpha, beta,,")
    assert load_settings().api_keys == ["alpha", "beta"]


def test_worker_with_a_missing_bundle_stops_with_a_message(tmp_path):
    env = settings_env(storage_dir=tmp_path, bundle_dir=tmp_path / "no-such-bundle")
    start = subprocess.run([sys.executable, "-m", "workers"], env=env, cwd=PROJECT_ROOT, capture_output=True,
                           text=True, timeout=120, check=False)  # fmt: skip
    assert start.returncode != 0
    assert "cannot load the model bundle" in start.stderr and "no-such-bundle" in start.stderr
    assert "Traceback" not in start.stderr


def test_a_compiled_worker_needs_its_warm_up_shapes_and_no_batch_above_them(monkeypatch, tmp_path):
    monkeypatch.setenv("MELFUSION_STORAGE_DIR", str(tmp_path))
    monkeypatch.setenv("MELFUSION_COMPILE_MODE", "check")
    with pytest.raises(SystemExit, match="MELFUSION_WARMUP_BATCH_SIZES"):
        load_settings()
    monkeypatch.setenv("MELFUSION_WARMUP_BATCH_SIZES", "1,2,4")
    monkeypatch.setenv("MELFUSION_WARMUP_SECONDS", "10")
    with pytest.raises(SystemExit, match="MELFUSION_MAX_BATCH=8 exceeds the largest warmed batch"):
        load_settings()
    monkeypatch.setenv("MELFUSION_MAX_BATCH", "4")
    assert load_settings().warmup_caption_tokens == [32, 128]


def test_the_api_explains_itself_without_any_settings():
    env = {name: value for name, value in settings_env().items() if not name.startswith("MELFUSION_")}
    run = subprocess.run([sys.executable, "-m", "service", "--help"], env=env, cwd=PROJECT_ROOT, capture_output=True,
                         text=True, timeout=120, check=False)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("usage: python -m service") and "FORWARDED_ALLOW_IPS" in run.stdout
    assert "MELFUSION_STORE_WAIT_SECONDS" in run.stdout and "MELFUSION_S3_SECRET_KEY" in run.stdout
