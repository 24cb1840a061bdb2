"""Shared fixtures: a tiny pipeline, sample images, one tiny bundle per session (and copies to damage)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from dummies import make_pipeline, noise_image
from PIL import Image

from melfusion.bundle import create_tiny_bundle
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
def tiny_bundle(tmp_path_factory) -> Path:
    """A pristine tiny bundle (built in about two seconds); never modify it, use `bundle_copy`."""
    return create_tiny_bundle(tmp_path_factory.mktemp("bundles") / "tiny")


@pytest.fixture
def bundle_copy(tiny_bundle: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny bundle for a test to damage."""
    return Path(shutil.copytree(tiny_bundle, tmp_path / "bundle"))
