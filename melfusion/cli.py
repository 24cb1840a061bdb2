"""`melfusion` console script: `melfusion generate [--image IMG] --caption TEXT --out OUT.wav`; train, distill, eval.

Cheap checks (image, caption, ranges from the bundle's config) run before any model is loaded, so a bad
request fails in well under a second; the WAV is written atomically, so a failure leaves no file.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .errors import BundleError, GenerationCancelled, InputError, MelFusionError
from .evaluation.cli import add_eval_parser
from .images import load_image
from .limits import IMAGE_GUIDANCE_MODES, SAMPLING_PRESETS, SCHEDULERS, read_limits
from .quiet import silence_library_noise
from .request import GenerationRequest
from .training.cli import add_train_parser
from .training.distill_cli import add_distill_parser

EXIT_INPUT, EXIT_BUNDLE, EXIT_FAILED, EXIT_INTERRUPTED = 2, 3, 1, 130


def add_generate_parser(commands) -> None:
    parser = commands.add_parser("generate", help="image + caption -> WAV (or caption only, without --image)")
    parser.add_argument("--image", help="JPEG, PNG or WebP file; without it the clip follows the caption only")
    parser.add_argument("--caption", required=True, help="a short description of the music")
    parser.add_argument("--out", required=True, type=Path, help="WAV file to write")
    parser.add_argument("--bundle", type=Path, help="model bundle folder (default: the embedded tiny bundle)")
    parser.add_argument("--seconds", type=float, help=_help("seconds", "bundle default if omitted"))
    parser.add_argument("--steps", type=int, help=_help("steps", "bundle default if omitted"))
    parser.add_argument("--guidance", dest="guidance_scale", type=float, help=_help("guidance_scale", "paper: 7"))
    parser.add_argument("--guidance-start", type=float, help=_help("guidance_start"))
    parser.add_argument("--guidance-end", type=float, help=_help("guidance_end"))
    parser.add_argument("--seed", type=int, help=_help("seed", "printed so the clip can be reproduced"))
    parser.add_argument("--scheduler", choices=SCHEDULERS, help=_help("scheduler"))
    parser.add_argument("--preset", choices=sorted(SAMPLING_PRESETS), help=_help("preset", "default none"))
    parser.add_argument("--image-strength", type=float, help=_help("image_strength"))
    parser.add_argument("--image-guidance", choices=IMAGE_GUIDANCE_MODES, help=_help("image_guidance"))
    parser.add_argument("--image-steps", type=int, help=_help("image_steps"))
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cuda or cuda:1; default cpu")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                        help="weights and activations; half precision needs a GPU; default float32")
    parser.set_defaults(run=run_generate)


def _help(name: str, note: str = "") -> str:
    return GenerationRequest.describe(name) + (f"; {note}" if note else "")


def run_generate(args: argparse.Namespace) -> int:
    from .bundle import ensure_tiny_bundle, verify_bundle

    # 1. Validate everything that needs no model weights
    image = load_image(args.image) if args.image else None
    bundle = args.bundle or ensure_tiny_bundle()
    verify_bundle(bundle, hashes=False)
    fields = {name: getattr(args, name) for name in GenerationRequest.field_names()}
    request = GenerationRequest(**fields).resolved(read_limits(bundle))
    if args.out.suffix.lower() != ".wav":
        raise InputError("out", f"must end in .wav, got {args.out.name}")

    # 2. Load and generate
    import torch

    from .audio import write_wav
    from .bundle import load_pipeline

    started = time.perf_counter()
    pipe = load_pipeline(bundle, device=args.device, dtype=getattr(torch, args.dtype))
    loaded = time.perf_counter()
    output = pipe.generate([request], [image])
    path = write_wav(args.out, output.audios[0], output.sampling_rate)
    print(
        f"wrote {path.resolve()} ({request.seconds:g} s at {output.sampling_rate} Hz, "
        f"{request.steps} {request.scheduler} steps, seed {output.seeds[0]}; "
        f"load {loaded - started:.1f} s, generate {time.perf_counter() - loaded:.1f} s)"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="melfusion", description="MelFusion: image + caption -> music")
    commands = parser.add_subparsers(dest="command", required=True)
    add_generate_parser(commands)
    add_train_parser(commands)
    add_distill_parser(commands)
    add_eval_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    silence_library_noise()
    try:
        return args.run(args)
    except InputError as exc:
        print(f"melfusion: error: {exc}", file=sys.stderr)
        return EXIT_INPUT
    except BundleError as exc:
        print(f"melfusion: bundle error: {exc}", file=sys.stderr)
        return EXIT_BUNDLE
    except (KeyboardInterrupt, GenerationCancelled):
        print("melfusion: interrupted; no file written", file=sys.stderr)
        return EXIT_INTERRUPTED
    except MelFusionError as exc:
        print(f"melfusion: generation failed: {exc}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
