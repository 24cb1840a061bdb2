"""Manifests (bad rows named by line), audio loading/resampling and the TANGO log-mel."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import soundfile as sf
import torch
from synthetic import TONE_RATE

from melfusion.bundle import load_pipeline
from melfusion.dataset.audio import LogMel, fit_length, load_audio
from melfusion.dataset.manifest import read_triplets
from melfusion.training.prepare import frozen_fingerprint, prepare_examples


def test_bad_jsonl_rows_are_skipped_and_named_by_line(manifest, tmp_path):
    for name in ("img0.png", "tone0.wav", "img1.png", "tone1.wav"):
        shutil.copy(manifest.parent / name, tmp_path / name)
    lines = [
        json.dumps({"image": "img0.png", "caption": "calm piano", "audio": "tone0.wav"}),
        json.dumps({"image": "gone.png", "caption": "calm piano", "audio": "tone0.wav"}),
        "{not json",
        "",
        json.dumps({"image": "img1.png", "audio": "tone1.wav"}),
        json.dumps({"image": str(tmp_path / "img1.png"), "caption": "drums", "audio": "tone1.wav"}),
    ]
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(lines) + "\n")
    found = read_triplets(path)
    assert [row.where for row in found.rows] == ["rows.jsonl line 1", "rows.jsonl line 6"]
    assert [str(bad) for bad in found.bad] == [
        f"rows.jsonl line 2: image file {tmp_path / 'gone.png'} not found",
        "rows.jsonl line 3: not JSON (Expecting property name enclosed in double quotes)",
        "rows.jsonl line 5: missing caption",
    ]
    assert "2 usable rows, 3 skipped" in found.summary()


def test_csv_rows_count_lines_of_multi_line_captions(manifest, tmp_path):
    shutil.copy(manifest.parent / "img0.png", tmp_path / "a.png")
    shutil.copy(manifest.parent / "tone0.wav", tmp_path / "a.wav")
    path = tmp_path / "rows.csv"
    path.write_text('image,caption,audio\na.png,"calm\npiano",a.wav\na.png,,a.wav\na.png,drums,missing.wav\n')
    found = read_triplets(path)
    assert [(row.where, row.caption) for row in found.rows] == [("rows.csv line 2", "calm\npiano")]
    assert [bad.where for bad in found.bad] == ["rows.csv line 4", "rows.csv line 5"]
    assert "missing.wav not found" in found.bad[1].reason


def test_a_folder_pairs_files_by_name(manifest, tmp_path):
    shutil.copy(manifest.parent / "img0.png", tmp_path / "song.png")
    shutil.copy(manifest.parent / "tone0.wav", tmp_path / "song.wav")
    (tmp_path / "song.txt").write_text("calm piano\n")
    (tmp_path / "lonely.txt").write_text("no files")
    found = read_triplets(tmp_path)
    assert [(row.caption, row.image.name, row.audio.name) for row in found.rows] == [("calm piano", "song.png", "song.wav")]
    assert str(found.bad[0]) == f"{tmp_path.name}/lonely: no image or audio file named lonely.*"


def test_corrupt_files_are_skipped_with_their_row_named(tiny_bundle, manifest, tmp_path):
    (tmp_path / "bad.wav").write_bytes(b"RIFF not really audio")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG broken")
    shutil.copy(manifest.parent / "img0.png", tmp_path / "img0.png")
    shutil.copy(manifest.parent / "tone0.wav", tmp_path / "tone0.wav")
    rows = [("img0.png", "tone0.wav"), ("img0.png", "bad.wav"), ("bad.png", "tone0.wav")]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"image": i, "caption": "piano", "audio": a}) + "\n" for i, a in rows))
    found = read_triplets(path)
    pipe = load_pipeline(tiny_bundle)
    pipe.set_progress_bar_config(disable=True)
    examples = prepare_examples(pipe, found, fingerprint=frozen_fingerprint(tiny_bundle), cache_dir=tmp_path / "cache",
                                steps=2, seconds=0.5)
    assert [e.where for e in examples] == ["rows.jsonl line 1"]
    assert [bad.where for bad in found.bad] == ["rows.jsonl line 2", "rows.jsonl line 3"]
    assert found.summary().startswith("1 usable rows, 2 skipped")
    assert f"audio file {tmp_path / 'bad.wav'} is not readable" in found.bad[0].reason
    assert found.bad[1].reason.startswith("image: not a readable image")


def test_audio_is_mono_resampled_and_fit_to_length(tmp_path):
    t = np.arange(TONE_RATE) / TONE_RATE
    stereo = np.stack([np.sin(2 * np.pi * 1000 * t), np.sin(2 * np.pi * 1000 * t)], axis=1) * 0.5
    sf.write(tmp_path / "tone.wav", stereo, TONE_RATE)
    waveform = load_audio(tmp_path / "tone.wav", 16000)
    assert waveform.dtype == np.float32 and waveform.shape == (16000,)
    spectrum = np.abs(np.fft.rfft(waveform))
    assert np.argmax(spectrum) == 1000  # 1 Hz bins over one second: the tone stayed at 1 kHz
    assert fit_length(waveform, 20000)[16000:].tolist() == [0.0] * 4000
    assert fit_length(waveform, 100).shape == (100,)


def test_log_mel_follows_the_tango_convention():
    mel = LogMel(sampling_rate=16000, n_fft=1024, win_length=1024, hop_length=160, n_mels=64, fmin=0, fmax=8000)
    silence = mel(torch.zeros(1, 16000))
    assert silence.shape == (1, 101, 64)  # frames = samples // hop + 1 (centred STFT), then mel bins
    assert torch.allclose(silence, torch.full_like(silence, float(np.log(1e-5))))  # log(clamp(x, 1e-5))
    t = torch.arange(16000) / 16000
    tone = mel(0.5 * torch.sin(2 * torch.pi * 1000 * t)[None])
    fft_bin = round(1000 * 1024 / 16000)
    assert tone[0, 50].argmax() == mel.filters[fft_bin].argmax()  # energy in the mel band holding 1 kHz
    assert tone[0, 50].max() > 0


def test_a_missing_manifest_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such manifest"):
        read_triplets(tmp_path / "nowhere.jsonl")
