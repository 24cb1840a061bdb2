"""The paper's training ablations, one training run per arm, then one evaluation table with TANGO beside them.

    python -m melfusion.training.experiments table14 --bundle B --data TRAIN --test-data TEST --out-dir DIR [...]

- `table14` (Table 14): α held fixed *during training* at each `--alphas` value, plus one learned-α run.
- `table2` (Table 2): synapse in the encoder, decoder or both, with one α per block or one shared.
- `table11` (Table 11): the synapse in decoder block 1, blocks 1-2, blocks 1-3.

Every arm starts from the same α (`--initial-alpha`, 0.5, as a plain `melfusion train` does), so no arm
begins at the bundle's learned values, and from the same bundle, data, steps and seed; all arms share one
encoding cache (its files do not depend on the synapse). An arm whose bundle exists is not trained again,
so a stopped run continues. Under `accelerate launch` every process trains each arm, then the processes
share out the evaluation's rows; one image pass per row serves every arm (see `evaluation.run`).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from ..bundle import load_pipeline
from ..dataset.manifest import read_triplets
from ..evaluation.evaluators import Evaluators
from ..evaluation.run import TRAINING_FEATURES, Variant, evaluate, format_table, sharing_frozen_parts
from ..launch import process_state
from ..synapse import DECODER_BLOCKS
from .cli import initial_alpha
from .config import INITIAL_ALPHA, TrainConfig
from .loop import train


def arms(table: str, alphas: list[float]) -> dict[str, dict]:
    """Arm name -> TrainConfig overrides."""
    if table == "table14":
        return {**{f"alpha {a:g} (fixed in training)": {"fix_alpha": a} for a in alphas}, "learned alpha": {}}
    if table == "table2":
        return {f"{placement}, {'same' if share else 'per-block'} alpha": {"placement": placement, "share_alpha": share}
                for share in (True, False) for placement in ("encoder", "both", "decoder")}
    if table == "table11":
        return {f"decoder blocks 1-{n}": {"synapse_blocks": DECODER_BLOCKS[:n]} for n in (1, 2, 3)}
    raise ValueError(f"unknown table {table!r}")


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-")


def run(args: argparse.Namespace) -> Path:
    base = TrainConfig(
        bundle=args.bundle, data=args.data, out=args.out_dir, max_steps=args.max_steps, epochs=args.epochs,
        batch_size=args.batch_size, gradient_accumulation=args.gradient_accumulation, initial_alpha=args.initial_alpha,
        seconds=args.seconds, feature_steps=args.feature_steps, freeze_unet=args.freeze_unet, seed=args.seed,
        cache_dir=args.cache_dir or args.out_dir / "cache", checkpoint_every=args.checkpoint_every,
        mixed_precision=args.mixed_precision,
    )
    trained = {}
    for name, overrides in arms(args.table, args.alphas).items():
        config = dataclasses.replace(base, out=args.out_dir / slug(name), **overrides)
        if not (config.out / "manifest.json").is_file():
            train(config)
        trained[name] = config.out

    # Every process evaluates its share of the rows; the main one writes the table
    state = process_state()
    pipe = load_pipeline(args.bundle, device=args.device or state.device)  # TANGO: the untouched starting UNet
    pipe.set_progress_bar_config(disable=True)
    variants = [Variant("TANGO (untouched UNet, caption only)", 0.0)]
    variants += [Variant(name, 1.0, sharing_frozen_parts(pipe, out)) for name, out in trained.items()]
    triplets = read_triplets(args.test_data)
    triplets.rows = triplets.rows[: args.limit]
    evaluators = Evaluators.load(args.clip, args.clap)
    scores = evaluate(pipe, triplets, evaluators, variants, steps=args.steps, seconds=args.seconds or
                      pipe.config.default_seconds, guidance_scale=args.guidance, batch_size=args.eval_batch_size,
                      image_features_from=args.image_features_from)
    table = format_table(scores, meaningful=evaluators.meaningful, skipped=len(triplets.bad),
                         image_features_from=args.image_features_from)
    table_path = args.out_dir / f"{args.table}.md"
    if state.is_main_process:
        table_path.write_text(table, encoding="utf-8")
        print(table)
        print(f"wrote {table_path.resolve()}")
    return table_path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m melfusion.training.experiments", description=__doc__.split("\n")[0])
    parser.add_argument("table", choices=("table14", "table2", "table11"))
    parser.add_argument("--bundle", required=True, type=Path, help="starting bundle (TANGO + SD): every arm's start")
    parser.add_argument("--data", required=True, type=Path, help="training triplets")
    parser.add_argument("--test-data", required=True, type=Path, help="evaluation triplets")
    parser.add_argument("--out-dir", required=True, type=Path, help="one bundle per arm, the cache and the table")
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.0, 0.1, 0.5, 0.9, 1.0], help="table14's fixed α")
    parser.add_argument("--initial-alpha", type=initial_alpha, default=INITIAL_ALPHA,
                        help="every arm's starting α (default %(default)s, as `melfusion train`'s)")
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--max-steps", type=int, default=20, help="optimiser steps per arm (default %(default)s)")
    length.add_argument("--epochs", type=float, help="passes over the training set per arm (paper: 30)")
    parser.add_argument("--checkpoint-every", type=int, default=1000, help="steps between an arm's checkpoints")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--gradient-accumulation", type=int, default=1)
    parser.add_argument("--seconds", type=float)
    parser.add_argument("--feature-steps", type=int, default=50)
    parser.add_argument("--freeze-unet", action="store_true", help="train α only")
    parser.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"))
    parser.add_argument("--cache-dir", type=Path, help="encoding cache (default OUT_DIR/cache)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=400, help="evaluation denoising steps (paper: 400)")
    parser.add_argument("--guidance", type=float, help="evaluation CFG scale (bundle default: the paper's 7)")
    parser.add_argument("--eval-batch-size", type=int, default=4)
    parser.add_argument("--limit", type=int, help="evaluate the first N rows only")
    parser.add_argument("--clip", type=Path, help="local CLIP folder")
    parser.add_argument("--clap", type=Path, help="local CLAP folder")
    parser.add_argument("--image-features-from", choices=("redenoise", "inversion"), default=TRAINING_FEATURES,
                        help="evaluation's image K/V (default: what training used)")
    parser.add_argument("--device", help="evaluation device (default this process's GPU, else cpu)")
    return parser


if __name__ == "__main__":
    run(build_parser().parse_args())
