"""Few-step students and training-free speedups, side by side with the teacher, plus what distilling costs.

    python -m bench.student --device cuda --dtype float16     # full size (SD 1.5 + TANGO shapes): issue 17's GPU figures
    python -m bench.student --size tiny --device cpu --dtype float32 --seconds 2 --repeats 2   # the same code on a CPU

Parts (`--parts`, all by default), each on random weights built in memory (speed does not depend on them):
- `speedups`: the teacher at 50 DPM-Solver++ steps with CFG against 25 and 20 steps and guidance intervals
  (CFG on part of the trajectory), caption only and with the photo's features computed;
- `student`: a student (the teacher's UNet plus a guidance input; an untrained one runs exactly as fast) at
  4 steps for caption only, a new photo (4 image passes) and a repeated photo, with per-component times,
  eager and (`--compile`) compiled;
- `service`: `--service-jobs` concurrent mixed jobs (new and repeated photos, guidance 2-8, strengths) through
  the real service (API, Redis, one worker) serving the student bundle, batching off vs on;
- `distill`: one `melfusion distill` step (guided teacher, target network, student forward + backward, AdamW)
  at batch 1/2/4 under bf16 autocast, its peak memory, and the GPU-hours it projects for MeLBench.
Whole calls are timed round-robin (`bench.generation.interleaved`: ratios hold on a busy machine); a call
returns the audio on the host, so GPU work is complete when it is timed.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench.generation import CAPTION, SAMPLE_IMAGE, interleaved, ratio, report, service_batching
from bench.train_step import synthetic_batch
from melfusion.pipeline import MelFusionPipeline
from melfusion.presets import build_components
from melfusion.quiet import silence_library_noise
from melfusion.student import student_scheduler, student_unet_from

TARGETS = {"caption only": 0.060, "new photo": 0.120, "repeated photo": 0.070}  # issue 17, seconds, full size
STUDENT_STEPS = 4
MELBENCH_ROWS = 11_250


def build_pair(size: str, device: str, dtype: torch.dtype) -> tuple[MelFusionPipeline, MelFusionPipeline]:
    """The teacher, and a student sharing every component but its UNet and scheduler."""
    with torch.device(device):
        components = build_components(size, seed=0)
        student_unet = student_unet_from(components["music_unet"])
    teacher = MelFusionPipeline(**components).to(dtype=dtype)
    student = MelFusionPipeline(**{**components, "music_unet": student_unet,
                                   "scheduler": student_scheduler(components["scheduler"].config, 40)},
                                default_steps=STUDENT_STEPS, max_steps=8).to(dtype=dtype)  # fmt: skip
    for pipe in (teacher, student):
        pipe.set_progress_bar_config(disable=True)
    return teacher, student


def relative_rms(clip: np.ndarray, reference: np.ndarray) -> float:
    return float(np.sqrt(((clip - reference) ** 2).mean() / (reference**2).mean()))


def speedups(teacher: MelFusionPipeline, image: Image.Image, args: argparse.Namespace) -> None:
    """Training-free: fewer DPM-Solver++ steps and CFG on part of the trajectory, against 50 guided steps."""
    features = {steps: teacher.encode_image(image, steps) for steps in (50, 25, 20)}
    cases = {
        "50 steps, CFG every step (baseline)": (50, 0.0, 1.0),
        "25 steps": (25, 0.0, 1.0),
        "20 steps": (20, 0.0, 1.0),
        "25 steps, CFG on steps in [0, 0.5)": (25, 0.0, 0.5),
        "20 steps, CFG on steps in [0.2, 0.8)": (20, 0.2, 0.8),
        "20 steps, CFG on steps in [0, 0.5)": (20, 0.0, 0.5),
    }
    for source in ("caption only", "features computed"):

        def call(steps: int, start: float, end: float, source=source) -> np.ndarray:
            photo = {"image_features": features[steps]} if source == "features computed" else {}
            return teacher(CAPTION, seconds=args.seconds, num_inference_steps=steps, scheduler="dpmpp",
                           guidance_scale=7.0, guidance_start=start, guidance_end=end, seed=0, **photo).audios  # fmt: skip

        print(f"teacher, {source}, {args.seconds:g} s clip, DPM-Solver++, CFG 7")
        times = interleaved({label: lambda case=case: call(*case) for label, case in cases.items()}, args.repeats)
        report(times)
        baseline = next(iter(cases))
        reference = call(*cases[baseline])
        for label, case in list(cases.items())[1:]:
            print(f"  {label}: time ÷ baseline {ratio(times, label, baseline)}; "
                  f"clip moved {relative_rms(call(*case), reference):.3f} RMS relative (random weights)")


class ComponentClock:
    """Seconds spent in each component's calls during one generation (CUDA-synchronised around each call)."""

    PARTS = {"T5": ("text_encoder", "forward"), "image VAE": ("image_vae", "encode"),
             "image UNet": ("image_unet", "forward"), "music UNet": ("music_unet", "forward"),
             "mel VAE decode": ("mel_vae", "decode"), "vocoder": ("vocoder", "forward")}  # fmt: skip

    def __init__(self, pipe: MelFusionPipeline):
        self.pipe, self.seconds = pipe, defaultdict(float)

    def sync(self) -> None:
        if self.pipe.device.type == "cuda":
            torch.cuda.synchronize()

    @contextlib.contextmanager
    def running(self):
        originals = {}
        for part, (name, method) in self.PARTS.items():
            module = getattr(self.pipe, name)
            originals[part] = (module, method, getattr(module, method))
            setattr(module, method, self.timed(part, getattr(module, method)))
        try:
            yield self
        finally:
            for module, method, original in originals.values():
                delattr(module, method)  # the instance attribute goes; the class's method is back

    def timed(self, part: str, call):
        def run(*args, **kwargs):
            self.sync()
            started = time.perf_counter()
            result = call(*args, **kwargs)
            self.sync()
            self.seconds[part] += time.perf_counter() - started
            return result

        return run


