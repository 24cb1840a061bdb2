"""An unknown, incomplete, corrupt or mismatched bundle fails with a BundleError naming the missing piece."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from melfusion.bundle import MANIFEST, load_pipeline, save_bundle, verify_bundle
from melfusion.errors import BundleError
from melfusion.pipeline import MelFusionPipeline
from melfusion.presets import build_components

WEIGHTS = "music_unet/diffusion_pytorch_model.safetensors"


def flip_byte(path: Path) -> None:
    """Invert one byte in the middle of the file: same size, different content."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def edit_json(bundle: Path, relative: str, change) -> None:
    """Edit a config and re-record its checksum, as a careless hand edit plus re-manifest would."""
    path = bundle / relative
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config))
    manifest = json.loads((bundle / MANIFEST).read_text())
    if relative in manifest["files"]:
        manifest["files"][relative] = {
            "bytes": path.stat().st_size,
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        }
    (bundle / MANIFEST).write_text(json.dumps(manifest))


def test_pristine_bundle_verifies(tiny_bundle):
    manifest = verify_bundle(tiny_bundle)
    assert manifest["source"] == "create-tiny"
    assert WEIGHTS in manifest["files"]


def test_flipped_byte_names_the_file(bundle_copy):
    flip_byte(bundle_copy / WEIGHTS)
    with pytest.raises(BundleError, match=f"{WEIGHTS} is corrupt"):
        verify_bundle(bundle_copy)
    with pytest.raises(BundleError, match=WEIGHTS):
        load_pipeline(bundle_copy)


def test_size_only_check_misses_a_flip_but_catches_truncation(bundle_copy):
    flip_byte(bundle_copy / WEIGHTS)
    verify_bundle(bundle_copy, hashes=False)  # documented trade-off of the fast check
    path = bundle_copy / WEIGHTS
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(BundleError, match=f"{WEIGHTS} is corrupt"):
        verify_bundle(bundle_copy, hashes=False)


def test_missing_component_folder(bundle_copy):
    shutil.rmtree(bundle_copy / "vocoder")
    with pytest.raises(BundleError, match="component folder vocoder/ missing"):
        load_pipeline(bundle_copy)


def test_missing_weight_file(bundle_copy):
    (bundle_copy / WEIGHTS).unlink()
    with pytest.raises(BundleError, match=f"file {WEIGHTS} missing"):
        verify_bundle(bundle_copy)


def test_weight_file_outside_the_manifest(bundle_copy):
    shutil.copy(bundle_copy / WEIGHTS, bundle_copy / "music_unet" / "extra.safetensors")
    with pytest.raises(BundleError, match="music_unet/extra.safetensors is not in the manifest"):
        verify_bundle(bundle_copy)


@pytest.mark.parametrize(
    ("relative", "change", "message"),
    [
        ("model_index.json", lambda c: c.pop("mel_vae"), "component 'mel_vae' missing from model_index.json"),
        (
            "model_index.json",
            lambda c: c.update(synapse=["melfusion_plugins", "VisualSynapse"]),
            "could not load .*melfusion_plugins",
        ),
        (
            "music_unet/config.json",
            lambda c: c.update(block_out_channels=[32, 64, 64, 64]),
            r"image_unet.block_out_channels=\[32, 32, 64, 64\] but music_unet.block_out_channels=\[32, 64, 64, 64\]",
        ),
        ("image_unet/config.json", lambda c: c.pop("layers_per_block"), "lacks 'layers_per_block'"),
        (
            "synapse/config.json",
            lambda c: c.update(blocks=["up_blocks.1", "up_blocks.7"]),
            r"synapse blocks \['up_blocks.7'\]",
        ),
    ],
    ids=["model-index-entry", "unknown-library", "unet-block-widths", "config-setting", "synapse-block"],
)
def test_inconsistent_configs_are_named(bundle_copy, relative, change, message):
    """Checksums re-recorded after the edit, so only the cross-component checks can catch these."""
    edit_json(bundle_copy, relative, change)
    with pytest.raises(BundleError, match=message):
        load_pipeline(bundle_copy)


@pytest.mark.parametrize("damage", ["no folder", "empty folder", "foreign folder", "foreign manifest", "newer version"])
def test_not_a_bundle(tmp_path, tiny_bundle, damage):
    target = tmp_path / "thing"
    if damage != "no folder":
        target.mkdir()
    if damage == "foreign folder":
        (target / "model_index.json").write_text("{}")
    if damage in ("foreign manifest", "newer version"):
        shutil.copytree(tiny_bundle, target, dirs_exist_ok=True)
        change = {"format": "something-else"} if damage == "foreign manifest" else {"bundle_version": 99}
        manifest = json.loads((target / MANIFEST).read_text())
        (target / MANIFEST).write_text(json.dumps({**manifest, **change}))
    with pytest.raises(BundleError, match="no such bundle|not a MelFusion|bundle version 99"):
        load_pipeline(target)


def test_save_load_gives_identical_generations(tmp_path):
    """A saved bundle reproduces its in-memory pipeline bit for bit; different seeds still differ."""
    image = Image.open(Path(__file__).parents[1] / "docs" / "sample.png")
    request = dict(image=image, seconds=1.0, num_inference_steps=2, guidance_scale=3.0)
    pipe = MelFusionPipeline(**build_components("tiny", seed=1))
    before = pipe("calm piano", seed=7, **request).audios
    loaded = load_pipeline(save_bundle(pipe, tmp_path / "saved", source="test"))
    after = loaded("calm piano", seed=7, **request).audios
    other_seed = loaded("calm piano", seed=8, **request).audios
    assert np.array_equal(before, after)
    assert not np.allclose(after, other_seed)
