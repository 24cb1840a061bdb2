"""Training step time and peak memory per GPU at batch 1, 2 and 4 (10 s clips), plus encoding cost per image.

    python -m bench.train_step --size full --device cuda    # SD 1.5 + TANGO sizes, bf16 autocast (~1-2 min on an H100)
    python -m bench.train_step --size tiny                  # the same code on the CPU in seconds

The components are built in memory with random weights (`presets.build_components`), the frozen SD UNet in
the training loop's GPU dtype (bfloat16), the music UNet in float32 under autocast as `accelerate launch
--mixed_precision bf16` runs it. One step is what `melfusion train` does per micro-batch: read the image
K/V at each row's t (one SD pass), T5 on the captions, music UNet forward and backward with the synapse,
AdamW on the UNet and α. The cache is replaced by random tensors of its shapes; the data loading is not timed.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from pathlib import Path

import torch
from diffusers import DDPMScheduler
from PIL import Image
from safetensors.torch import save_file
from torch.utils.flop_counter import FlopCounterMode

from melfusion.pipeline import MelFusionPipeline
from melfusion.presets import build_components
from melfusion.training.config import TrainConfig
from melfusion.training.denoiser import SynapseDenoiser
from melfusion.training.image_side import ImageKeyValues, encode_trajectories
from melfusion.training.prepare import TRAJECTORY_DTYPE, Example, image_side_to, load_image_segments, load_trajectories

CAPTION = "calm piano with soft strings at sunset"
GRID = 50  # the cache grid: a step reads the two cached latents around each row's t, whatever the grid


def build(size: str, device: torch.device) -> MelFusionPipeline:
    with torch.device(device):
        pipe = MelFusionPipeline(**build_components(size))
    pipe.set_progress_bar_config(disable=True)
    image_side_to(pipe, device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    return pipe


def synthetic_batch(pipe: MelFusionPipeline, batch_size: int, seconds: float, generator: torch.Generator) -> TrainBatch:
    from melfusion.training.loop import TrainBatch  # needs the training extra (accelerate)

    shape = pipe.music_latent_shape(batch_size, seconds)
    side = pipe.image_unet.config.sample_size
    return TrainBatch(
        captions=[CAPTION] * batch_size,
        latents=torch.randn(shape, generator=generator),
        noise=torch.randn(shape, generator=generator),
        timesteps=torch.randint(1000, (batch_size,), generator=generator),
        image_segments=torch.randn((batch_size, 2, pipe.image_unet.config.in_channels, side, side), generator=generator),
        image_strength=torch.ones(batch_size),
    )


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_steps(pipe: MelFusionPipeline, batch_size: int, args: argparse.Namespace) -> dict:
    from melfusion.training.loop import diffusion_loss, make_optimizer  # needs the training extra (accelerate)

    device = pipe.music_unet.device
    config = TrainConfig(bundle=None, data=None, out=None)  # the loop's default learning rates and decay
    model = SynapseDenoiser(pipe.music_unet, pipe.synapse).train()
    optimizer = make_optimizer(pipe, config)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    image_kv = ImageKeyValues(pipe, pipe.synapse, GRID)
    generator = torch.Generator().manual_seed(batch_size)
    cuda = device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()

    def step() -> None:
        batch = synthetic_batch(pipe, batch_size, args.seconds, generator)
        with autocast:
            loss = diffusion_loss(pipe, model, noise_scheduler, image_kv, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def image_pass() -> None:
        batch = synthetic_batch(pipe, batch_size, args.seconds, generator)
        with autocast:
            image_kv(batch.image_segments, batch.timesteps)

    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    times = {"step": [], "image K/V": []}
    for repeat in range(args.warmup + args.repeats):
        for name, run in (("step", step), ("image K/V", image_pass)):
            synchronize(device)
            started = time.perf_counter()
            run()
            synchronize(device)
            if repeat >= args.warmup:
                times[name].append(time.perf_counter() - started)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else float("nan")
    with FlopCounterMode(display=False) as flops:
        step()
    optimizer.zero_grad(set_to_none=True)
    del optimizer  # AdamW state is per measurement: the next batch size starts from the same memory
    return {"batch": batch_size, "step_s": statistics.median(times["step"]),
            "image_s": statistics.median(times["image K/V"]), "peak_gib": peak, "tflop": flops.get_total_flops() / 1e12}


def measure_encoding(pipe: MelFusionPipeline, batch_size: int, steps: int, repeats: int) -> float:
    """Seconds per image per grid step of the cache fill (VAE, DDIM inversion, re-denoising)."""
    device = pipe.image_unet.device
    images = [Image.new("RGB", (pipe.image_resolution,) * 2, (40 * i % 255, 90, 160)) for i in range(batch_size)]
    encode_trajectories(pipe, images, 2)  # warm-up
    times = []
    for _ in range(repeats):
        synchronize(device)
        started = time.perf_counter()
        encode_trajectories(pipe, images, steps)
        synchronize(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times) / (batch_size * steps)


def measure_cache_reads(channels: int, side: int, rows: int = 32, repeats: int = 5) -> tuple[float, float, int]:
    """Seconds per row to read a whole cached trajectory vs the two steps a training row uses, and the
    file's bytes: `rows` files of (GRID, channels, side, side) float16, read from the page cache (a cold
    disk or a network filesystem widens the gap)."""
    shape = (GRID, channels, side, side)
    with tempfile.TemporaryDirectory() as folder:
        examples = []
        for row in range(rows):
            path = Path(folder) / f"{row}.safetensors"
            save_file({"latents": torch.randn(shape).to(TRAJECTORY_DTYPE)}, path)
            examples.append(Example("", path, path, str(row)))
        first = torch.randint(GRID - 1, (rows,), generator=torch.Generator().manual_seed(0))
        timed = {"whole": lambda: load_trajectories(examples), "two": lambda: load_image_segments(examples, first)}
        seconds = {name: min(_timed(read) for _ in range(repeats)) / rows for name, read in timed.items()}
    return seconds["whole"], seconds["two"], GRID * torch.Size(shape[1:]).numel() * TRAJECTORY_DTYPE.itemsize


def _timed(run) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=("tiny", "small", "full"), default="tiny",
                        help="component sizes (full: SD 1.5 + TANGO shapes); default %(default)s")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cuda; default %(default)s")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4],
                        help="micro-batch sizes timed; default %(default)s")
    parser.add_argument("--seconds", type=float, default=10.0, help="clip length; default %(default)s")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per batch size; default %(default)s")
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed steps per batch size (median); default %(default)s")
    parser.add_argument("--encode-steps", type=int, default=10, help="grid steps of the timed cache fill")
    args = parser.parse_args(argv)
    try:
        import accelerate  # noqa: F401  (the training loop's; checked here so that --help needs no extra)
    except ImportError:
        raise SystemExit("bench.train_step needs the training extra: pip install -e '.[train]'") from None

    device = torch.device(args.device)
    started = time.perf_counter()
    pipe = build(args.size, device)
    print(f"{args.size} components on {device} in {time.perf_counter() - started:.1f} s; "
          f"music UNet {sum(p.numel() for p in pipe.music_unet.parameters()) / 1e6:.0f} M parameters; "
          f"{args.seconds:g} s clips, latent {tuple(pipe.music_latent_shape(1, args.seconds))[1:]}")
    if device.type == "cuda":
        print(torch.cuda.get_device_name(device), f"torch {torch.__version__}")
    print("| batch | step (s) | of which image K/V (s) | rows/s | TFLOP/step | peak GPU memory (GiB) |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for batch_size in args.batch_sizes:
        r = measure_steps(pipe, batch_size, args)
        print(f"| {r['batch']} | {r['step_s']:.3f} | {r['image_s']:.3f} | {batch_size / r['step_s']:.2f} | "
              f"{r['tflop']:.2f} | {r['peak_gib']:.1f} |", flush=True)
    encode_batch = max(args.batch_sizes)
    per_image_step = measure_encoding(pipe, encode_batch, args.encode_steps, repeats=2)
    print(f"cache fill, batches of {encode_batch}: {per_image_step * 1e3:.1f} ms per image per grid step "
          f"(x 50 steps = {per_image_step * 50:.2f} s per image)")
    whole, two, size = measure_cache_reads(pipe.image_unet.config.in_channels, pipe.image_unet.config.sample_size)
    print(f"cache read per training row: whole trajectory ({size:,} B) {whole * 1e3:.2f} ms, the two steps around t "
          f"({2 * size // GRID:,} B) {two * 1e3:.2f} ms: x{whole / two:.1f}")
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
