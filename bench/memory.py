"""CPU peak memory of a full-size (SD 1.5 + TANGO sizes, ~2.3 B parameters) random bundle.

Phases, each in a fresh child process that reports its own peak RSS (`getrusage(RUSAGE_SELF).ru_maxrss`),
so no phase inherits another's peak: `build` (random init + cast + save with manifest, what
`python -m model_store create-random --size full` does) and `generate` (verify hashes + load, then one short
generation: 1 step, 1 s clip, with an image, CFG). Run from the repository root: `python -m bench.memory`.
Needs ~10 GB of disk in float32 and several minutes on 2 cores; a bundle built in a temporary folder
is deleted afterwards, one built in --dir is kept.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GIB = 2**30


def peak_rss() -> int:
    """This process's peak resident set size in bytes (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def build(directory: Path, size: str, dtype_name: str) -> dict:
    import torch

    from melfusion.bundle import read_manifest
    from model_store.random_bundles import create_random_bundle

    started = time.perf_counter()
    create_random_bundle(directory, size=size, dtype=getattr(torch, dtype_name))
    manifest = read_manifest(directory)
    return {
        "seconds": time.perf_counter() - started,
        "peak_rss": peak_rss(),
        "bundle_bytes": sum(entry["bytes"] for entry in manifest["files"].values()),
        "parameters": _parameters(directory),
    }


def _parameters(directory: Path) -> int:
    """Parameters stored in the bundle, read from the safetensors headers."""
    from safetensors import safe_open

    total = 0
    for path in directory.rglob("*.safetensors"):
        with safe_open(path, framework="pt") as weights:
            total += sum(math.prod(weights.get_slice(name).get_shape()) for name in weights.keys())
    return total


def generate(directory: Path) -> dict:
    import torch
    from PIL import Image

    from melfusion.bundle import load_pipeline

    started = time.perf_counter()
    pipe = load_pipeline(directory, dtype=torch.float32)  # verifies every sha256 first, as the service does
    loaded, rss_loaded = time.perf_counter(), peak_rss()
    image = Image.open(Path(__file__).parents[1] / "docs" / "sample.png").convert("RGB")
    pipe("calm piano at sunset", image, seconds=1.0, num_inference_steps=1, seed=0)
    return {
        "load_seconds": loaded - started,
        "load_peak_rss": rss_loaded,
        "generate_seconds": time.perf_counter() - loaded,
        "peak_rss": peak_rss(),
    }


def run_phase(phase: str, args: argparse.Namespace, directory: Path) -> dict:
    """Run one phase in a child process and return the JSON line it prints last."""
    options = ["--phase", phase, "--dir", str(directory), "--dtype", args.dtype, "--size", args.size]
    command = [sys.executable, "-m", "bench.memory", *options]
    result = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).parents[1], check=False)
    if result.returncode != 0:
        sys.exit(f"phase {phase} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, help="build the bundle here and keep it (default: a temporary folder)")
    parser.add_argument("--dtype", choices=("float32", "float16"), default="float32", help="stored dtype")
    parser.add_argument("--size", choices=("small", "full"), default="full", help="small: a quick dry run")
    parser.add_argument("--phase", choices=("build", "generate"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        print(json.dumps(build(args.dir, args.size, args.dtype) if args.phase == "build" else generate(args.dir)))
        return

    temporary = None if args.dir else Path(tempfile.mkdtemp(prefix="melfusion-full-"))
    directory = args.dir or temporary / args.size
    try:
        built = run_phase("build", args, directory)
        print(
            f"{args.size} size, build + save ({args.dtype}): {built['seconds']:.0f} s, "
            f"peak RSS {built['peak_rss'] / GIB:.2f} GiB, {built['parameters'] / 1e9:.3f} B parameters, "
            f"bundle {built['bundle_bytes']:,} bytes ({built['bundle_bytes'] / GIB:.2f} GiB)"
        )
        ran = run_phase("generate", args, directory)
        print(
            f"verify + load (float32): {ran['load_seconds']:.0f} s, peak RSS {ran['load_peak_rss'] / GIB:.2f} GiB "
            "(safetensors are memory-mapped: weights page in on first use)"
        )
        print(
            f"one generation (1 step, 1 s, image + CFG): {ran['generate_seconds']:.0f} s, "
            f"peak RSS of the whole process {ran['peak_rss'] / GIB:.2f} GiB"
        )
    finally:
        if temporary:
            shutil.rmtree(temporary, ignore_errors=True)


if __name__ == "__main__":
    main()
