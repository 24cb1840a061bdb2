"""Fixtures for the training and evaluation tests: a tiny bundle, a synthetic data set, a shared cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from synthetic import write_triplets

from melfusion.bundle import save_bundle
from melfusion.pipeline import MelFusionPipeline
from melfusion.presets import build_components
from melfusion.training.config import TrainConfig

SECONDS = 0.5  # latent (8, 16, 16) on the tiny bundle: a training step in well under a second
FEATURE_STEPS = 4  # a coarse grid keeps the one-off image encoding cheap


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """The models here are tiny: a second intra-op thread gains little alone and, on a busy 2-core machine,
    costs up to 6x in spin-waits (measured: 15 s vs 97 s for this folder). One thread also fixes the
    numerics: a random SD UNet's DDIM path turns the rounding differences between thread counts and batch
    sizes into different trajectories (measured: 2.3 apart at 2 threads), which the shared feature cache
    and the learning test would see (the root conftest restores the count after each test)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def v_prediction_bundle(tmp_path_factory) -> Path:
    """The tiny bundle with TANGO's v-prediction schedule (the tiny preset keeps the paper's epsilon)."""
    pipe = MelFusionPipeline(**build_components("tiny", prediction_type="v_prediction"))
    return save_bundle(pipe, tmp_path_factory.mktemp("bundles") / "tiny-v", source="create-tiny")


@pytest.fixture(scope="session")
def manifest(tmp_path_factory) -> Path:
    return write_triplets(tmp_path_factory.mktemp("data"), count=4, seconds=SECONDS)


@pytest.fixture(scope="session")
def feature_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def make_config(tiny_bundle, manifest, feature_cache, tmp_path):
    """TrainConfig for the tiny bundle and synthetic set; every batch is the whole set (4 rows)."""

    def make(name: str = "out", **overrides) -> TrainConfig:
        settings = {"bundle": tiny_bundle, "data": manifest, "max_steps": 2, "batch_size": 4, "seconds": SECONDS,
                    "feature_steps": FEATURE_STEPS, "cache_dir": feature_cache, "checkpoint_every": 1000}
        return TrainConfig(out=tmp_path / name, **(settings | overrides))

    return make
