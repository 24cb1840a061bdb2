"""Each ablation script end to end on the tiny bundle: train every arm, evaluate them beside TANGO, write the table."""

from __future__ import annotations

import torch

from melfusion.bundle import load_pipeline
from melfusion.training.experiments import build_parser, run, slug

TANGO = "TANGO (untouched UNet, caption only)"


def run_experiment(table: str, out_dir, tiny_bundle, manifest, feature_cache, *extra: str) -> dict[str, str]:
    """Run `table` with one training step per arm and a 2-step evaluation of 2 rows; returns arm name -> table line."""
    args = build_parser().parse_args([
        table, "--bundle", str(tiny_bundle), "--data", str(manifest), "--test-data", str(manifest),
        "--out-dir", str(out_dir), "--max-steps", "1", "--batch-size", "4", "--seconds", "0.5", "--feature-steps",
        "4", "--cache-dir", str(feature_cache), "--steps", "2", "--limit", "2", *extra,
    ])
    text = run(args).read_text()
    assert "Evaluated on 2 rows (0 skipped); image features: redenoise" in text
    lines = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line][1:]
    rows = {line.split(" | ")[0].removeprefix("| "): line for line in lines}
    assert list(rows)[0] == TANGO
    return rows


def test_table14_experiment_runs_end_to_end(tiny_bundle, manifest, feature_cache, tmp_path):
    rows = run_experiment("table14", tmp_path / "t14", tiny_bundle, manifest, feature_cache, "--alphas", "0.9")
    assert list(rows)[1:] == ["alpha 0.9 (fixed in training)", "learned alpha"]
    assert torch.equal(load_pipeline(tmp_path / "t14" / "alpha-0-9--fixed-in-training").synapse.alphas,
                       torch.full((3,), 0.9))
    learned = load_pipeline(tmp_path / "t14" / "learned-alpha").synapse.alphas
    assert 0 < (learned - 0.5).abs().max() < 1e-3  # started at 0.5, not at the bundle's α, and trained
    assert rows["alpha 0.9 (fixed in training)"].split(" | ")[1:] != rows["learned alpha"].split(" | ")[1:]


def test_table2_experiment_runs_end_to_end(tiny_bundle, manifest, feature_cache, tmp_path):
    # Encoder, decoder and both: one image pass per row records every arm's sites from the shared SD UNet
    rows = run_experiment("table2", tmp_path / "t2", tiny_bundle, manifest, feature_cache)
    layouts = {"encoder": ("down_blocks.0", "down_blocks.1", "down_blocks.2"),
               "decoder": ("up_blocks.1", "up_blocks.2", "up_blocks.3")}
    layouts["both"] = layouts["encoder"] + layouts["decoder"]
    assert len(rows) == 7
    for arm in list(rows)[1:]:
        placement, sharing = arm.split(", ")
        synapse = load_pipeline(tmp_path / "t2" / slug(arm)).synapse
        assert tuple(synapse.config.blocks) == layouts[placement], arm
        assert synapse.config.share_alpha == (sharing == "same alpha"), arm
        assert 0 < (synapse.alphas - 0.5).abs().max() < 1e-3, arm


def test_table11_experiment_runs_end_to_end(tiny_bundle, manifest, feature_cache, tmp_path):
    rows = run_experiment("table11", tmp_path / "t11", tiny_bundle, manifest, feature_cache)
    assert list(rows)[1:] == ["decoder blocks 1-1", "decoder blocks 1-2", "decoder blocks 1-3"]
    for count in (1, 2, 3):
        synapse = load_pipeline(tmp_path / "t11" / f"decoder-blocks-1-{count}").synapse
        assert tuple(synapse.config.blocks) == ("up_blocks.1", "up_blocks.2", "up_blocks.3")[:count]
    scores = [rows[f"decoder blocks 1-{n}"].split(" | ")[1:] for n in (1, 2, 3)]
    assert scores[0] != scores[2]  # more synapse blocks, other music
