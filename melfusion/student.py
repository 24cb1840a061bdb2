"""The few-step student: a music UNet distilled from the bundle's guided sampler (latent consistency).

A student bundle is a teacher bundle whose `music_unet` was trained by `melfusion distill` to jump from any
point of the teacher's guided ODE to any earlier point on it in one call (trajectory consistency, TCD, Zheng
et al. 2024; the jump to the end alone is latent consistency, LCM, Luo et al. 2023, and ConsistencyTTA on
TANGO's UNet), and whose `scheduler` is an `LCMScheduler`. Classifier-free
guidance is folded in: the student reads the guidance scale as an input through diffusers' time-condition
projection (`UNet2DConditionModel(time_cond_proj_dim=…)` + `timestep_cond`), so one network call per step
serves any scale, with no unconditional batch. Everything else (image side, synapse, T5, mel VAE, vocoder)
is the teacher's. What a bundle is follows from its scheduler class: an `LCMScheduler` makes a student.

This module holds what sampling (`MelFusionPipeline`) and distillation (`training/distill.py`) must agree
on: the guidance embedding, the student's jump f(x_t, t → s) (a DDIM step along its own prediction), and
how a student UNet and its scheduler are made from the teacher's.
"""

from __future__ import annotations

import torch
from diffusers import LCMScheduler, UNet2DConditionModel
from diffusers.models.embeddings import get_timestep_embedding

from .schedulers import ddim_move

GUIDANCE_EMBEDDING_DIM = 256  # LCM's choice for SD's UNet; the projection adds 256 × block_out_channels[0] weights
TIMESTEP_SCALING = 10.0  # LCMScheduler's default: its f(x_t, t) is the UNet's x̂_0 for t ≥ 1, x_t itself at t = 0


def is_student_unet(unet: UNet2DConditionModel) -> bool:
    return unet.config.time_cond_proj_dim is not None


def guidance_embedding(guidance_scale: torch.Tensor, dim: int) -> torch.Tensor:
    """(B, dim) sinusoidal embedding of w = guidance − 1 (LCM's convention: the CFG scale of
    `uncond + g·(cond − uncond)` is 1 + w, so w = 0 is the plain conditional model), scaled by 1000 like a
    timestep."""
    w = (guidance_scale.float() - 1.0) * 1000.0
    return get_timestep_embedding(w, dim, flip_sin_to_cos=False, downscale_freq_shift=1)


def student_unet_from(teacher: UNet2DConditionModel, dim: int = GUIDANCE_EMBEDDING_DIM) -> UNet2DConditionModel:
    """The teacher's UNet with a guidance input whose projection starts at zero, so that before any training
    the student computes exactly what the teacher computes."""
    student = UNet2DConditionModel.from_config(teacher.config, time_cond_proj_dim=dim)
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    if unexpected or missing != ["time_embedding.cond_proj.weight"]:
        raise ValueError(f"teacher and student UNets differ beyond the guidance projection: {missing}, {unexpected}")
    with torch.no_grad():
        student.time_embedding.cond_proj.weight.zero_()
    if student.dtype != teacher.dtype:
        student.to(teacher.dtype)
    return student.to(teacher.device)


def student_scheduler(teacher_config, teacher_steps: int) -> LCMScheduler:
    """The teacher's noise schedule and prediction type as an LCMScheduler whose `original_inference_steps` is
    the distillation grid (the trailing grid of `teacher_steps`; LCMScheduler warns when a sampling grid
    leaves it)."""
    return LCMScheduler.from_config(
        teacher_config, original_inference_steps=teacher_steps, timestep_scaling=TIMESTEP_SCALING
    )


def ddim_step(
    scheduler, prediction: torch.Tensor, sample: torch.Tensor, t: torch.Tensor, s: torch.Tensor
) -> torch.Tensor:
    """x_s from x_t along the prediction made at t, one (t, s) per row (any t ≥ s ≥ 0): `ddim_move` on the
    rows' noise levels of `scheduler` (its betas and prediction type).

    It is the teacher's ODE step in distillation, and the student's jump
    f(x_t, t → s) = √ᾱ_s·x̂_0 + √(1−ᾱ_s)·ε̂ both in distillation and when it samples ("tcd", TCDScheduler with γ = 0, takes exactly this step)."""
    shape = (-1,) + (1,) * (sample.dim() - 1)
    alphas = scheduler.alphas_cumprod.to(sample.device)
    return ddim_move(scheduler, prediction, sample, alphas[t].view(shape), alphas[s].view(shape)).prev_sample
