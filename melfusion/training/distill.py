"""Consistency distillation of the music UNet with its synapse, run by Accelerate (`melfusion distill`).

The teacher is a bundle's music UNet with its visual synapse, fed the image K/V of the same cached SD
trajectories `melfusion train` reads (`image_side.ImageKeyValues`). The student starts as the teacher's UNet
plus a guidance input (`melfusion.student`) and learns to jump along the teacher's *guided* ODE, from any
point x_t to any earlier point x_s in one call: trajectory consistency (TCD, Zheng et al. 2024), which holds
the jump to the end, latent consistency (LCM, Luo et al. 2023; ConsistencyTTA, Bai et al. 2023, on TANGO's
UNet; `--targets endpoint` trains that alone). Per row:

1. z_0, ε, t and whether the row sees its image, drawn as `melfusion train` draws them (one generator per
   row, so any number of processes and an exact resume); then w ~ U[min, max] and where the jump ends.
2. t moves up to the distillation grid (the trailing grid of `teacher_steps`, LCM's), u is the grid point
   below it (0 under the lowest), s a grid point in [0, u]; x_t = √ᾱ_t·z_0 + √(1−ᾱ_t)·ε.
3. The teacher solves its guided ODE from t to u in `teacher_substeps` DDIM steps of
   ε̂ = ε_uncond + w·(ε_cond − ε_uncond) (the image in the conditional branch, the service's default
   `image_guidance`; the image K/V at each step's own timestep): x̂_u.
4. The student's f_θ(x_t, t → s) against the target network's f_θ⁻(x̂_u, u → s), θ⁻ an exponential moving
   average of θ; f(x, s → s) = x anchors every chain. Pseudo-Huber (or L2) loss.

A jump is a DDIM step along the student's own prediction (`melfusion.student.ddim_step`), the step the "tcd"
sampler takes (γ = 0): a few deterministic steps follow the teacher's trajectory from the same seed. The
"lcm" sampler re-noises between steps with fresh noise instead (LCM's multistep sampling).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from tqdm.auto import tqdm

from ..attention import ImageFeatures
from ..bundle import load_pipeline, save_bundle
from ..manifest import file_sha256, read_manifest
from ..errors import InputError
from ..pipeline import MelFusionPipeline
from ..student import ddim_step, guidance_embedding, student_scheduler, student_unet_from
from .checkpoint import checkpoint_path, load_trainer_state, load_weights, prune_checkpoints, write_checkpoint
from .denoiser import SynapseDenoiser
from .distill_cli import DistillConfig
from .image_side import ImageKeyValues, grid_segments
from .loop import (
    Dropout,
    LossLog,
    Prefetcher,
    TrainBatch,
    TrainResult,
    draw_batch,
    encode_data,
    make_accelerator,
    make_barrier,
    micro_step_rows,
)
from .prepare import load_image_segments

STUDENT, TARGET = "student.", "target."  # weight groups of a distillation checkpoint


@dataclass
class DistillBatch:
    """One micro-batch of distillation: the training draws plus what the teacher's solve reads."""

    batch: TrainBatch  # z_0, ε, the drawn t, captions and image strength, as `melfusion train` draws them
    guidance: torch.Tensor  # (B,) w ~ U[min, max]
    path: torch.Tensor  # (substeps + 1, B) the teacher's timesteps from t (on the grid) down to u
    jump_to: torch.Tensor  # (B,) s, the grid point the jump ends at
    path_segments: torch.Tensor  # (substeps + 1)·B rows of cached SD latents around each path timestep