def student_speed(teacher: MelFusionPipeline, student: MelFusionPipeline, image: Image.Image, args, label: str,
                  per_component: bool = True) -> None:  # fmt: skip
    """The student at 4 steps against the teacher at 50 guided DPM-Solver++ steps; then where the time goes."""
    repeated = student.encode_image(image, STUDENT_STEPS)  # a repeated photo: the worker's feature cache has it
    new_photos = iter(range(10**6))  # every call a photo the cache has not seen

    def new_photo() -> Image.Image:
        return Image.fromarray(np.full((64, 64, 3), next(new_photos) % 256, dtype=np.uint8))

    common = {"seconds": args.seconds, "seed": 0}
    cases = {
        "teacher, 50 DPM-Solver++ steps, CFG 7, caption only": lambda: teacher(
            CAPTION, num_inference_steps=50, scheduler="dpmpp", **common),
        "caption only": lambda: student(CAPTION, **common),
        "new photo": lambda: student(CAPTION, new_photo(), **common),
        "repeated photo": lambda: student(CAPTION, image_features=repeated, **common),
    }  # fmt: skip
    print(f"{label}: student, {STUDENT_STEPS} steps (tcd), batch 1, {args.seconds:g} s clip")
    times = interleaved(cases, args.repeats)
    report(times)
    teacher_case = next(iter(cases))
    for case in list(cases)[1:]:
        target = TARGETS[case]
        seconds = statistics.median(times[case].wall)
        goal = f"; target <= {target * 1e3:.0f} ms" if args.size == "full" and args.device.startswith("cuda") else ""
        print(f"  student {case}: {seconds * 1e3:.1f} ms{goal}; ÷ teacher caption only {ratio(times, case, teacher_case)}")
    for case in ("caption only", "new photo", "repeated photo") if per_component else ():
        clock = ComponentClock(student)
        with clock.running():
            cases[case]()
        parts = ", ".join(f"{part} {seconds * 1e3:.1f} ms" for part, seconds in clock.seconds.items())
        print(f"  {case}, per component (synchronised per call): {parts}")


def student_through_service(student: MelFusionPipeline, args: argparse.Namespace) -> None:
    """Mixed jobs: a quarter with a photo never seen, the rest one repeated photo; guidance 2-8, strengths."""
    from melfusion.bundle import save_bundle

    def mixed(index: int) -> tuple[Path | bytes, dict]:
        fields = {"caption": f"{CAPTION} {index % 7}", "seed": index, "guidance_scale": 2.0 + index % 7,
                  "image_strength": (index % 5) / 4}  # fmt: skip
        if index % 4:
            return SAMPLE_IMAGE, fields
        png = io.BytesIO()
        Image.fromarray(np.random.default_rng(index).integers(0, 256, (96, 96, 3), dtype=np.uint8)).save(png, "PNG")
        return png.getvalue(), fields

    with tempfile.TemporaryDirectory() as folder:
        origin = {"teacher": {"bundle": f"random {args.size}, in memory"}, "distillation": {"steps": 0}}
        bundle = save_bundle(student, Path(folder) / "student", source=f"bench.student --size {args.size}", origin=origin)
        device = "cuda" if args.device.startswith("cuda") else "cpu"
        settings = {"device": device, "dtype": args.dtype, "max_batch": args.service_jobs}
        if device == "cpu":
            settings["torch_threads"] = 1
        rates = service_batching(args.service_jobs, 1, args.seconds, STUDENT_STEPS, bundle=bundle, job=mixed, **settings)
    target = " (target >= 30 clips/s per GPU)" if args.size == "full" and device == "cuda" else ""
    print(f"  student through the service: {rates}{target}")


