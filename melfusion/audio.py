"""Waveform helpers: clip length <-> latent length, encoding (WAV, FLAC, Ogg Vorbis, Ogg Opus, MP3, all
through libsndfile) and writing."""

from __future__ import annotations

import io
import math
import os
from pathlib import Path

import numpy as np
import soundfile as sf

from .files import write_atomically
from .formats import DEFAULT_FORMAT, audio_format


def latent_frames(seconds: float, *, sampling_rate: int, hop_length: int, vae_scale: int, unet_scale: int) -> int:
    """Latent time length for a clip: enough mel frames for `seconds`, rounded up so the UNet can halve it."""
    mel_frames = math.ceil(seconds * sampling_rate / hop_length)
    frames = math.ceil(mel_frames / vae_scale)
    return math.ceil(frames / unet_scale) * unet_scale


def encode_audio(waveform: np.ndarray, sampling_rate: int, format: str = DEFAULT_FORMAT) -> bytes:
    """Mono float waveform in [-1, 1] -> file bytes in `format` (16-bit for the lossless ones).

    Opus and MP3 are written at the rates of `AudioFormat.rate_for` (16 kHz: Opus 48 kHz, MP3 32 kHz),
    resampled with scipy (the engine's).
    """
    spec = audio_format(format)
    waveform = np.clip(np.asarray(waveform, dtype=np.float32), -1.0, 1.0)
    target = spec.rate_for(sampling_rate)
    if target != sampling_rate:
        from scipy.signal import resample_poly

        divisor = math.gcd(target, sampling_rate)
        waveform = np.clip(resample_poly(waveform, target // divisor, sampling_rate // divisor), -1.0, 1.0)
        sampling_rate = target
    buffer = io.BytesIO()
    options = {} if spec.compression_level is None else {"compression_level": spec.compression_level}
    sf.write(buffer, waveform, sampling_rate, format=spec.container, subtype=spec.subtype, **options)
    return buffer.getvalue()


def encode_wav(waveform: np.ndarray, sampling_rate: int) -> bytes:
    """Mono float waveform in [-1, 1] -> 16-bit PCM WAV bytes (deterministic for equal input)."""
    return encode_audio(waveform, sampling_rate, "wav")


def write_wav(path: str | os.PathLike, waveform: np.ndarray, sampling_rate: int) -> Path:
    return write_atomically(path, encode_wav(waveform, sampling_rate))
