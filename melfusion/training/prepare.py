"""Encode the data set once with the frozen parts: image features per image, mel-VAE posteriors per clip.

Stable Diffusion, the mel VAE and the mel settings do not change during training, so Algorithm 1's
line 1 (DDIM inversion, then the K/V of every denoising step) and line 2's E^M(M) run once per file and
land in a disk cache keyed by file content, grid and the frozen weights' checksums. Features are captured
on the DDIM grid of `feature_steps`; the loop draws training timesteps from that grid, so image step i is
paired with music timestep grid[i] exactly as at sampling time.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..attention import ImageFeatures
from ..bundle import file_sha256, read_manifest
from ..dataset.audio import LogMel, fit_length, load_audio, normalize_peak
from ..dataset.manifest import Triplets
from ..errors import InputError
from ..images import load_image
from ..pipeline import MelFusionPipeline

TRAINED_COMPONENTS = ("music_unet", "synapse")  # everything else is frozen: its checksums key the cache


@dataclass(frozen=True)
class Example:
    caption: str
    features: Path  # safetensors: "key/<site>", "value/<site>" of shape (steps, grid², D)
    latents: Path  # safetensors: "mean", "std" of the mel VAE posterior, (C, T, F)
    where: str


def frozen_fingerprint(bundle: Path) -> str:
    """Checksum of the bundle's frozen files: a cache made with other image/audio weights is never reused."""
    files = read_manifest(bundle)["files"]
    frozen = {name: entry["sha256"] for name, entry in files.items() if name.split("/")[0] not in TRAINED_COMPONENTS}
    return hashlib.sha256(json.dumps(frozen, sort_keys=True).encode()).hexdigest()


def _cached(directory: Path, key: dict, compute: Callable[[], dict[str, torch.Tensor]]) -> Path:
    """The safetensors file for `key`, computed and written atomically on first use."""
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    path = directory / f"{name}.safetensors"
    if not path.is_file():
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().float().cpu().contiguous() for k, v in compute().items()}
        fd, tmp = tempfile.mkstemp(dir=directory, suffix=".part")
        os.close(fd)
        save_file(tensors, tmp)
        os.replace(tmp, path)
    return path


def image_features(pipe: MelFusionPipeline, image_path: Path, steps: int) -> dict[str, torch.Tensor]:
    features = pipe.encode_image(load_image(image_path), steps)  # lines 1 and 7 of Algorithm 1
    tensors = {f"key/{site}": k[:, 0] for site, k in features.keys.items()}  # (steps, grid², D)
    return tensors | {f"value/{site}": v[:, 0] for site, v in features.values.items()}


@torch.no_grad()
def music_posterior(pipe: MelFusionPipeline, log_mel: LogMel, audio_path: Path, seconds: float) -> dict:
    """E^M(M): waveform -> log-mel of the latent's span -> mel VAE posterior (sampled afresh every step)."""
    _, _, frames, _ = pipe.music_latent_shape(1, seconds)
    mel_frames = frames * 2 ** (len(pipe.mel_vae.config.block_out_channels) - 1)
    waveform = fit_length(normalize_peak(load_audio(audio_path, pipe.sampling_rate)), mel_frames * pipe.config.hop_length)
    device = pipe._execution_device
    mel = log_mel.to(device)(torch.from_numpy(waveform)[None].to(device))[:, :mel_frames]  # (1, frames, mels)
    posterior = pipe.mel_vae.encode(mel[:, None].to(pipe.mel_vae.dtype)).latent_dist
    return {"mean": posterior.mean[0], "std": posterior.std[0]}


def prepare_examples(
    pipe: MelFusionPipeline, triplets: Triplets, *, fingerprint: str, cache_dir: Path, steps: int, seconds: float
) -> list[Example]:
    """Encode every usable row (cache hits are free); rows whose files fail to decode move to `triplets.bad`."""
    log_mel, synapse = LogMel.for_pipeline(pipe), pipe.synapse.config
    examples = []
    for row in tqdm(list(triplets.rows), desc="encoding data set", unit="row"):
        image_key = {"file": file_sha256(row.image), "steps": steps, "blocks": list(synapse.blocks),
                     "grid": synapse.image_grid, "bundle": fingerprint}
        audio_key = {"file": file_sha256(row.audio), "seconds": seconds, "bundle": fingerprint}
        try:
            features = _cached(cache_dir / "images", image_key, partial(image_features, pipe, row.image, steps))
            latents = _cached(cache_dir / "audio", audio_key, partial(music_posterior, pipe, log_mel, row.audio, seconds))
        except (InputError, ValueError) as exc:
            triplets.reject(row, str(exc))
            continue
        examples.append(Example(row.caption, features, latents, row.where))
    return examples


def load_features(examples: list[Example], steps: list[int], timesteps: torch.Tensor) -> ImageFeatures:
    """Row b's image K/V at its own grid step steps[b], as one pseudo-step (the mixer reads step 0).

    Only that step is read from disk (safetensors slices). `timesteps` (B,) records which t each row holds.
    """
    keys: dict[str, list[torch.Tensor]] = {}
    values: dict[str, list[torch.Tensor]] = {}
    for example, step in zip(examples, steps):
        with safe_open(example.features, framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
                kind, site = name.split("/", 1)
                (keys if kind == "key" else values).setdefault(site, []).append(handle.get_slice(name)[step])
    stack = lambda rows: torch.stack(rows)[None]  # (1, B, grid², D)
    return ImageFeatures(timesteps, {s: stack(r) for s, r in keys.items()}, {s: stack(r) for s, r in values.items()})


def load_latents(examples: list[Example]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C, T, F) posterior means and standard deviations."""

    def read(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
        with safe_open(path, framework="pt") as handle:
            return handle.get_tensor("mean"), handle.get_tensor("std")

    means, stds = zip(*(read(example.latents) for example in examples))
    return torch.stack(means), torch.stack(stds)
