"""Shared fixtures: one tiny bundle per session (built in about two seconds), copied by tests that damage it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from melfusion.bundle import create_tiny_bundle


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> Path:
    """A pristine tiny bundle; never modify it, use `bundle_copy`."""
    return create_tiny_bundle(tmp_path_factory.mktemp("bundles") / "tiny")


@pytest.fixture
def bundle_copy(tiny_bundle: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny bundle for a test to damage."""
    return Path(shutil.copytree(tiny_bundle, tmp_path / "bundle"))
