"""`melfusion eval` end to end on the tiny bundle with tiny random CLIP/CLAP, and the evaluators' contract."""

from __future__ import annotations

import re

import numpy as np
import pytest

from melfusion.bundle import load_pipeline
from melfusion.cli import main
from melfusion.dataset.manifest import read_triplets
from melfusion.evaluation.evaluators import MUSIC_LABELS, Evaluators
from melfusion.evaluation.run import MEANINGLESS, Variant, evaluate, sharing_frozen_parts


def test_eval_cli_writes_a_table_with_the_tango_baseline(tiny_bundle, manifest, tmp_path, capsys):
    out = tmp_path / "table.md"
    code = main(["eval", "--bundle", str(tiny_bundle), "--data", str(manifest), "--out", str(out), "--steps", "2",
                 "--seconds", "0.5", "--limit", "3", "--batch-size", "2", "--baseline", str(tiny_bundle)])
    assert code == 0
    printed = capsys.readouterr().out
    assert MEANINGLESS in printed
    # the estimate counts the rows left after --limit and one variant more with --baseline, before any work
    assert re.search(r"^estimate: 3 variants x 3 rows = 9 clips at about \d+\.\d s each", printed, re.MULTILINE)
    assert printed.index("estimate:") < printed.index("Evaluated on")
    table = out.read_text()
    assert "Evaluated on 3 rows (0 skipped)." in table and MEANINGLESS in table
    header, _, *rows = [line for line in table.splitlines() if line.startswith("|")]
    assert header == "| Variant | FAD ↓ | KL ↓ | FD ↓ | IMSM ↑ |"
    assert [row.split(" | ")[0] for row in rows] == [
        "| TANGO (untouched UNet, caption only)", "| caption only (trained UNet, α = 0)", "| image + caption (learned α)"]
    # the baseline given is the evaluated bundle itself here, so its caption-only row must match exactly
    assert rows[0].split(" | ")[1:] == rows[1].split(" | ")[1:]


def spectrum(waveforms, rate):  # a pluggable embedder: the magnitude spectrum's first bins
    return np.stack([np.abs(np.fft.rfft(w))[:64] for w in waveforms])


def test_streaming_in_batches_gives_what_one_batch_gives_and_the_image_changes_the_music(tiny_bundle, manifest):
    pipe = load_pipeline(tiny_bundle)
    pipe.set_progress_bar_config(disable=True)
    other = sharing_frozen_parts(pipe, tiny_bundle)
    other.synapse.alphas.data.fill_(1.0)  # a second model: shares SD, T5 and the VAEs, has its own α
    assert other.image_unet is pipe.image_unet and other.music_unet is not pipe.music_unet
    variants = [Variant("text", 0.0), Variant("image", 1.0), Variant("alpha 1", 1.0, other)]

    def scores(batch_size):
        triplets = read_triplets(manifest)
        triplets.rows = triplets.rows[:3]
        return evaluate(pipe, triplets, Evaluators.tiny_random(), variants, steps=2, seconds=0.5,
                        batch_size=batch_size, fad_embedder=spectrum, fd_embedder=spectrum)

    streamed, whole = scores(2), scores(3)
    assert [(s.variant, s.rows) for s in streamed] == [("text", 3), ("image", 3), ("alpha 1", 3)]
    for a, b in zip(streamed, whole):
        assert a.fad == pytest.approx(b.fad, rel=1e-4) and a.imsm == pytest.approx(b.imsm)
    assert streamed[0].fad != pytest.approx(streamed[1].fad)  # the image changes the music
    assert streamed[1].fad != pytest.approx(streamed[2].fad)  # and so does the other model's α


def test_zero_shot_labels_sharpen_with_claps_logit_scale():
    """KL's classifier applies CLAP's learned temperature: dropping it would flatten every distribution."""
    evaluators = Evaluators.tiny_random()
    waveforms = [np.random.default_rng(i).normal(scale=0.1, size=16000).astype(np.float32) for i in range(3)]
    entropy = lambda p: float(-(p * np.log(p)).sum(axis=1).mean())
    cool = entropy(evaluators.label_distribution(waveforms, 16000))
    evaluators.clap.logit_scale_a.data += 5.0  # e⁵ times sharper logits
    assert entropy(evaluators.label_distribution(waveforms, 16000)) < cool - 0.1
    assert evaluators.label_distribution(waveforms, 16000).shape == (3, len(MUSIC_LABELS))
    assert not evaluators.meaningful
