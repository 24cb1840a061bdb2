"""`melfusion distill --teacher BUNDLE --data FILE --out STUDENT [...]`: its config and command line.

Torch-free like `cli.py` and `config.py`, so `melfusion --help` stays quick; the loop is `distill.py`.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..errors import InputError
from .cli import NUMBERS, add_number_arguments, add_run_arguments, config_from
from .config import TrainConfig

# What `melfusion distill` reads of the training config; it ignores the rest (α, placement, CFG dropout).
SHARED_NUMBERS = (
    "batch_size", "gradient_accumulation", "unet_lr", "seconds", "feature_steps", "encode_batch_size",
    "checkpoint_every", "keep_checkpoints", "barrier_timeout_minutes", "collective_timeout_minutes", "seed",
)  # fmt: skip
DISTILL_NUMBERS = [
    ("student_steps", int, "the student's default steps, written into its bundle"),
    ("max_student_steps", int, "the most steps a request may ask of the student"),
    ("teacher_steps", int, "distillation grid: consistency pairs are its neighbouring timesteps"),
    ("teacher_substeps", int, "guided teacher DDIM steps between two neighbouring grid timesteps"),
    ("guidance_min", float, "smallest guidance scale the student learns"),
    ("guidance_max", float, "largest guidance scale the student learns"),
    ("ema_decay", float, "decay of the target network's moving average"),
    ("huber_c", float, "pseudo-Huber constant c"),
    ("image_dropout", float, "probability that a row hides its image, so caption-only requests are distilled too"),
    ("guidance_embedding_dim", int, "width of the student's guidance input"),
]


@dataclass
class DistillConfig:
    """Latent consistency distillation settings; the data, cache, precision, checkpoint and resume settings are
    those of `melfusion train` (its `bundle` is the teacher, its `out` the student, its `unet_lr` and
    `weight_decay` the student's AdamW)."""

    train: TrainConfig
    student_steps: int = 4  # the target: 4 UNet calls per clip
    max_student_steps: int = 8  # consistency sampling saturates within a few steps; more cost without gain
    teacher_steps: int = 40  # the trailing grid of 40 holds those of 1, 2, 4, 5, 8 steps (LCM: 50, ConsistencyTTA: 18)
    teacher_substeps: int = 1  # guided DDIM steps per grid step (LCM: 1); a coarse grid wants more
    guidance_min: float = 1.0  # 1: no guidance, so `guidance_scale <= 1` requests are learned too
    guidance_max: float = 8.0  # covers the bundle default (the paper's 7) and TANGO's 3
    ema_decay: float = 0.95  # LCM's target-network decay
    targets: Literal["trajectory", "endpoint"] = "trajectory"  # see distill.py's docstring
    loss: Literal["huber", "l2"] = "huber"  # pseudo-Huber (LCM, Song & Dhariwal 2023) is robust to a few bad rows
    huber_c: float = 1e-3  # LCM's c for SD latents (unit variance, like ours)
    image_dropout: float = 0.25  # rows without their image, so strength-0 (caption-only) requests are distilled
    guidance_embedding_dim: int = 256  # melfusion.student.GUIDANCE_EMBEDDING_DIM

    def check(self) -> None:
        """Raise InputError naming the first setting out of range, before any model loads."""
        bounds = {
            "student_steps": 1 <= self.student_steps <= self.max_student_steps,
            "teacher_steps": 1 <= self.teacher_steps <= 1000,
            "teacher_substeps": 1 <= self.teacher_substeps <= 1000 // self.teacher_steps,
            "guidance_min": 0 <= self.guidance_min <= self.guidance_max,
            "ema_decay": 0 <= self.ema_decay < 1,
            "image_dropout": 0 <= self.image_dropout <= 1,
            "huber_c": self.huber_c > 0,
            "guidance_embedding_dim": self.guidance_embedding_dim > 0 and self.guidance_embedding_dim % 2 == 0,
        }
        for name, ok in bounds.items():
            if not ok:
                raise InputError(name.replace("_", "-"), f"out of range: {getattr(self, name)}")

    @property
    def settings(self) -> dict:
        """The distillation settings a student's manifest records (beside the teacher it came from)."""
        train = self.train
        return {
            "method": "CFG-aware consistency distillation, guidance as an input (TCD / LCM), guided DDIM teacher",
            "data": str(train.data), "seconds": train.seconds, "feature_steps": train.feature_steps,
            "batch_size": train.batch_size, "gradient_accumulation": train.gradient_accumulation,
            "lr": train.unet_lr, "weight_decay": train.weight_decay, "seed": train.seed,
            "mixed_precision": train.mixed_precision, "student_steps": self.student_steps,
            "teacher_steps": self.teacher_steps, "teacher_substeps": self.teacher_substeps,
            "guidance_range": [self.guidance_min, self.guidance_max],
            "ema_decay": self.ema_decay, "targets": self.targets, "loss": self.loss, "huber_c": self.huber_c,
            "image_dropout": self.image_dropout,
        }  # fmt: skip


def add_distill_parser(commands) -> None:
    parser = commands.add_parser("distill", help="distil a few-step, guidance-free student bundle from a bundle")
    parser.add_argument("--teacher", dest="bundle", required=True, type=Path, help="the bundle to distil")
    parser.add_argument("--data", required=True, type=Path, help="JSONL/CSV manifest or folder of triplets")
    parser.add_argument("--out", required=True, type=Path, help="student bundle to write (work files in OUT.train/)")
    shared = TrainConfig(Path(), Path(), Path())
    parser.add_argument("--max-steps", type=int, default=shared.max_steps,
                        help=f"optimiser steps (default {shared.max_steps}: a brief smoke run)")
    add_number_arguments(parser, [n for n in NUMBERS if n[0] in SHARED_NUMBERS], shared)
    defaults = DistillConfig(TrainConfig(Path(), Path(), Path()))
    add_number_arguments(parser, DISTILL_NUMBERS, defaults)
    parser.add_argument("--targets", choices=("trajectory", "endpoint"), default=defaults.targets,
                        help="jump to any earlier grid point (TCD: deterministic few steps follow the teacher) or "
                             "to the end only (LCM)")
    parser.add_argument("--loss", choices=("huber", "l2"), default=defaults.loss, help="consistency loss")
    add_run_arguments(parser)
    parser.set_defaults(run=run_distill)


def run_distill(args: argparse.Namespace) -> int:
    from .distill import distill

    fields = DistillConfig.__dataclass_fields__
    distill(DistillConfig(config_from(args), **{k: v for k, v in vars(args).items() if k in fields and k != "train"}))
    return 0
