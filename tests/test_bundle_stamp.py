"""The verification stamp: a worker hashes a bundle once, later starts check sizes and times against it."""

from __future__ import annotations

import json
import os

import pytest

import melfusion.bundle
from melfusion.bundle import load_pipeline, verify_bundle
from melfusion.errors import BundleError
from melfusion.manifest import STAMP

WEIGHTS = "music_unet/diffusion_pytorch_model.safetensors"


@pytest.fixture
def hashed(monkeypatch) -> list[str]:
    """Every file the bundle code hashes, by name (the real sha256 still runs)."""
    names: list[str] = []
    real = melfusion.bundle.file_sha256
    monkeypatch.setattr(melfusion.bundle, "file_sha256", lambda path: names.append(path.name) or real(path))
    return names


def test_a_complete_check_records_a_stamp_that_spares_the_next_start(bundle_copy, hashed):
    (bundle_copy / STAMP).unlink(missing_ok=True)
    manifest = verify_bundle(bundle_copy)
    assert len(hashed) == len(manifest["files"])
    stamp = json.loads((bundle_copy / STAMP).read_text())
    assert set(stamp["files"]) == set(manifest["files"])
    assert stamp["files"][WEIGHTS][0] == manifest["files"][WEIGHTS]["bytes"]

    hashed.clear()
    load_pipeline(bundle_copy)  # what a worker does on start
    assert hashed == []
    verify_bundle(bundle_copy)  # `model_store verify` hashes whatever the stamp says
    assert len(hashed) == len(manifest["files"])


def test_a_file_rewritten_since_the_stamp_is_hashed_again(bundle_copy, hashed):
    verify_bundle(bundle_copy)
    weights = bundle_copy / WEIGHTS
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))  # same size, new modification time
    hashed.clear()
    with pytest.raises(BundleError, match=f"{WEIGHTS} is corrupt"):
        load_pipeline(bundle_copy)
    assert "diffusion_pytorch_model.safetensors" in hashed


def test_a_stamp_of_another_manifest_is_not_trusted(bundle_copy, hashed):
    verify_bundle(bundle_copy)
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    manifest["source"] = "edited"
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    hashed.clear()
    load_pipeline(bundle_copy)
    assert len(hashed) > 1  # the manifest and every file it lists


def test_a_bundle_where_no_stamp_can_be_written_still_loads_and_hashes_each_time(bundle_copy, hashed):
    """A read-only mount: the stamp cannot be written (here its path is a folder), so every start hashes."""
    (bundle_copy / STAMP).unlink(missing_ok=True)
    (bundle_copy / STAMP).mkdir()
    for _ in range(2):
        hashed.clear()
        load_pipeline(bundle_copy)
        assert WEIGHTS.rsplit("/", 1)[1] in hashed
    assert (bundle_copy / STAMP).is_dir()


def test_the_stamp_trusts_times_so_verify_is_the_full_check(bundle_copy):
    """Same size and a restored modification time pass the stamp; `verify` (no stamp) still finds the damage."""
    verify_bundle(bundle_copy)
    weights = bundle_copy / WEIGHTS
    before = weights.stat()
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))
    load_pipeline(bundle_copy)
    with pytest.raises(BundleError, match=f"{WEIGHTS} is corrupt"):
        verify_bundle(bundle_copy)
