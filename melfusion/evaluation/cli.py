"""`melfusion eval --bundle DIR --data MANIFEST [--baseline DIR --clip DIR --clap DIR]`: FAD, KL, FD, IMSM per variant."""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def add_eval_parser(commands) -> None:
    parser = commands.add_parser("eval", help="FAD, KL, FD and IMSM of a bundle on a triplet set")
    parser.add_argument("--bundle", required=True, type=Path, help="model bundle to evaluate")
    parser.add_argument("--data", required=True, type=Path, help="JSONL/CSV manifest or folder of triplets")
    parser.add_argument("--baseline", type=Path, help="the untouched starting bundle (TANGO): adds its caption-only row")
    parser.add_argument("--clip", type=Path, help="local CLIP folder (transformers CLIPModel)")
    parser.add_argument("--clap", type=Path, help="local CLAP folder (transformers ClapModel)")
    parser.add_argument("--out", type=Path, default=Path("outputs/eval.md"), help="Markdown table to write")
    parser.add_argument("--steps", type=int, default=25,
                        help="denoising steps; default %(default)s (a quick look; the paper's tables: 400)")
    parser.add_argument("--seconds", type=float, default=5.0, help="clip length; default %(default)s (paper: 10)")
    parser.add_argument("--guidance", type=float, help="CFG scale (bundle default if omitted; paper: 7)")
    parser.add_argument("--batch-size", type=int, default=4, help="rows generated together (and features held); default %(default)s")
    parser.add_argument("--limit", type=int, help="evaluate the first N usable rows only; default all")
    parser.add_argument("--seed", type=int, default=0, help="seed of every clip; default %(default)s")
    parser.add_argument("--device", default="cpu", help="torch device; default %(default)s")
    parser.set_defaults(run=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    from ..bundle import load_pipeline
    from ..dataset.manifest import read_triplets
    from .evaluators import Evaluators
    from .run import MEANINGLESS, default_variants, evaluate, format_table, sharing_frozen_parts

    triplets = read_triplets(args.data)
    triplets.rows = triplets.rows[: args.limit]
    evaluators = Evaluators.load(args.clip, args.clap)
    if not evaluators.meaningful:
        print(f"melfusion: warning: {MEANINGLESS}")
    pipe = load_pipeline(args.bundle, device=args.device)
    pipe.set_progress_bar_config(disable=True)  # one bar for the whole evaluation instead
    baseline = sharing_frozen_parts(pipe, args.baseline) if args.baseline else None
    variants = default_variants(baseline)
    probe = time.perf_counter()
    pipe("estimate", seconds=args.seconds, num_inference_steps=args.steps, seed=0)  # one caption-only clip
    per_clip = time.perf_counter() - probe
    clips = len(variants) * len(triplets.rows)
    print(f"estimate: {len(variants)} variants x {len(triplets.rows)} rows = {clips} clips at about {per_clip:.1f} s "
          f"each (more with an image): ~{clips * per_clip / 60:.1f} min; --steps, --seconds and --limit "
          "shorten it", flush=True)  # fmt: skip
    scores = evaluate(
        pipe, triplets, evaluators, variants, steps=args.steps, seconds=args.seconds,
        guidance_scale=args.guidance, seed=args.seed, batch_size=args.batch_size,
    )
    table = format_table(scores, meaningful=evaluators.meaningful, skipped=len(triplets.bad))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table, encoding="utf-8")
    print(triplets.summary())
    print(table)
    print(f"wrote {args.out.resolve()}")
    return 0
