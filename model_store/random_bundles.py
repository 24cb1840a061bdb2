"""Randomly initialised bundles at the presets' sizes: same classes and layouts as the real models.

"small" is for per-step benchmarks; "full" has Stable Diffusion 1.5's and TANGO's real sizes (~2.3 B
parameters, 9 GB in float32), for memory and speed measurements without downloading anything.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from melfusion.bundle import save_bundle
from melfusion.pipeline import MelFusionPipeline
from melfusion.presets import build_components


def create_random_bundle(
    directory: str | os.PathLike, *, size: str, dtype: torch.dtype = torch.float32, seed: int = 0
) -> Path:
    """Build every component at `size` from `seed`, cast to `dtype`, save atomically with a manifest.

    Components are initialised in float32 and cast afterwards (per parameter, so the peak stays near
    the float32 model), because CPU random init in float16 is slow or unsupported for some layers.
    """
    pipe = MelFusionPipeline(**build_components(size, seed=seed)).to(dtype=dtype)
    return save_bundle(pipe, directory, source=f"create-random --size {size}")
