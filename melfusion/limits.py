"""Request bounds and their checks, torch-free so the HTTP side can validate without loading models."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import BundleError, InputError

SCHEDULERS = ("ddim", "dpmpp", "ddpm")
IMAGE_GUIDANCE_MODES = ("conditional", "both")
MAX_GUIDANCE_SCALE = 50.0
DEFAULT_WINDOW_SECONDS = 10.0  # TANGO's training clips (256 latent frames); bundles may say otherwise
LOUDNESS_RANGE_LUFS = (-40.0, -5.0)  # quieter is inaudible on a phone, louder cannot keep 1 dB of true-peak headroom


@dataclass(frozen=True)
class SamplingPreset:
    """Named sampler settings; a request's own values override them, the bundle's defaults fill the rest."""

    scheduler: str
    steps: int
    guidance_scale: float
    source: str  # where the numbers come from


SAMPLING_PRESETS: dict[str, SamplingPreset] = {
    # declare-lab/tango: DDPMScheduler at inference, guidance 3, 100 steps by default and 200 recommended.
    "tango": SamplingPreset("ddpm", 200, 3.0, "TANGO's own sampling (DDPM, guidance 3, 200 steps)"),
    # MelFusion, section 5: 400 DDIM steps, guidance 7.
    "paper": SamplingPreset("ddim", 400, 7.0, "MelFusion paper, section 5 (DDIM, guidance 7, 400 steps)"),
}


@dataclass(frozen=True)
class GenerationLimits:
    """Bounds and defaults of one bundle (from its model_index.json), so every front end states the same."""

    max_seconds: float
    default_seconds: float
    max_steps: int
    default_steps: int
    default_guidance_scale: float
    sampling_rate: int
    schedulers: tuple[str, ...] = SCHEDULERS
    window_seconds: float = DEFAULT_WINDOW_SECONDS  # the trained clip length: longer clips run in windows of it

    def check(
        self,
        *,
        captions: list[str],
        seconds: float,
        steps: int,
        guidance_scale: float,
        image_strength: float,
        scheduler: str,
        image_guidance: str = "conditional",
        image_steps: int | None = None,
        loudness_lufs: float | None = None,
    ) -> None:
        """Raise InputError naming the first out-of-range field (`image_steps` None: one pass per step)."""
        if not captions or any(not isinstance(c, str) or not c.strip() for c in captions):
            raise InputError("caption", "must be a non-empty string")
        if not 0 < seconds <= self.max_seconds:
            raise InputError("seconds", f"must be in (0, {self.max_seconds}], got {seconds}")
        if not 1 <= steps <= self.max_steps:
            raise InputError("steps", f"must be in [1, {self.max_steps}], got {steps}")
        if not 0 <= guidance_scale <= MAX_GUIDANCE_SCALE:
            raise InputError("guidance_scale", f"must be in [0, {MAX_GUIDANCE_SCALE}], got {guidance_scale}")
        if not 0 <= image_strength <= 1:
            raise InputError("image_strength", f"must be in [0, 1], got {image_strength}")
        if scheduler not in self.schedulers:
            raise InputError("scheduler", f"must be one of {self.schedulers}, got {scheduler!r}")
        if image_guidance not in IMAGE_GUIDANCE_MODES:
            raise InputError("image_guidance", f"must be one of {IMAGE_GUIDANCE_MODES}, got {image_guidance!r}")
        if image_steps is not None and not 1 <= image_steps <= steps:
            raise InputError("image_steps", f"must be in [1, steps = {steps}], got {image_steps}")
        low, high = LOUDNESS_RANGE_LUFS
        if loudness_lufs is not None and not low <= loudness_lufs <= high:
            raise InputError("loudness_lufs", f"must be in [{low}, {high}] LUFS or null (off), got {loudness_lufs}")


def read_limits(bundle_dir: str | os.PathLike) -> GenerationLimits:
    """The limits of a bundle on disk, without importing torch or loading weights."""
    directory = Path(bundle_dir)
    try:
        index = json.loads((directory / "model_index.json").read_text())
        vocoder = json.loads((directory / "vocoder" / "config.json").read_text())
        return GenerationLimits(
            max_seconds=float(index["max_seconds"]),
            default_seconds=float(index["default_seconds"]),
            max_steps=int(index["max_steps"]),
            default_steps=int(index["default_steps"]),
            default_guidance_scale=float(index["default_guidance_scale"]),
            sampling_rate=int(vocoder["sampling_rate"]),
            window_seconds=float(index.get("window_seconds", DEFAULT_WINDOW_SECONDS)),
        )
    except (OSError, KeyError, ValueError) as exc:
        raise BundleError(f"{directory}: cannot read generation limits ({type(exc).__name__}: {exc})") from None
