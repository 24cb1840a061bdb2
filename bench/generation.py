"""CPU speed: whole generations on the tiny bundle, UNet steps at the small size, the synapse's overhead,
and batched vs sequential jobs through the real service.

Run from the repository root (so this checkout's packages are imported): `python -m bench.generation`.
Runs are interleaved round by round after a warm-up; ratios are medians of per-round ratios, since
absolute times on a shared machine drift.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from melfusion.bundle import create_tiny_bundle, load_pipeline
from melfusion.pipeline import MelFusionPipeline
from melfusion.presets import build_components

SAMPLE_IMAGE = Path(__file__).parents[1] / "docs" / "sample.png"
CAPTION = "calm piano at sunset"


@dataclass
class Timings:
    """Seconds per call: wall clock, and CPU time of this process (less disturbed by other jobs)."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)


def interleaved(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, Timings]:
    """`repeats` rounds of one call of each run, after one warm-up call each.

    Round-robin rather than one run after the other, so load from other jobs on the machine falls on
    all runs alike; the first call of a shape pays one-off kernel set-up, hence the warm-up.
    """
    for run in runs.values():
        run()
    times = {label: Timings() for label in runs}
    for _ in range(repeats):
        for label, run in runs.items():
            wall, cpu = time.perf_counter(), time.process_time()
            run()
            times[label].wall.append(time.perf_counter() - wall)
            times[label].cpu.append(time.process_time() - cpu)
    return times


def report(times: dict[str, Timings]) -> None:
    for label, t in times.items():
        print(
            f"  {label:<50} wall median {statistics.median(t.wall):7.3f} s, min {min(t.wall):7.3f} s;"
            f" CPU median {statistics.median(t.cpu):7.3f} s"
        )


def ratio(times: dict[str, Timings], top: str, bottom: str) -> str:
    """Median over rounds of top/bottom (each round's runs saw the same machine load), wall and CPU."""
    wall = statistics.median(a / b for a, b in zip(times[top].wall, times[bottom].wall))
    cpu = statistics.median(a / b for a, b in zip(times[top].cpu, times[bottom].cpu))
    return f"{wall:.3f} wall, {cpu:.3f} CPU"


def tiny_generations(image: Image.Image, repeats: int, seconds: float, steps: int) -> None:
    """Whole calls (image inversion + music loop + decode) on a saved and loaded tiny bundle."""
    with tempfile.TemporaryDirectory() as folder:
        pipe = load_pipeline(create_tiny_bundle(Path(folder) / "tiny"))
    pipe.set_progress_bar_config(disable=True)
    request = dict(seconds=seconds, num_inference_steps=steps, seed=0)
    print(f"tiny bundle, {seconds:g} s clip, {steps} steps, CFG 7, {repeats} rounds")
    ddim, dpmpp, caption_only = "image + caption, DDIM", "image + caption, DPM-Solver++", "caption only, DDIM"
    times = interleaved(
        {
            ddim: lambda: pipe(CAPTION, image, scheduler="ddim", **request),
            dpmpp: lambda: pipe(CAPTION, image, scheduler="dpmpp", **request),
            caption_only: lambda: pipe(CAPTION, scheduler="ddim", **request),
        },
        repeats,
    )
    report(times)
    print(f"  ratio DPM-Solver++/DDIM: {ratio(times, dpmpp, ddim)}")
    print(f"  ratio caption-only/image+caption: {ratio(times, caption_only, ddim)}")
    feature_cache_gain(pipe, image, repeats, seconds, steps)


def feature_cache_gain(pipe: MelFusionPipeline, image: Image.Image, repeats: int, seconds: float, steps: int) -> None:
    """A repeated photo with the worker's feature cache on (the image side skipped) against a fresh one."""
    cold, warm = "image + caption, image side computed", "image + caption, image features cached"
    cached = copy.copy(pipe)  # same modules, its own cache
    cached.enable_feature_cache(2**30)
    request = dict(seconds=seconds, num_inference_steps=steps, seed=0)
    runs = {cold: lambda: pipe(CAPTION, image, **request), warm: lambda: cached(CAPTION, image, **request)}
    times = interleaved(runs, repeats)
    report(times)
    print(f"  ratio cached/computed image side: {ratio(times, warm, cold)}")


