"""`melfusion eval` end to end on the tiny bundle with tiny random CLIP/CLAP, and the evaluators' contract."""

from __future__ import annotations

import re

import numpy as np
import pytest
from processes import processes, run_cli

from melfusion.bundle import load_pipeline
from melfusion.cli import main
from melfusion.dataset.manifest import read_triplets
from melfusion.evaluation.evaluators import MUSIC_LABELS, Evaluators
from melfusion.evaluation.run import MEANINGLESS, Variant, evaluate, sharing_frozen_parts

EVAL = ["--steps", "2", "--seconds", "0.5", "--batch-size", "2"]


def table_rows(table: str) -> dict[str, list[float]]:
    """Variant -> FAD, KL, FD, IMSM of a written table."""
    rows = [line.split(" | ") for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    return {row[0].removeprefix("| "): [float(x.strip(" |")) for x in row[1:]] for row in rows}


def test_eval_cli_writes_a_table_with_the_tango_baseline(tiny_bundle, manifest, tmp_path, capsys):
    out = tmp_path / "table.md"
    code = main(["eval", "--bundle", str(tiny_bundle), "--data", str(manifest), "--out", str(out), *EVAL,
                 "--limit", "3", "--baseline", str(tiny_bundle)])
    assert code == 0
    printed = capsys.readouterr().out
    assert MEANINGLESS in printed
    # the estimate counts the rows left after --limit and one variant more with --baseline, before any work
    assert re.search(r"^estimate: 3 variants x 3 rows = 9 clips on 1 process\(es\) \(cpu\), 9 each at about \d+\.\d s",
                     printed, re.MULTILINE)
    assert "melfusion: evaluating on the CPU" in printed and "accelerate launch --multi_gpu" in printed
    assert printed.index("estimate:") < printed.index("Evaluated on")
    table = out.read_text()
    assert "Evaluated on 3 rows (0 skipped); image features: redenoise (re-denoised, as in training)." in table
    assert MEANINGLESS in table
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


def test_two_processes_share_the_rows_and_write_the_table_one_process_writes(tiny_bundle, manifest, tmp_path):
    arguments = ["eval", "--bundle", str(tiny_bundle), "--data", str(manifest), *EVAL, "--out"]
    assert main([*arguments, str(tmp_path / "one.md")]) == 0
    run = run_cli([*arguments, str(tmp_path / "two.md")], launch=processes(2))
    assert run.returncode == 0, run.stderr[-3000:]
    assert "8 clips on 2 process(es) (cpu), 4 each" in run.stdout  # 2 variants x 4 rows, half each
    one, two = (tmp_path / "one.md").read_text(), (tmp_path / "two.md").read_text()
    assert "Evaluated on 4 rows (0 skipped)" in two
    for (variant, a), (other, b) in zip(table_rows(one).items(), table_rows(two).items()):
        assert variant == other
        # each row's clip has its own seed; only batch-composition rounding differs (rows 0, 2 vs 0, 1 together)
        assert b == pytest.approx(a, rel=1e-3, abs=1e-3), variant


def test_evaluation_mixes_in_the_features_training_used_unless_told_and_restores_the_pipeline(tiny_bundle, manifest):
    pipe = load_pipeline(tiny_bundle)
    pipe.set_progress_bar_config(disable=True)
    recorder = pipe.feature_recorder
    variants = [Variant("text", 0.0), Variant("image", 1.0)]

    def scores(source):
        triplets = read_triplets(manifest)
        triplets.rows = triplets.rows[:2]
        return evaluate(pipe, triplets, Evaluators.tiny_random(), variants, steps=2, seconds=0.5, batch_size=2,
                        image_features_from=source, fad_embedder=spectrum, fd_embedder=spectrum)

    redenoised, inverted = scores("redenoise"), scores("inversion")
    assert redenoised[0] == inverted[0]  # caption only: no image features
    assert redenoised[1].fad != pytest.approx(inverted[1].fad)  # a random SD's inversion is far from exact
    assert pipe.config.image_features_from == "inversion"  # the bundle's own setting, back
    assert pipe.feature_recorder is recorder and recorder.synapse is pipe.synapse
