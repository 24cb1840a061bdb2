"""How much noise DDIM leaves on the trailing grid: diffusers' stepping vs grid point to grid point.

A toy problem whose exact denoiser is known: the data are 8 points on the unit circle, so E[x_0 | z_t]
(and with it ε̂) is a softmax over those points. Samples start from N(0, I) at t = 999 and are denoised
with SD's noise schedule on the pipeline's "trailing" grid by (a) diffusers' `DDIMScheduler`, which steps
by the constant stride 1000 // N (wrong on uneven grids: 300, 400, 600 steps), and (b) the pipeline's
`GridDDIMScheduler`. "Noise left" is the RMS distance of the final samples to the nearest data point.
Run from the repository root: `python -m bench.ddim_grid` (about a minute of CPU time).
"""

from __future__ import annotations

import argparse
import math

import torch
from diffusers import DDIMScheduler

from melfusion.presets import sd_scheduler
from melfusion.schedulers import GridDDIMScheduler

POINTS = torch.stack([torch.tensor([math.cos(a), math.sin(a)]) for a in torch.arange(8) * math.pi / 4]).double()


def exact_noise(latents: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """ε̂ = (z − √ᾱ·E[x_0 | z]) / √(1−ᾱ) for data uniform on POINTS."""
    alpha = alpha.double()
    logits = -torch.cdist(latents, alpha.sqrt() * POINTS) ** 2 / (2 * (1 - alpha))
    expected = logits.softmax(dim=1) @ POINTS
    return (latents - alpha.sqrt() * expected) / (1 - alpha).sqrt()


def noise_left(scheduler_class, steps: int, samples: int, seed: int) -> float:
    scheduler = scheduler_class.from_config(sd_scheduler().config, timestep_spacing="trailing")
    scheduler.set_timesteps(steps)
    latents = torch.randn(samples, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    for t in scheduler.timesteps:
        latents = scheduler.step(exact_noise(latents, scheduler.alphas_cumprod[t]), t, latents).prev_sample
    return torch.cdist(latents, POINTS).min(dim=1).values.pow(2).mean().sqrt().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[50, 100, 200, 300, 400, 600])
    parser.add_argument("--samples", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"{'steps':>6} {'diffusers DDIM':>15} {'grid DDIM':>10} {'ratio':>6}")
    for steps in args.steps:
        stock = noise_left(DDIMScheduler, steps, args.samples, args.seed)
        grid = noise_left(GridDDIMScheduler, steps, args.samples, args.seed)
        print(f"{steps:>6} {stock:>15.4f} {grid:>10.4f} {stock / grid:>6.2f}")


if __name__ == "__main__":
    main()