@torch.no_grad()
def small_unet_steps(image: Image.Image, repeats: int, seconds: float) -> None:
    """One UNet call of each side at the small size, and the music UNet's cost with image features mixed in
    (the mixers are always attached; caption only runs them at strength 0)."""
    pipe = MelFusionPipeline(**build_components("small"))
    text_states, text_mask = pipe.encode_captions([CAPTION], [""])  # CFG rows [uncond, cond]
    music_latents = torch.randn(pipe.music_latent_shape(2, seconds))  # (2, 8, T, 16)
    side = pipe.image_unet.config.sample_size
    image_latents = torch.randn(1, 4, side, side)
    image_context = torch.randn(1, pipe.image_tokenizer.model_max_length, pipe.image_unet.config.cross_attention_dim)
    t = torch.tensor(500)
    features = pipe.encode_image(image, num_inference_steps=2)

    def music_step(features):
        rows = pipe.image_rows(torch.ones(1), torch.tensor([features is not None]), True, "conditional")
        pipe.load_synapse(features, [0], text_mask, rows, [0])
        pipe.synapse_state.select_step(0)
        return pipe.music_unet(music_latents, t, encoder_hidden_states=text_states, encoder_attention_mask=text_mask)

    print(f"small size, music latent {tuple(music_latents.shape)}, image latent {tuple(image_latents.shape)}")
    plain, mixed = "music UNet step (batch 2 = CFG), caption only", "music UNet step (batch 2 = CFG), image mixed"
    times = interleaved(
        {
            "image UNet step (batch 1)": lambda: pipe.image_unet(image_latents, t, image_context),
            plain: lambda: music_step(None),
            mixed: lambda: music_step(features),
        },
        repeats,
    )
    report(times)
    print(f"  synapse overhead, image mixed / caption only: {ratio(times, mixed, plain)}")


