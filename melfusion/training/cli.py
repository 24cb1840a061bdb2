"""`melfusion train --bundle DIR --data MANIFEST --out DIR [...]`: the three flags alone train briefly."""

from __future__ import annotations

import argparse
from pathlib import Path

from .config import PLACEMENTS, TrainConfig


def add_train_parser(commands) -> None:
    parser = commands.add_parser("train", help="train the visual synapse (and the music UNet) on triplets")
    parser.add_argument("--bundle", required=True, type=Path, help="starting model bundle")
    parser.add_argument("--data", required=True, type=Path, help="JSONL/CSV manifest or folder of triplets")
    parser.add_argument("--out", required=True, type=Path, help="trained bundle to write (work files in OUT.train/)")
    defaults = TrainConfig(Path(), Path(), Path())
    for name, kind, text in [
        ("max_steps", int, "optimiser steps"),
        ("batch_size", int, "examples per process and micro-batch"),
        ("gradient_accumulation", int, "micro-batches per optimiser step"),
        ("unet_lr", float, "music UNet learning rate"),
        ("alpha_lr", float, "α learning rate (paper: 1e-5)"),
        ("fix_alpha", float, "hold every α at this value (paper Table 14)"),
        ("initial_alpha", float, "start α of a new synapse"),
        ("text_dropout", float, "CFG: probability of dropping caption and image"),
        ("image_dropout", float, "CFG: probability of dropping the image alone"),
        ("seconds", float, "clip length (bundle default if omitted)"),
        ("feature_steps", int, "DDIM grid of the cached image features; t is drawn from it"),
        ("checkpoint_every", int, "steps between checkpoints"),
        ("seed", int, "seed of every random draw"),
    ]:
        default = getattr(defaults, name)
        shown = "" if default is None else f" (default {default})"
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, default=default, help=text + shown)
    parser.add_argument("--freeze-unet", action="store_true", help="train α only")
    parser.add_argument("--share-alpha", action="store_true", help="one α for all synapse blocks")
    parser.add_argument("--placement", choices=tuple(PLACEMENTS), default=defaults.placement, help="synapse blocks")
    parser.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), help="default: as accelerate launch says")
    parser.add_argument("--resume", type=Path, help="checkpoint (.pt) to continue from")
    parser.add_argument("--cache-dir", type=Path, help="feature cache (default OUT.train/cache)")
    parser.set_defaults(run=run_train)


def run_train(args: argparse.Namespace) -> int:
    from .loop import train

    fields = TrainConfig.__dataclass_fields__
    config = TrainConfig(**{name: value for name, value in vars(args).items() if name in fields})
    train(config)
    return 0
