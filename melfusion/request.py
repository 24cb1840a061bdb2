"""GenerationRequest: the one declaration of a generation's fields, and the one place their defaults resolve.

Each field is declared once, here: its type, default, range (fixed, or from the bundle's `GenerationLimits`)
and help text. The HTTP form and its OpenAPI schema, the CLI flags, the client's parameters, the queue
payload and the engine call are all derived from this class (see `interface`), so adding a field touches
this file and the engine only (CONTRIBUTING.md walks through it). Torch-free, like `limits`, so the HTTP
side can use it without models.
"""

from __future__ import annotations

import secrets
import types
import typing
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from .formats import AUDIO_FORMATS, DEFAULT_FORMAT
from .errors import InputError
from .limits import (
    IMAGE_GUIDANCE_MODES, LOUDNESS_RANGE_LUFS, MAX_GUIDANCE_SCALE, SAMPLING_PRESETS, STUDENT_SCHEDULERS, GenerationLimits,
)  # fmt: skip

MAX_SEED = 2**32 - 1  # seeds are drawn from [0, MAX_SEED] and accepted in it: any uint32 works
DEFAULT_GUIDANCE_INTERVAL = (0.0, 1.0)  # CFG at every step
MAX_OUTPUTS = 8  # variations of one request in one batched call; 8 rows cost about one at batch 1 on a GPU
DEFAULT_LOUDNESS_LUFS = -14.0  # the level streaming and social platforms normalise to
OFF = "off"  # how a form or a command line says null for a field whose default is not null

FromLimits = Callable[[GenerationLimits], Any]  # a bound or default that depends on the bundle


@dataclass(frozen=True)
class Declaration:
    """What a field promises, beyond its type and default: each front end states and enforces these."""

    help: str
    ge: float | FromLimits | None = None
    gt: float | FromLimits | None = None
    lt: float | FromLimits | None = None
    le: float | FromLimits | None = None
    choices: tuple | FromLimits | None = None
    text: bool = False  # free text, capped by the service's MELFUSION_MAX_CAPTION_CHARS
    bundle_default: FromLimits | None = None  # named in the help text (when a preset does not set it)
    nullable: bool = False  # null is a value of its own (spelled OFF in forms and flags), not "unset"


def declare(help: str, *, default: Any = None, **promises: Any) -> Any:
    """A GenerationRequest field: `default` (None = resolved later, from the preset or the bundle) and the
    promises of `Declaration` (a bound may be a function of the bundle's limits)."""
    return field(default=default, metadata={"declaration": Declaration(help, **promises)})


@dataclass(frozen=True)
class FieldInterface:
    """One field as the front ends show it, with the bounds of one bundle filled in (None: unbounded, or
    bounded by a bundle the caller did not name)."""

    name: str
    kind: type  # str, int, float or bool
    default: Any
    help: str
    ge: float | None
    gt: float | None
    lt: float | None
    le: float | None
    choices: tuple | None
    text: bool
    nullable: bool = False

    def from_text(self, text: str) -> Any:
        """The value a form field or a flag spells: OFF is null for a nullable field; true/false for a bool."""
        if self.nullable and text.strip().lower() == OFF:
            return None
        if self.kind is bool:
            if text.strip().lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"{self.name}: true or false, got {text!r}")
            return text.strip().lower() in ("true", "1")
        return self.kind(text)

    def check(self, value: Any) -> None:
        """Raise InputError naming this field if `value` breaks its type or range (None: not given)."""
        if value is None:
            return
        if self.kind is str and (not isinstance(value, str) or (self.text and not value.strip())):
            raise InputError(self.name, "must be a non-empty string")
        if self.kind is bool and not isinstance(value, bool):
            raise InputError(self.name, f"must be true or false, got {value!r}")
        if self.kind in (int, float) and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise InputError(self.name, f"must be a number, got {value!r}")
        if self.kind is int and value != int(value):
            raise InputError(self.name, f"must be a whole number, got {value!r}")
        if self.choices is not None and value not in self.choices:
            raise InputError(self.name, f"must be one of {self.choices}, got {value!r}")
        low, high = self.gt if self.gt is not None else self.ge, self.lt if self.lt is not None else self.le
        too_low = low is not None and (value <= low if self.gt is not None else value < low)
        too_high = high is not None and (value >= high if self.lt is not None else value > high)
        if too_low or too_high:
            opening, closing = "(" if self.gt is not None else "[", ")" if self.lt is not None else "]"
            raise InputError(self.name, f"must be in {opening}{low}, {high}{closing}, got {value}")


def random_seed() -> int:
    return secrets.randbelow(MAX_SEED + 1)


