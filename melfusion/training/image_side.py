"""Image K/V at any training timestep t ∈ [1, T] (eq. 7), one Stable Diffusion pass per row.

Algorithm 1 (lines 1 and 7) wants K_l^I, V_l^I of ε_ψ(z_t^I, ∅, t) at the music timestep t, drawn from all
T = 1000 timesteps. Caching those K/V on a grid fine enough for that costs terabytes at SD 1.5 size
(1.72 MB per step per image in float16), so the cache holds the *latents* instead: the SD UNet's input
z_{t_i}^I at every step i of the image's re-denoising on a DDIM grid (32 KB per step at 64×64 in float16),
and training runs the frozen SD UNet once per row at the row's own t to record the K/V.

Between two grid points t_i > t > t_{i+1}, z_t^I is exactly the DDIM step from z_{t_i} to t: both grid
latents lie on one DDIM line z = √ᾱ·x̂_0 + √(1−ᾱ)·ε̂ (the same x̂_0, ε̂ predicted at t_i), so the two stored
latents give x̂_0 and ε̂ and any t on that line follows. At a grid timestep it is the stored latent itself,
so the K/V equal what `MelFusionPipeline.encode_image` records at that step — training and sampling see the
same image features where their timesteps meet. Below the grid's last point the last line is extended.
A row therefore needs two of its trajectory's steps (64 KB at SD 1.5 size), not all of them (1.64 MB at 50).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from diffusers import DDIMScheduler
from PIL import Image

from ..attention import ImageFeatures, attach_recorders
from ..pipeline import MelFusionPipeline
from ..synapse import VisualSynapse


@contextlib.contextmanager
def captured_unet_inputs(unet: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
    """Every latent the UNet is called with inside the `with` body, in call order."""
    inputs: list[torch.Tensor] = []
    handle = unet.register_forward_pre_hook(lambda module, args: inputs.append(args[0].detach()))
    try:
        yield inputs
    finally:
        handle.remove()


@torch.no_grad()
def encode_trajectories(pipe: MelFusionPipeline, images: list[Image.Image], steps: int) -> torch.Tensor:
    """(B, steps, C, h, w): the SD UNet's input latent at each step of the images' re-denoising.

    Lines 1 and 6 of Algorithm 2 as the pipeline runs them (VAE mean, DDIM inversion, re-denoising), the
    whole batch at once; step i belongs to `pipe.timestep_grid(steps)[i]`.
    """
    z_0 = torch.cat([pipe.prepare_image_latents(image) for image in images])
    z_T = pipe.invert_image_latents(z_0, steps)
    with captured_unet_inputs(pipe.image_unet) as inputs:
        pipe.denoise_image_latents(z_T, steps)
    return torch.stack(inputs, dim=1)


def grid_segments(grid: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """(B,) index i of the grid segment [t_i, t_{i+1}] holding each timestep (the first or last beyond the grid).

    Training reads only the cached latents at steps i and i + 1 of a row's trajectory (`load_image_segments`).
    """
    above = (grid[None, :] > timesteps[:, None]).sum(dim=1)  # grid points above t (the grid descends)
    return (above - 1).clamp(0, len(grid) - 2)


class ImageKeyValues:
    """K_l^I, V_l^I of the frozen SD UNet at each row's own timestep, from the cached latents around it."""

    def __init__(self, pipe: MelFusionPipeline, synapse: VisualSynapse, steps: int):
        self.pipe, self.synapse = pipe, synapse
        self.grid = pipe.timestep_grid(steps)  # (steps,) descending: the trajectory's timesteps
        alphas = DDIMScheduler.from_config(pipe.image_scheduler.config).alphas_cumprod
        self.alphas_cumprod = alphas.to(torch.float64)
        with torch.no_grad():  # CLIP's "" embedding, kept: the text encoder may leave the GPU after this
            self.empty_prompt = pipe._empty_prompt_embeds(pipe.image_unet.device)

    def latents_at(self, segments: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) z_t^I for any timesteps (B,) in [0, T), from segments (B, 2, C, h, w): each row's
        cached latents at the grid points t_i > t_{i+1} around its t (i from `grid_segments`)."""
        index = grid_segments(self.grid, timesteps)
        z_a, z_b = segments[:, 0].double(), segments[:, 1].double()
        a_a, a_b, a_t = (self.alphas_cumprod[t].view(-1, 1, 1, 1)
                         for t in (self.grid[index], self.grid[index + 1], timesteps))
        # z = √ᾱ·x̂_0 + √(1−ᾱ)·ε̂ at t_i and t_{i+1}: two equations for x̂_0 and ε̂ per element
        det = a_a.sqrt() * (1 - a_b).sqrt() - a_b.sqrt() * (1 - a_a).sqrt()
        x_0 = (z_a * (1 - a_b).sqrt() - z_b * (1 - a_a).sqrt()) / det
        epsilon = (a_a.sqrt() * z_b - a_b.sqrt() * z_a) / det
        return a_t.sqrt() * x_0 + (1 - a_t).sqrt() * epsilon

    @torch.no_grad()
    def __call__(self, segments: torch.Tensor, timesteps: torch.Tensor) -> ImageFeatures:
        """One pseudo-step of features: row b's K/V of ε_ψ(z_t^I, ∅, t) at t = timesteps[b]."""
        unet = self.pipe.image_unet
        latents = self.latents_at(segments, timesteps).to(unet.device, unet.dtype)
        empty = self.empty_prompt.to(unet.device, unet.dtype).expand(len(timesteps), -1, -1)
        recorder = self.pipe.feature_recorder
        if recorder.synapse is not self.synapse:  # an ablation's synapse records other blocks
            recorder = attach_recorders(unet, self.synapse)
        recorder.start()
        unet(latents, timesteps.to(unet.device), encoder_hidden_states=empty)
        keys = {site: key[None] for site, (key, _) in recorder.latest.items()}  # (1, B, grid², D)
        values = {site: value[None] for site, (_, value) in recorder.latest.items()}
        return ImageFeatures(timesteps.cpu(), keys, values).to(unet.device, self.pipe.music_unet.dtype)
