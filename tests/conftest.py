"""Shared fixtures: a tiny pipeline, sample images, a tiny bundle."""

from __future__ import annotations

import pytest
from dummies import make_pipeline, noise_image
from PIL import Image

from melfusion.pipeline import MelFusionPipeline


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