@dataclass(frozen=True)
class GenerationRequest:
    """One request (of `num_outputs` clips); unset fields are None until `resolved` fills them."""

    caption: str | None = declare("a short description of the music; optional when an image is given", text=True)
    negative_caption: str | None = declare(
        "what the music should not be: replaces the empty caption of CFG's unconditional branch "
        "(diffusers' negative prompt); needs guidance_scale > 1",
        text=True,
    )
    seconds: float | None = declare(
        "clip length in seconds", gt=0, le=lambda limits: limits.max_seconds,
        bundle_default=lambda limits: limits.default_seconds,
    )  # fmt: skip
    steps: int | None = declare(
        "denoising steps", ge=1, le=lambda limits: limits.max_steps, bundle_default=lambda limits: limits.default_steps
    )
    guidance_scale: float | None = declare(
        "classifier-free guidance scale; <= 1 turns CFG off", ge=0, le=MAX_GUIDANCE_SCALE,
        bundle_default=lambda limits: limits.default_guidance_scale,
    )  # fmt: skip
    guidance_start: float = declare(
        "guidance interval: CFG runs on the steps from this fraction of the trajectory (0 = pure noise) "
        "until `guidance_end`; the other steps run the conditional branch alone, half the UNet work "
        "(teacher bundles only)",
        default=DEFAULT_GUIDANCE_INTERVAL[0],
        ge=0,
        lt=1,
    )
    guidance_end: float = declare(
        "guidance interval's end, a fraction of the trajectory (1: CFG to the last step)",
        default=DEFAULT_GUIDANCE_INTERVAL[1],
        gt=0,
        le=1,
    )
    image_strength: float = declare("scales every α: 0 = caption only, 1 = learned α", default=1.0, ge=0, le=1)
    image_guidance: str = declare(
        "CFG branch that sees the image: conditional (guidance amplifies image and caption) "
        "or both (guidance amplifies the caption only)",
        default="conditional",
        choices=IMAGE_GUIDANCE_MODES,
    )
    scheduler: str | None = declare(
        "sampler (default: the preset's, else the bundle's: ddim; a distilled student serves only tcd, its "
        "default, and lcm)",
        choices=lambda limits: limits.schedulers,
    )
    seed: int | None = declare(
        f"in [0, {MAX_SEED}]; chosen and echoed if omitted; output i gets seed + i", ge=0, le=MAX_SEED
    )
    image_steps: int | None = declare(
        "image passes, at most `steps` (default: one per denoising step, as in the paper); fewer is faster "
        "for a new image, and each music step then meets the image features recorded nearest to it",
        ge=1,
        le=lambda limits: limits.max_steps,
    )
    preset: str | None = declare(
        "sampler, steps and guidance of: " + "; ".join(f"{k}: {p.source}" for k, p in SAMPLING_PRESETS.items()),
        choices=tuple(SAMPLING_PRESETS),
    )
    num_outputs: int = declare(
        f"variations made in one batched call (1 to {MAX_OUTPUTS}), seeds seed, seed + 1, ...",
        default=1,
        ge=1,
        le=MAX_OUTPUTS,
    )
    format: str = declare("file format of the clip (16-bit WAV and FLAC; Ogg Vorbis; Opus at 48 kHz; MP3 at 32 kHz)", default=DEFAULT_FORMAT,
                          choices=tuple(AUDIO_FORMATS))  # fmt: skip
    loudness_lufs: float | None = declare(
        f"integrated loudness of the clip in LUFS (ITU-R BS.1770-4); {OFF} (null) = the level as generated; "
        "a true-peak limiter keeps every clip under -1 dBTP",
        default=DEFAULT_LOUDNESS_LUFS, ge=LOUDNESS_RANGE_LUFS[0], le=LOUDNESS_RANGE_LUFS[1], nullable=True,
    )  # fmt: skip
    loop: bool = declare(
        "a seamless loop: the end flows into the start (circular windows; no fades); it lasts `seconds` "
        "rounded to a whole latent frame (40 ms at 16 kHz)",
        default=False,
    )

    @staticmethod
    def field_names() -> tuple[str, ...]:
        return tuple(f.name for f in fields(GenerationRequest))

    @staticmethod
    def interface(limits: GenerationLimits | None = None) -> tuple[FieldInterface, ...]:
        """Every field as the front ends show it, with `limits`' bounds and defaults (None: bounds that need a
        bundle are left to `resolved`)."""
        hints = typing.get_type_hints(GenerationRequest)
        described = []
        for f in fields(GenerationRequest):
            declaration: Declaration = f.metadata["declaration"]
            kind = next(arg for arg in _union_args(hints[f.name]) if arg is not type(None))
            help_text = declaration.help
            if f.default is not None:
                help_text += f"; default {f.default}"
            elif declaration.bundle_default is not None and limits is not None:
                help_text += f"; default {declaration.bundle_default(limits)} (or the preset's)"
            described.append(FieldInterface(
                name=f.name, kind=kind, default=f.default, help=help_text, ge=_for_bundle(declaration.ge, limits),
                gt=_for_bundle(declaration.gt, limits), lt=_for_bundle(declaration.lt, limits),
                le=_for_bundle(declaration.le, limits),
                choices=_for_bundle(declaration.choices, limits), text=declaration.text, nullable=declaration.nullable,
            ))  # fmt: skip
        return tuple(described)

    def resolved(self, limits: GenerationLimits) -> GenerationRequest:
        """Every field set: the request's values, then the preset's, then the bundle's, then the defaults
        declared above (one image pass per step); a seed chosen if none was given; every range checked.
        Idempotent, so a queue payload from an older version resolves to the same request plus new defaults.

        Raises:
            InputError: an unknown preset, one the bundle cannot run, or an out-of-range field (names the field).
        """
        for described in GenerationRequest.interface(limits):
            described.check(getattr(self, described.name))
        preset = limits.preset(self.preset)
        request = replace(
            self,
            seconds=_first(self.seconds, limits.default_seconds),
            steps=_first(self.steps, preset and preset.steps, limits.default_steps),
            guidance_scale=_first(self.guidance_scale, preset and preset.guidance_scale, limits.default_guidance_scale),
            scheduler=_first(self.scheduler, preset and preset.scheduler, limits.default_scheduler),
            seed=_first(self.seed, random_seed()),
        )
        request = replace(request, image_steps=_first(self.image_steps, request.steps))
        if request.image_steps > request.steps:
            raise InputError("image_steps", f"must be in [1, steps = {request.steps}], got {request.image_steps}")
        if request.negative_caption is not None and not request.uses_cfg:
            raise InputError("negative_caption", f"needs guidance_scale > 1 and a teacher's sampler (a CFG batch), "
                             f"got {request.guidance_scale} with {request.scheduler}")  # fmt: skip
        if request.guidance_end <= request.guidance_start:
            raise InputError("guidance_end", f"must be in (guidance_start = {request.guidance_start}, 1], "
                             f"got {request.guidance_end}")  # fmt: skip
        if request.scheduler in STUDENT_SCHEDULERS:
            # a student has no unconditional batch: guidance is an input, distilled with the image in the
            # conditional branch (the default), and there is no CFG pass for an interval to skip
            if request.image_guidance != "conditional":
                raise InputError("image_guidance", "a distilled student takes guidance as an input, distilled as "
                                 "'conditional' (guidance amplifies caption and image together)")  # fmt: skip
            if (request.guidance_start, request.guidance_end) != DEFAULT_GUIDANCE_INTERVAL:
                named = "guidance_start" if request.guidance_start != DEFAULT_GUIDANCE_INTERVAL[0] else "guidance_end"
                raise InputError(named, "a distilled student runs no CFG batch, so there is no guidance "
                                 "interval to set (leave it at 0-1)")  # fmt: skip
        return request

    def check_condition(self, *, has_image: bool) -> None:
        """A clip needs something to follow: a caption, an image, or both."""
        if self.caption is None and not has_image:
            raise InputError("caption", "give a caption, an image, or both")

    def variations(self) -> list[GenerationRequest]:
        """The `num_outputs` rows of a resolved request: one clip each, seeds seed, seed + 1, ..."""
        return [
            replace(self, seed=(self.seed + i) % (MAX_SEED + 1), num_outputs=1) for i in range(self.num_outputs)
        ]

    @property
    def uses_cfg(self) -> bool:
        """Whether the request needs an unconditional batch (a student takes its guidance as an input)."""
        return self.guidance_scale > 1.0 and self.scheduler not in STUDENT_SCHEDULERS

    def batch_key(self, limits: GenerationLimits) -> tuple:
        """Requests with equal keys can share one pipeline call (same UNet shape, grids, sampler, CFG rows and
        interval): clips of the trained length or longer, and loops, all run in windows of the trained length,
        so they batch together whatever their length; shorter clips batch with clips of their length."""
        shape = "windows" if self.loop or self.seconds >= limits.window_seconds else self.seconds
        return (shape, self.steps, self.image_steps, self.scheduler, self.image_guidance, self.uses_cfg,
                self.guidance_start, self.guidance_end)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (the queue payload)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GenerationRequest:
        """From a queue payload, across versions: keys this version does not know are left out (a payload
        from a newer API), and a field the payload lacks takes its declared default (`resolved` then fills
        the ones that depend on others, as for a new request)."""
        return cls(**{name: value for name, value in data.items() if name in cls.field_names()})


def _for_bundle(promise: Any, limits: GenerationLimits | None) -> Any:
    """A declared promise for one bundle: a function of the limits is called (None when no bundle is named)."""
    if not callable(promise):
        return promise
    return promise(limits) if limits is not None else None


def _union_args(hint: Any) -> tuple:
    return typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)


def _first(*values):
    """The first value that is not None (a preset's missing value reads as None)."""
    return next(value for value in values if value is not None)