def distill_step(teacher: MelFusionPipeline, args: argparse.Namespace) -> None:
    """One distillation step per batch size: what `melfusion distill` runs per micro-batch, on synthetic rows."""
    from melfusion.training.config import TrainConfig
    from melfusion.training.denoiser import SynapseDenoiser
    from melfusion.training.distill import ConsistencyTargets, draw_rows
    from melfusion.training.distill_cli import DistillConfig
    from melfusion.training.image_side import ImageKeyValues
    from melfusion.training.prepare import image_side_to

    device = teacher.music_unet.device
    cuda = device.type == "cuda"
    teacher.to(dtype=torch.float32)  # training keeps fp32 weights and runs under bf16 autocast
    image_side_to(teacher, device, torch.bfloat16 if cuda else torch.float32)
    config = DistillConfig(TrainConfig(bundle=None, data=None, out=None))
    student_unet = student_unet_from(teacher.music_unet).train()
    target_unet = student_unet_from(teacher.music_unet).requires_grad_(False)
    teacher.music_unet.requires_grad_(False)
    teacher.synapse.requires_grad_(False)
    model = SynapseDenoiser(student_unet, teacher.synapse)
    optimizer = torch.optim.AdamW(student_unet.parameters(), lr=1e-5)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else contextlib.nullcontext
    targets = ConsistencyTargets(teacher, target_unet, ImageKeyValues(teacher, teacher.synapse, 50), config, autocast)
    generator = torch.Generator().manual_seed(0)
    print(f"distillation step, {args.seconds:g} s rows, teacher substeps {config.teacher_substeps}, "
          f"{'bf16 autocast' if cuda else 'float32'}")
    print("| batch | step (s) | rows/s | peak GPU memory (GiB) | hours per MeLBench epoch on this device |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for batch_size in args.distill_batches:
        def step() -> None:
            batch = synthetic_batch(teacher, batch_size, args.seconds, generator)
            guidance, jump = draw_rows([generator] * batch_size, config)
            path_points = config.teacher_substeps + 1  # random segments stand in for the cache's, read per path point
            drawn = targets.draw(batch, guidance, jump, lambda _: batch.image_segments.repeat(path_points, 1, 1, 1, 1))
            with autocast():
                loss = targets.loss(model, drawn)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        if cuda:
            torch.cuda.reset_peak_memory_stats()
        step()  # warm-up
        times = []
        for _ in range(args.repeats):
            if cuda:
                torch.cuda.synchronize()
            started = time.perf_counter()
            step()
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
        seconds = statistics.median(times)
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
        epoch_hours = MELBENCH_ROWS / batch_size * seconds / 3600
        print(f"| {batch_size} | {seconds:.3f} | {batch_size / seconds:.2f} | {peak:.1f} | {epoch_hours:.2f} |", flush=True)
    print(f"projected: {args.distill_rows:,} rows (--distill-rows; default ConsistencyTTA's 60 epochs, here of "
          f"MeLBench) at the largest batch's rate = {args.distill_rows / (batch_size / seconds) / 3600:.1f} hours on this device")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("tiny", "small", "full"), default="full")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default="float16")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--parts", nargs="*", choices=("speedups", "student", "service", "distill"),
                        default=["speedups", "student", "service", "distill"])  # fmt: skip
    parser.add_argument("--compile", default="reduce-overhead", help="torch.compile mode of the student's UNets ('off' skips)")
    parser.add_argument("--service-jobs", type=int, default=64, help="concurrent jobs through the service")
    parser.add_argument("--distill-batches", type=int, nargs="*", default=[1, 2, 4])
    parser.add_argument("--distill-rows", type=int, default=60 * MELBENCH_ROWS, help="rows a distillation run sees")
    args = parser.parse_args()
    silence_library_noise()
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(f"torch {torch.__version__} on {name}; {args.size} size, {args.dtype}, {args.seconds:g} s clips", flush=True)
    image = Image.open(SAMPLE_IMAGE).convert("RGB")
    started = time.perf_counter()
    teacher, student = build_pair(args.size, args.device, getattr(torch, args.dtype))
    print(f"built in memory in {time.perf_counter() - started:.1f} s", flush=True)
    if "speedups" in args.parts:
        speedups(teacher, image, args)
    if "student" in args.parts:
        student_speed(teacher, student, image, args, "eager")
    if "service" in args.parts:
        student_through_service(student, args)
    if "student" in args.parts and args.compile != "off":
        started = time.perf_counter()
        student.compile_unets(None if args.compile == "default" else args.compile)
        student(CAPTION, image, seconds=args.seconds, seed=0)
        print(f"compile + warm-up ({args.compile}): {time.perf_counter() - started:.1f} s")
        # compiled graphs call the modules' own methods: the per-component clock would break them, so the
        # eager figures show where the time goes
        student_speed(teacher, student, image, args, f"compiled ({args.compile})", per_component=False)
    if "distill" in args.parts:
        del student
        distill_step(teacher, args)


if __name__ == "__main__":
    main()