def small_generations(image: Image.Image, repeats: int, seconds: float, steps: int) -> None:
    """Whole generations at the small size: what a new photo, a cached one and each image-side option cost."""
    components = build_components("small")
    pipe = MelFusionPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    cached = copy.copy(pipe)  # same modules, its own cache
    cached.enable_feature_cache(2**30)
    two_pass = MelFusionPipeline(**components, image_features_from="redenoise")
    two_pass.set_progress_bar_config(disable=True)
    request = dict(seconds=seconds, num_inference_steps=steps, scheduler="dpmpp", seed=0)
    coarse_steps = max(1, steps // 5)
    caption_only, warm, new = "caption only", "image features cached", "new image (one image pass)"
    redenoise, coarse = "new image, two image passes", f"new image, {coarse_steps} image passes"
    print(f"small size, whole generations, {seconds:g} s clip, {steps} DPM-Solver++ steps, CFG 7")
    times = interleaved(
        {
            caption_only: lambda: pipe(CAPTION, **request),
            warm: lambda: cached(CAPTION, image, **request),
            new: lambda: pipe(CAPTION, image, **request),
            redenoise: lambda: two_pass(CAPTION, image, **request),
            coarse: lambda: pipe(CAPTION, image, image_steps=coarse_steps, **request),
        },
        repeats,
    )
    report(times)
    print(f"  ratio new image / caption only (target <= 1.5): {ratio(times, new, caption_only)}")
    print(f"  ratio features cached / caption only (target <= 1.05): {ratio(times, warm, caption_only)}")
    print(f"  ratio one image pass / two: {ratio(times, new, redenoise)}")
    print(f"  ratio {coarse_steps} image passes / {steps}: {ratio(times, coarse, new)}")
    full, fewer = pipe(CAPTION, image, **request).audios, pipe(CAPTION, image, image_steps=coarse_steps, **request).audios
    moved = float(((full - fewer) ** 2).mean() ** 0.5 / (full**2).mean() ** 0.5)
    print(f"  output moved by the coarse image grid: {moved:.3f} RMS relative to the clip")


def repeated_photo(index: int) -> tuple[Path | bytes, dict]:
    """The service benches' default job: the sample photo, one caption, DPM-Solver++, the job's own seed."""
    return SAMPLE_IMAGE, {"caption": CAPTION, "seed": index, "scheduler": "dpmpp"}


def service_batching(
    jobs: int, rounds: int, seconds: float, steps: int, *, bundle: Path | None = None,
    job: Callable[[int], tuple[Path | bytes, dict]] = repeated_photo, **worker_settings,
) -> dict[str, float]:  # fmt: skip
    """Clips per second through the real service (API, Redis, one worker, local storage; the tiny bundle
    unless `bundle` is given) for `jobs` concurrent jobs (`job(i)`: the photo and form fields of job i),
    batching off (MELFUSION_MAX_BATCH=1) vs on, alternating rounds. `worker_settings` are further MELFUSION_*
    settings (device, dtype, …). Returns the median clips per second of each."""
    from bench.service import private_redis, run_burst, running_service

    print(f"service, {jobs} concurrent jobs, {bundle or 'tiny bundle'}, {seconds:g} s clip, {steps} steps, "
          f"one worker {worker_settings or '(1 thread)'}", flush=True)  # fmt: skip
    worker_settings = worker_settings or {"torch_threads": 1}
    requests = [(image, {"seconds": seconds, "steps": steps, **fields}) for image, fields in map(job, range(jobs))]
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        work = Path(tmp)
        bundle = bundle or create_tiny_bundle(work / "bundle")
        redis_port = stack.enter_context(private_redis(work))
        services = {
            label: stack.enter_context(running_service(work, redis_port=redis_port, db=db, bundle=bundle,
                                                       max_batch=max_batch, batch_wait_ms=20, **worker_settings))
            for db, (label, max_batch) in enumerate((("sequential", 1), (f"batched (max {jobs})", jobs)), start=1)
        }  # fmt: skip
        rates = {label: [] for label in services}
        for _ in range(rounds + 1):  # the first round warms up (feature cache, first-call kernels)
            for label, service in services.items():
                burst = run_burst(service.client, requests)
                assert not burst.failed, [job.raw for job in burst.failed]
                rates[label].append(burst.clips_per_second)
    for label, measured in rates.items():
        print(f"  {label:<22} {statistics.median(measured[1:]):.2f} clips/s (rounds: "
              + ", ".join(f"{rate:.2f}" for rate in measured[1:]) + ")")  # fmt: skip
    medians = {label: statistics.median(measured[1:]) for label, measured in rates.items()}
    sequential, batched = medians.values()
    print(f"  batched/sequential: x{batched / sequential:.2f}")
    return medians


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="measured rounds")
    parser.add_argument("--seconds", type=float, default=10.0, help="clip length")
    parser.add_argument("--steps", type=int, default=25, help="denoising steps of the tiny generations")
    parser.add_argument("--only", choices=("tiny", "small", "service"), help="run one of the three parts")
    parser.add_argument("--jobs", type=int, default=8, help="concurrent jobs of the service part")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}")
    image = Image.open(SAMPLE_IMAGE).convert("RGB")
    if args.only in (None, "tiny"):
        tiny_generations(image, args.repeats, args.seconds, args.steps)
    if args.only in (None, "small"):
        small_unet_steps(image, args.repeats, args.seconds)
        small_generations(image, args.repeats, args.seconds, steps=10)
    if args.only in (None, "service"):
        service_batching(args.jobs, rounds=2, seconds=args.seconds, steps=args.steps)


if __name__ == "__main__":
    main()
