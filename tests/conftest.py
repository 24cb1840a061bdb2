"""Shared fixtures: a tiny pipeline, sample images, one tiny bundle per session (and copies to damage)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from dummies import make_pipeline, noise_image
from PIL import Image

from melfusion.bundle import create_tiny_bundle
from melfusion.pipeline import MelFusionPipeline


@pytest.fixture(autouse=True)
def torch_threads_kept():
    """A test that runs the CLI in-process (`generate` sets torch's thread count for the machine) leaves the
    count as it found it: later tests' numerics, and the feature caches they share, depend on it."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


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


@pytest.fixture
def limits_only_bundle(tmp_path: Path) -> Path:
    """A folder holding only a bundle's model_index.json: all the API reads, so it starts without torch."""
    bundle = tmp_path / "limits-only-bundle"
    bundle.mkdir()
    (bundle / "model_index.json").write_text(json.dumps({
        "max_seconds": 30, "default_seconds": 10, "max_steps": 1000, "default_steps": 100,
        "default_guidance_scale": 7, "scheduler": ["diffusers", "DDIMScheduler"],  # the class names its samplers
    }))  # fmt: skip
    return bundle
