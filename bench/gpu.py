"""GPU speed and memory of the fused loop: eager vs compiled, plain / cached / new image, batch throughput.

On a CUDA machine: `python -m bench.gpu` builds the full-size pipeline (SD 1.5 + TANGO shapes, random
weights) in memory in float16 — no 10 GB bundle is written — and prints one table, in a few minutes.
`--size tiny --device cpu` runs the same code in seconds (for checking the script, not for numbers).
Times are medians of `--repeats` warm calls, CUDA-synchronised.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from melfusion.pipeline import MelFusionPipeline
from melfusion.presets import build_components

SAMPLE_IMAGE = Path(__file__).parents[1] / "docs" / "sample.png"
CAPTION = "calm piano at sunset"
TARGETS = {"caption only": 0.45, "features computed": 0.5, "new image": 1.0}  # issue 8, seconds at full size


class Bench:
    def __init__(self, device: str, repeats: int):
        self.device, self.repeats = torch.device(device), repeats
        self.rows: list[tuple[str, str, str]] = []

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def time(self, run: Callable[[], object], repeats: int | None = None) -> float:
        """Median seconds of warm calls (the first call is a warm-up and not counted)."""
        run()
        times = []
        for _ in range(repeats or self.repeats):
            self.sync()
            started = time.perf_counter()
            run()
            self.sync()
            times.append(time.perf_counter() - started)
        return statistics.median(times)

    def once(self, run: Callable[[], object]) -> float:
        self.sync()
        started = time.perf_counter()
        run()
        self.sync()
        return time.perf_counter() - started

    def row(self, what: str, value: str, note: str = "") -> None:
        self.rows.append((what, value, note))
        print(f"{what:<62} {value:>14}  {note}", flush=True)

    def peak_gib(self) -> float:
        return torch.cuda.max_memory_allocated() / 2**30 if self.device.type == "cuda" else float("nan")

    def reset_peak(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()

    def markdown(self) -> str:
        lines = ["| case | value | note |", "|---|---|---|"]
        return "\n".join(lines + [f"| {what} | {value} | {note} |" for what, value, note in self.rows])


def build(size: str, device: str, dtype: torch.dtype) -> MelFusionPipeline:
    with torch.device(device):
        pipe = MelFusionPipeline(**build_components(size, seed=0))
    pipe = pipe.to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def measure(bench: Bench, pipe: MelFusionPipeline, label: str, args: argparse.Namespace, image: Image.Image) -> dict:
    """Plain, cached and new image at batch 1; batch 4 and 8 throughput; peak memory."""
    request = dict(seconds=args.seconds, num_inference_steps=args.steps, scheduler="dpmpp", guidance_scale=7.0, seed=0)
    features = pipe.encode_image(image, args.steps)
    coarse = max(1, args.steps // 5)
    results = {
        "caption only": bench.time(lambda: pipe(CAPTION, **request)),
        "features computed": bench.time(lambda: pipe(CAPTION, image_features=features, **request)),
        "new image": bench.time(lambda: pipe(CAPTION, image, **request)),
        f"new image, {coarse} image passes": bench.time(lambda: pipe(CAPTION, image, image_steps=coarse, **request)),
    }
    for case, seconds in results.items():
        target = TARGETS.get(case)
        note = f"target ≤ {target} s" if target and args.size == "full" else ""
        bench.row(f"{label}: {case}, batch 1", f"{seconds:.3f} s", note)
    bench.row(f"{label}: new image ÷ caption only", f"{results['new image'] / results['caption only']:.2f}", "target ≤ 1.5")
    bench.row(
        f"{label}: features computed ÷ caption only",
        f"{results['features computed'] / results['caption only']:.2f}",
        "target ≤ 1.05",
    )
    for batch in args.batches:
        captions = [f"{CAPTION} {i}" for i in range(batch)]
        bench.reset_peak()
        seconds = bench.time(lambda: pipe(captions, image_features=features, **{**request, "seed": list(range(batch))}))
        bench.row(
            f"{label}: batch {batch}, features computed",
            f"{seconds:.3f} s",
            f"{batch / seconds:.2f} clips/s; peak {bench.peak_gib():.1f} GiB",
        )
    return results


def check_outputs(bench: Bench, pipe: MelFusionPipeline, args: argparse.Namespace, image: Image.Image) -> None:
    """Same seed -> same clip; α = 0 -> exactly caption only; batch row vs alone; no NaN."""
    request = dict(seconds=args.seconds, num_inference_steps=args.steps, scheduler="dpmpp", seed=3)
    first, again = pipe(CAPTION, image, **request).audios, pipe(CAPTION, image, **request).audios
    zero, plain = pipe(CAPTION, image, image_strength=0.0, **request).audios, pipe(CAPTION, **request).audios
    batch = pipe([CAPTION, "rainy jazz"], [image, None], **{**request, "seed": [3, 4]}).audios
    bench.row("same seed twice: max |difference|", f"{np.abs(first - again).max():.2e}")
    bench.row("image_strength 0 vs caption only: max |difference|", f"{np.abs(zero - plain).max():.2e}")
    bench.row("batch row vs alone: max |difference|", f"{np.abs(batch[0] - first[0]).max():.2e}", str(pipe.music_unet.dtype))
    bench.row("all finite, RMS of a clip", f"{bool(np.isfinite(first).all())}, {float(np.sqrt((first**2).mean())):.3f}")


def through_service(bench: Bench, pipe: MelFusionPipeline, args: argparse.Namespace) -> None:
    """The same pipeline through the real service (API, Redis, one eager worker, local storage): clips per
    second for concurrent jobs with batching off and on. The bundle is written once (in the bench's dtype)
    to a temporary folder, which the worker loads as in production."""
    import tempfile

    from bench.generation import service_batching
    from melfusion.bundle import save_bundle

    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        bundle = save_bundle(pipe, Path(folder) / "bundle", source=f"bench.gpu --size {args.size}")
        bench.row("write the bundle for the worker", f"{time.perf_counter() - started:.1f} s")
        device = "cuda" if bench.device.type == "cuda" else "cpu"
        rates = service_batching(
            args.service_jobs, 1, args.seconds, args.steps, bundle=bundle, device=device, dtype=args.dtype
        )
    for label, rate in rates.items():
        bench.row(f"service: {args.service_jobs} concurrent jobs, {label}", f"{rate:.2f} clips/s", "target ≥ 4")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("tiny", "small", "full"), default="full",
                        help="component sizes (full: SD 1.5 + TANGO shapes); default %(default)s")
    parser.add_argument("--device", default="cuda", help="torch device; default %(default)s")
    parser.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default="float16",
                        help="weights and activations; default %(default)s")
    parser.add_argument("--seconds", type=float, default=10.0, help="clip length; default %(default)s")
    parser.add_argument("--steps", type=int, default=50, help="DPM-Solver++ steps per clip; default %(default)s")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per case (median); default %(default)s")
    parser.add_argument("--batches", type=int, nargs="*", default=[4, 8],
                        help="batch sizes of the throughput rows; default %(default)s")
    parser.add_argument("--compile", default="reduce-overhead", help="music UNet's torch.compile mode ('off' skips)")
    parser.add_argument("--compiled-batches", type=int, nargs="*", default=[4], help="batch sizes measured compiled")
    parser.add_argument("--image-backend", default="cudagraphs", help="torch.compile backend of the image UNet")
    parser.add_argument("--parts", nargs="*", choices=("eager", "service", "compiled"),
                        default=["eager", "service", "compiled"], help="which parts to run; default all")
    parser.add_argument("--service-jobs", type=int, default=16, help="concurrent jobs through the service (0 skips)")
    parser.add_argument("--markdown", type=Path, help="also write the table here")
    args = parser.parse_args()
    bench = Bench(args.device, args.repeats)
    name = torch.cuda.get_device_name() if bench.device.type == "cuda" else "CPU"
    print(f"torch {torch.__version__} on {name}; {args.size} size, {args.dtype}, {args.seconds:g} s clip, "
          f"{args.steps} DPM-Solver++ steps, CFG 7", flush=True)  # fmt: skip
    image = Image.open(SAMPLE_IMAGE).convert("RGB")
    started = time.perf_counter()
    pipe = build(args.size, args.device, getattr(torch, args.dtype))
    bench.row("build in memory", f"{time.perf_counter() - started:.1f} s")

    if "eager" in args.parts:
        measure(bench, pipe, "eager", args, image)
        check_outputs(bench, pipe, args, image)
    if "service" in args.parts and args.service_jobs:
        through_service(bench, pipe, args)
    if "compiled" not in args.parts or args.compile == "off":
        print(bench.markdown())
        return
    mode = None if args.compile == "default" else args.compile
    pipe.compile_unets(mode)  # the pipeline's settings (static shapes, cache size) for both UNets
    pipe.image_unet.compile(backend=args.image_backend)  # then the image UNet's own backend
    request = dict(seconds=args.seconds, num_inference_steps=args.steps, scheduler="dpmpp", seed=0)
    warm_up = bench.once(lambda: pipe(CAPTION, image, **request))
    bench.row(f"compile + warm-up (music {args.compile}, image {args.image_backend}), batch 1", f"{warm_up:.1f} s")
    for batch in args.compiled_batches:
        captions = [CAPTION] * batch
        warm_up = bench.once(lambda: pipe(captions, image, **{**request, "seed": list(range(batch))}))
        bench.row(f"compile + warm-up, batch {batch}", f"{warm_up:.1f} s")
    measure(bench, pipe, "compiled", argparse.Namespace(**{**vars(args), "batches": args.compiled_batches}), image)
    check_outputs(bench, pipe, args, image)
    print("\n" + bench.markdown())
    if args.markdown:
        args.markdown.write_text(bench.markdown() + "\n")


if __name__ == "__main__":
    main()
