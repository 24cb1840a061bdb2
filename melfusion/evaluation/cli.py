"""`melfusion eval --bundle DIR --data MANIFEST [--baseline DIR --clip DIR --clap DIR]`: FAD, KL, FD, IMSM per variant.

Under `accelerate launch --multi_gpu --num_processes N -m melfusion.cli eval ...` the rows are shared out
over the N processes (one GPU each) and the table is the one a single process would write.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..launch import process_state, refuse_single_process_cpu_launch

SHARDING_HINT = ("accelerate launch --multi_gpu --num_processes N -m melfusion.cli eval ... shares the rows "
                 "out over N GPUs")


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
    parser.add_argument("--image-features-from", choices=("redenoise", "inversion"), default="redenoise",
                        help="image K/V mixed in: redenoise (default: what training used) or inversion (the "
                             "service's default, one SD pass per step instead of two)")
    parser.add_argument("--device", help="torch device; default this process's GPU under accelerate, else cuda, else cpu")
    parser.set_defaults(run=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    refuse_single_process_cpu_launch()
    from ..bundle import load_pipeline
    from ..dataset.manifest import read_triplets
    from .evaluators import Evaluators
    from .run import MEANINGLESS, default_variants, evaluate, format_table, sharing_frozen_parts

    state = process_state()
    say = print if state.is_main_process else lambda *_, **__: None
    device = args.device or state.device
    triplets = read_triplets(args.data)
    triplets.rows = triplets.rows[: args.limit]
    evaluators = Evaluators.load(args.clip, args.clap)
    if not evaluators.meaningful:
        say(f"melfusion: warning: {MEANINGLESS}")
    pipe = load_pipeline(args.bundle, device=device)
    pipe.set_progress_bar_config(disable=True)  # one bar for the whole evaluation instead
    baseline = sharing_frozen_parts(pipe, args.baseline) if args.baseline else None
    variants = default_variants(baseline)
    probe = time.perf_counter()
    pipe("estimate", seconds=args.seconds, num_inference_steps=args.steps, seed=0)  # one caption-only clip
    per_clip = time.perf_counter() - probe
    clips = len(variants) * len(triplets.rows)
    share = -(-clips // state.num_processes)
    say(f"estimate: {len(variants)} variants x {len(triplets.rows)} rows = {clips} clips on {state.num_processes} "
        f"process(es) ({pipe.device}), {share} each at about {per_clip:.1f} s (more with an image): "
        f"~{share * per_clip / 60:.1f} min; --steps, --seconds and --limit shorten it", flush=True)
    if pipe.device.type == "cpu":
        say(f"melfusion: evaluating on the CPU, {per_clip:.1f} s per caption-only clip at {args.steps} steps; "
            f"on GPUs pass --device cuda, or {SHARDING_HINT}", flush=True)
    scores = evaluate(
        pipe, triplets, evaluators, variants, steps=args.steps, seconds=args.seconds, guidance_scale=args.guidance,
        seed=args.seed, batch_size=args.batch_size, image_features_from=args.image_features_from,
    )
    table = format_table(scores, meaningful=evaluators.meaningful, skipped=len(triplets.bad),
                         image_features_from=args.image_features_from)
    if state.is_main_process:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table, encoding="utf-8")
    say(triplets.summary())
    say(table)
    say(f"wrote {args.out.resolve()}")
    return 0
