"""TANGO checkpoint conversion, on tiny checkpoints written in TANGO's layout (no download).

A TANGO folder holds `main_config.json` (AudioDiffusion's arguments) and `pytorch_model_main.bin`
(`AudioDiffusion.state_dict()`: `unet.*` + `text_encoder.*`); the UNet config is a diffusers-0.10 file
that `main_config.json` points to.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, PNDMScheduler, UNet2DConditionModel
from fake_hub import FakeHub, commit_of, folder_files
from PIL import Image

from melfusion.bundle import load_pipeline, save_bundle, verify_bundle
from melfusion.pipeline import MelFusionPipeline
from melfusion.presets import build_components
from melfusion.synapse import VisualSynapse
from model_store.cli import main
from model_store.hub import AUDIOLDM_REPO, SD_REPO, TANGO_REPO
from model_store.tango import (
    TANGO_UNET_CONFIG,
    ConversionError,
    convert_tango_checkpoint,
    ddim_scheduler,
    read_unet_config,
    unet_config,
)

# stabilityai/stable-diffusion-2-1 scheduler/scheduler_config.json, the schedule TANGO trains with.
SD21_SCHEDULER = {
    "_class_name": "DDIMScheduler",
    "_diffusers_version": "0.8.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}
UNET_CONFIG_PATH = "configs/diffusion_model_config.json"
T5_REPO = "google/flan-t5-large"


def sd15_scheduler() -> PNDMScheduler:
    """Stable Diffusion 1.5's scheduler as its repository ships it."""
    return PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        skip_prk_steps=True,
        steps_offset=1,
        set_alpha_to_one=False,
    )


@pytest.fixture(scope="module")
def tiny() -> dict:
    return build_components("tiny", seed=3)


def write_tango_folder(
    folder: Path,
    tiny: dict,
    *,
    extra_keys: dict | None = None,
    prefix: str = "",
    text_encoder_name: str = "google/flan-t5-large",
    scheduler_name: str = "stabilityai/stable-diffusion-2-1",
    **overrides,
) -> Path:
    """A TANGO-layout checkpoint of the tiny music UNet and T5 encoder; `overrides` edit the UNet config."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {k: tiny["music_unet"].config[k] for k in TANGO_UNET_CONFIG}
    config = {"_class_name": "UNet2DConditionModel", "_diffusers_version": "0.10.0.dev0", **config}
    config.update(sample_size=[32, 2], **overrides)  # TANGO's own value; unused by its sampler
    (folder / UNET_CONFIG_PATH).parent.mkdir(exist_ok=True)
    (folder / UNET_CONFIG_PATH).write_text(json.dumps(config))
    main_config = {
        "text_encoder_name": text_encoder_name,
        "scheduler_name": scheduler_name,
        "unet_model_name": None,
        "unet_model_config_path": UNET_CONFIG_PATH,
        "snr_gamma": 5.0,
    }
    (folder / "main_config.json").write_text(json.dumps(main_config))
    state = {f"{prefix}unet.{k}": v for k, v in tiny["music_unet"].state_dict().items()}
    state |= {f"{prefix}text_encoder.{k}": v for k, v in tiny["text_encoder"].state_dict().items()}
    torch.save({**state, **(extra_keys or {})}, folder / "pytorch_model_main.bin")
    return folder


def tiny_image() -> Image.Image:
    return Image.open(Path(__file__).parents[1] / "docs" / "sample.png").convert("RGB")


def convert(folder: Path, tiny: dict) -> dict:
    return convert_tango_checkpoint(
        folder, text_encoder_config=tiny["text_encoder"].config, scheduler_config=SD21_SCHEDULER
    )


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    state_a, state_b = a.state_dict(), b.state_dict()
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), key


def test_unet_and_text_encoder_convert_exactly(tmp_path, tiny):
    converted = convert(write_tango_folder(tmp_path / "tango", tiny), tiny)
    unet, original = converted["music_unet"], tiny["music_unet"]
    assert isinstance(unet, UNet2DConditionModel)
    assert_same_weights(unet, original)
    assert_same_weights(converted["text_encoder"], tiny["text_encoder"])
    assert unet.config.sample_size == (256, 16)  # TANGO's hard-coded latent, not its config's [32, 2]
    assert unet.config.upcast_attention and unet.config.use_linear_projection

    sample = torch.randn(2, 8, 32, 16, generator=torch.Generator().manual_seed(0))
    text = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(unet(sample, 500, text).sample, original(sample, 500, text).sample)
        ids = torch.tensor([[5, 6, 7, 1]])
        assert torch.equal(converted["text_encoder"](ids)[0], tiny["text_encoder"](ids)[0])


def test_ddp_module_prefix_is_removed(tmp_path, tiny):
    converted = convert(write_tango_folder(tmp_path / "tango", tiny, prefix="module."), tiny)
    assert_same_weights(converted["music_unet"], tiny["music_unet"])


def test_checkpoint_without_text_encoder_leaves_it_to_the_caller(tmp_path, tiny):
    folder = write_tango_folder(tmp_path / "tango", tiny)
    state = torch.load(folder / "pytorch_model_main.bin", weights_only=True)
    torch.save({k: v for k, v in state.items() if k.startswith("unet.")}, folder / "pytorch_model_main.bin")
    assert set(convert(folder, tiny)) == {"music_unet", "scheduler"}


def test_scheduler_keeps_tangos_v_prediction_and_noise_schedule():
    scheduler = ddim_scheduler(SD21_SCHEDULER)
    assert scheduler.config.prediction_type == "v_prediction"
    trained_with = DDPMScheduler.from_config(SD21_SCHEDULER)  # what TANGO's training loop adds noise with
    assert torch.allclose(scheduler.alphas_cumprod, trained_with.alphas_cumprod)


def test_sd15_pndm_config_becomes_epsilon_ddim():
    pndm = sd15_scheduler()
    scheduler = ddim_scheduler(dict(pndm.config))
    assert scheduler.config.prediction_type == "epsilon"
    assert not scheduler.config.clip_sample
    assert torch.allclose(scheduler.alphas_cumprod, pndm.alphas_cumprod)


def test_published_unet_config_is_tangos_866m_unet(tmp_path):
    """Without the config file in the folder, TANGO's published config is used: the 866 M parameter UNet."""
    config = read_unet_config(tmp_path, {"unet_model_config_path": UNET_CONFIG_PATH})
    assert config is TANGO_UNET_CONFIG
    with torch.device("meta"):  # shapes only, no 3.5 GB of memory
        unet = UNet2DConditionModel(**unet_config(config))
    parameters = sum(p.numel() for p in unet.parameters())
    assert 860e6 < parameters < 870e6, parameters


