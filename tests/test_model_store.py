"""`python -m model_store` as a user runs it: exit codes, messages on stderr, no tracebacks."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from fake_hub import FakeHub, commit_of

from melfusion.bundle import MANIFEST, verify_bundle
from model_store.hub import AUDIOLDM_REPO, SD_REPO, TANGO_REPO, HubUnavailable, PullSources, plan_pull

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
        with pytest.raises(HubUnavailable, match=f"Hugging Face hub at {endpoint} within 1 s"):
            plan_pull(PullSources(), deadline_s=1.0)


def test_offline_pull_fails_before_importing_torch(tmp_path):
    """The pre-flight runs before torch and diffusers load: that is what makes an offline failure quick."""
    check = ("import sys; from model_store.cli import main; code = main(['pull', sys.argv[1]]); "
             "print(code, sorted({'torch', 'diffusers', 'transformers'} & set(sys.modules)))")  # fmt: skip
    result = subprocess.run([sys.executable, "-c", check, str(tmp_path / "pulled")], cwd=ROOT, capture_output=True,
                            text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"}, check=False)  # fmt: skip
    assert result.stdout.strip() == "1 []", result.stderr
    assert "HF_HUB_OFFLINE is set" in result.stderr


GB, MB, KB = 10**9, 10**6, 10**3
TANGO_MAIN_CONFIG = json.dumps({
    "text_encoder_name": "google/flan-t5-large", "scheduler_name": "stabilityai/stable-diffusion-2-1",
    "unet_model_name": None, "unet_model_config_path": "configs/diffusion_model_config.json", "snr_gamma": 5.0,
}).encode()  # fmt: skip
# The five repositories `pull` touches, as ../shared/REFERENCE.md ("Hub listings, 2026-12") lists them: names as
# published, sizes approximate. Only TANGO's main_config.json has contents: the plan reads nothing else.
# stabilityai/stable-diffusion-2-1 was deleted in November 2025, so it is absent.
HUB_2026_12 = {
    SD_REPO: {
        "model_index.json": 541, "scheduler/scheduler_config.json": 308,
        "text_encoder/config.json": 617, "text_encoder/model.safetensors": 492 * MB,
        "text_encoder/pytorch_model.bin": 492 * MB, "text_encoder/model.fp16.safetensors": 246 * MB,
        "tokenizer/merges.txt": 525 * KB, "tokenizer/special_tokens_map.json": 472,
        "tokenizer/tokenizer_config.json": 806, "tokenizer/vocab.json": 1_060 * KB,
        "unet/config.json": 743, "unet/diffusion_pytorch_model.safetensors": 3_440 * MB,
        "unet/diffusion_pytorch_model.bin": 3_440 * MB, "unet/diffusion_pytorch_model.fp16.safetensors": 1_720 * MB,
        "vae/config.json": 547, "vae/diffusion_pytorch_model.safetensors": 335 * MB,
        "vae/diffusion_pytorch_model.bin": 335 * MB, "vae/diffusion_pytorch_model.fp16.safetensors": 167 * MB,
        "safety_checker/config.json": 4_720, "safety_checker/model.safetensors": 1_220 * MB,
        "safety_checker/pytorch_model.bin": 1_220 * MB, "feature_extractor/preprocessor_config.json": 342,
        "v1-5-pruned-emaonly.safetensors": 4_270 * MB, "v1-5-pruned.safetensors": 7_700 * MB,
        "v1-5-pruned.ckpt": 7_700 * MB, "v1-inference.yaml": 1_870,
    },
    AUDIOLDM_REPO: {
        "model_index.json": 532, "scheduler/scheduler_config.json": 431,
        "text_encoder/config.json": 1_590, "text_encoder/pytorch_model.bin": 499 * MB,
        "tokenizer/merges.txt": 456 * KB, "tokenizer/special_tokens_map.json": 280,
        "tokenizer/tokenizer.json": 2_110 * KB, "tokenizer/tokenizer_config.json": 385, "tokenizer/vocab.json": 798 * KB,
        "unet/config.json": 1_000, "unet/diffusion_pytorch_model.bin": 739 * MB,
        "vae/config.json": 744, "vae/diffusion_pytorch_model.bin": 222 * MB,
        "vocoder/config.json": 586, "vocoder/pytorch_model.bin": 221 * MB,
    },
    TANGO_REPO: {
        "main_config.json": TANGO_MAIN_CONFIG, "pytorch_model_main.bin": 4_800 * MB,
        "pytorch_model_vae.bin": 443 * MB, "pytorch_model_stft.bin": 17 * MB,
        "vae_config.json": 1_200, "stft_config.json": 123,
    },
    "google/flan-t5-large": {
        "config.json": 662, "generation_config.json": 147, "model.safetensors": 3_130 * MB,
        "pytorch_model.bin": 3_130 * MB, "flax_model.msgpack": 3_130 * MB, "tf_model.h5": 3_130 * MB,
        "spiece.model": 792 * KB, "tokenizer.json": 2_420 * KB, "tokenizer_config.json": 2_540,
        "special_tokens_map.json": 2_200,
    },
}  # fmt: skip
# What pull must take from them: per component folder, configs and tokenizer files plus one weight format,
# safetensors where published (AudioLDM has pickles only); no fp16 variants, no other frameworks, no extras.
EXPECTED_PLAN = {
    "image": {"vae/config.json", "vae/diffusion_pytorch_model.safetensors", "unet/config.json",
              "unet/diffusion_pytorch_model.safetensors", "text_encoder/config.json", "text_encoder/model.safetensors",
              "tokenizer/merges.txt", "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json",
              "tokenizer/vocab.json", "scheduler/scheduler_config.json"},
    "tango": {"main_config.json", "vae_config.json", "pytorch_model_main.bin"},
    "audio": {"vae/config.json", "vae/diffusion_pytorch_model.bin", "vocoder/config.json", "vocoder/pytorch_model.bin"},
    "text_encoder": {"config.json", "generation_config.json", "spiece.model", "tokenizer.json",
                     "tokenizer_config.json", "special_tokens_map.json"},  # TANGO's checkpoint holds the weights
}  # fmt: skip


def read_plan(stdout: str) -> tuple[dict[str, str], dict[str, set[str]]]:
    """The plan `pull` printed: each role's 'repo @ commit', and its files."""
    heads, files, role = {}, {}, None
    for line in stdout.splitlines():
        if line.startswith("  ") and role:
            files[role].add(line.split()[0])
        elif " @ " in line:
            role, rest = line.split(": ", 1)
            heads[role], files[role] = rest.split(",")[0], set()
    return heads, files


