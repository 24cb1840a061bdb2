"""The one training config: a plain dataclass, saved inside every checkpoint."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..errors import InputError

Placement = Literal["decoder", "encoder", "both"]
# Where training starts every α unless told otherwise, in `train` and in every ablation arm alike: mid-way
# in eq. 5's convex range, among the paper's learned 0.37-0.63 but at none of them, so no run starts at
# the answer and arms of other layouts start alike. A pulled or random bundle holds the paper's α, set by
# hand (no MelFusion weights are public): what serving uses until a trained synapse replaces them.
INITIAL_ALPHA = 0.5
PLACEMENTS: dict[str, tuple[str, ...]] = {
    "decoder": ("up_blocks.1", "up_blocks.2", "up_blocks.3"),  # the paper's choice (Table 2, best)
    "encoder": ("down_blocks.0", "down_blocks.1", "down_blocks.2"),
    "both": ("down_blocks.0", "down_blocks.1", "down_blocks.2", "up_blocks.1", "up_blocks.2", "up_blocks.3"),
}


@dataclass
class TrainConfig:
    bundle: Path  # the starting model bundle (its frozen SD side encodes the images)
    data: Path  # JSONL/CSV manifest or folder of (image, caption, audio) triplets
    out: Path  # where the trained bundle is exported; work files go to `<out>.train/` beside it
    max_steps: int = 20  # optimiser steps; the default is a brief smoke run (real runs give `epochs`)
    epochs: float | None = None  # when set, replaces max_steps: passes over the data set (the paper: 30), see `steps_for`
    batch_size: int = 2  # per process; TANGO used 8 per GPU with gradient accumulation
    gradient_accumulation: int = 1  # micro-batches per optimiser step (Accelerate's accumulate())
    unet_lr: float = 3e-5  # TANGO's fine-tuning learning rate for the music UNet
    alpha_lr: float = 1e-5  # the paper's best α learning rate (Table 3)
    weight_decay: float = 1e-2  # AdamW default, UNet only: decay would pull α towards 0 (text-only)
    freeze_unet: bool = False  # α-only training (the authors' released `--train_only_alpha` recipe)
    fix_alpha: float | None = None  # hold every α at this value (paper Table 14); None learns α
    share_alpha: bool = False  # one α for all blocks (Table 2, "same α")
    placement: Placement = "decoder"  # synapse blocks (Table 2): decoder, encoder or both
    synapse_blocks: tuple[str, ...] | None = None  # explicit blocks (Table 11: a subset of the decoder's); wins over placement
    initial_alpha: float | None = INITIAL_ALPHA  # every α's start, in `train` and every ablation arm alike;
    #   None keeps the bundle's α (to go on training a trained synapse; its layout must be the run's)
    text_dropout: float = 0.1  # CFG: caption -> "" and the image hidden too (the unconditional branch of
    #   image_guidance="conditional", the service default); TANGO dropped 10 % of captions
    caption_dropout: float = 0.05  # CFG: caption -> "" with the image kept: the unconditional branch of
    #   image_guidance="both", which the API serves, so it must be trained; 5 % keeps 85 % of rows fully conditioned
    image_dropout: float = 0.0  # CFG: hide the image alone, so guidance can also amplify the image
    seconds: float | None = None  # clip length; None takes the bundle's default_seconds (10 s for TANGO)
    feature_steps: int = 50  # DDIM grid of the cached image trajectories (t itself is drawn from all T)
    encode_batch_size: int = 8  # images per SD batch while filling the cache
    image_dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"  # the frozen SD side's dtype while
    #   encoding and training; auto: bfloat16 on a GPU (half the memory and time, K/V are mixed in at ~1e-2), else float32
    checkpoint_every: int = 500  # steps between checkpoints (one more is written at the end)
    keep_checkpoints: int = 3  # older checkpoints are deleted: a full-size one is ~10 GB with the UNet's AdamW state
    barrier_timeout_minutes: float = 180  # waits for the other processes' cache fill, checkpoint and export
    collective_timeout_minutes: float = 30  # training all-reduces: a wedged process frees every GPU after this
    resume: Path | None = None  # checkpoint to continue from, exactly
    seed: int = 0  # every random draw of the loop derives from it (see loop.step_generator)
    mixed_precision: Literal["no", "fp16", "bf16"] | None = None  # None: as `accelerate launch` says (else fp32)
    cache_dir: Path | None = None  # image-feature and audio-latent cache; None: `<out>.train/cache`

    def __post_init__(self) -> None:
        if self.epochs is not None and self.epochs <= 0:
            raise InputError("epochs", f"must be positive, got {self.epochs}")
        if self.feature_steps < 2:
            raise InputError("feature_steps", f"the cached trajectory needs at least 2 steps, got {self.feature_steps}")

    def steps_for(self, rows: int, processes: int) -> int:
        """Optimiser steps of the run: `max_steps`, or with `epochs`, enough steps of processes × batch ×
        accumulation rows to pass over `rows` that many times (the last step may run into the next pass)."""
        if self.epochs is None:
            return self.max_steps
        return math.ceil(self.epochs * rows / (processes * self.batch_size * self.gradient_accumulation))

    @property
    def work_dir(self) -> Path:
        """Checkpoints, loss log and cache: beside the bundle, since exporting replaces `out` as a whole."""
        return self.out.with_name(self.out.name + ".train")

    @property
    def blocks(self) -> tuple[str, ...]:
        return tuple(self.synapse_blocks) if self.synapse_blocks else PLACEMENTS[self.placement]

    @property
    def cache(self) -> Path:
        return self.cache_dir or self.work_dir / "cache"