@pytest.mark.parametrize(
    ("extra_keys", "message"),
    [
        ({"group_in.0.weight": torch.zeros(512, 8)}, "group_in/group_out channel adapters"),
        ({"ema.decay": torch.zeros(())}, r"keys outside unet.\* and text_encoder.\*: ema.decay"),
    ],
)
def test_foreign_keys_are_refused_by_name(tmp_path, tiny, extra_keys, message):
    with pytest.raises(ConversionError, match=message):
        convert(write_tango_folder(tmp_path / "tango", tiny, extra_keys=extra_keys), tiny)


def test_missing_unet_weight_is_named(tmp_path, tiny):
    folder = write_tango_folder(tmp_path / "tango", tiny)
    state = torch.load(folder / "pytorch_model_main.bin", weights_only=True)
    del state["unet.conv_out.weight"]
    torch.save(state, folder / "pytorch_model_main.bin")
    with pytest.raises(ConversionError, match="music UNet: checkpoint lacks 1 weights: conv_out.weight"):
        convert(folder, tiny)


def test_config_that_does_not_fit_the_weights(tmp_path, tiny):
    folder = write_tango_folder(tmp_path / "tango", tiny, cross_attention_dim=64)
    with pytest.raises(ConversionError, match="music UNet: weights do not fit the config: size mismatch for"):
        convert(folder, tiny)


def test_config_setting_unknown_to_diffusers(tmp_path, tiny):
    folder = write_tango_folder(tmp_path / "tango", tiny, attention_windows=4)
    with pytest.raises(ConversionError, match=r"lacks: \['attention_windows'\]"):
        convert(folder, tiny)


def test_non_t5_text_encoder_and_unreadable_checkpoint(tmp_path, tiny):
    folder = write_tango_folder(tmp_path / "tango", tiny)
    (folder / "pytorch_model_main.bin").write_bytes(b"not a checkpoint")
    with pytest.raises(ConversionError, match="pytorch_model_main.bin: unreadable checkpoint"):
        convert(folder, tiny)
    (folder / "main_config.json").write_text(json.dumps({"text_encoder_name": "openai/clip", "scheduler_name": "x"}))
    with pytest.raises(ConversionError, match="'openai/clip' is not T5"):
        convert(folder, tiny)


