"""Tiny synthetic triplet data sets written by the tests: noise PNGs, captions, sine tones as WAV; and a toy
where only the image says which tone plays."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import soundfile as sf
from PIL import Image

CAPTIONS = ("calm piano at sunset", "upbeat drums in the city", "sad violin in the rain", "happy guitar on the beach")
TONE_RATE = 22050  # not the bundle's 16 kHz, so loading resamples


def write_triplets(folder: Path, count: int = 4, seconds: float = 1.0) -> Path:
    """`count` triplets and a JSONL manifest with relative paths; returns the manifest's path."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    lines = []
    for i in range(count):
        pixels = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i}.png")
        t = np.arange(int(seconds * TONE_RATE)) / TONE_RATE
        sf.write(folder / f"tone{i}.wav", 0.3 * np.sin(2 * np.pi * 220 * (i + 1) * t), TONE_RATE)
        lines.append({"image": f"img{i}.png", "caption": CAPTIONS[i % len(CAPTIONS)], "audio": f"tone{i}.wav"})
    manifest = folder / "data.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return manifest


COLOUR_TONES = {(220, 30, 30): 300.0, (30, 30, 220): 2400.0}  # red image: a low tone; blue image: a high tone


def write_colour_tones(folder: Path, count: int = 8, seconds: float = 0.32) -> Path:
    """`count` rows alternating red/blue images with a low/high tone and one caption for all: only the
    image tells the two sounds apart. Returns the JSONL manifest's path."""
    folder.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * TONE_RATE)) / TONE_RATE
    lines = []
    for i in range(count):
        colour, pitch = list(COLOUR_TONES.items())[i % len(COLOUR_TONES)]
        Image.new("RGB", (64, 64), colour).save(folder / f"colour{i}.png")
        sf.write(folder / f"pitch{i}.wav", 0.5 * np.sin(2 * np.pi * pitch * t), TONE_RATE)
        lines.append({"image": f"colour{i}.png", "caption": "a melody", "audio": f"pitch{i}.wav"})
    manifest = folder / "data.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return manifest
