"""The training loop of Algorithm 1 (paper section 3.2-3.3), run by Hugging Face Accelerate.

`python -m melfusion.cli train ...` runs one process (CPU here); `accelerate launch -m melfusion.cli train ...`
runs the same code on several GPUs or machines, with mixed precision and gradient accumulation.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator, DistributedType
from accelerate.utils import InitProcessGroupKwargs
from diffusers import DDPMScheduler
from tqdm.auto import tqdm

from ..bundle import load_pipeline, save_bundle
from ..dataset.manifest import read_triplets
from ..errors import InputError
from ..launch import refuse_single_process_cpu_launch
from ..pipeline import MelFusionPipeline
from ..synapse import VisualSynapse
from .checkpoint import checkpoint_path, load_trainer_state, prune_checkpoints, restore_weights, save_checkpoint
from .config import TrainConfig
from .denoiser import SynapseDenoiser
from .image_side import ImageKeyValues, grid_segments
from .prepare import (
    Example,
    frozen_fingerprint,
    image_side_to,
    load_image_segments,
    load_posterior,
    prepare_examples,
)


@dataclass
class TrainResult:
    bundle: Path
    step: int
    losses: list[float] = field(default_factory=list)  # one per optimiser step run by this call
    checkpoints: list[Path] = field(default_factory=list)


def training_synapse(bundle_synapse: VisualSynapse, config: TrainConfig) -> VisualSynapse:
    """A synapse in the run's layout with every α at `initial_alpha`; with `initial_alpha` None, the bundle's own."""
    if config.initial_alpha is None:
        layout = (tuple(bundle_synapse.config.blocks), bundle_synapse.config.share_alpha)
        if layout != (config.blocks, config.share_alpha):
            raise InputError("initial_alpha", f"the bundle's α belong to blocks {list(layout[0])} (shared: {layout[1]}), "
                             f"not to this run's {list(config.blocks)} (shared: {config.share_alpha}); give a start value")
        synapse = bundle_synapse
    else:
        synapse = VisualSynapse(
            blocks=config.blocks,
            initial_alphas=(config.initial_alpha,),
            share_alpha=config.share_alpha,
            image_grid=bundle_synapse.config.image_grid,
            token_matching=bundle_synapse.config.token_matching,
        )
    if config.fix_alpha is not None:
        synapse.alphas.data.fill_(config.fix_alpha)
    return synapse


def make_optimizer(pipe: MelFusionPipeline, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW with two groups: α at its own lr without decay, the music UNet at the UNet lr."""
    pipe.synapse.alphas.requires_grad_(config.fix_alpha is None)
    pipe.music_unet.requires_grad_(not config.freeze_unet)
    groups = []
    if config.fix_alpha is None:
        groups.append({"params": [pipe.synapse.alphas], "lr": config.alpha_lr, "weight_decay": 0.0})
    if not config.freeze_unet:
        groups.append({"params": list(pipe.music_unet.parameters()), "lr": config.unet_lr,
                       "weight_decay": config.weight_decay})
    if not groups:
        raise InputError("config", "nothing to train: the UNet is frozen and α is fixed")
    return torch.optim.AdamW(groups)


