"""Encode the data set once with the frozen parts, split across processes: image trajectories, clip posteriors.

Stable Diffusion, the mel VAE and the mel settings do not change during training, so Algorithm 1's line 1
(DDIM inversion, then re-denoising) and line 2's E^M(M) run once per file and land in a disk cache keyed
by file content, grid and the frozen weights' checksums. Per image the cache holds the SD UNet's input
latent at every step of the re-denoising in float16 (see image_side.py: training computes the K/V from
it at any t); per clip the mel-VAE posterior in float32. Every process encodes its share of the missing
files, in batches; a file that fails to decode leaves an `.error` note so every process skips that row.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..bundle import file_sha256, read_manifest
from ..dataset.audio import LogMel, fit_length, load_audio, normalize_peak
from ..dataset.manifest import Triplet, Triplets
from ..errors import InputError
from ..files import replacing
from ..images import load_image
from ..pipeline import MelFusionPipeline
from .image_side import encode_trajectories

TRAINED_COMPONENTS = ("music_unet", "synapse")  # everything else is frozen: its checksums key the cache
IMAGE_FORMAT = "sd-trajectory-float16-v1"  # bump when what an image file holds changes
TRAJECTORY_DTYPE = torch.float16  # latents are O(1): 11 bits of mantissa keep them to ~1e-3
IMAGE_SIDE = ("image_vae", "image_unet", "image_text_encoder")


@dataclass(frozen=True)
class Example:
    caption: str
    trajectory: Path  # safetensors "latents": (steps, C, h, w) float16, the SD UNet's inputs on the grid
    latents: Path  # safetensors "mean", "std" of the mel VAE posterior, (C, T, F) float32
    where: str


@dataclass(frozen=True)
class _Planned:
    row: Triplet
    trajectory: Path
    latents: Path


def frozen_fingerprint(bundle: Path) -> str:
    """Checksum of the bundle's frozen files: a cache made with other image/audio weights is never reused."""
    files = read_manifest(bundle)["files"]
    frozen = {name: entry["sha256"] for name, entry in files.items() if name.split("/")[0] not in TRAINED_COMPONENTS}
    return hashlib.sha256(json.dumps(frozen, sort_keys=True).encode()).hexdigest()


def _cache_file(directory: Path, key: dict) -> Path:
    return directory / f"{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]}.safetensors"


def _error_note(path: Path) -> Path:
    return path.with_suffix(".error")