def test_converted_parts_run_in_a_saved_bundle(tmp_path, tiny):
    """TANGO's parts in a MelFusion bundle: saved, verified, loaded, and sampled with v-prediction."""
    converted = convert(write_tango_folder(tmp_path / "tango", tiny), tiny)
    pipe = MelFusionPipeline(**{**build_components("tiny", seed=3), **converted})
    loaded = load_pipeline(save_bundle(pipe, tmp_path / "bundle", source="test"))
    assert loaded.scheduler.config.prediction_type == "v_prediction"
    request = dict(seconds=1.0, num_inference_steps=3, guidance_scale=3.0, seed=0)
    v_prediction = loaded("upbeat piano", **request).audios
    assert np.array_equal(v_prediction, pipe("upbeat piano", **request).audios)
    epsilon = MelFusionPipeline(**build_components("tiny", seed=3))("upbeat piano", **request).audios
    assert not np.allclose(v_prediction, epsilon)  # same weights, other prediction_type: other samples


# Files each repository publishes that `pull` must never fetch or read: their bytes are no model at all.
PLACEHOLDER = b"published on the hub; pull has no use for it"


def publish(model, folder: Path, formats: tuple[str, ...]) -> None:
    """`model` under the names its repository publishes: config plus weights in each of `formats`:
    "safetensors", "pickle" (`torch.save` of the state dict, as every .bin on the hub is) and "fp16" (a
    variant file; pull must skip it, so its contents do not matter)."""
    model.save_pretrained(folder)  # config.json + <stem>.safetensors
    (safetensors,) = folder.glob("*.safetensors")
    stem = safetensors.name.removesuffix(".safetensors")  # transformers: "model"; diffusers: "diffusion_pytorch_model"
    if "pickle" in formats:
        torch.save(model.state_dict(), folder / ("pytorch_model.bin" if stem == "model" else f"{stem}.bin"))
    if "fp16" in formats:
        (folder / f"{stem}.fp16.safetensors").write_bytes(safetensors.read_bytes())
    if "safetensors" not in formats:
        safetensors.unlink()


def placeholders(folder: Path, *names: str) -> None:
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(PLACEHOLDER)


@dataclass
class HubFolders:
    """Local folders holding the repositories `pull` reads as REFERENCE.md's "Hub listings, 2026-12" give
    them: every file name, each weight in the formats its repository publishes (AudioLDM: pickled only),
    tiny models where pull reads a file and placeholders where it must not."""

    sd15: Path
    audioldm: Path
    t5: Path
    sd21: Path
    root: Path
    tiny: dict

    def tango(self, name: str = "tango", **main_config) -> Path:
        settings = {"text_encoder_name": str(self.t5), "scheduler_name": str(self.sd21), **main_config}
        folder = write_tango_folder(self.root / name, self.tiny, **settings)
        scale = self.tiny["mel_vae"].config.scaling_factor
        (folder / "vae_config.json").write_text(json.dumps({"scale_factor": scale}))
        placeholders(folder, "pytorch_model_vae.bin", "pytorch_model_stft.bin", "stft_config.json")
        return folder

    def pull_args(self, tango: Path, *extra: str) -> list[str]:
        sources = ["--image-repo", self.sd15, "--tango", tango, "--audio-repo", self.audioldm]
        return ["pull", str(self.root / "bundle"), *map(str, sources), *extra]


