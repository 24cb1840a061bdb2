"""`melfusion train --bundle DIR --data MANIFEST --out DIR [...]`: the three flags alone train briefly.

`melfusion encode` with the same flags fills the cache only (under `accelerate launch` too), so a long
encoding need not run inside a training job (whose processes would wait for it under the barrier timeout).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..launch import refuse_single_process_cpu_launch
from .config import PLACEMENTS, TrainConfig

NUMBERS = [
    ("batch_size", int, "examples per process and micro-batch"),
    ("gradient_accumulation", int, "micro-batches per optimiser step"),
    ("unet_lr", float, "music UNet learning rate"),
    ("alpha_lr", float, "α learning rate (paper: 1e-5)"),
    ("fix_alpha", float, "hold every α at this value (paper Table 14)"),
    ("text_dropout", float, "CFG: probability of dropping caption and image"),
    ("caption_dropout", float, "CFG: probability of dropping the caption alone (trains image_guidance=both)"),
    ("image_dropout", float, "CFG: probability of dropping the image alone"),
    ("seconds", float, "clip length (bundle default if omitted)"),
    ("feature_steps", int, "DDIM grid of the cached image trajectories (t is drawn from all T)"),
    ("encode_batch_size", int, "images per SD batch while encoding"),
    ("checkpoint_every", int, "steps between checkpoints"),
    ("keep_checkpoints", int, "checkpoints kept (older ones are deleted)"),
    ("barrier_timeout_minutes", float, "how long processes wait for each other's cache fill, checkpoint, export"),
    ("collective_timeout_minutes", float, "timeout of the training all-reduces (a wedged process stops the run)"),
    ("seed", int, "seed of every random draw"),
]


def add_number_arguments(parser: argparse.ArgumentParser, numbers: list[tuple[str, type, str]], defaults) -> None:
    """One `--name` option per (field, type, help) entry, defaulting to the field's value in `defaults`."""
    for name, kind, text in numbers:
        default = getattr(defaults, name)
        shown = "" if default is None else f" (default {default})"
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, default=default, help=text + shown)


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Precision, resume and cache options, shared by `train`, `encode` and `distill`."""
    parser.add_argument("--image-dtype", choices=("auto", "float32", "float16", "bfloat16"), default="auto",
                        help="frozen SD side while encoding and training (auto: bfloat16 on a GPU)")
    parser.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), help="default: as accelerate launch says")
    parser.add_argument("--resume", type=Path, help="checkpoint folder (OUT.train/checkpoints/step-...) to continue from")
    parser.add_argument("--cache-dir", type=Path, help="encoding cache, e.g. on a shared filesystem (default OUT.train/cache)")


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bundle", required=True, type=Path, help="starting model bundle")
    parser.add_argument("--data", required=True, type=Path, help="JSONL/CSV manifest or folder of triplets")
    parser.add_argument("--out", required=True, type=Path, help="trained bundle to write (work files in OUT.train/)")
    defaults = TrainConfig(Path(), Path(), Path())
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--max-steps", type=int, help=f"optimiser steps (default {defaults.max_steps}: a brief smoke run)")
    length.add_argument("--epochs", type=float, help="passes over the data set (paper: 30); sets the steps from the "
                        "usable rows, the number of processes, --batch-size and --gradient-accumulation")
    parser.add_argument("--initial-alpha", type=initial_alpha, default=defaults.initial_alpha,
                        help=f"every α's start (default {defaults.initial_alpha}, as the experiments'); 'bundle' "
                             "keeps the bundle's own α, e.g. to go on training a trained synapse")
    add_number_arguments(parser, NUMBERS, defaults)
    parser.add_argument("--freeze-unet", action="store_true", help="train α only")
    parser.add_argument("--share-alpha", action="store_true", help="one α for all synapse blocks")
    parser.add_argument("--placement", choices=tuple(PLACEMENTS), default=defaults.placement, help="synapse blocks")
    parser.add_argument("--synapse-blocks", nargs="+", help="explicit synapse blocks, e.g. up_blocks.1 (Table 11)")
    add_run_arguments(parser)


def add_train_parser(commands) -> None:
    train = commands.add_parser("train", help="train the visual synapse (and the music UNet) on triplets")
    _add_config_arguments(train)
    train.set_defaults(run=run_train)
    encode = commands.add_parser("encode", help="fill the training cache (image trajectories, clip posteriors) only")
    _add_config_arguments(encode)
    encode.set_defaults(run=run_encode)


def initial_alpha(text: str) -> float | None:
    """`--initial-alpha`: a number, or "bundle" (None: keep the bundle's α)."""
    if text == "bundle":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a number or 'bundle', not {text!r}") from None


def config_from(args: argparse.Namespace) -> TrainConfig:
    fields = TrainConfig.__dataclass_fields__
    given = {name: value for name, value in vars(args).items() if name in fields}
    if given["max_steps"] is None:  # not given: the config's brief default (or --epochs decides)
        del given["max_steps"]
    config = TrainConfig(**given)
    if config.synapse_blocks:
        config.synapse_blocks = tuple(config.synapse_blocks)
    return config


def run_train(args: argparse.Namespace) -> int:
    refuse_single_process_cpu_launch()
    from .loop import train

    train(config_from(args))
    return 0


def run_encode(args: argparse.Namespace) -> int:
    refuse_single_process_cpu_launch()
    from .loop import encode

    encode(config_from(args))
    return 0
