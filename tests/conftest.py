"""Shared fixtures: tiny real components (the diffusers test-suite pattern), sample images, a tiny bundle."""

from __future__ import annotations

import numpy as np
import pytest
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


@pytest.fixture(scope="session")
def pipe() -> MelFusionPipeline:
    return make_pipeline()


@pytest.fixture(scope="session")
def image() -> Image.Image:
    return noise_image(0)


@pytest.fixture(scope="session")
def other_image() -> Image.Image:
    return noise_image(1)


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory):
    from melfusion.bundle import create_tiny_bundle

    return create_tiny_bundle(tmp_path_factory.mktemp("bundles") / "tiny")
