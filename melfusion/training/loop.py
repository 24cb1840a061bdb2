"""The training loop of Algorithm 1 (paper section 3.2-3.3), run by Hugging Face Accelerate.

`python -m melfusion.cli train ...` runs one process (CPU here); `accelerate launch -m melfusion.cli train ...`
runs the same code on several GPUs or machines, with mixed precision and gradient accumulation.
"""

from __future__ import annotations

import csv
import functools
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers import DDPMScheduler
from tqdm.auto import tqdm

from ..bundle import load_pipeline, save_bundle
from ..dataset.manifest import read_triplets
from ..errors import InputError
from ..pipeline import MelFusionPipeline
from ..synapse import VisualSynapse
from .checkpoint import checkpoint_path, load_checkpoint, restore_weights, save_checkpoint
from .config import TrainConfig
from .denoiser import SynapseDenoiser
from .prepare import Example, frozen_fingerprint, load_features, load_latents, prepare_examples

NEW_SYNAPSE_ALPHA = 0.5  # a new layout starts mid-way; the paper's learned α are 0.37-0.63


@dataclass
class TrainResult:
    bundle: Path
    step: int
    losses: list[float] = field(default_factory=list)  # one per optimiser step run by this call
    checkpoints: list[Path] = field(default_factory=list)


