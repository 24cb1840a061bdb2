"""`python -m model_store verify | create-tiny | create-random | pull`.

A deliberate failure (a broken bundle, an unreachable hub, a target folder that is not a bundle) prints
one line on stderr and exits 1; usage mistakes exit 2 (argparse). Torch and the models load only inside
the command that needs them: `pull` checks its target folder and asks the hub before importing torch, so
offline it fails in about a second.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from melfusion.errors import BundleError, MelFusionError

EXIT_FAILED = 1
DTYPES = ("float32", "float16", "bfloat16")


def describe(directory: Path, manifest: dict) -> str:
    """Summary lines of a bundle's manifest: source, total size, one line per component."""
    total = sum(entry["bytes"] for entry in manifest["files"].values())
    lines = [
        (
            f"{directory}: {len(manifest['components'])} components, {len(manifest['files'])} files, "
            f"{total:,} bytes ({total / 2**30:.2f} GiB), source {manifest['source']}, created {manifest['created']}"
        )
    ]
    for source, detail in manifest.get("origin", {}).items():
        if isinstance(detail, dict):  # a student: its teacher and the distillation settings
            lines.append(f"  {source}: " + ", ".join(f"{key} {value}" for key, value in detail.items()))
        else:
            lines.append(f"  from {source} @ {detail}")
    for name, component in manifest["components"].items():
        size = sum(manifest["files"][f]["bytes"] for f in component["files"])
        dtype = component["dtype"] or "-"
        lines.append(f"  {name:<20} {component['class']:<24} {dtype:<9} {size:>15,} bytes")
    return "\n".join(lines)


def check_target(directory: Path) -> None:
    """Writers replace DIR wholesale: allow only a new or empty folder or an existing bundle."""
    from melfusion.manifest import MANIFEST

    if directory.exists() and not directory.is_dir():
        raise BundleError(f"{directory} is a file, not a bundle folder")
    if directory.is_dir() and any(directory.iterdir()) and not (directory / MANIFEST).is_file():
        raise BundleError(f"{directory} is a non-empty folder that is not a bundle; refusing to replace it")


def run_verify(args: argparse.Namespace) -> int:
    from melfusion.bundle import verify_bundle

    manifest = verify_bundle(args.directory, hashes=not args.skip_hashes)
    checked = "sizes only" if args.skip_hashes else "sha256 of every file"
    print(f"OK ({checked})\n{describe(args.directory, manifest)}")
    return 0


def run_create_tiny(args: argparse.Namespace) -> int:
    from melfusion.bundle import create_tiny_bundle

    return _report_written(args.directory, lambda: create_tiny_bundle(args.directory, seed=args.seed))


def run_create_random(args: argparse.Namespace) -> int:
    import torch

    from .random_bundles import create_random_bundle

    dtype = getattr(torch, args.dtype)
    return _report_written(
        args.directory, lambda: create_random_bundle(args.directory, size=args.size, dtype=dtype, seed=args.seed)
    )


def run_pull(args: argparse.Namespace) -> int:
    from .hub import PullSources, plan_pull, pull_bundle

    if args.directory is not None:
        check_target(args.directory)
    sources = PullSources(image=args.image_repo, tango=args.tango, audio=args.audio_repo)
    plan = plan_pull(sources, deadline_s=args.hub_deadline)  # every repository and file asked about, no torch yet
    print(plan.describe(), flush=True)
    if args.plan_only:
        return 0
    import torch

    dtype = getattr(torch, args.dtype)
    return _report_written(args.directory, lambda: pull_bundle(args.directory, plan=plan, dtype=dtype))


def _report_written(directory: Path, write) -> int:
    from melfusion.bundle import read_manifest

    check_target(directory)
    started = time.perf_counter()
    path = write()
    print(f"wrote in {time.perf_counter() - started:.1f} s\n{describe(path, read_manifest(path))}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .hub import AUDIOLDM_REPO, HUB_DEADLINE_S, SD_REPO, TANGO_REPO

    parser = argparse.ArgumentParser(prog="python -m model_store", description="MelFusion model bundles")
    commands = parser.add_subparsers(dest="command", required=True)

    verify = commands.add_parser("verify", help="check a bundle: files, sha256, cross-component configs")
    verify.add_argument("directory", type=Path, help="the bundle folder")
    verify.add_argument("--skip-hashes", action="store_true", help="check file sizes only (fast for 9 GB bundles)")
    verify.set_defaults(run=run_verify)

    tiny = commands.add_parser("create-tiny", help="tiny random bundle for tests and the quick start (seconds)")
    tiny.add_argument("directory", type=Path, help="folder to write (replaced whole if it holds a bundle)")
    tiny.add_argument("--seed", type=int, default=0, help="seed of the random weights; default %(default)s")
    tiny.set_defaults(run=run_create_tiny)

    create_random = commands.add_parser("create-random", help="random bundle at the small or the real (full) size")
    create_random.add_argument("directory", type=Path, help="folder to write (replaced whole if it holds a bundle)")
    create_random.add_argument("--size", choices=("small", "full"), required=True,
                               help="small: ~120 M parameters, for per-step benchmarks; full: SD 1.5 + TANGO shapes")
    create_random.add_argument("--dtype", choices=DTYPES, default="float32",
                               help="stored dtype (float16 halves a full bundle for GPU machines); default %(default)s")
    create_random.add_argument("--seed", type=int, default=0, help="seed of the random weights; default %(default)s")
    create_random.set_defaults(run=run_create_random)

    pull = commands.add_parser("pull", help="assemble the real models from the Hugging Face hub (needs network)")
    pull.add_argument("directory", type=Path, nargs="?",
                      help="where to write the bundle (replaced whole if it holds one; not needed with --plan-only)")  # fmt: skip
    pull.add_argument("--plan-only", action="store_true",
                      help="print the repositories, commits, files and sizes; fetch nothing")  # fmt: skip
    pull.add_argument("--hub-deadline", type=float, default=HUB_DEADLINE_S, metavar="SECONDS",
                      help="for all questions to the hub before downloading (default %(default)g)")  # fmt: skip
    pull.add_argument("--tango", default=TANGO_REPO, help="TANGO checkpoint (music UNet, T5 encoder): repo or folder")
    pull.add_argument("--image-repo", default=SD_REPO, help="Stable Diffusion 1.5 (image side): repo or folder")
    pull.add_argument("--audio-repo", default=AUDIOLDM_REPO, help="AudioLDM (mel VAE, vocoder): repo or folder")
    pull.add_argument("--dtype", choices=DTYPES, default="float32",
                      help="stored dtype; float16 halves the bundle for GPU machines; default %(default)s")
    pull.set_defaults(run=run_pull)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "pull" and args.directory is None and not args.plan_only:
        parser.error("pull: give the bundle folder DIR (or --plan-only)")
    try:
        return args.run(args)
    except (MelFusionError, OSError) as exc:  # OSError: disk full, permissions; its message names the path
        print(f"model_store {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(f"model_store {args.command}: interrupted; nothing written", file=sys.stderr)
        return 130
