"""`melfusion` console script: `melfusion generate [--image IMG] --caption TEXT --out OUT.wav`.

Cheap checks (image, caption, ranges from the bundle's config) run before any model is loaded, so a bad
request fails in well under a second; the clip (WAV, FLAC, Ogg, Opus or MP3, by --format or the file's
extension) is written atomically, so a failure leaves no file.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .errors import BundleError, GenerationCancelled, InputError, MelFusionError
from .evaluation.cli import add_eval_parser
from .audio import AUDIO_FORMATS, format_of_extension
from .images import load_image
from .limits import IMAGE_GUIDANCE_MODES, SAMPLING_PRESETS, SCHEDULERS, read_limits
from .quiet import silence_library_noise
from .request import DEFAULT_LOUDNESS_LUFS, GenerationRequest, parse_loudness
from .training.cli import add_train_parser

EXIT_INPUT, EXIT_BUNDLE, EXIT_FAILED, EXIT_INTERRUPTED = 2, 3, 1, 130


def add_generate_parser(commands) -> None:
    parser = commands.add_parser("generate", help="image + caption -> WAV (or caption only, without --image)")
    parser.add_argument("--image", help="JPEG, PNG or WebP file; without it the clip follows the caption only")
    parser.add_argument("--caption", required=True, help="a short description of the music")
    parser.add_argument("--out", required=True, type=Path,
                        help=f"file to write; its extension ({', '.join(f.extension for f in AUDIO_FORMATS.values())}) "
                        "gives the format unless --format does")
    parser.add_argument("--format", choices=tuple(AUDIO_FORMATS), help=_help("format", "default: --out's extension"))
    parser.add_argument("--loudness-lufs", type=str, help=_help("loudness_lufs"))
    parser.add_argument("--loop", action="store_true", default=None, help=_help("loop"))
    parser.add_argument("--bundle", type=Path, help="model bundle folder (default: the embedded tiny bundle)")
    parser.add_argument("--seconds", type=float, help=_help("seconds", "bundle default if omitted"))
    parser.add_argument("--steps", type=int, help=_help("steps", "bundle default if omitted"))
    parser.add_argument("--guidance", dest="guidance_scale", type=float, help=_help("guidance_scale", "paper: 7"))
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
    fields["loudness_lufs"] = DEFAULT_LOUDNESS_LUFS if args.loudness_lufs is None else parse_loudness(args.loudness_lufs)
    by_extension = format_of_extension(args.out.suffix)
    if by_extension is None:
        extensions = ", ".join(f".{f.extension}" for f in AUDIO_FORMATS.values())
        raise InputError("out", f"must end in one of {extensions}, got {args.out.name}")
    if args.format and args.format != by_extension.name:
        raise InputError("out", f"--format {args.format} writes .{AUDIO_FORMATS[args.format].extension} files, got {args.out.name}")
    fields["format"] = by_extension.name
    request = GenerationRequest(**fields).resolved(read_limits(bundle))

    # 2. Load and generate
    import torch

    from .audio import write_atomically
    from .bundle import load_pipeline
    from .mastering import deliver

    started = time.perf_counter()
    pipe = load_pipeline(bundle, device=args.device, dtype=getattr(torch, args.dtype))
    loaded = time.perf_counter()
    output = pipe.generate([request], [image])
    _, encoded = deliver(output.clip(0), output.sampling_rate, request)
    path = write_atomically(args.out, encoded)
    seconds = output.lengths[0] / output.sampling_rate
    print(
        f"wrote {path.resolve()} ({request.format}, {seconds:g} s at {output.sampling_rate} Hz, seed {output.seeds[0]}; "
        f"load {loaded - started:.1f} s, generate {time.perf_counter() - loaded:.1f} s)"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="melfusion", description="MelFusion: image + caption -> music")
    commands = parser.add_subparsers(dest="command", required=True)
    add_generate_parser(commands)
    add_train_parser(commands)
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
