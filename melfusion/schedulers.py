"""DDIM sampling and DDIM inversion that step from each grid point to the next one, on any grid.

diffusers' `DDIMScheduler.step` and `DDIMInverseScheduler.step` find the other end of a step as
t ∓ num_train_timesteps // num_inference_steps, which is right only on an evenly spaced grid. The
"trailing" grid the pipeline walks is uneven for most step counts (400 steps over 1000 timesteps: strides
of 2 and 3; 7 steps: 142 and 143), so on those grids half the steps landed on a noise level the sample was
not at (diffusers issue #12633), the paper preset's 400 steps among them. These subclasses look the
neighbour up in their own `timesteps` instead. Everything else (betas, `prediction_type`, `set_timesteps`,
configs) is diffusers'; the bundle still stores the stock classes, and the pipeline builds these from their
configs for each generation.
"""

from __future__ import annotations

import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler
from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput


def grid_index(timesteps: torch.Tensor, timestep: int | torch.Tensor) -> int:
    """Where `timestep` sits in a scheduler's grid; a timestep off the grid is an error, not a guess."""
    matches = (timesteps == timestep).nonzero()
    if len(matches) != 1:
        raise ValueError(f"timestep {int(timestep)} is not on this scheduler's grid of {len(timesteps)} steps")
    return int(matches[0, 0])


def ddim_move(
    scheduler, model_output: torch.Tensor, sample: torch.Tensor, alpha_from: torch.Tensor, alpha_to: torch.Tensor
) -> DDIMSchedulerOutput:
    """Deterministic DDIM (eq. 12 of Song et al., η = 0) from noise level ᾱ_from to ᾱ_to.

    The model output is read per the scheduler's `prediction_type`; x̂_0 is clipped or thresholded as
    the scheduler's config says, as diffusers' DDIM does.
    """
    beta_from = 1 - alpha_from
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        original = (sample - beta_from.sqrt() * model_output) / alpha_from.sqrt()
        noise = model_output
    elif kind == "sample":
        original = model_output
        noise = (sample - alpha_from.sqrt() * original) / beta_from.sqrt()
    elif kind == "v_prediction":
        original = alpha_from.sqrt() * sample - beta_from.sqrt() * model_output
        noise = alpha_from.sqrt() * model_output + beta_from.sqrt() * sample
    else:
        raise ValueError(f"prediction_type {kind!r}: DDIM reads epsilon, sample or v_prediction")
    if scheduler.config.get("thresholding"):
        original = scheduler._threshold_sample(original)
    elif scheduler.config.clip_sample:
        original = original.clamp(-scheduler.config.clip_sample_range, scheduler.config.clip_sample_range)
    return DDIMSchedulerOutput(prev_sample=alpha_to.sqrt() * original + (1 - alpha_to).sqrt() * noise,
                               pred_original_sample=original)  # fmt: skip


class _GridStepping:
    """`step` for both directions: the two noise levels of grid step `index` come from `levels`."""

    def levels(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True):
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps before step")
        output = ddim_move(self, model_output, sample, *self.levels(grid_index(self.timesteps, timestep)))
        return output if return_dict else (output.prev_sample, output.pred_original_sample)


class GridDDIMScheduler(_GridStepping, DDIMScheduler):
    """DDIM sampling: step i goes from `timesteps[i]` to `timesteps[i + 1]`, the last one to ᾱ_final."""

    def levels(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        last = index + 1 == len(self.timesteps)
        alpha_to = self.final_alpha_cumprod if last else self.alphas_cumprod[self.timesteps[index + 1]]
        return self.alphas_cumprod[self.timesteps[index]], alpha_to


class GridDDIMInverseScheduler(_GridStepping, DDIMInverseScheduler):
    """DDIM inversion: the step at `timesteps[i]` goes from `timesteps[i - 1]` (ᾱ_initial for the first) to it.

    As in diffusers' inversion, the model output is the one predicted at `timesteps[i]` for the sample at
    the previous grid point.
    """

    def levels(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        alpha_from = self.initial_alpha_cumprod if index == 0 else self.alphas_cumprod[self.timesteps[index - 1]]
        return alpha_from, self.alphas_cumprod[self.timesteps[index]]
