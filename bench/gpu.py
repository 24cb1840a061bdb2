"""GPU speed of the engine and of the service under real traffic: eager vs compiled, batched vs sequential.

On a CUDA machine, two commands of under 10 minutes each (the second reuses the inductor cache on disk
that the first fills):

    python -m bench.gpu --parts engine compiled --markdown outputs/gpu-engine.md
    python -m bench.gpu --parts service --markdown outputs/gpu-service.md

Both build the full-size pipeline (SD 1.5 + TANGO shapes, random weights, float16) in memory; the service
part writes it once as a bundle for its workers. Parts:

- engine: eager, batch 1 (caption only, cached photo, new photo at the full and at a coarse image grid),
  8 new photos inverted in one SD pass vs one at a time, batch 4 and 8, output checks, host syncs per step;
- compiled: `torch.compile` (`--compile`, CUDA graphs with reduce-overhead) on the shapes of
  `--compiled-batches`, warmed as a worker warms them (compile + warm-up seconds), the same cases, output
  checks against eager, and no graph compiled after warm-up;
- service: `--service-jobs` concurrent 10 s jobs of mixed traffic (50% new photos, 30% repeated photos,
  20% strength 0) through the real service (API, Redis, one worker): eager one job at a time, eager
  batched and compiled batched; clips/s, p50/p99 job latency, compile misses after warm-up.

Device time is short: run the first command first. If only one command fits, `--parts compiled service
--service-modes compiled` gives the two headline figures (new photo at batch 1, the compiled service).

`--size tiny --device cpu --dtype float32 --compile check` runs every code path on a CPU in minutes (for
checking the script, not for numbers); "check" traces with dynamo and runs eagerly, as MELFUSION_COMPILE_MODE=check.
Times are medians of `--repeats` warm calls, CUDA-synchronised.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import random
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from melfusion.pipeline import MelFusionPipeline
from melfusion.presets import build_components
from melfusion.shapes import ShapeBuckets

SAMPLE_IMAGE = Path(__file__).parents[1] / "docs" / "sample.png"
CAPTION = "calm piano at sunset"
WORDS = "calm happy slow upbeat piano guitar strings synth drums jazz ambient night sunset rain summer epic".split()
# Targets at full size: issue 8 (batch 1, compiled) and issue 16 (new photo, service).
TARGETS = {"caption only": 0.45, "features computed": 0.5, "new image": 0.8}
SERVICE_TARGET = 6.0  # clips/s per GPU through the service, compiled


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
        return statistics.median(self.once(run) for _ in range(repeats or self.repeats))

    def once(self, run: Callable[[], object]) -> float:
        self.sync()
        started = time.perf_counter()
        run()
        self.sync()
        return time.perf_counter() - started

    def row(self, what: str, value: str, note: str = "") -> None:
        self.rows.append((what, value, note))
        print(f"{what:<66} {value:>14}  {note}", flush=True)

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


def noise_photo(seed: int, side: int = 256) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8))


def measure(bench: Bench, pipe: MelFusionPipeline, label: str, args: argparse.Namespace, batches: list[int]) -> dict:
    """Plain, cached and new image at batch 1; new photos inverted together vs one by one; batch throughput."""
    image = Image.open(SAMPLE_IMAGE).convert("RGB")
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
    bench.row(f"{label}: features computed ÷ caption only",
              f"{results['features computed'] / results['caption only']:.2f}", "target ≤ 1.05")  # fmt: skip
    photos = [noise_photo(seed) for seed in range(max(batches))]
    if len(photos) > 1:
        pipe.encode_images(photos, args.steps)  # first call of this image batch
        together = bench.once(lambda: pipe.encode_images(photos, args.steps))
        one_by_one = bench.once(lambda: [pipe.encode_image(photo, args.steps) for photo in photos])
        bench.row(f"{label}: {len(photos)} new photos, image side in one pass", f"{together:.3f} s",
                  f"one at a time {one_by_one:.3f} s (×{one_by_one / together:.2f})")  # fmt: skip
    for batch in [size for size in batches if size > 1]:
        captions = [f"{CAPTION} {i}" for i in range(batch)]
        bench.reset_peak()
        seconds = bench.time(lambda: pipe(captions, image_features=features, **{**request, "seed": list(range(batch))}))
        bench.row(f"{label}: batch {batch}, features computed", f"{seconds:.3f} s",
                  f"{batch / seconds:.2f} clips/s; peak {bench.peak_gib():.1f} GiB")  # fmt: skip
    return results


def check_outputs(bench: Bench, pipe: MelFusionPipeline, label: str, args: argparse.Namespace, reference: dict) -> None:
    """Same seed -> same clip; strength 0 -> exactly caption only; batch row vs alone; DDPM seeded per row on
    the device; compiled vs eager (`reference` holds the eager clips); no NaN."""
    image = Image.open(SAMPLE_IMAGE).convert("RGB")
    request = dict(seconds=args.seconds, num_inference_steps=args.steps, scheduler="dpmpp", seed=3)
    first, again = pipe(CAPTION, image, **request).audios, pipe(CAPTION, image, **request).audios
    zero, plain = pipe(CAPTION, image, image_strength=0.0, **request).audios, pipe(CAPTION, **request).audios
    ddpm = {**request, "scheduler": "ddpm", "guidance_scale": 3.0}
    tango, tango_again = pipe(CAPTION, **ddpm).audios, pipe(CAPTION, **ddpm).audios
    bench.row(f"{label}: same seed twice: max |difference|", f"{np.abs(first - again).max():.2e}")
    bench.row(f"{label}: image_strength 0 vs caption only: max |difference|", f"{np.abs(zero - plain).max():.2e}")
    bench.row(f"{label}: DDPM (tango) same seed twice: max |difference|", f"{np.abs(tango - tango_again).max():.2e}")
    if pipe.shape_buckets is None or 2 in pipe.shape_buckets.batch_sizes:  # a batch of 2 is warmed
        batch = pipe([CAPTION, "rainy jazz"], [image, None], **{**request, "seed": [3, 4]}).audios
        tango_batch = pipe(["rainy jazz", CAPTION], **{**ddpm, "seed": [4, 3]}).audios
        bench.row(f"{label}: batch row vs alone: max |difference| (DPM-Solver++ / DDPM)",
                  f"{np.abs(batch[0] - first[0]).max():.1e} / {np.abs(tango_batch[1] - tango[0]).max():.1e}",
                  str(pipe.music_unet.dtype))  # fmt: skip
    bench.row(f"{label}: all finite, RMS of a clip", f"{bool(np.isfinite(first).all())}, {float(np.sqrt((first**2).mean())):.3f}")
    if reference:
        bench.row(f"{label} vs eager, same request: max |difference|", f"{np.abs(first - reference['first']).max():.2e}")
    reference.setdefault("first", first)


def host_syncs(bench: Bench, pipe: MelFusionPipeline, label: str, args: argparse.Namespace) -> None:
    """Host-device syncs per denoising step (torch.cuda's sync debug mode), with a progress callback and a
    cancel check, as a worker runs them: any sync in the loop stalls the launch queue every step."""
    if bench.device.type != "cuda":
        bench.row(f"{label}: host syncs per step (image loop / music loop)", "n/a", "needs CUDA")
        return
    marks: list[tuple[str, int]] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            pipe(CAPTION, noise_photo(123), seconds=args.seconds, num_inference_steps=args.steps, scheduler="dpmpp",
                 seed=0, callback=lambda step: marks.append((step.phase, len(caught))), should_cancel=lambda: False)  # fmt: skip
        finally:
            torch.cuda.set_sync_debug_mode("default")
    per_step = []
    for phase in ("image_inversion", "music_denoise"):
        counts = [count for seen, count in marks if seen == phase]
        per_step.append((counts[-1] - counts[0]) / max(1, len(counts) - 1))
    bench.row(f"{label}: host syncs per step (image loop / music loop)", f"{per_step[0]:.2f} / {per_step[1]:.2f}", "target 0")


def compile_pipeline(pipe: MelFusionPipeline, mode: str, image_backend: str) -> None:
    """As a worker compiles under MELFUSION_COMPILE_MODE / MELFUSION_IMAGE_COMPILE_BACKEND."""
    if mode == "check":
        pipe.compile_unets(backend="eager")
    else:
        image = None if image_backend == "same" else image_backend
        pipe.compile_unets(None if mode == "default" else mode, image_backend=image)


def compiled_part(bench: Bench, pipe: MelFusionPipeline, args: argparse.Namespace, reference: dict) -> None:
    """The engine compiled and warmed on the shapes of `--compiled-batches`, then nothing may compile."""
    from torch._dynamo.utils import counters

    buckets = ShapeBuckets(tuple(args.compiled_batches), (args.seconds,), (32,))
    compile_pipeline(pipe, args.compile, args.image_backend)
    pipe.shape_buckets = buckets
    warm_up = bench.once(lambda: pipe.warm_up(buckets))
    graphs = counters["stats"]["unique_graphs"]
    bench.row(f"compile + warm-up: {graphs} graphs (music {args.compile}, image {args.image_backend}), "
              f"batches {list(buckets.batch_sizes)}", f"{warm_up:.1f} s", "paid before /readyz, not by jobs")  # fmt: skip
    torch._dynamo.config.error_on_recompile = True  # a graph compiled from here on fails the run
    try:
        measure(bench, pipe, "compiled", args, list(buckets.batch_sizes))
        check_outputs(bench, pipe, "compiled", args, reference)
        host_syncs(bench, pipe, "compiled", args)
    finally:
        torch._dynamo.config.error_on_recompile = False
    bench.row("compiled: graphs compiled after warm-up", str(counters["stats"]["unique_graphs"] - graphs), "target 0")


def mixed_traffic(jobs: int, args: argparse.Namespace) -> list[tuple[bytes, dict]]:
    """`jobs` requests in random order: 50% new photos, 30% repeated photos (three photos over and over),
    20% strength 0; captions of 3-12 words, CFG 7, DPM-Solver++, a seed each."""
    rng = random.Random(16)
    kinds = ["new"] * round(jobs * 0.5) + ["repeated"] * round(jobs * 0.3)
    kinds += ["strength 0"] * (jobs - len(kinds))
    rng.shuffle(kinds)
    repeated = [_png(noise_photo(1000 + k)) for k in range(3)]
    requests = []
    for i, kind in enumerate(kinds):
        fields = {"caption": " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))), "seed": i,
                  "seconds": args.seconds, "steps": args.steps, "scheduler": "dpmpp", "guidance_scale": 7.0,
                  "image_strength": 0.0 if kind == "strength 0" else 1.0}  # fmt: skip
        requests.append((repeated[i % 3] if kind == "repeated" else _png(noise_photo(i)), fields))
    return requests


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def through_service(bench: Bench, pipe: MelFusionPipeline, args: argparse.Namespace) -> None:
    """Mixed traffic through the real service: eager one job at a time, eager batched, compiled batched.

    The bundle is written once (in the bench's dtype) to a temporary folder, which each worker loads as in
    production. Every worker is warmed on `--service-batch-sizes` before its burst and batches up to the
    largest; the compiled one runs with `--compile` on the music UNet and `--service-image-backend` on the
    image UNet. The default sizes, 1 and 8, compile two music-UNet graphs instead of four: a GPU that is
    launch-bound runs a step of 8 rows about as fast as one of 2, and a burst's batches are mostly full.
    """
    from bench.service import private_redis, run_burst, running_service
    from melfusion.bundle import save_bundle

    max_batch = max(args.service_batch_sizes)
    warm = {"warmup_batch_sizes": ",".join(map(str, args.service_batch_sizes)), "warmup_seconds": args.seconds,
            "warmup_caption_tokens": 32}  # fmt: skip
    device = {"device": "cuda" if bench.device.type == "cuda" else "cpu", "dtype": args.dtype}
    compiled = {"compile_mode": args.compile, "image_compile_backend": args.service_image_backend}
    modes = [  # (kind, label, worker settings, jobs)
        ("eager", "eager, one job at a time", {"max_batch": 1}, args.sequential_jobs),
        ("eager", f"eager, batched (max {max_batch})", {"max_batch": max_batch}, args.service_jobs),
        ("compiled", f"compiled ({args.compile}), batched (warmed {args.service_batch_sizes})",
         {"max_batch": max_batch, **compiled}, args.service_jobs),
    ]  # fmt: skip
    traffic = mixed_traffic(args.service_jobs, args)
    with tempfile.TemporaryDirectory() as folder, contextlib.ExitStack() as stack:
        work = Path(folder)
        started = time.perf_counter()
        bundle = save_bundle(pipe, work / "bundle", source=f"bench.gpu --size {args.size}")
        bench.row("write the bundle for the workers", f"{time.perf_counter() - started:.1f} s")
        redis_port = stack.enter_context(private_redis(work))
        for db, (kind, label, settings, jobs) in enumerate(modes, start=1):
            if kind not in args.service_modes:
                continue
            with running_service(work, redis_port=redis_port, db=db, bundle=bundle, ready_timeout=args.ready_timeout,
                                 batch_wait_ms=20, **device, **warm, **settings) as service:  # fmt: skip
                burst = run_burst(service.client, traffic[:jobs])
                if burst.failed:
                    raise SystemExit(f"{label}: {len(burst.failed)} job(s) failed: {burst.failed[0].raw}")
                note = f"p50 {burst.latency(0.5):.2f} s, p99 {burst.latency(0.99):.2f} s"
                if "compile_mode" in settings:
                    note += (f"; warm-up {service.warm_up_seconds():.0f} s; compile misses after warm-up "
                             f"{service.compile_misses()} (target 0); target ≥ {SERVICE_TARGET:g} clips/s")  # fmt: skip
                bench.row(f"service: {jobs} concurrent mixed jobs, {label}", f"{burst.clips_per_second:.2f} clips/s", note)


def main(argv: list[str] | None = None) -> None:
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
                        help="eager batch sizes (and photos inverted at once); default %(default)s")
    parser.add_argument("--compile", default="reduce-overhead", choices=("default", "reduce-overhead", "max-autotune", "check"),
                        help="torch.compile mode of the music UNet (check: dynamo only, eager kernels)")  # fmt: skip
    parser.add_argument("--image-backend", default="same", choices=("same", "cudagraphs"),
                        help="the image UNet's backend in the compiled part: the music UNet's, or CUDA graphs over eager kernels")  # fmt: skip
    parser.add_argument("--compiled-batches", type=int, nargs="*", default=[1],
                        help="batch sizes compiled and warmed; default %(default)s")
    parser.add_argument("--parts", nargs="*", choices=("engine", "compiled", "service"), default=["engine", "compiled"],
                        help="which parts to run; default %(default)s")  # fmt: skip
    parser.add_argument("--service-jobs", type=int, default=64, help="concurrent jobs of a batched service burst")
    parser.add_argument("--sequential-jobs", type=int, default=16, help="jobs of the one-at-a-time burst")
    parser.add_argument("--service-modes", nargs="*", choices=("eager", "compiled"), default=["eager", "compiled"],
                        help="which workers the service part runs; default %(default)s")  # fmt: skip
    parser.add_argument("--service-batch-sizes", type=int, nargs="*", default=[1, 8],
                        help="the workers' MELFUSION_WARMUP_BATCH_SIZES; the largest is MELFUSION_MAX_BATCH")  # fmt: skip
    parser.add_argument("--service-image-backend", default="cudagraphs", choices=("same", "cudagraphs"),
                        help="MELFUSION_IMAGE_COMPILE_BACKEND of the compiled worker (inductor at 4 batch sizes takes ~12 min)")  # fmt: skip
    parser.add_argument("--ready-timeout", type=float, default=900, help="seconds a worker may take to load and warm up")
    parser.add_argument("--markdown", type=Path, help="also write the table here")
    args = parser.parse_args(argv)
    bench = Bench(args.device, args.repeats)
    name = torch.cuda.get_device_name() if bench.device.type == "cuda" else "CPU"
    print(f"torch {torch.__version__} on {name}; {args.size} size, {args.dtype}, {args.seconds:g} s clip, "
          f"{args.steps} DPM-Solver++ steps, CFG 7; parts {args.parts}", flush=True)  # fmt: skip
    started = time.perf_counter()
    pipe = build(args.size, args.device, getattr(torch, args.dtype))
    bench.row("build in memory", f"{time.perf_counter() - started:.1f} s")

    reference: dict = {}
    if "engine" in args.parts:
        measure(bench, pipe, "eager", args, args.batches)
        check_outputs(bench, pipe, "eager", args, reference)
        host_syncs(bench, pipe, "eager", args)
    if "compiled" in args.parts:
        compiled_part(bench, pipe, args, reference)
    if "service" in args.parts:  # after `compiled`: its worker finds the batch-1 graph in inductor's disk cache
        through_service(bench, pipe, args)
    print("\n" + bench.markdown())
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(bench.markdown() + "\n")


if __name__ == "__main__":
    main()