def training_synapse(bundle_synapse: VisualSynapse, config: TrainConfig) -> VisualSynapse:
    """The bundle's synapse when the layout matches the config, else a new one in the asked layout."""
    same = tuple(bundle_synapse.config.blocks) == config.blocks and bundle_synapse.config.share_alpha == config.share_alpha
    if same and config.initial_alpha is None:
        synapse = bundle_synapse
    else:
        initial = NEW_SYNAPSE_ALPHA if config.initial_alpha is None else config.initial_alpha
        synapse = VisualSynapse(
            blocks=config.blocks,
            initial_alphas=(initial,),
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


def batch_examples(
    examples: list[Example], micro_step: int, batch_size: int, rank: int, world: int, seed: int
) -> list[Example]:
    """This process's share of micro-batch `micro_step`: a pure function of the step, hence exact resume."""
    start = (micro_step * world + rank) * batch_size
    return [examples[epoch_order(len(examples), p // len(examples), seed)[p % len(examples)]]
            for p in range(start, start + batch_size)]


def step_generator(seed: int, micro_step: int, rank: int) -> torch.Generator:
    """The generator for one micro-batch's draws (t, posterior sample, ε, CFG dropout)."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, micro_step, rank]).generate_state(1)[0]))


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


def diffusion_loss(
    pipe: MelFusionPipeline,
    model: torch.nn.Module,
    noise_scheduler: DDPMScheduler,
    grid: torch.Tensor,
    examples: list[Example],
    generator: torch.Generator,
    *,
    text_dropout: float = 0.0,
    image_dropout: float = 0.0,
) -> torch.Tensor:
    """Eq. 7 on one batch: MSE between the scheduler's target (ε, or v for v-prediction) and the model's output."""
    device, count = pipe.device, len(examples)
    # Training timesteps come from the grid the image features were captured on (see prepare.py).
    steps = torch.randint(len(grid), (count,), generator=generator)
    timesteps = grid[steps]
    mean, std = load_latents(examples)  # E^M(M): z_0 ~ posterior, drawn afresh each time
    latents = (mean + std * torch.randn(mean.shape, generator=generator)) * pipe.mel_vae.config.scaling_factor
    noise = torch.randn(latents.shape, generator=generator)  # ε_t^M (line 2)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    target = training_target(noise_scheduler, latents, noise, timesteps)
    # CFG dropout: a dropped caption takes the image with it (the unconditional branch sees neither)
    drop_text = torch.rand(count, generator=generator) < text_dropout
    drop_image = drop_text | (torch.rand(count, generator=generator) < image_dropout)
    with torch.no_grad():
        captions = ["" if drop else e.caption for drop, e in zip(drop_text.tolist(), examples)]
        text_states, text_mask = pipe.encode_captions(captions, with_unconditional=False)  # c (line 4)
    features = load_features(examples, steps.tolist(), timesteps).to(device)
    prediction = model(
        noisy.to(device), timesteps.to(device), text_states, text_mask, features, (~drop_image).float().to(device)
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


def train(config: TrainConfig) -> TrainResult:
    """Train, checkpoint every `checkpoint_every` steps and at the end, export the bundle to `config.out`."""
    # 1. Processes, devices, precision and accumulation: Accelerate's business
    accelerator = Accelerator(
        mixed_precision=config.mixed_precision, gradient_accumulation_steps=config.gradient_accumulation
    )
    rank, world = accelerator.process_index, accelerator.num_processes

    # 2. The bundle, the synapse to train, and the state to resume from
    pipe = load_pipeline(config.bundle, device=accelerator.device)
    pipe.set_progress_bar_config(disable=True)
    pipe.register_modules(synapse=training_synapse(pipe.synapse, config).to(accelerator.device))
    checkpoint = load_checkpoint(config.resume) if config.resume else None
    if checkpoint is not None:
        restore_weights(pipe, checkpoint)
    step = checkpoint["step"] if checkpoint else 0

    # 3. Data: read the manifest, encode images and clips once (the main process fills the cache)
    triplets = read_triplets(config.data)
    seconds = config.seconds or pipe.config.default_seconds
    with accelerator.main_process_first():
        examples = prepare_examples(
            pipe, triplets, fingerprint=frozen_fingerprint(config.bundle),
            cache_dir=config.cache_dir or config.work_dir / "cache", steps=config.feature_steps, seconds=seconds,
        )
    accelerator.print(triplets.summary())
    if not examples:
        raise InputError("data", f"{config.data}: no usable rows")

    # 4. Model and optimiser
    optimizer = make_optimizer(pipe, config)
    if checkpoint is not None:
        optimizer.load_state_dict(checkpoint["optimizer"])
    model, optimizer = accelerator.prepare(SynapseDenoiser(pipe.music_unet, pipe.synapse), optimizer)
    model.train()
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    grid = pipe.timestep_grid(config.feature_steps)

    # 5. The loop: Algorithm 1, one optimiser step per `gradient_accumulation` micro-batches
    result = TrainResult(bundle=config.out, step=step)
    log = LossLog(config.work_dir / "loss.csv", len(pipe.synapse.alphas), append=checkpoint is not None,
                  enabled=accelerator.is_main_process)
    bar = tqdm(total=config.max_steps, initial=step, desc="training", disable=not accelerator.is_main_process)
    while step < config.max_steps:
        started, losses = time.perf_counter(), []
        for micro in range(config.gradient_accumulation):
            micro_step = step * config.gradient_accumulation + micro
            batch = batch_examples(examples, micro_step, config.batch_size, rank, world, config.seed)
            with accelerator.accumulate(model):
                loss = diffusion_loss(
                    pipe, model, noise_scheduler, grid, batch, step_generator(config.seed, micro_step, rank),
                    text_dropout=config.text_dropout, image_dropout=config.image_dropout,
                )
                accelerator.backward(loss)
                optimizer.step()  # Accelerate holds it back until the last micro-batch
                optimizer.zero_grad()
            losses.append(accelerator.gather(loss.detach()[None]).mean().item())
        step += 1
        result.losses.append(sum(losses) / len(losses))
        log.write(step, result.losses[-1], time.perf_counter() - started, pipe.synapse.alphas.detach().cpu())
        bar.update()
        bar.set_postfix(loss=f"{result.losses[-1]:.4f}")
        if step % config.checkpoint_every == 0 or step == config.max_steps:
            if accelerator.is_main_process:
                path = checkpoint_path(config, step)
                result.checkpoints.append(save_checkpoint(path, config=config, step=step, pipe=pipe, optimizer=optimizer))
            accelerator.wait_for_everyone()
    bar.close()

    # 6. Export: the trained synapse and UNet with the frozen parts, a bundle a worker can serve
    result.step = step
    if accelerator.is_main_process:
        save_bundle(pipe, config.out, source="melfusion-train")
    accelerator.wait_for_everyone()
    if result.losses:
        accelerator.print(f"trained {len(result.losses)} steps to step {step}: "
                          f"loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f}")
    accelerator.print(f"wrote bundle {config.out.resolve()}; log and checkpoints in {config.work_dir.resolve()}")
    return result
