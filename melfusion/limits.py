"""Request bounds of a bundle, torch-free so the HTTP side can validate without loading models."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, fields
from pathlib import Path

from .errors import BundleError, InputError

SCHEDULERS = ("ddim", "dpmpp", "ddpm")
IMAGE_GUIDANCE_MODES = ("conditional", "both")
MAX_GUIDANCE_SCALE = 50.0
DEFAULT_WINDOW_SECONDS = 10.0  # TANGO's training clips (256 latent frames); bundles may say otherwise
LOUDNESS_RANGE_LUFS = (-40.0, -5.0)  # quieter is inaudible on a phone, louder cannot keep 1 dB of true-peak headroom
DTYPES = ("float32", "float16", "bfloat16")
_DEVICE = re.compile(r"(cpu|cuda|mps|xpu)(:\d+)?")


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
    """Bounds and defaults of one bundle (from its model_index.json), so every front end states the same.
    The ranges themselves are declared with the fields, in `melfusion.request`."""

    max_seconds: float
    default_seconds: float
    max_steps: int
    default_steps: int
    default_guidance_scale: float
    schedulers: tuple[str, ...] = SCHEDULERS
    window_seconds: float = DEFAULT_WINDOW_SECONDS  # the trained clip length: longer clips run in windows of it

    @classmethod
    def from_config(cls, config: Mapping) -> GenerationLimits:
        """From a bundle's model_index.json, or the pipeline's config (which holds the same keys; a key added
        since a bundle was written takes its default)."""
        kinds = {"float": float, "int": int}
        return cls(**{
            f.name: kinds[f.type](config[f.name]) for f in fields(cls)
            if f.name != "schedulers" and (f.name in config or f.default is MISSING)
        })  # fmt: skip


def check_device(device: str, dtype: str = "float32") -> None:
    """Raise InputError for a device torch would not take, or half precision on the CPU, which runs float32
    (its kernels are float32-exact; half precision there is slow and changes the clip); torch-free, so a
    wrong flag or setting answers before anything loads. Whether the device exists is torch's to say."""
    if not _DEVICE.fullmatch(device):
        raise InputError("device", f"must be cpu, cuda, cuda:N, mps or xpu, got {device!r}")
    if dtype not in DTYPES:
        raise InputError("dtype", f"must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if device == "cpu" and dtype != "float32":
        raise InputError("dtype", f"{dtype} needs a GPU: the CPU path runs float32")


def read_limits(bundle_dir: str | os.PathLike) -> GenerationLimits:
    """The limits of a bundle on disk, without importing torch or loading weights."""
    directory = Path(bundle_dir)
    try:
        return GenerationLimits.from_config(json.loads((directory / "model_index.json").read_text()))
    except (OSError, KeyError, ValueError) as exc:
        raise BundleError(f"{directory}: cannot read generation limits ({type(exc).__name__}: {exc})") from None

