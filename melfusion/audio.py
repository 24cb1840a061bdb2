"""Waveform helpers: clip length <-> latent length, WAV encoding and writing."""

from __future__ import annotations

import io
import math
import os
from pathlib import Path

import numpy as np
import soundfile as sf

from .files import write_atomically


def latent_frames(seconds: float, *, sampling_rate: int, hop_length: int, vae_scale: int, unet_scale: int) -> int:
    """Latent time length for a clip: enough mel frames for `seconds`, rounded up so the UNet can halve it."""
    mel_frames = math.ceil(seconds * sampling_rate / hop_length)
    frames = math.ceil(mel_frames / vae_scale)
    return math.ceil(frames / unet_scale) * unet_scale


def encode_wav(waveform: np.ndarray, sampling_rate: int) -> bytes:
    """Mono float waveform in [-1, 1] -> 16-bit PCM WAV bytes (deterministic for equal input)."""
    buffer = io.BytesIO()
    sf.write(buffer, np.clip(waveform, -1.0, 1.0), sampling_rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def write_wav(path: str | os.PathLike, waveform: np.ndarray, sampling_rate: int) -> Path:
    return write_atomically(path, encode_wav(waveform, sampling_rate))