def _write(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Atomically, so a crash or a second writer never leaves half a file."""
    with replacing(path) as staging:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, staging)


def _note_failure(path: Path, reason: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    _error_note(path).write_text(reason, encoding="utf-8")


def _is_done(path: Path) -> bool:
    return path.is_file() or _error_note(path).is_file()


@torch.no_grad()
def music_posterior(pipe: MelFusionPipeline, log_mel: LogMel, audio_path: Path, seconds: float) -> dict:
    """E^M(M): waveform -> log-mel of the latent's span -> mel VAE posterior (sampled afresh every step)."""
    _, _, frames, _ = pipe.music_latent_shape(1, seconds)
    mel_frames = frames * 2 ** (len(pipe.mel_vae.config.block_out_channels) - 1)
    waveform = fit_length(normalize_peak(load_audio(audio_path, pipe.sampling_rate)), mel_frames * pipe.config.hop_length)
    device = pipe._execution_device
    mel = log_mel.to(device)(torch.from_numpy(waveform)[None].to(device))[:, :mel_frames]  # (1, frames, mels)
    posterior = pipe.mel_vae.encode(mel[:, None].to(pipe.mel_vae.dtype)).latent_dist
    return {"mean": posterior.mean[0].float(), "std": posterior.std[0].float()}


def image_side_to(pipe: MelFusionPipeline, device: torch.device | str, dtype: torch.dtype | None = None) -> None:
    """Move (and cast) the frozen SD side; training exports the bundle's own files, so casting loses nothing."""
    for name in IMAGE_SIDE:
        module = getattr(pipe, name).to(device)
        if dtype is not None and module.dtype != dtype:
            module.to(dtype)
    pipe._empty_prompt_cache.clear()


def cache_sizes(pipe: MelFusionPipeline, steps: int, seconds: float) -> tuple[int, int]:
    """Exact tensor bytes of one image's and one clip's cache file (each file adds a header of ~100 bytes)."""
    latent = pipe.image_unet.config.in_channels * pipe.image_unet.config.sample_size**2
    image = steps * latent * TRAJECTORY_DTYPE.itemsize
    clip = 2 * math.prod(pipe.music_latent_shape(1, seconds)) * torch.float32.itemsize
    return image, clip


def _plan(triplets: Triplets, *, cache_dir: Path, fingerprint: str, steps: int, seconds: float) -> list[_Planned]:
    plan = []
    for row in triplets.rows:
        image_key = {"file": file_sha256(row.image), "steps": steps, "format": IMAGE_FORMAT, "bundle": fingerprint}
        audio_key = {"file": file_sha256(row.audio), "seconds": seconds, "bundle": fingerprint}
        plan.append(_Planned(row, _cache_file(cache_dir / "images", image_key), _cache_file(cache_dir / "audio", audio_key)))
    return plan


def _encode_images(pipe: MelFusionPipeline, planned: list[_Planned], steps: int) -> None:
    images, targets = [], []
    for item in planned:
        try:
            images.append(load_image(item.row.image))
            targets.append(item.trajectory)
        except (InputError, ValueError) as exc:
            _note_failure(item.trajectory, str(exc))
    if images:
        for path, trajectory in zip(targets, encode_trajectories(pipe, images, steps)):
            _write(path, {"latents": trajectory.to(TRAJECTORY_DTYPE)})


def _encode_clip(pipe: MelFusionPipeline, log_mel: LogMel, item: _Planned, seconds: float) -> None:
    try:
        _write(item.latents, music_posterior(pipe, log_mel, item.row.audio, seconds))
    except (InputError, ValueError) as exc:
        _note_failure(item.latents, str(exc))


def prepare_examples(
    pipe: MelFusionPipeline,
    triplets: Triplets,
    *,
    fingerprint: str,
    cache_dir: Path,
    steps: int,
    seconds: float,
    batch_size: int = 8,
    rank: int = 0,
    world: int = 1,
    wait_for_everyone: Callable[[], None] = lambda: None,
    log: Callable[[str], None] = print,
) -> list[Example]:
    """Encode this process's share of the missing files, wait for the others, return every usable row.

    Rows whose files fail to decode (on any process) move from `triplets.rows` to `triplets.bad`.
    """
    plan = _plan(triplets, cache_dir=cache_dir, fingerprint=fingerprint, steps=steps, seconds=seconds)
    # Shard the distinct files, then look at the cache before any process writes to it
    images = list({p.trajectory: p for p in plan}.values())
    clips = list({p.latents: p for p in plan}.values())
    mine_images = [p for p in images[rank::world] if not _is_done(p.trajectory)]
    mine_clips = [p for p in clips[rank::world] if not _is_done(p.latents)]
    missing_images = sum(not _is_done(p.trajectory) for p in images)
    missing_clips = sum(not _is_done(p.latents) for p in clips)
    wait_for_everyone()
    image_bytes, clip_bytes = cache_sizes(pipe, steps, seconds)
    log(f"feature cache {cache_dir}: writing {missing_images} image trajectories x {image_bytes:,} bytes "
        f"({TRAJECTORY_DTYPE}, {steps} steps) = {missing_images * image_bytes:,} bytes and {missing_clips} clip "
        f"posteriors x {clip_bytes:,} bytes = {missing_clips * clip_bytes:,} bytes, on {world} process(es)")
    log_mel = LogMel.for_pipeline(pipe)
    with tqdm(total=len(mine_images) + len(mine_clips), desc=f"encoding (process {rank})", unit="file",
              disable=rank != 0 or not (mine_images or mine_clips)) as bar:
        for start in range(0, len(mine_images), batch_size):
            batch = mine_images[start:start + batch_size]
            _encode_images(pipe, batch, steps)
            bar.update(len(batch))
        for item in mine_clips:
            _encode_clip(pipe, log_mel, item, seconds)
            bar.update()
    wait_for_everyone()

    examples = []
    for item in plan:
        failed = [_error_note(p).read_text(encoding="utf-8") for p in (item.trajectory, item.latents) if not p.is_file()]
        if failed:
            triplets.reject(item.row, failed[0])
        else:
            examples.append(Example(item.row.caption, item.trajectory, item.latents, item.row.where))
    return examples


def load_trajectories(examples: list[Example]) -> torch.Tensor:
    """(B, steps, C, h, w) float32: every step of the rows' trajectories."""
    return torch.stack([_read(example.trajectory, "latents") for example in examples]).float()


def load_image_segments(examples: list[Example], first_steps: torch.Tensor) -> torch.Tensor:
    """(B, 2, C, h, w) float32: steps i and i + 1 of row b's trajectory, i = first_steps[b]; only those
    bytes are read from the memory-mapped file."""
    segments = []
    for example, step in zip(examples, first_steps.tolist()):
        with safe_open(example.trajectory, framework="pt") as handle:
            segments.append(handle.get_slice("latents")[step:step + 2])
    return torch.stack(segments).float()


def load_posterior(example: Example) -> tuple[torch.Tensor, torch.Tensor]:
    """(C, T, F) posterior mean and standard deviation of one clip."""
    return _read(example.latents, "mean"), _read(example.latents, "std")


def _read(path: Path, name: str) -> torch.Tensor:
    with safe_open(path, framework="pt") as handle:
        return handle.get_tensor(name)
