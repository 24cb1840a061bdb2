"""GenerationRequest: the one spelling of a generation's fields, and the one place their defaults resolve.

The HTTP form, the queue payload, the worker, the CLI and `MelFusionPipeline.generate` all speak this
type, so a batch is a list of them. Torch-free, like `limits`, so the HTTP side can use it without models.
"""

from __future__ import annotations

import secrets
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from .audio import AUDIO_FORMATS, DEFAULT_FORMAT, audio_format
from .errors import InputError
from .limits import SAMPLING_PRESETS, GenerationLimits

MAX_SEED = 2**32 - 1  # seeds are drawn from [0, MAX_SEED] and accepted in it: any uint32 works
DEFAULT_SCHEDULER = "ddim"  # the paper's sampler, when neither the request nor a preset names one
DEFAULT_IMAGE_STRENGTH = 1.0  # the learned α as trained
DEFAULT_IMAGE_GUIDANCE = "conditional"  # see MelFusionPipeline.image_rows
DEFAULT_LOUDNESS_LUFS = -14.0  # the level streaming and social platforms normalise to


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
    image_strength: float | None = _doc(
        f"scales every α: 0 = caption only, 1 = learned α (default {DEFAULT_IMAGE_STRENGTH})"
    )
    image_guidance: str | None = _doc(
        "CFG branch that sees the image: conditional (guidance amplifies image and caption) "
        f"or both (guidance amplifies the caption only); default {DEFAULT_IMAGE_GUIDANCE}"
    )
    scheduler: str | None = _doc(f"sampler (default: the preset's, else {DEFAULT_SCHEDULER})")
    seed: int | None = _doc(f"in [0, {MAX_SEED}]; chosen and echoed if omitted")
    image_steps: int | None = _doc(
        "image passes, at most `steps` (default: one per denoising step, as in the paper); fewer is faster "
        "for a new image, and each music step then meets the image features recorded nearest to it"
    )
    preset: str | None = _doc(
        "sampler, steps and guidance of: " + "; ".join(f"{k}: {p.source}" for k, p in SAMPLING_PRESETS.items())
    )
    loop: bool | None = _doc(
        "a seamless loop: the end flows into the start (circular windows; no fades); its length is `seconds` "
        "rounded to a whole latent frame (40 ms at 16 kHz)"
    )
    format: str | None = _doc(f"file format of the clip: {', '.join(AUDIO_FORMATS)} (default {DEFAULT_FORMAT})")
    loudness_lufs: float | None = field(
        default=DEFAULT_LOUDNESS_LUFS,
        metadata={
            "doc": f"integrated loudness of the clip in LUFS (default {DEFAULT_LOUDNESS_LUFS:g}); null/off = as "
            "generated; a true-peak limiter keeps it under -1 dBTP either way"
        },
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
            InputError: an unknown preset or an out-of-range field (names the field).
        """
        if self.preset is not None and self.preset not in SAMPLING_PRESETS:
            raise InputError("preset", f"must be one of {tuple(SAMPLING_PRESETS)}, got {self.preset!r}")
        preset = SAMPLING_PRESETS.get(self.preset)
        request = replace(
            self,
            seconds=_first(self.seconds, limits.default_seconds),
            steps=_first(self.steps, preset and preset.steps, limits.default_steps),
            guidance_scale=_first(self.guidance_scale, preset and preset.guidance_scale, limits.default_guidance_scale),
            image_strength=_first(self.image_strength, DEFAULT_IMAGE_STRENGTH),
            image_guidance=_first(self.image_guidance, DEFAULT_IMAGE_GUIDANCE),
            scheduler=_first(self.scheduler, preset and preset.scheduler, DEFAULT_SCHEDULER),
            seed=_first(self.seed, random_seed()),
            loop=_first(self.loop, False),
            format=_first(self.format, DEFAULT_FORMAT),
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
            loudness_lufs=request.loudness_lufs,
        )
        audio_format(request.format)
        return request

    @property
    def uses_cfg(self) -> bool:
        return self.guidance_scale > 1.0

    def batch_key(self, limits: GenerationLimits) -> tuple:
        """Requests with equal keys can share one pipeline call (same UNet shape, grids, sampler, CFG rows):
        clips of the trained length or longer, and loops, all run in windows of the trained length, so
        they batch together whatever their length; shorter clips batch with clips of their length."""
        shape = "windows" if self.loop or self.seconds >= limits.window_seconds else self.seconds
        return (shape, self.steps, self.image_steps, self.scheduler, self.image_guidance, self.uses_cfg)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (the queue payload)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GenerationRequest:
        """From a queue payload, across versions: keys this version does not know are left out (a payload
        from a newer API), and a resolved payload from before `image_steps`, `loop`, `format` or
        `loudness_lufs` existed gets their defaults."""
        known = {name: value for name, value in data.items() if name in cls.field_names()}
        if known.get("steps") is not None:  # resolved: fields added since take their defaults
            known.setdefault("loop", False)
            known.setdefault("format", DEFAULT_FORMAT)
            if known.get("image_steps") is None:
                known["image_steps"] = known["steps"]
        return cls(**known)


LOUDNESS_OFF = ("off", "null", "none")  # how a form or a command line says `loudness_lufs: null`


def parse_loudness(text: str) -> float | None:
    """`loudness_lufs` as a form field or flag spells it: a number, or off/null/none (no normalisation)."""
    if text.strip().lower() in LOUDNESS_OFF:
        return None
    try:
        return float(text)
    except ValueError:
        raise InputError("loudness_lufs", f"must be a number of LUFS or one of {LOUDNESS_OFF}, got {text!r}") from None


def _first(*values):
    """The first value that is not None (a preset's missing value reads as None)."""
    return next(value for value in values if value is not None)