def test_plan_only_against_todays_hub_listings(tmp_path):
    with FakeHub(HUB_2026_12) as hub:
        result = model_store("pull", "--plan-only", HF_ENDPOINT=hub.endpoint, HF_HOME=str(tmp_path / "hf"),
                             HF_HUB_OFFLINE="0")  # fmt: skip
    assert result.returncode == 0, result.stderr
    heads, files = read_plan(result.stdout)
    repos = {"image": SD_REPO, "tango": TANGO_REPO, "audio": AUDIOLDM_REPO, "text_encoder": "google/flan-t5-large"}
    assert heads == {role: f"{repo} @ {commit_of(repo)}" for role, repo in repos.items()}
    assert files == EXPECTED_PLAN
    pickled = [line for line in result.stdout.splitlines() if "pickled: loaded with torch weights_only=True" in line]
    assert sorted(line.split()[0] for line in pickled) == [
        "pytorch_model_main.bin", "vae/diffusion_pytorch_model.bin", "vocoder/pytorch_model.bin"]
    assert "scheduler: known constants" in result.stdout and "stabilityai/stable-diffusion-2-1" in result.stdout
    total = sum(HUB_2026_12[repos[role]][path] for role in files for path in files[role] if path != "main_config.json")
    total += len(TANGO_MAIN_CONFIG)
    assert f"total to fetch: {total / 2**30:.2f} GiB" in result.stdout
    assert hub.downloads() == {(TANGO_REPO, "main_config.json")}  # the plan downloads nothing else


def test_one_deadline_covers_every_question_of_the_pre_flight(tmp_path):
    """Each answer takes 0.4 s: every question alone fits 1 s, the pre-flight's rounds together do not."""
    with FakeHub(HUB_2026_12, delay_s=0.4) as hub:
        result = model_store("pull", "--plan-only", "--hub-deadline", "1", HF_ENDPOINT=hub.endpoint,
                             HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="0")  # fmt: skip
    assert_clean_failure(result, f"no answer from the Hugging Face hub at {hub.endpoint} within 1 s")


def test_verify_lists_where_pulled_weights_came_from(tiny_bundle, tmp_path, capsys):
    from melfusion.bundle import load_pipeline, save_bundle
    from model_store.cli import main

    origin = {"declare-lab/tango-full-ft-audio-music-caps": "0123abc"}
    pulled = save_bundle(load_pipeline(tiny_bundle), tmp_path / "pulled", source="pull", origin=origin)
    assert main(["verify", str(pulled)]) == 0
    out = capsys.readouterr().out
    assert "source pull" in out and "from declare-lab/tango-full-ft-audio-music-caps @ 0123abc" in out
