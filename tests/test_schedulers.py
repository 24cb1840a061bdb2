"""DDIM sampling and inversion go from each grid point to the next, for every step count (diffusers #12633).

Each step is given z = √ᾱ·x_0 + √(1−ᾱ)·ε at the grid point it should start from and the exact model output
for the one-point data set {x_0} (the true ε, or v). A DDIM step that starts from that level recovers x_0
exactly and lands exactly on √ᾱ_next·x_0 + √(1−ᾱ_next)·ε: checking that pins both ends of every step to
the grid (a step that assumed another starting level gets x̂_0 wrong, one that goes elsewhere lands elsewhere).
Stock diffusers fails this on every uneven grid below (7, 300, 400, 600, 999 steps).
"""

from __future__ import annotations

import pytest
import torch

from melfusion.schedulers import GridDDIMInverseScheduler, GridDDIMScheduler

STEP_COUNTS = (1, 7, 50, 100, 200, 300, 400, 600, 999)


def noised(x_0: torch.Tensor, noise: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    alpha = alpha.double()
    return alpha.sqrt() * x_0 + (1 - alpha).sqrt() * noise


def oracle(kind: str, x_0: torch.Tensor, noise: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """The exact model output at noise level `alpha` for the one-point data set {x_0}."""
    alpha = alpha.double()
    return noise if kind == "epsilon" else alpha.sqrt() * noise - (1 - alpha).sqrt() * x_0


@pytest.fixture(scope="module")
def x_0_and_noise() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(2, 4, 8, 8, generator=generator, dtype=torch.float64), torch.randn(
        2, 4, 8, 8, generator=generator, dtype=torch.float64
    )


def assert_at_level(latents: torch.Tensor, expected: torch.Tensor, step: int, where: str) -> None:
    """Up to float32 rounding (the schedulers keep ᾱ in float32); a step off by one timestep misses by > 1e-4."""
    error = (latents - expected).abs().max().item()
    assert error < 1e-5, f"step {step}: not at {where} (max error {error:.2e})"


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("steps", STEP_COUNTS)
def test_sampling_steps_from_each_grid_point_to_the_next(pipe, x_0_and_noise, steps, prediction_type):
    x_0, noise = x_0_and_noise
    scheduler = pipe.make_scheduler("ddim", pipe.timestep_grid(steps))
    scheduler = type(scheduler).from_config(scheduler.config, prediction_type=prediction_type)  # TANGO: v
    scheduler.set_timesteps(steps)
    assert isinstance(scheduler, GridDDIMScheduler)
    grid = scheduler.timesteps
    assert len(grid) == steps and torch.equal(grid, pipe.timestep_grid(steps))
    alphas = scheduler.alphas_cumprod
    for i, t in enumerate(grid):
        latents = noised(x_0, noise, alphas[t])
        latents = scheduler.step(oracle(prediction_type, x_0, noise, alphas[t]), t, latents).prev_sample
        last = i + 1 == len(grid)
        target = scheduler.final_alpha_cumprod if last else alphas[grid[i + 1]]
        assert_at_level(latents, noised(x_0, noise, target), i, "the final level" if last else f"t={grid[i + 1]}")


@pytest.mark.parametrize("steps", STEP_COUNTS)
def test_inversion_and_redenoising_step_along_the_grid(pipe, x_0_and_noise, steps):
    """The image side's two walks (SD: epsilon): up the grid from ᾱ_initial, then back down to ᾱ_final."""
    x_0, noise = x_0_and_noise
    inverse, forward = pipe._image_schedulers(steps)
    assert isinstance(inverse, GridDDIMInverseScheduler) and isinstance(forward, GridDDIMScheduler)
    assert torch.equal(inverse.timesteps.flip(0), pipe.timestep_grid(steps))
    alphas = inverse.alphas_cumprod
    for i, t in enumerate(inverse.timesteps):
        start = inverse.initial_alpha_cumprod if i == 0 else alphas[inverse.timesteps[i - 1]]
        latents = inverse.step(noise, t, noised(x_0, noise, start)).prev_sample  # the oracle: ε at any level
        assert_at_level(latents, noised(x_0, noise, alphas[t]), i, f"t={t}")
    assert torch.equal(forward.timesteps, pipe.timestep_grid(steps))
    for i, t in enumerate(forward.timesteps):
        latents = forward.step(noise, t, noised(x_0, noise, alphas[t])).prev_sample
        last = i + 1 == len(forward.timesteps)
        target = forward.final_alpha_cumprod if last else alphas[forward.timesteps[i + 1]]
        assert_at_level(latents, noised(x_0, noise, target), i, "the final level" if last else "the next grid point")


def test_a_timestep_off_the_grid_is_refused(pipe):
    scheduler = pipe.make_scheduler("ddim", pipe.timestep_grid(7))
    sample = torch.zeros(1, 4, 2, 2)
    with pytest.raises(ValueError, match="timestep 500 is not on this scheduler's grid of 7 steps"):
        scheduler.step(sample, torch.tensor(500), sample)