class ConsistencyTargets:
    """The frozen side of a step: the guided teacher's solve from t to u, then the target network's jump to s."""

    def __init__(self, pipe: MelFusionPipeline, target_unet, image_key_values: ImageKeyValues, config: DistillConfig,
                 autocast: Callable):  # fmt: skip
        self.pipe, self.config, self.autocast = pipe, config, autocast
        self.teacher = SynapseDenoiser(pipe.music_unet, pipe.synapse)
        self.target = SynapseDenoiser(target_unet, pipe.synapse)
        self.image_key_values = image_key_values
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.grid = torch.cat([torch.zeros(1, dtype=torch.long), pipe.timestep_grid(config.teacher_steps).flip(0)])

    def timesteps(self, drawn: torch.Tensor, jump: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(t, u, s) per row: t the grid point at or above the drawn timestep (a uniform draw over [0, T) picks
        each grid step in proportion to its span), u the point below it (0 under the lowest), s a grid point
        in [0, u] picked by `jump` ∈ [0, 1) — always 0 for `endpoint` targets (LCM)."""
        above = torch.searchsorted(self.grid, drawn).clamp(1, len(self.grid) - 1)
        below = (jump * above).long() if self.config.targets == "trajectory" else torch.zeros_like(above)
        return self.grid[above], self.grid[above - 1], self.grid[below]

    def draw(
        self, batch: TrainBatch, guidance: torch.Tensor, jump: torch.Tensor,
        segments_at: Callable[[torch.Tensor], torch.Tensor],
    ) -> DistillBatch:  # fmt: skip
        """Step 2's timesteps for the (B,) per-row draws, and the cached image latents the solve from t to u
        reads: `segments_at(timesteps)` gives each row's segment around its timestep (`ImageKeyValues`), for
        the path's timesteps of all rows at once, path point after path point. A path leaves the segment of
        the drawn t (t moves up to the grid, the solve goes down to u), so it reads segments of its own."""
        t, u, s = self.timesteps(batch.timesteps, jump)
        substeps = self.config.teacher_substeps
        path = torch.stack([t - torch.div((t - u) * j, substeps, rounding_mode="floor") for j in range(substeps + 1)])
        return DistillBatch(batch, guidance, path, s, segments_at(path.flatten()))

    def loss(self, model: torch.nn.Module, drawn: DistillBatch) -> torch.Tensor:
        """Steps 2-4 of the module docstring on one micro-batch."""
        pipe, config, batch, guidance = self.pipe, self.config, drawn.batch, drawn.guidance
        device, rows, substeps = pipe.music_unet.device, len(batch.captions), config.teacher_substeps
        path = list(drawn.path)  # t … u
        t, u, s = path[0], path[-1], drawn.jump_to
        x = x_t = self.noise_scheduler.add_noise(batch.latents, batch.noise, t).to(device)
        strength = batch.image_strength.to(device)
        condition = guidance_embedding(guidance, config.guidance_embedding_dim).to(device)
        w = guidance.to(device).view(-1, *[1] * (x_t.dim() - 1))
        t, u, s = t.to(device), u.to(device), s.to(device)
        with torch.no_grad():
            # ["", …] + captions
            text_states, text_mask = pipe.encode_captions(batch.captions, [""] * rows)
            states, mask = text_states[rows:], text_mask[rows:]
            # the image K/V at every timestep of the path, in one SD batch: path[j] is rows j·B … (j+1)·B − 1
            features = self.image_key_values(drawn.path_segments, drawn.path.flatten())
            at = lambda j: features_rows(features, slice(j * rows, (j + 1) * rows))
            with self.autocast():
                for j in range(substeps):  # the guided teacher's DDIM steps from t to u
                    here, there = path[j].to(device), path[j + 1].to(device)
                    both = self.teacher(torch.cat([x] * 2), torch.cat([here] * 2), text_states, text_mask, at(j),
                                        torch.cat([torch.zeros_like(strength), strength])).float()  # fmt: skip
                    uncond, cond = both.chunk(2)
                    x = ddim_step(self.noise_scheduler, uncond + w * (cond - uncond), x, here, there)
                target_output = self.target(x, u, states, mask, at(substeps), strength, condition).float()
            target = ddim_step(self.noise_scheduler, target_output, x, u, s)  # f⁻(x̂_u, u → s)
        output = model(x_t, t, states, mask, at(0), strength, condition).float()
        online = ddim_step(self.noise_scheduler, output, x_t, t, s)  # f_θ(x_t, t → s)
        if config.loss == "l2":
            return F.mse_loss(online, target)
        return (((online - target) ** 2 + config.huber_c**2).sqrt() - config.huber_c).mean()


def features_rows(features: ImageFeatures, rows: slice) -> ImageFeatures:
    """The K/V of some rows of a one-pseudo-step ImageFeatures (keys and values are (1, B, N, D))."""
    pick = lambda tensors: {site: tensor[:, rows] for site, tensor in tensors.items()}
    return ImageFeatures(features.timesteps[rows], pick(features.keys), pick(features.values))


def draw_rows(generators: list[torch.Generator], config: DistillConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) guidance scales w ~ U[min, max] and jump fractions ~ U[0, 1), from each row's generator after the
    draws `draw_batch` made from it."""
    draws = torch.stack([torch.rand(2, generator=generator) for generator in generators])  # (B, 2)
    return config.guidance_min + (config.guidance_max - config.guidance_min) * draws[:, 0], draws[:, 1]


def write_student_bundle(
    teacher: Path, student_unet, out: Path, *, teacher_steps: int, default_steps: int, max_steps: int, origin: dict
) -> Path:  # fmt: skip
    """A student bundle: `student_unet` and an LCMScheduler with every other file of the `teacher` bundle
    (its own files: training ran parts of it in half precision), defaults and bounds for few steps."""
    export = load_pipeline(teacher)
    scheduler = student_scheduler(export.scheduler.config, teacher_steps)
    export.register_modules(music_unet=student_unet, scheduler=scheduler)
    export.register_to_config(default_steps=default_steps, max_steps=max_steps)
    return save_bundle(export, out, source="melfusion-distill", origin=origin)


def export_student(config: DistillConfig, student_unet, step: int, world: int) -> Path:
    """The student bundle, its manifest's `origin` naming the teacher and the distillation settings."""
    teacher = config.train.bundle
    origin = {
        "teacher": {"bundle": str(teacher.resolve()), "manifest_sha256": file_sha256(teacher / "manifest.json"),
                    "source": read_manifest(teacher)["source"]},
        "distillation": {**config.settings, "steps": step, "processes": world},
    }  # fmt: skip
    return write_student_bundle(teacher, student_unet, config.train.out, teacher_steps=config.teacher_steps,
                                default_steps=config.student_steps, max_steps=config.max_student_steps,
                                origin=origin)  # fmt: skip


def few_step_distances(
    teacher: MelFusionPipeline, student: MelFusionPipeline, captions: list[str], images: list | None, *,
    seeds: list[int], steps: tuple[int, ...] = (1, 2, 4, 8), reference_steps: int = 50, guidance_scale: float,
    seconds: float,
) -> dict[int, tuple[float, float]]:  # fmt: skip
    """For each step count n: the mean L2 distance of the student's n-step clips (its default sampler) and of the
    teacher's n-step DDIM clips from the teacher's `reference_steps`-step DDIM clips of the same seeds — how much
    of the teacher's many-step result each keeps in n steps. On random weights this measures the distillation,
    not the music: quality needs real weights and `melfusion eval`."""
    run = lambda pipe, n, scheduler: pipe(captions, images, seconds=seconds, num_inference_steps=n, scheduler=scheduler,
                                          guidance_scale=guidance_scale, seed=seeds).audios  # fmt: skip
    reference = run(teacher, reference_steps, "ddim")
    distance = lambda clips: float(np.linalg.norm(clips - reference, axis=-1).mean())
    return {n: (distance(run(student, n, None)), distance(run(teacher, n, "ddim"))) for n in steps}


def save_state(config: DistillConfig, step: int, student_unet, target_unet, optimizer, scaler) -> Path:
    """Student, target network, optimiser and scaler: all an exact resume needs besides the config's seed."""
    weights = {STUDENT + k: v for k, v in student_unet.state_dict().items()}
    weights |= {TARGET + k: v for k, v in target_unet.state_dict().items()}
    trainer = {
        "config": {"distill": {k: v for k, v in vars(config).items() if k != "train"}, "train": vars(config.train)},
        "step": step,
        "optimizer": optimizer.state_dict(),
        "scaler": None if scaler is None else scaler.state_dict(),
        "rng": {"seed": config.train.seed, "torch": torch.get_rng_state()},
    }
    return write_checkpoint(checkpoint_path(config.train, step), weights, trainer)


def distill(config: DistillConfig) -> TrainResult:
    """Distil, checkpoint every `checkpoint_every` steps and at the end, export the student to `config.train.out`."""
    settings = config.train
    config.check()
    # 1. Processes, devices, precision and accumulation: Accelerate's business, as in `melfusion train`
    accelerator = make_accelerator(settings)
    barrier = make_barrier(accelerator, settings)  # long waits (cache fill, checkpoints) apart from the collectives
    rank, world = accelerator.process_index, accelerator.num_processes

    # 2. The teacher (bundle UNet + synapse, frozen), the student and its target network, or their checkpoint
    pipe = load_pipeline(settings.bundle, device=accelerator.device)
    pipe.set_progress_bar_config(disable=True)
    if pipe.is_student:
        raise InputError("teacher", f"{settings.bundle} is already a distilled student; distil from its teacher")
    if pipe.scheduler.config.num_train_timesteps % config.teacher_steps:  # LCM's grid is then the trailing grid
        raise InputError("teacher-steps", f"must divide the teacher's {pipe.scheduler.config.num_train_timesteps} "
                         f"training timesteps, got {config.teacher_steps}")  # fmt: skip
    if pipe.scheduler.config.prediction_type not in ("epsilon", "v_prediction"):
        raise InputError("teacher", f"prediction type {pipe.scheduler.config.prediction_type!r}: distillation "
                         "supports epsilon and v_prediction")  # fmt: skip
    pipe.music_unet.requires_grad_(False).eval()
    pipe.synapse.requires_grad_(False)
    student_unet = student_unet_from(pipe.music_unet, config.guidance_embedding_dim).train()
    target_unet = student_unet_from(pipe.music_unet, config.guidance_embedding_dim).requires_grad_(False).eval()
    resumed = load_trainer_state(settings.resume, made_by="distill") if settings.resume else None
    if resumed is not None:
        load_weights(settings.resume, {STUDENT: student_unet, TARGET: target_unet}, device=str(accelerator.device))
        torch.set_rng_state(resumed["rng"]["torch"])
    step = resumed["step"] if resumed else 0

    # 3. Data: the training cache (image trajectories, clip posteriors), then the SD VAE and CLIP leave the GPU
    examples = encode_data(pipe, settings, accelerator, barrier)
    image_key_values = ImageKeyValues(pipe, pipe.synapse, settings.feature_steps)
    pipe.image_vae.to("cpu")
    pipe.image_text_encoder.to("cpu")

    # 4. Optimiser on the student alone
    optimizer = torch.optim.AdamW(student_unet.parameters(), lr=settings.unet_lr, weight_decay=settings.weight_decay)
    if resumed is not None:
        optimizer.load_state_dict(resumed["optimizer"])
    model, optimizer = accelerator.prepare(SynapseDenoiser(student_unet, pipe.synapse), optimizer)
    if resumed is not None and accelerator.scaler is not None and resumed["scaler"] is not None:
        accelerator.scaler.load_state_dict(resumed["scaler"])
    targets = ConsistencyTargets(pipe, target_unet, image_key_values, config, accelerator.autocast)
    dropout = Dropout(image=config.image_dropout)

    def read_batch(micro_step: int) -> DistillBatch:  # a pure function of the micro-step, as Prefetcher needs
        rows, generators = micro_step_rows(examples, settings, micro_step, rank, world)
        batch = draw_batch(pipe, rows, generators, dropout, image_key_values.grid)
        segments_at = lambda timesteps: load_image_segments(  # noqa: E731
            rows * (config.teacher_substeps + 1), grid_segments(image_key_values.grid, timesteps))
        return targets.draw(batch, *draw_rows(generators, config), segments_at)

    # 5. The loop: one optimiser step per `gradient_accumulation` micro-batches, then the target follows
    result = TrainResult(bundle=settings.out, step=step)
    log = LossLog(settings.work_dir / "loss.csv", 0, append=resumed is not None, enabled=accelerator.is_main_process)
    bar = tqdm(total=settings.max_steps, initial=step, desc="distilling", disable=not accelerator.is_main_process)
    accumulation = settings.gradient_accumulation
    with contextlib.closing(Prefetcher(read_batch, end=settings.max_steps * accumulation)) as batches:
        while step < settings.max_steps:
            started, losses = time.perf_counter(), []
            for micro in range(accumulation):
                drawn = batches(step * accumulation + micro)
                with accelerator.accumulate(model):
                    loss = targets.loss(model, drawn)
                    accelerator.backward(loss)
                    optimizer.step()  # Accelerate holds it back until the last micro-batch
                    optimizer.zero_grad()
                    if accelerator.sync_gradients:  # θ⁻ ← μ·θ⁻ + (1 − μ)·θ
                        torch._foreach_lerp_(list(target_unet.parameters()), list(student_unet.parameters()),
                                             1 - config.ema_decay)  # fmt: skip
                losses.append(accelerator.gather(loss.detach()[None]).mean().item())
            step += 1
            result.losses.append(sum(losses) / len(losses))
            log.write(step, result.losses[-1], time.perf_counter() - started, torch.empty(0))
            bar.update()
            bar.set_postfix(loss=f"{result.losses[-1]:.4f}")
            if step % settings.checkpoint_every == 0 or step == settings.max_steps:
                if accelerator.is_main_process:
                    result.checkpoints.append(save_state(config, step, student_unet, target_unet, optimizer,
                                                         accelerator.scaler))  # fmt: skip
                    prune_checkpoints(settings)
                barrier()
    bar.close()

    # 6. Export: the student with the teacher's other parts, a bundle a worker serves as it is
    result.step = step
    if accelerator.is_main_process:
        export_student(config, student_unet, step, world)
    barrier()
    if result.losses:
        accelerator.print(f"distilled {len(result.losses)} steps to step {step}: "
                          f"loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f}")  # fmt: skip
    accelerator.print(f"wrote student bundle {settings.out.resolve()}; "
                      f"log and checkpoints in {settings.work_dir.resolve()}")  # fmt: skip
    return result
