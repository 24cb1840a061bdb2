"""GenerationRequest: the one spelling of a generation's fields, and the one place their defaults resolve.

The HTTP form, the queue payload, the worker, the CLI and `MelFusionPipeline.generate` all speak this
type, so a batch is a list of them. Torch-free, like `limits`, so the HTTP side can use it without models.
"""

from __future__ import annotations

import secrets
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from .errors import InputError
from .limits import SAMPLING_PRESETS, STUDENT_SCHEDULERS, GenerationLimits

MAX_SEED = 2**32 - 1  # seeds are drawn from [0, MAX_SEED] and accepted in it: any uint32 works
DEFAULT_IMAGE_STRENGTH = 1.0  # the learned α as trained
DEFAULT_IMAGE_GUIDANCE = "conditional"  # see MelFusionPipeline.image_rows
DEFAULT_GUIDANCE_INTERVAL = (0.0, 1.0)  # CFG at every step


def random_seed() -> int:
    return secrets.randbelow(MAX_SEED + 1)


def _doc(text: str) -> Any:
    return field(default=None, metadata={"doc": text})


@dataclass(frozen=True)
class GenerationRequest:
    """One clip's request; unset fields are None until `resolved` fills them."""

    caption: str
    seconds: float | None = _doc("clip length in seconds")
    steps: int | None = _doc("denoising steps")
    guidance_scale: float | None = _doc("classifier-free guidance scale; <= 1 turns CFG off")
    guidance_start: float | None = _doc(
        "guidance interval: CFG runs on the steps from this fraction of the trajectory (0 = pure noise) "
        "until `guidance_end`; the other steps run the conditional branch alone, half the UNet work "
        f"(default {DEFAULT_GUIDANCE_INTERVAL[0]:g}; teacher bundles only)"
    )
    guidance_end: float | None = _doc(
        f"guidance interval's end, a fraction of the trajectory (default {DEFAULT_GUIDANCE_INTERVAL[1]:g}: "
        "CFG to the last step)"
    )
    image_strength: float | None = _doc(
        f"scales every α: 0 = caption only, 1 = learned α (default {DEFAULT_IMAGE_STRENGTH})"
    )
    image_guidance: str | None = _doc(
        "CFG branch that sees the image: conditional (guidance amplifies image and caption) "
        f"or both (guidance amplifies the caption only); default {DEFAULT_IMAGE_GUIDANCE}"
    )
    scheduler: str | None = _doc(
        "sampler (default: the preset's, else the bundle's: ddim; a distilled student serves only tcd, its "
        "default, and lcm)"
    )
    seed: int | None = _doc(f"in [0, {MAX_SEED}]; chosen and echoed if omitted")
    image_steps: int | None = _doc(
        "image passes, at most `steps` (default: one per denoising step, as in the paper); fewer is faster "
        "for a new image, and each music step then meets the image features recorded nearest to it"
    )
    preset: str | None = _doc(
        "sampler, steps and guidance of: " + "; ".join(f"{k}: {p.source}" for k, p in SAMPLING_PRESETS.items())
    )

    @staticmethod
    def field_names() -> tuple[str, ...]:
        return tuple(f.name for f in fields(GenerationRequest))

    @staticmethod
    def describe(name: str) -> str:
        """The help text of a field, for the HTTP form and the CLI."""
        return next(f.metadata["doc"] for f in fields(GenerationRequest) if f.name == name)

    def resolved(self, limits: GenerationLimits) -> GenerationRequest:
        """Every field set: the request's values, then the preset's, then the bundle's, then the defaults
        above (one image pass per step); a seed chosen if none was given; ranges checked.

        Raises:
            InputError: an unknown preset, one the bundle cannot run, or an out-of-range field (names the field).
        """
        preset = limits.preset(self.preset)
        request = replace(
            self,
            seconds=_first(self.seconds, limits.default_seconds),
            steps=_first(self.steps, preset and preset.steps, limits.default_steps),
            guidance_scale=_first(self.guidance_scale, preset and preset.guidance_scale, limits.default_guidance_scale),
            guidance_start=_first(self.guidance_start, DEFAULT_GUIDANCE_INTERVAL[0]),
            guidance_end=_first(self.guidance_end, DEFAULT_GUIDANCE_INTERVAL[1]),
            image_strength=_first(self.image_strength, DEFAULT_IMAGE_STRENGTH),
            image_guidance=_first(self.image_guidance, DEFAULT_IMAGE_GUIDANCE),
            scheduler=_first(self.scheduler, preset and preset.scheduler, limits.default_scheduler),
            seed=_first(self.seed, random_seed()),
        )
        request = replace(request, image_steps=_first(self.image_steps, request.steps))
        if not 0 <= request.seed <= MAX_SEED:
            raise InputError("seed", f"must be in [0, {MAX_SEED}], got {request.seed}")
        limits.check(
            captions=[request.caption],
            seconds=request.seconds,
            steps=request.steps,
            guidance_scale=request.guidance_scale,
            image_strength=request.image_strength,
            scheduler=request.scheduler,
            image_guidance=request.image_guidance,
            image_steps=request.image_steps,
            guidance_start=request.guidance_start,
            guidance_end=request.guidance_end,
        )
        return request

    @property
    def uses_cfg(self) -> bool:
        """Whether the request needs an unconditional batch (a student takes its guidance as an input)."""
        return self.guidance_scale > 1.0 and self.scheduler not in STUDENT_SCHEDULERS

    @property
    def batch_key(self) -> tuple:
        """Requests with equal keys can share one pipeline call (same latent shape, grids, sampler, CFG rows)."""
        return (self.seconds, self.steps, self.image_steps, self.scheduler, self.image_guidance, self.uses_cfg,
                self.guidance_start, self.guidance_end)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (the queue payload)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GenerationRequest:
        """From a queue payload, across versions: keys this version does not know are left out (a payload
        from a newer API), and a resolved payload from before `image_steps` or the guidance interval
        existed gets their defaults."""
        known = {name: value for name, value in data.items() if name in cls.field_names()}
        if known.get("steps") is not None:  # resolved, perhaps by a version from before these fields
            known["image_steps"] = _first(known.get("image_steps"), known["steps"])
            known["guidance_start"] = _first(known.get("guidance_start"), DEFAULT_GUIDANCE_INTERVAL[0])
            known["guidance_end"] = _first(known.get("guidance_end"), DEFAULT_GUIDANCE_INTERVAL[1])
        return cls(**known)


def _first(*values):
    """The first value that is not None (a preset's missing value reads as None)."""
    return next(value for value in values if value is not None)
