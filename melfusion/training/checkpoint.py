"""Checkpoints: one folder per step, written atomically, the last `keep_checkpoints` kept.

    step-0001000/
      weights.safetensors   synapse.* and (unless the UNet is frozen) music_unet.* tensors
      trainer.pt            config, step, synapse config, optimiser, GradScaler (fp16) and RNG state

On resume every process memory-maps both files (safetensors' `safe_open`, `torch.load(mmap=True)`) and
copies tensors straight to its device, so the OS page cache holds one copy per machine instead of each
process reading the full file into its own memory. Rank 0 writes them; that is right for DDP (every
process holds the whole model) and for one process; FSDP and DeepSpeed, which shard it, are refused at start.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import InputError
from ..files import replacing
from ..pipeline import MelFusionPipeline
from ..synapse import VisualSynapse
from .config import TrainConfig

WEIGHTS, TRAINER = "weights.safetensors", "trainer.pt"


def checkpoint_path(config: TrainConfig, step: int) -> Path:
    return config.work_dir / "checkpoints" / f"step-{step:07d}"


def save_checkpoint(
    path: Path,
    *,
    config: TrainConfig,
    step: int,
    pipe: MelFusionPipeline,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None = None,
) -> Path:
    """Everything an exact resume needs; a crash mid-write leaves the previous checkpoints intact.

    The loop's own random draws come from generators seeded by (seed, micro-step, row), so `step` and the
    config's seed restore them; torch's global RNG state is kept for anything else that draws from it.
    """
    weights = {f"synapse.{k}": v for k, v in pipe.synapse.state_dict().items()}
    if not config.freeze_unet:
        weights |= {f"music_unet.{k}": v for k, v in pipe.music_unet.state_dict().items()}
    trainer = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(config).items()},
        "step": step,
        "synapse_config": dict(pipe.synapse.config),
        "optimizer": optimizer.state_dict(),
        "scaler": None if scaler is None else scaler.state_dict(),
        "rng": {"seed": config.seed, "torch": torch.get_rng_state()},
    }
    return write_checkpoint(path, weights, trainer)


def write_checkpoint(path: Path, weights: dict[str, torch.Tensor], trainer: dict) -> Path:
    """The two files into a staging folder, then swapped in: a crash mid-write leaves older checkpoints intact."""
    with replacing(path, folder=True) as staging:  # the old folder goes only once the new one is whole
        save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, staging / WEIGHTS)
        torch.save(trainer, staging / TRAINER)
    return path


def prune_checkpoints(config: TrainConfig) -> list[Path]:
    """Delete all but the newest `keep_checkpoints` step folders; returns the deleted ones."""
    folders = sorted((config.work_dir / "checkpoints").glob("step-*"))
    stale = folders[: max(len(folders) - config.keep_checkpoints, 0)]
    for folder in stale:
        shutil.rmtree(folder)
    return stale


def load_trainer_state(path: Path, *, made_by: str | None = None) -> dict:
    """The small part (config, step, optimiser, scaler, RNG), memory-mapped rather than read.

    With `made_by` ("train" or "distill"), an InputError naming `resume` unless `path` is a checkpoint of
    that command: before the optimiser meets another model's parameter groups."""
    if not (path / TRAINER).is_file():
        raise InputError("resume", f"{path} is not a checkpoint folder (it has no {TRAINER})")
    state = torch.load(path / TRAINER, map_location="cpu", weights_only=False, mmap=True)
    made = "distill" if "distill" in state["config"] else "train"
    if made_by is not None and made != made_by:
        raise InputError("resume", f"{path} is a `melfusion {made}` checkpoint: resume it with `melfusion {made}`")
    return state


def restore_weights(pipe: MelFusionPipeline, path: Path, trainer_state: dict) -> None:
    """Put the checkpoint's synapse (its layout wins over the config's) and music UNet into `pipe`."""
    synapse_config = {k: v for k, v in trainer_state["synapse_config"].items() if not k.startswith("_")}
    synapse = VisualSynapse(**synapse_config).to(pipe.device)
    load_weights(path, {"synapse.": synapse, "music_unet.": pipe.music_unet}, device=str(pipe.device))
    pipe.register_modules(synapse=synapse)
    torch.set_rng_state(trainer_state["rng"]["torch"])


def load_weights(path: Path, modules: dict[str, torch.nn.Module], *, device: str) -> None:
    """Each module gets the checkpoint's tensors under its prefix, copied straight to `device` from the
    memory-mapped file; a module whose prefix the checkpoint lacks is left as it is."""
    with safe_open(path / WEIGHTS, framework="pt", device=device) as handle:
        for prefix, module in modules.items():
            names = [name for name in handle.keys() if name.startswith(prefix)]  # noqa: SIM118
            if names:
                module.load_state_dict({name.removeprefix(prefix): handle.get_tensor(name) for name in names})
