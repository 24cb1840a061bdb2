"""Checkpoints as plain dicts (config + weights + optimiser + RNG), nanoGPT-style."""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path

import torch

from ..pipeline import MelFusionPipeline
from ..synapse import VisualSynapse
from .config import TrainConfig


def checkpoint_path(config: TrainConfig, step: int) -> Path:
    return config.work_dir / "checkpoints" / f"step-{step:07d}.pt"


def save_checkpoint(
    path: Path, *, config: TrainConfig, step: int, pipe: MelFusionPipeline, optimizer: torch.optim.Optimizer
) -> Path:
    """Everything an exact resume needs; written atomically so a crash leaves the previous one intact.

    The loop's own random draws come from generators seeded by (seed, micro-step, process), so `step` and
    the config's seed restore them; torch's global RNG state is kept for anything else that draws from it.
    """
    state = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(config).items()},
        "step": step,
        "synapse_config": dict(pipe.synapse.config),
        "synapse": pipe.synapse.state_dict(),
        "music_unet": None if config.freeze_unet else pipe.music_unet.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng": {"seed": config.seed, "torch": torch.get_rng_state()},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".part")
    os.close(fd)
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def restore_weights(pipe: MelFusionPipeline, checkpoint: dict) -> None:
    """Put the checkpoint's synapse (its layout wins over the config's) and music UNet into `pipe`."""
    synapse_config = {k: v for k, v in checkpoint["synapse_config"].items() if not k.startswith("_")}
    synapse = VisualSynapse(**synapse_config)
    synapse.load_state_dict(checkpoint["synapse"])
    pipe.register_modules(synapse=synapse.to(pipe.device))
    if checkpoint["music_unet"] is not None:
        pipe.music_unet.load_state_dict(checkpoint["music_unet"])
    torch.set_rng_state(checkpoint["rng"]["torch"])

