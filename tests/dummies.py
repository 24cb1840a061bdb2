"""Tiny real components (the diffusers test-suite pattern) and sample images for the engine tests."""

from __future__ import annotations

import numpy as np
from PIL import Image

from melfusion.pipeline import MelFusionPipeline
from melfusion.presets import build_components


def get_dummy_components(**overrides) -> dict:
    """Every pipeline component, tiny and randomly initialised from seed 0, real classes throughout."""
    return {**build_components("tiny", seed=0), **overrides}


def make_pipeline(**overrides) -> MelFusionPipeline:
    pipe = MelFusionPipeline(**get_dummy_components(**overrides))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def noise_image(seed: int, size: tuple[int, int] = (96, 72)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)
