"""Clips longer than the model saw, and seamless loops: overlapping windows of the trained length in time.

Training-free, MultiDiffusion (Bar-Tal et al. 2023) along the time axis: at every denoising step each
window of the trained length is denoised by the UNet on its own, and every latent frame takes the
cross-fade-weighted mean of the predictions of the windows that cover it; the sampler then steps the whole
latent with that mean (it is linear in the prediction, so this is MultiDiffusion's least-squares fusion).
The UNet only ever sees latents of the length it was trained on, which a compiled worker has warmed up.
A loop's windows are circular: the last ones wrap from the end back to the start, so the seam is inside a
window like any other frame and the end flows into the start.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

MIN_OVERLAP = 0.25  # of a window: consecutive windows share at least this much, and cross-fade over it


@dataclass(frozen=True)
class TimeWindows:
    """Every UNet row of a call: which clip it reads, which latent frames, and each frame's weight."""

    rows: torch.Tensor  # (N,) the clip (batch row) each window belongs to
    frames: torch.Tensor  # (N, W) latent frame indices into that clip
    weights: torch.Tensor  # (N, W) cross-fade weights, > 0

    @property
    def length(self) -> int:
        return self.frames.shape[1]

    def __len__(self) -> int:
        return self.frames.shape[0]

    def gather(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, T, F) clip latents -> (N, C, W, F) window latents, contiguous (a compiled UNet's graphs
        are guarded on strides too)."""
        by_frame = latents.permute(0, 2, 1, 3)  # (B, T, C, F)
        return by_frame[self.rows[:, None], self.frames].permute(0, 2, 1, 3).contiguous()

    def blend(self, predictions: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """(N, C, W, F) window predictions -> (B, C, T, F) like `like`: each frame the weighted mean of the
        windows covering it (a frame no window covers, the padding of a shorter clip, gets 0)."""
        total = torch.zeros_like(like.permute(0, 2, 1, 3))  # (B, T, C, F)
        weight = torch.zeros(like.shape[0], like.shape[2], dtype=like.dtype, device=like.device)
        w = self.weights.to(like.dtype)
        total.index_put_((self.rows[:, None], self.frames), predictions.permute(0, 2, 1, 3) * w[..., None, None], accumulate=True)
        weight.index_put_((self.rows[:, None], self.frames), w, accumulate=True)
        return (total / weight.clamp_min(torch.finfo(like.dtype).tiny)[..., None, None]).permute(0, 2, 1, 3)


def plan_windows(lengths: list[int], loops: list[bool], window: int) -> TimeWindows:
    """The windows of a batch of clips (latent frame counts `lengths`) for a UNet of `window` frames.

    A clip no longer than the window and not a loop is one window of its own length (all of a call's
    windows share one length, so such clips share a batch only with clips of their length). A longer clip
    gets the fewest windows that overlap by at least MIN_OVERLAP, spread evenly from its start to its end;
    a loop gets at least two circular windows (a loop shorter than the window repeats inside it).
    """
    plain = [length for length, loop in zip(lengths, loops) if not loop and length < window]
    if plain and (len(plain) != len(lengths) or len(set(plain)) != 1):
        raise ValueError("clips shorter than the window share a call only with clips of their own length")
    size = plain[0] if plain else window
    rows, frames, weights = [], [], []
    hop = size - math.ceil(MIN_OVERLAP * size)
    for row, (length, loop) in enumerate(zip(lengths, loops)):
        if loop:
            count = max(2, math.ceil(length / hop))
            starts = [round(k * length / count) for k in range(count)]
        else:
            count = 1 + max(0, math.ceil((length - size) / hop))
            starts = [round(k * (length - size) / max(count - 1, 1)) for k in range(count)]
        steps = [b - a for a, b in zip(starts, starts[1:])] or [size]
        overlap = size - max(steps)  # the least any two neighbours share: the cross-fade's length
        ramp = _ramp(size, overlap) if count > 1 else torch.ones(size)
        for start in starts:
            offsets = torch.arange(start, start + size)
            rows.append(row)
            frames.append(offsets % length if loop else offsets)
            weights.append(ramp)
    return TimeWindows(torch.tensor(rows), torch.stack(frames), torch.stack(weights))


def _ramp(size: int, overlap: int) -> torch.Tensor:
    """1 in the middle, linear over `overlap` frames to near 0 at both ends (never 0: every frame counts)."""
    if overlap <= 0:
        return torch.ones(size)
    j = torch.arange(size, dtype=torch.float32)
    return torch.clamp(torch.minimum(j + 1, size - j) / (overlap + 1), max=1.0)
