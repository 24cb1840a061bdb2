"""Request bounds of a bundle, torch-free so the HTTP side can validate without loading models."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, fields
from pathlib import Path

from .errors import BundleError, InputError

TEACHER_SCHEDULERS = ("ddim", "dpmpp", "ddpm")  # what a bundle's own music UNet samples with; ddim is its default
# A distilled student's samplers (melfusion.student): "tcd" re-noises each step's x̂_0 along its own predicted
# noise (TCD with γ = 0: deterministic, so a seed follows the teacher's ODE), "lcm" with fresh noise (LCM's).
STUDENT_SCHEDULERS = ("tcd", "lcm")
SCHEDULERS = TEACHER_SCHEDULERS + STUDENT_SCHEDULERS
STUDENT_SCHEDULER_CLASS = "LCMScheduler"  # the scheduler class that makes a bundle a student
IMAGE_GUIDANCE_MODES = ("conditional", "both")
MAX_GUIDANCE_SCALE = 50.0
DEFAULT_WINDOW_SECONDS = 10.0  # TANGO's training clips (256 latent frames); bundles may say otherwise
LOUDNESS_RANGE_LUFS = (-40.0, -5.0)  # quieter is inaudible on a phone, louder cannot keep 1 dB of true-peak headroom
DTYPES = ("float32", "float16", "bfloat16")
_DEVICE = re.compile(r"(cpu|cuda|mps|xpu)(:\d+)?")


def bundle_schedulers(scheduler_class: str) -> tuple[str, ...]:
    """The samplers a bundle with this scheduler class serves, its default first.

    A student's UNet was trained for consistency steps with guidance as an input, a teacher's for the ODE
    with a CFG batch: neither runs the other's samplers meaningfully, so each is refused the other's.
    """
    return STUDENT_SCHEDULERS if scheduler_class == STUDENT_SCHEDULER_CLASS else TEACHER_SCHEDULERS


@dataclass(frozen=True)
class SamplingPreset:
    """Named sampler settings; a request's own values override them, the bundle's defaults fill the rest.

    A preset is a fixed recipe, so it runs on the bundles whose samplers include its `scheduler` and is
    refused by name on the others, rather than meaning something else on each bundle.
    """

    scheduler: str
    steps: int | None  # None: the bundle's default
    guidance_scale: float | None  # None: the bundle's default
    source: str  # where the numbers come from


SAMPLING_PRESETS: dict[str, SamplingPreset] = {
    # declare-lab/tango: DDPMScheduler at inference, guidance 3, 100 steps by default and 200 recommended.
    "tango": SamplingPreset("ddpm", 200, 3.0, "TANGO's own sampling (DDPM, guidance 3, 200 steps)"),
    # MelFusion, section 5: 400 DDIM steps, guidance 7.
    "paper": SamplingPreset("ddim", 400, 7.0, "MelFusion paper, section 5 (DDIM, guidance 7, 400 steps)"),
    # `melfusion distill` writes the step count it distilled for as the student's default (4).
    "fast": SamplingPreset("tcd", None, None, "a distilled student's few-step sampling (student bundles only)"),
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
    schedulers: tuple[str, ...] = TEACHER_SCHEDULERS  # `bundle_schedulers` of the bundle's scheduler class
    window_seconds: float = DEFAULT_WINDOW_SECONDS  # the trained clip length: longer clips run in windows of it

    @property
    def default_scheduler(self) -> str:
        return self.schedulers[0]

    @property
    def is_student(self) -> bool:
        return self.schedulers == STUDENT_SCHEDULERS

    def preset(self, name: str | None) -> SamplingPreset | None:
        """The named preset (None for none), if this bundle can run it.

        Raises:
            InputError: an unknown preset, or one whose sampler this bundle does not serve.
        """
        if name is None:
            return None
        if name not in SAMPLING_PRESETS:
            raise InputError("preset", f"must be one of {tuple(SAMPLING_PRESETS)}, got {name!r}")
        preset = SAMPLING_PRESETS[name]
        if preset.scheduler not in self.schedulers:
            needs = "a student bundle (made by `melfusion distill`)" if preset.scheduler in STUDENT_SCHEDULERS else \
                "a teacher bundle (this one is a distilled student)"
            raise InputError("preset", f"{name!r} samples with {preset.scheduler}, which needs {needs}; "
                             f"this bundle serves {', '.join(self.schedulers)}")
        return preset

    @classmethod
    def from_config(cls, config: Mapping) -> GenerationLimits:
        """From a bundle's model_index.json, or the pipeline's config (which hold the same keys; a key added
        since a bundle was written takes its default); the samplers from its scheduler's class
        (`bundle_schedulers`)."""
        kinds = {"float": float, "int": int}
        return cls(**{
            f.name: kinds[f.type](config[f.name]) for f in fields(cls)
            if f.name != "schedulers" and (f.name in config or f.default is MISSING)
        }, schedulers=bundle_schedulers(config["scheduler"][1]))  # fmt: skip


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
    except (OSError, KeyError, IndexError, TypeError, ValueError) as exc:
        raise BundleError(f"{directory}: cannot read generation limits ({type(exc).__name__}: {exc})") from None

