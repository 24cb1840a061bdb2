"""`melfusion eval` end to end on the tiny bundle with tiny random CLIP/CLAP, and the evaluators' contract."""

from __future__ import annotations

import numpy as np
import pytest

from melfusion.bundle import load_pipeline
from melfusion.cli import main
from melfusion.dataset.manifest import read_triplets
from melfusion.evaluation.evaluators import MUSIC_LABELS, Evaluators
from melfusion.evaluation.run import MEANINGLESS, Variant, evaluate


def test_eval_cli_writes_a_table_and_says_random_evaluators_are_meaningless(tiny_bundle, manifest, tmp_path, capsys):
    out = tmp_path / "table.md"
    code = main(["eval", "--bundle", str(tiny_bundle), "--data", str(manifest), "--out", str(out),
                 "--steps", "2", "--seconds", "0.5", "--alphas", "0.5", "--limit", "2"])
    assert code == 0
    assert MEANINGLESS in capsys.readouterr().out
    table = out.read_text()
    assert "Evaluated on 2 rows (0 skipped)." in table and MEANINGLESS in table
    header, _, *rows = [line for line in table.splitlines() if line.startswith("|")]
    assert header == "| Variant | FAD ↓ | KL ↓ | FD ↓ | IMSM ↑ |"
    assert [row.split(" | ")[0] for row in rows] == [
        "| text only (α = 0)", "| image + text (learned α)", "| image + text (α = 0.5)"]
    for row in rows:
        values = [float(cell) for cell in row.strip("| ").split(" | ")[1:]]
        assert all(np.isfinite(values)) and all(v >= 0 for v in values) and 0 < values[3] <= 1


def test_the_image_changes_the_music_and_fixed_alphas_are_restored(tiny_bundle, manifest):
    pipe = load_pipeline(tiny_bundle)
    pipe.set_progress_bar_config(disable=True)
    learned = pipe.synapse.alphas.detach().clone()
    triplets = read_triplets(manifest)
    triplets.rows = triplets.rows[:2]

    def spectrum(waveforms, rate):  # a pluggable embedder: the magnitude spectrum's first bins
        return np.stack([np.abs(np.fft.rfft(w))[:64] for w in waveforms])

    variants = [Variant("text", 0.0), Variant("alpha 1", 1.0, 1.0)]
    scores = evaluate(pipe, triplets, Evaluators.tiny_random(), variants, steps=2, seconds=0.5,
                      fad_embedder=spectrum, fd_embedder=spectrum)
    assert [(s.variant, s.rows) for s in scores] == [("text", 2), ("alpha 1", 2)]
    assert scores[0].fad != pytest.approx(scores[1].fad)  # α = 1 feeds the image in: other music
    assert np.equal(pipe.synapse.alphas.detach().numpy(), learned.numpy()).all()


def test_zero_shot_labels_are_distributions():
    evaluators = Evaluators.tiny_random()
    waveforms = [np.random.default_rng(i).normal(scale=0.1, size=16000).astype(np.float32) for i in range(3)]
    labels = evaluators.label_distribution(waveforms, 16000)
    assert labels.shape == (3, len(MUSIC_LABELS))
    assert labels.sum(axis=1) == pytest.approx(np.ones(3), abs=1e-5)
    assert not evaluators.meaningful
