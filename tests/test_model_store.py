"""`python -m model_store` as a user runs it: exit codes, messages on stderr, no tracebacks."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from melfusion.bundle import MANIFEST, verify_bundle
from model_store.hub import HubUnavailable, PullSources, list_source

ROOT = Path(__file__).parents[1]


def model_store(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "model_store", *map(str, args)],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def assert_clean_failure(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr


def free_port() -> int:
    """A local port with nothing listening: connecting to it is refused at once."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_create_tiny_then_verify(tmp_path):
    created = model_store("create-tiny", tmp_path / "tiny", "--seed", "4")
    assert created.returncode == 0, created.stderr
    verified = model_store("verify", tmp_path / "tiny")
    assert verified.returncode == 0, verified.stderr
    assert verified.stdout.startswith("OK (sha256 of every file)")
    assert "12 components" in verified.stdout and "source create-tiny" in verified.stdout
    assert "music_unet           UNet2DConditionModel" in verified.stdout


def test_verify_names_the_corrupt_file(bundle_copy):
    weights = bundle_copy / "image_vae" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0x01
    weights.write_bytes(bytes(data))
    assert_clean_failure(model_store("verify", bundle_copy), "image_vae/diffusion_pytorch_model.safetensors is corrupt")


def test_verify_names_a_missing_component(bundle_copy):
    for path in (bundle_copy / "synapse").iterdir():
        path.unlink()
    (bundle_copy / "synapse").rmdir()
    assert_clean_failure(model_store("verify", bundle_copy), "component folder synapse/ missing")


def test_verify_something_that_is_not_a_bundle(tmp_path):
    assert_clean_failure(model_store("verify", tmp_path), "not a MelFusion bundle (manifest.json missing)")


def test_writers_refuse_to_replace_a_folder_that_is_not_a_bundle(tmp_path):
    keep = tmp_path / "notes.txt"
    keep.write_text("mine")
    assert_clean_failure(model_store("create-tiny", tmp_path), "not a bundle; refusing to replace it")
    assert keep.read_text() == "mine"


def test_create_tiny_replaces_an_existing_bundle(bundle_copy):
    before = json.loads((bundle_copy / MANIFEST).read_text())
    assert model_store("create-tiny", bundle_copy, "--seed", "9").returncode == 0
    after = verify_bundle(bundle_copy)
    weights = "music_unet/diffusion_pytorch_model.safetensors"
    assert after["files"][weights]["sha256"] != before["files"][weights]["sha256"]  # other seed, other weights


def test_create_random_small_in_float16(tmp_path):
    created = model_store("create-random", tmp_path / "small", "--size", "small", "--dtype", "float16")
    assert created.returncode == 0, created.stderr
    assert "music_unet           UNet2DConditionModel     float16" in created.stdout
    manifest = verify_bundle(tmp_path / "small")
    assert manifest["source"] == "create-random --size small"
    assert manifest["components"]["music_unet"]["dtype"] == "float16"
    assert manifest["components"]["image_scheduler"]["dtype"] is None


def test_usage_errors_exit_2(tmp_path):
    result = model_store("create-random", tmp_path / "x", "--size", "huge")
    assert result.returncode == 2 and "invalid choice: 'huge'" in result.stderr


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE is set: pull needs the Hugging Face hub"),
        ({"HF_ENDPOINT": "http://127.0.0.1:{port}"}, "cannot reach the Hugging Face hub at http://127.0.0.1:{port}"),
    ],
)
def test_pull_offline_fails_with_a_clear_message(tmp_path, env, message):
    port = free_port()
    env = {key: value.format(port=port) for key, value in env.items()}
    result = model_store("pull", tmp_path / "pulled", **env)
    assert_clean_failure(result, message.format(port=port))
    assert not (tmp_path / "pulled").exists()


def test_pull_gives_up_on_a_hub_that_never_answers(monkeypatch):
    """A server that accepts connections and stays silent must not hang `pull` (deadline covers DNS too)."""
    from huggingface_hub import constants

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
        monkeypatch.setattr(constants, "ENDPOINT", endpoint)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        with pytest.raises(HubUnavailable, match=f"Hugging Face hub at {endpoint}"):
            list_source(PullSources().tango, deadline_s=1.0)


def test_verify_lists_where_pulled_weights_came_from(tiny_bundle, tmp_path, capsys):
    from melfusion.bundle import load_pipeline, save_bundle
    from model_store.cli import main

    origin = {"declare-lab/tango-full-ft-audio-music-caps": "0123abc"}
    pulled = save_bundle(load_pipeline(tiny_bundle), tmp_path / "pulled", source="pull", origin=origin)
    assert main(["verify", str(pulled)]) == 0
    out = capsys.readouterr().out
    assert "source pull" in out and "from declare-lab/tango-full-ft-audio-music-caps @ 0123abc" in out