@pytest.fixture
def hub(tmp_path, tiny) -> HubFolders:
    folders = HubFolders(*(tmp_path / name for name in ("sd15", "audioldm", "flan-t5-tiny", "sd21")), tmp_path, tiny)
    for component, subfolder in [("image_vae", "vae"), ("image_unet", "unet"), ("image_text_encoder", "text_encoder")]:
        publish(tiny[component], folders.sd15 / subfolder, ("safetensors", "pickle", "fp16"))
    tiny["image_tokenizer"].save_pretrained(folders.sd15 / "tokenizer")
    sd15_scheduler().save_pretrained(folders.sd15 / "scheduler")
    placeholders(folders.sd15, "model_index.json", "safety_checker/config.json", "safety_checker/model.safetensors",
                 "safety_checker/pytorch_model.bin", "feature_extractor/preprocessor_config.json",
                 "v1-5-pruned-emaonly.safetensors", "v1-5-pruned.safetensors", "v1-5-pruned.ckpt")  # fmt: skip
    publish(tiny["mel_vae"], folders.audioldm / "vae", ("pickle",))
    publish(tiny["vocoder"], folders.audioldm / "vocoder", ("pickle",))
    placeholders(folders.audioldm, "model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json",
                 "text_encoder/pytorch_model.bin", "tokenizer/vocab.json", "tokenizer/merges.txt",
                 "unet/config.json", "unet/diffusion_pytorch_model.bin")  # fmt: skip
    publish(tiny["text_encoder"], folders.t5, ("safetensors", "pickle"))
    tiny["tokenizer"].save_pretrained(folders.t5)
    placeholders(folders.t5, "flax_model.msgpack", "tf_model.h5")
    DDIMScheduler.from_config(SD21_SCHEDULER).save_pretrained(folders.sd21 / "scheduler")
    return folders


def expected_pipeline(tiny: dict) -> MelFusionPipeline:
    return MelFusionPipeline(
        **{
            **tiny,
            "image_scheduler": ddim_scheduler(dict(sd15_scheduler().config)),
            "scheduler": ddim_scheduler(SD21_SCHEDULER),
            "synapse": VisualSynapse(),
        }
    )


def test_pull_assembles_a_working_bundle_from_local_folders(hub, tiny, capsys):
    """`pull` end to end without the hub: every source a local folder in its hub repository's layout."""
    tango = hub.tango()
    assert main(hub.pull_args(tango)) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "pytorch_model_main.bin" in out and "unet/diffusion_pytorch_model.safetensors" in out  # the plan
    manifest = verify_bundle(hub.root / "bundle")
    assert manifest["source"] == "pull" and manifest["origin"][str(tango)] == "local folder"
    assert str(hub.sd21) in manifest["origin"] and str(hub.t5) in manifest["origin"]

    pulled = load_pipeline(hub.root / "bundle")
    assert_same_weights(pulled.music_unet, tiny["music_unet"])
    assert pulled.scheduler.config.prediction_type == "v_prediction"
    assert pulled.image_scheduler.config.prediction_type == "epsilon"
    request = {"image": tiny_image(), "seconds": 1.0, "num_inference_steps": 2, "seed": 5}
    expected = expected_pipeline(tiny)
    assert np.array_equal(pulled("soft guitar", **request).audios, expected("soft guitar", **request).audios)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_pull_in_half_precision_keeps_t5_wo_in_float32(hub, dtype, capsys):
    assert main(hub.pull_args(hub.tango(), "--dtype", dtype)) == 0, capsys.readouterr().err
    pulled = load_pipeline(hub.root / "bundle", dtype=getattr(torch, dtype))
    assert pulled.music_unet.dtype == getattr(torch, dtype)
    wo = [m.weight.dtype for name, m in pulled.text_encoder.named_modules() if name.endswith(".wo")]
    assert wo and set(wo) == {torch.float32}
    audio = pulled("soft guitar", image=tiny_image(), seconds=1.0, num_inference_steps=2, seed=5).audios
    assert np.isfinite(audio).all() and audio.std() > 0


def test_missing_scheduler_repository_falls_back_to_tangos_known_schedule(hub, tiny, capsys, monkeypatch):
    """TANGO's main_config.json names stabilityai/stable-diffusion-2-1, deleted in November 2025."""
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)  # a repository that cannot be asked
    tango = hub.tango(scheduler_name="stabilityai/stable-diffusion-2-1")
    assert main(hub.pull_args(tango)) == 0, capsys.readouterr().err
    assert "scheduler: known constants" in capsys.readouterr().out
    manifest = verify_bundle(hub.root / "bundle")
    assert manifest["origin"]["stabilityai/stable-diffusion-2-1"].startswith("known constants")
    pulled = load_pipeline(hub.root / "bundle")
    config, published = pulled.scheduler.config, ddim_scheduler(SD21_SCHEDULER).config
    for key in ("beta_start", "beta_end", "beta_schedule", "num_train_timesteps", "prediction_type", "steps_offset"):
        assert config[key] == published[key], key
    request = {"seconds": 1.0, "num_inference_steps": 2, "seed": 5}
    assert np.array_equal(pulled("soft guitar", **request).audios, expected_pipeline(tiny)("soft guitar", **request).audios)