@functools.lru_cache(maxsize=4)
def epoch_order(size: int, epoch: int, seed: int) -> list[int]:
    return torch.randperm(size, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()


def batch_positions(micro_step: int, batch_size: int, rank: int, world: int) -> range:
    """This process's rows of micro-batch `micro_step`, as positions in the endless shuffled stream."""
    start = (micro_step * world + rank) * batch_size
    return range(start, start + batch_size)


def batch_examples(examples: list[Example], positions: range, seed: int) -> list[Example]:
    """A pure function of the positions, hence exact resume."""
    return [examples[epoch_order(len(examples), p // len(examples), seed)[p % len(examples)]] for p in positions]


def micro_step_rows(
    examples: list[Example], config: TrainConfig, micro_step: int, rank: int, world: int
) -> tuple[list[Example], list[torch.Generator]]:
    """This process's rows of micro-batch `micro_step` and each row's generator (`draw_batch` draws from it
    first; `melfusion distill` goes on drawing from it)."""
    positions = batch_positions(micro_step, config.batch_size, rank, world)
    generators = [row_generator(config.seed, micro_step, position) for position in positions]
    return batch_examples(examples, positions, config.seed), generators


def row_generator(seed: int, micro_step: int, position: int) -> torch.Generator:
    """The generator for one row's draws (t, posterior sample, ε, CFG dropout).

    Keyed by the row's place in the stream, not by the process: N processes with batch B draw exactly
    what one process with batch N·B draws, so a run does not depend on how many GPUs it had.
    """
    state = np.random.SeedSequence([seed, micro_step, position]).generate_state(1)[0]
    return torch.Generator().manual_seed(int(state))


def training_target(
    noise_scheduler: DDPMScheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """What the UNet must predict: ε (the paper's eq. 7), or v = √ᾱ·ε − √(1−ᾱ)·z_0 for a v-prediction bundle."""
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    raise InputError("scheduler", f"training supports epsilon and v_prediction, not {prediction_type!r}")


@dataclass(frozen=True)
class Dropout:
    """Classifier-free-guidance dropout: which conditions a training row hides."""

    text: float = 0.0  # caption and image: the unconditional branch of image_guidance="conditional"
    caption: float = 0.0  # caption only, image kept: the unconditional branch of image_guidance="both"
    image: float = 0.0  # image only

    def draw(self, generator: torch.Generator) -> tuple[bool, bool]:
        """(drop the caption, drop the image) for one row; always three draws, so streams stay aligned."""
        text, caption, image = (torch.rand(3, generator=generator) < torch.tensor([self.text, self.caption, self.image])).tolist()
        return text or caption, text or image


@dataclass
class TrainBatch:
    """One micro-batch of Algorithm 1 as tensors (lines 3-6 drawn, line 7's image still a trajectory)."""

    captions: list[str]  # "" where dropped
    latents: torch.Tensor  # (B, C, T, F) z_0^M, a posterior sample, scaled
    noise: torch.Tensor  # (B, C, T, F) ε_t^M
    timesteps: torch.Tensor  # (B,) t ∈ [0, T), uniform (eq. 7)
    image_segments: torch.Tensor  # (B, 2, c, h, w) each image's cached SD latents at the grid points around t
    image_strength: torch.Tensor  # (B,) 1 where the row sees its image, 0 where it is dropped


def draw_batch(
    pipe: MelFusionPipeline,
    examples: list[Example],
    generators: list[torch.Generator],
    dropout: Dropout,
    image_grid: torch.Tensor,
) -> TrainBatch:
    """Make each row's random draws from its own generator and read what they need of the cache.

    `image_grid`: the cached trajectories' timesteps (`ImageKeyValues.grid`); of each trajectory only the
    two steps around the row's t are read.
    """
    num_timesteps = pipe.scheduler.config.num_train_timesteps
    captions, latents, noises, timesteps, strengths = [], [], [], [], []
    for example, generator in zip(examples, generators):
        timesteps.append(torch.randint(num_timesteps, (1,), generator=generator))  # t ~ U[1, T] (eq. 7)
        mean, std = load_posterior(example)  # E^M(M): z_0 ~ posterior, drawn afresh each time
        latents.append(mean + std * torch.randn(mean.shape, generator=generator))
        noises.append(torch.randn(mean.shape, generator=generator))  # ε_t^M (line 2)
        drop_caption, drop_image = dropout.draw(generator)
        captions.append("" if drop_caption else example.caption)
        strengths.append(0.0 if drop_image else 1.0)
    timesteps = torch.cat(timesteps)
    return TrainBatch(
        captions=captions,
        latents=torch.stack(latents) * pipe.mel_vae.config.scaling_factor,
        noise=torch.stack(noises),
        timesteps=timesteps,
        image_segments=load_image_segments(examples, grid_segments(image_grid, timesteps)),
        image_strength=torch.tensor(strengths),
    )


class Prefetcher:
    """Reads micro-batch m + 1 from the cache in a thread while micro-batch m trains.

    `read(m)` must be a pure function of m (draw_batch is), so prefetching never changes what is trained.
    """

    def __init__(self, read: Callable[[int], TrainBatch], end: int):
        self.read, self.end = read, end  # micro-steps past `end - 1` are never read
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="melfusion-prefetch")
        self.pending: dict[int, Future] = {}

    def __call__(self, micro_step: int) -> TrainBatch:
        future = self.pending.pop(micro_step, None) or self.pool.submit(self.read, micro_step)
        if micro_step + 1 < self.end:
            self.pending[micro_step + 1] = self.pool.submit(self.read, micro_step + 1)
        return future.result()

    def close(self) -> None:
        self.pool.shutdown(cancel_futures=True)


def diffusion_loss(
    pipe: MelFusionPipeline,
    model: torch.nn.Module,
    noise_scheduler: DDPMScheduler,
    image_key_values: ImageKeyValues,
    batch: TrainBatch,
) -> torch.Tensor:
    """Eq. 7 on one batch: MSE between the scheduler's target (ε, or v for v-prediction) and the model's output."""
    device = pipe.music_unet.device
    noisy = noise_scheduler.add_noise(batch.latents, batch.noise, batch.timesteps)  # z_t^M
    target = training_target(noise_scheduler, batch.latents, batch.noise, batch.timesteps)
    with torch.no_grad():
        text_states, text_mask = pipe.encode_captions(batch.captions)  # c (line 4)
    features = image_key_values(batch.image_segments, batch.timesteps)  # K_l^I, V_l^I at each row's t (line 7)
    prediction = model(
        noisy.to(device), batch.timesteps.to(device), text_states, text_mask, features, batch.image_strength.to(device)
    )
    return F.mse_loss(prediction.float(), target.to(device))


class LossLog:
    """CSV of step, loss, seconds per step and every α; appended to on resume, written by one process."""

    def __init__(self, path: Path, alpha_count: int, *, append: bool, enabled: bool):
        self.path, self.enabled = path, enabled
        if enabled and not (append and path.exists()):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(",".join(["step", "loss", "seconds", *(f"alpha_{i}" for i in range(alpha_count))]) + "\n")

    def write(self, step: int, loss: float, seconds: float, alphas: torch.Tensor) -> None:
        if self.enabled:
            with open(self.path, "a", newline="") as handle:
                csv.writer(handle).writerow([step, f"{loss:.6f}", f"{seconds:.3f}", *(f"{a:.6f}" for a in alphas.tolist())])


def check_backend(accelerator: Accelerator) -> None:
    """Single process and DDP (GPUs over NCCL, CPUs over gloo) hold the whole model in every process, which
    checkpoints and export assume; sharding back ends would need their own gather and are refused."""
    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM):
        raise InputError("accelerate", f"{accelerator.distributed_type.value} is not supported; use DDP (multi-GPU)")


def image_dtype(config: TrainConfig, device: torch.device) -> torch.dtype:
    if config.image_dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, config.image_dtype)


def make_accelerator(config: TrainConfig) -> Accelerator:
    """Accelerate's processes, whose collectives (the training all-reduces) time out after `collective_timeout_minutes`."""
    refuse_single_process_cpu_launch()
    timeout = InitProcessGroupKwargs(timeout=timedelta(minutes=config.collective_timeout_minutes))
    accelerator = Accelerator(
        mixed_precision=config.mixed_precision, gradient_accumulation_steps=config.gradient_accumulation,
        kwargs_handlers=[timeout], cpu=not torch.cuda.is_available(),  # several CPU processes: DDP over gloo
    )
    check_backend(accelerator)
    return accelerator


def make_barrier(accelerator: Accelerator, config: TrainConfig) -> Callable[[], None]:
    """Wait for every process, for up to `barrier_timeout_minutes`, on a gloo group of its own.

    A cache fill or a 10 GB checkpoint write keeps the other processes waiting for hours or minutes; a
    training all-reduce never should. One timeout for both let a wedged process hold every GPU for the
    barrier's 3 hours; with the group apart, the training collectives keep their own short timeout.
    Every process must call this at the same point (it creates a process group).
    """
    if accelerator.num_processes == 1:
        return lambda: None
    group = torch.distributed.new_group(backend="gloo", timeout=timedelta(minutes=config.barrier_timeout_minutes))
    return functools.partial(torch.distributed.barrier, group=group)


def encode_data(
    pipe: MelFusionPipeline, config: TrainConfig, accelerator: Accelerator, barrier: Callable[[], None] | None = None
) -> list[Example]:
    """Algorithm 1's frozen encoders over the data set, split across the processes (a filled cache is free)."""
    barrier = barrier or make_barrier(accelerator, config)
    triplets = read_triplets(config.data)
    image_side_to(pipe, accelerator.device, image_dtype(config, accelerator.device))
    examples = prepare_examples(
        pipe, triplets, fingerprint=frozen_fingerprint(config.bundle), cache_dir=config.cache,
        steps=config.feature_steps, seconds=config.seconds or pipe.config.default_seconds,
        batch_size=config.encode_batch_size, rank=accelerator.process_index, world=accelerator.num_processes,
        wait_for_everyone=barrier, log=accelerator.print,
    )
    accelerator.print(triplets.summary())
    if not examples:
        raise InputError("data", f"{config.data}: no usable rows")
    return examples


def encode(config: TrainConfig) -> list[Example]:
    """Fill the cache without training (`melfusion encode`): the same processes, shards and files."""
    accelerator = make_accelerator(config)
    barrier = make_barrier(accelerator, config)
    pipe = load_pipeline(config.bundle, device=accelerator.device)
    pipe.set_progress_bar_config(disable=True)
    return encode_data(pipe, config, accelerator, barrier)


def export_bundle(config: TrainConfig, pipe: MelFusionPipeline) -> None:
    """The trained synapse and UNet with the bundle's own frozen files (the SD side ran in half precision)."""
    export = load_pipeline(config.bundle)
    export.register_modules(music_unet=pipe.music_unet, synapse=pipe.synapse)
    save_bundle(export, config.out, source="melfusion-train")


def train(config: TrainConfig) -> TrainResult:
    """Train, checkpoint every `checkpoint_every` steps and at the end, export the bundle to `config.out`."""
    # 1. Processes, devices, precision and accumulation: Accelerate's business
    accelerator = make_accelerator(config)
    barrier = make_barrier(accelerator, config)  # long waits (cache fill, checkpoints) apart from the collectives
    rank, world = accelerator.process_index, accelerator.num_processes

    # 2. The bundle, the synapse to train, and the state to resume from
    pipe = load_pipeline(config.bundle, device=accelerator.device)
    pipe.set_progress_bar_config(disable=True)
    pipe.register_modules(synapse=training_synapse(pipe.synapse, config).to(accelerator.device))
    resumed = load_trainer_state(config.resume, made_by="train") if config.resume else None
    if resumed is not None:
        restore_weights(pipe, config.resume, resumed)
    step = resumed["step"] if resumed else 0

    # 3. Data: every process encodes its share of the images and clips, then the SD VAE and CLIP leave the GPU
    examples = encode_data(pipe, config, accelerator, barrier)
    max_steps = config.steps_for(len(examples), world)
    if config.epochs is not None:
        accelerator.print(f"{config.epochs:g} epochs of {len(examples)} rows in steps of {world} process(es) x "
                          f"{config.batch_size} rows x {config.gradient_accumulation} micro-batches: {max_steps} steps")
    image_key_values = ImageKeyValues(pipe, pipe.synapse, config.feature_steps)  # keeps CLIP's "" embedding
    pipe.image_vae.to("cpu")
    pipe.image_text_encoder.to("cpu")

    # 4. Model and optimiser
    optimizer = make_optimizer(pipe, config)
    if resumed is not None:
        optimizer.load_state_dict(resumed["optimizer"])
    model, optimizer = accelerator.prepare(SynapseDenoiser(pipe.music_unet, pipe.synapse), optimizer)
    if resumed is not None and accelerator.scaler is not None and resumed["scaler"] is not None:
        accelerator.scaler.load_state_dict(resumed["scaler"])
    model.train()
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    dropout = Dropout(text=config.text_dropout, caption=config.caption_dropout, image=config.image_dropout)

    def read_batch(micro_step: int) -> TrainBatch:
        return draw_batch(pipe, *micro_step_rows(examples, config, micro_step, rank, world), dropout,
                          image_key_values.grid)

    # 5. The loop: Algorithm 1, one optimiser step per `gradient_accumulation` micro-batches
    result = TrainResult(bundle=config.out, step=step)
    log = LossLog(config.work_dir / "loss.csv", len(pipe.synapse.alphas), append=resumed is not None,
                  enabled=accelerator.is_main_process)
    bar = tqdm(total=max_steps, initial=step, desc="training", disable=not accelerator.is_main_process)
    with contextlib.closing(Prefetcher(read_batch, end=max_steps * config.gradient_accumulation)) as batches:
        while step < max_steps:
            started, losses = time.perf_counter(), []
            for micro in range(config.gradient_accumulation):
                batch = batches(step * config.gradient_accumulation + micro)
                with accelerator.accumulate(model):
                    loss = diffusion_loss(pipe, model, noise_scheduler, image_key_values, batch)
                    accelerator.backward(loss)
                    optimizer.step()  # Accelerate holds it back until the last micro-batch
                    optimizer.zero_grad()
                    pipe.synapse.alphas.data.clamp_(0.0, 1.0)  # projected step: α stays where eq. 5 is convex
                losses.append(accelerator.gather(loss.detach()[None]).mean().item())
            step += 1
            result.losses.append(sum(losses) / len(losses))
            log.write(step, result.losses[-1], time.perf_counter() - started, pipe.synapse.alphas.detach().cpu())
            bar.update()
            bar.set_postfix(loss=f"{result.losses[-1]:.4f}")
            if step % config.checkpoint_every == 0 or step == max_steps:
                if accelerator.is_main_process:
                    path = checkpoint_path(config, step)
                    result.checkpoints.append(save_checkpoint(
                        path, config=config, step=step, pipe=pipe, optimizer=optimizer, scaler=accelerator.scaler))
                    prune_checkpoints(config)
                barrier()
    bar.close()

    # 6. Export: the trained synapse and UNet with the frozen parts, a bundle a worker can serve
    result.step = step
    if accelerator.is_main_process:
        export_bundle(config, pipe)
    barrier()
    if result.losses:
        accelerator.print(f"trained {len(result.losses)} steps to step {step}: "
                          f"loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f}")
    accelerator.print(f"wrote bundle {config.out.resolve()}; log and checkpoints in {config.work_dir.resolve()}")
    return result
