"""`melfusion` console script: `melfusion generate [--image IMG] [--caption TEXT] --out OUT.wav`; train, eval,
distill.

Cheap checks (image, caption, ranges from the bundle's config, device and dtype) run before torch or any
model is imported, so a bad request fails in well under a second; the clip (WAV, FLAC, Ogg, Opus or MP3:
--format, else --out's extension) is written atomically, so a failure leaves no file. Torch gets the fair
share of the cores this process may use (`--threads`).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

from .cpus import let_idle_threads_sleep, set_torch_threads
from .errors import BundleError, GenerationCancelled, InputError, MelFusionError
from .evaluation.cli import add_eval_parser
from .formats import AUDIO_FORMATS, format_of_extension
from .images import load_image
from .limits import DTYPES, check_device, read_limits
from .manifest import default_tiny_bundle_dir
from .quiet import silence_library_noise
from .request import GenerationRequest
from .training.cli import add_train_parser
from .training.distill_cli import add_distill_parser

EXIT_INPUT, EXIT_BUNDLE, EXIT_FAILED, EXIT_INTERRUPTED = 2, 3, 1, 130


def add_generate_parser(commands) -> None:
    parser = commands.add_parser("generate", help="image and/or caption -> WAV (or FLAC, Ogg, Opus, MP3)")
    parser.add_argument("--image", help="JPEG, PNG or WebP file; without it the clip follows the caption only")
    parser.add_argument("--out", required=True, type=Path, help="file to write, .wav .flac .ogg .opus or .mp3 (output i > 1: NAME-i.EXT)")
    parser.add_argument("--bundle", type=Path, help="model bundle folder (default: the embedded tiny bundle)")
    add_request_flags(parser)
    parser.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:N, mps or xpu; default cpu")
    parser.add_argument("--dtype", choices=DTYPES, default="float32",
                        help="weights and activations; half precision needs a GPU; default float32")
    parser.add_argument("--threads", type=int, help="CPU threads for torch; default OMP_NUM_THREADS if set, else "
                        "the cores this process may use (CPU affinity and cgroup quota)")
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
    # 1. Validate everything that needs no torch and no model weights
    check_device(args.device, args.dtype)
    if args.threads is not None and args.threads < 1:
        raise InputError("threads", f"must be at least 1, got {args.threads}")
    given = {name: getattr(args, name) for name in GenerationRequest.field_names() if hasattr(args, name)}
    by_extension = format_of_extension(args.out.suffix)
    if by_extension is None:
        extensions = ", ".join(f".{f.extension}" for f in AUDIO_FORMATS.values())
        raise InputError("out", f"must end in one of {extensions}, got {args.out.name}")
    given.setdefault("format", by_extension.name)
    if given["format"] != by_extension.name:
        written_to = AUDIO_FORMATS[given["format"]].extension
        raise InputError("out", f"format {given['format']} is written to .{written_to} files, got {args.out.name}")
    image = load_image(args.image) if args.image else None
    bundle = args.bundle or default_tiny_bundle_dir()
    request = GenerationRequest(**given)
    request.check_condition(has_image=image is not None)
    with contextlib.suppress(BundleError):  # not there yet (the tiny bundle is built below) or broken (verified below)
        request = request.resolved(read_limits(bundle))

    # 2. Load and generate
    silence_library_noise()
    import torch

    from .files import write_atomically
    from .bundle import ensure_tiny_bundle, load_pipeline, verify_bundle
    from .mastering import deliver

    require_device(torch, args.device)
    if args.bundle is None:
        bundle = ensure_tiny_bundle(bundle)
    verify_bundle(bundle, hashes=False)
    request = request.resolved(read_limits(bundle))  # resolving twice keeps the seed drawn the first time
    set_torch_threads(args.threads)
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
        print(f"wrote {path.resolve()} ({request.format}, {seconds:g} s at {output.sampling_rate} Hz, "
              f"{request.steps} {request.scheduler} steps, seed {seed})")
    print(f"load {loaded - started:.1f} s, generate {generated - loaded:.1f} s")
    return 0


def require_device(torch, device: str) -> None:
    """InputError unless this torch build can use `device` (a CPU build has no CUDA; cuda:3 needs 4 GPUs)."""
    kind, _, index = device.partition(":")
    if kind == "cpu":
        return
    backend = {"cuda": torch.cuda, "xpu": getattr(torch, "xpu", None), "mps": torch.backends.mps}[kind]
    if backend is None or not backend.is_available():
        raise InputError("device", f"{kind} is not available to this torch build ({torch.__version__}) on this machine")
    if index and kind != "mps" and int(index) >= backend.device_count():
        raise InputError("device", f"{device}: only {backend.device_count()} {kind} device(s) here")


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
    let_idle_threads_sleep()
    if args.run is not run_generate:
        silence_library_noise()  # generate quiets them once its request passed the checks: no import before
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