def test_missing_text_encoder_repository_fails_before_any_large_file(hub, capsys, monkeypatch):
    import model_store.hub

    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    fetched = []
    real_fetch = model_store.hub.fetch
    monkeypatch.setattr(model_store.hub, "fetch", lambda listing, files: fetched.append(list(files)) or real_fetch(listing, files))
    tango = hub.tango(text_encoder_name="google/flan-t5-gone")
    assert main(hub.pull_args(tango)) == 1
    err = capsys.readouterr().err
    assert "text encoder 'google/flan-t5-gone' named by" in err and "main_config.json" in err
    assert fetched == []  # nothing fetched: TANGO's main_config.json was read in its folder
    assert not (hub.root / "bundle").exists()


def test_mel_vae_scale_comes_from_tangos_vae_config(hub, capsys):
    scale = hub.tiny["mel_vae"].config.scaling_factor
    tango = hub.tango()
    (tango / "vae_config.json").write_text(json.dumps({"scale_factor": scale * 1.03}))
    assert main(hub.pull_args(tango)) == 1
    assert "mel VAE scale: TANGO's vae_config.json has" in capsys.readouterr().err
    (tango / "vae_config.json").write_text(json.dumps({"scale_factor": scale}))
    assert main(hub.pull_args(tango)) == 0, capsys.readouterr().err
    assert load_pipeline(hub.root / "bundle").mel_vae.config.scaling_factor == scale


def test_pull_through_an_http_hub_serving_the_published_layouts(hub, tiny, tmp_path):
    """`pull` as a user runs it, against the real hub client talking HTTP to a local hub that serves the
    folders above under the repositories' names (stabilityai/stable-diffusion-2-1 deleted, as it is)."""
    tango = hub.tango(text_encoder_name=T5_REPO, scheduler_name="stabilityai/stable-diffusion-2-1")
    repos = {SD_REPO: folder_files(hub.sd15), AUDIOLDM_REPO: folder_files(hub.audioldm),
             TANGO_REPO: folder_files(tango), T5_REPO: folder_files(hub.t5)}  # fmt: skip
    bundle = tmp_path / "bundle"
    with FakeHub(repos) as fake:
        result = subprocess.run(
            [sys.executable, "-m", "model_store", "pull", str(bundle)],
            env={**os.environ, "HF_ENDPOINT": fake.endpoint, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0"},
            capture_output=True, text=True, timeout=600, check=False,
        )  # fmt: skip
    assert result.returncode == 0, result.stderr
    tokenizers = {(SD_REPO, f"tokenizer/{name}") for name in os.listdir(hub.sd15 / "tokenizer")}
    t5_files = {(T5_REPO, name) for name in os.listdir(hub.t5) if name.endswith(".json")}
    assert fake.downloads() == tokenizers | t5_files | {
        *((SD_REPO, f"{folder}/{name}") for folder in ("vae", "unet") for name in
          ("config.json", "diffusion_pytorch_model.safetensors")),
        (SD_REPO, "text_encoder/config.json"), (SD_REPO, "text_encoder/model.safetensors"),
        (SD_REPO, "scheduler/scheduler_config.json"),
        (AUDIOLDM_REPO, "vae/config.json"), (AUDIOLDM_REPO, "vae/diffusion_pytorch_model.bin"),
        (AUDIOLDM_REPO, "vocoder/config.json"), (AUDIOLDM_REPO, "vocoder/pytorch_model.bin"),
        (TANGO_REPO, "main_config.json"), (TANGO_REPO, "vae_config.json"), (TANGO_REPO, "pytorch_model_main.bin"),
        (TANGO_REPO, UNET_CONFIG_PATH),  # the UNet config main_config.json points to, where the repository has it
    }  # fmt: skip
    assert "vocoder/pytorch_model.bin" in result.stdout and "pickled: loaded with torch weights_only=True" in result.stdout
    manifest = verify_bundle(bundle)
    assert manifest["origin"][AUDIOLDM_REPO] == commit_of(AUDIOLDM_REPO)
    assert manifest["origin"]["stabilityai/stable-diffusion-2-1"].startswith("known constants")
    pulled = load_pipeline(bundle)
    assert_same_weights(pulled.vocoder, tiny["vocoder"])  # from the pickled file
    request = {"image": tiny_image(), "seconds": 1.0, "num_inference_steps": 2, "seed": 5}
    assert np.array_equal(pulled("soft guitar", **request).audios, expected_pipeline(tiny)("soft guitar", **request).audios)
