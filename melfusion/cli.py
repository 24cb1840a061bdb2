"""`melfusion` console script: `melfusion generate [--image IMG] [--caption TEXT] --out OUT.wav`.

Cheap checks (image, caption, ranges from the bundle's config) run before any model is loaded, so a bad
request fails in well under a second; the clip (WAV, FLAC, Ogg, Opus or MP3: --format, else --out's
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
from .limits import read_limits
from .quiet import silence_library_noise
from .request import GenerationRequest
from .training.cli import add_train_parser

EXIT_INPUT, EXIT_BUNDLE, EXIT_FAILED, EXIT_INTERRUPTED = 2, 3, 1, 130


def add_generate_parser(commands) -> None:
    parser = commands.add_parser("generate", help="image and/or caption -> WAV (or FLAC, Ogg, Opus, MP3)")
    parser.add_argument("--image", help="JPEG, PNG or WebP file; without it the clip follows the caption only")
    parser.add_argument("--out", required=True, type=Path, help="file to write, .wav .flac .ogg .opus or .mp3 (output i > 1: NAME-i.EXT)")
    parser.add_argument("--bundle", type=Path, help="model bundle folder (default: the embedded tiny bundle)")
    add_request_flags(parser)
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cuda or cuda:1; default cpu")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                        help="weights and activations; half precision needs a GPU; default float32")
    parser.set_defaults(run=run_generate)


def add_request_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per GenerationRequest field (`--image-strength` for image_strength), its help and choices
    from the declaration; ranges that depend on the bundle are checked once it is known. A flag not given
    is absent from the namespace (so `--loudness-lufs off`, null, differs from leaving the default)."""
    for described in GenerationRequest.interface():
        switch = {"nargs": "?", "const": True} if described.kind is bool else {}  # `--loop` = `--loop true`
        parser.add_argument(
            f"--{described.name.replace('_', '-')}", dest=described.name, type=described.from_text,
            choices=described.choices, help=described.help, default=argparse.SUPPRESS, **switch,
        )  # fmt: skip


def run_generate(args: argparse.Namespace) -> int:
    from .bundle import ensure_tiny_bundle, verify_bundle

    # 1. Validate everything that needs no model weights
    image = load_image(args.image) if args.image else None
    bundle = args.bundle or ensure_tiny_bundle()
    verify_bundle(bundle, hashes=False)
    given = {name: getattr(args, name) for name in GenerationRequest.field_names() if hasattr(args, name)}
    by_extension = format_of_extension(args.out.suffix)
    if by_extension is None:
        extensions = ", ".join(f".{f.extension}" for f in AUDIO_FORMATS.values())
        raise InputError("out", f"must end in one of {extensions}, got {args.out.name}")
    given.setdefault("format", by_extension.name)
    if given["format"] != by_extension.name:
        raise InputError("out", f"format {given['format']} is written to .{AUDIO_FORMATS[given['format']].extension} files, got {args.out.name}")
    request = GenerationRequest(**given).resolved(read_limits(bundle))
    request.check_condition(has_image=image is not None)

    # 2. Load and generate
    import torch

    from .audio import write_atomically
    from .bundle import load_pipeline
    from .mastering import deliver

    started = time.perf_counter()
    pipe = load_pipeline(bundle, device=args.device, dtype=getattr(torch, args.dtype))
    loaded = time.perf_counter()
    output = pipe.generate([request], [image])
    generated = time.perf_counter()
    for index, seed in enumerate(output.seeds, start=1):
        out = args.out if index == 1 else args.out.with_name(f"{args.out.stem}-{index}{args.out.suffix}")
        audio, encoded = deliver(output.clip(index - 1), output.sampling_rate, request)
        path = write_atomically(out, encoded)
        seconds = audio.size / output.sampling_rate
        print(f"wrote {path.resolve()} ({request.format}, {seconds:g} s at {output.sampling_rate} Hz, seed {seed})")
    print(f"load {loaded - started:.1f} s, generate {generated - loaded:.1f} s")
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
