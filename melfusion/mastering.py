"""Delivery mastering of a clip: loudness normalisation (ITU-R BS.1770-4 via pyloudnorm), a true-peak
limiter, and short fades, so every clip arrives at the level platforms play it at without clipping.

Why each step: platforms normalise to about -14 LUFS, so a clip mastered there is played as it was heard
here; gain alone would push peaks of a quiet, spiky clip past full scale (and MP3/Vorbis decoders
overshoot between samples), hence a limiter on the oversampled ("true") peak; and a model's first and last
samples are not zero, hence fades against clicks. A loop gets none of the fades (they would break the
seam) and its limiter wraps around, so the end still flows into the start.
"""

from __future__ import annotations

import math

import numpy as np
import pyloudnorm
from scipy.ndimage import minimum_filter1d, uniform_filter1d
from scipy.signal import resample_poly

from .audio import encode_audio

TRUE_PEAK_CEILING_DBTP = -1.0  # EBU R 128 / streaming platforms' delivery ceiling
TRUE_PEAK_RATE = 192_000  # oversample to at least this rate to find inter-sample peaks (BS.1770-4: 4x at 48 kHz)
FADE_SECONDS = 0.01  # long enough to hide a step at the ends, short enough not to be heard as a fade
LIMITER_SECONDS = 0.005  # the limiter's look-ahead and release: its gain never changes faster than this
LOUDNESS_ROUNDS = 4  # gain -> limit -> measure rounds; the limiter costs loudness, the next round makes it up
LOUDNESS_TOLERANCE_LU = 0.1
MAX_GAIN_DB = 60.0  # near-silence is not boosted into amplified noise floor beyond this


def oversampling(sampling_rate: int) -> int:
    return max(4, math.ceil(TRUE_PEAK_RATE / sampling_rate))


def true_peak_per_sample(waveform: np.ndarray, sampling_rate: int, *, loop: bool = False) -> np.ndarray:
    """|x| at and between each sample and the next, from an oversampled copy (polyphase FIR); a loop is
    oversampled circularly."""
    factor = oversampling(sampling_rate)
    pad = 64 if waveform.size >= 64 else waveform.size
    padded = np.pad(waveform, pad, mode="wrap" if loop else "constant")
    upsampled = resample_poly(padded, factor, 1)[pad * factor : (pad + waveform.size) * factor]
    return np.maximum(np.abs(waveform), np.abs(upsampled).reshape(waveform.size, factor).max(axis=1))


def true_peak_dbtp(waveform: np.ndarray, sampling_rate: int, *, loop: bool = False) -> float:
    peak = float(true_peak_per_sample(waveform, sampling_rate, loop=loop).max(initial=0.0))
    return 20 * math.log10(peak) if peak > 0 else -math.inf


def integrated_loudness(waveform: np.ndarray, sampling_rate: int) -> float:
    """Integrated loudness in LUFS (gated, BS.1770-4); clips shorter than the 400 ms gating block are
    measured as one block (half a sample short of the clip: pyloudnorm refuses a block that `size / rate`
    rounding makes a hair longer than the clip, e.g. 2007 samples at 16 kHz)."""
    block = min(0.4, (waveform.size - 0.5) / sampling_rate)
    return float(pyloudnorm.Meter(sampling_rate, block_size=block).integrated_loudness(waveform.astype(np.float64)))


def limit_true_peak(waveform: np.ndarray, sampling_rate: int, ceiling_dbtp: float, *, loop: bool = False) -> np.ndarray:
    """A look-ahead peak limiter: the gain at each sample is at most what keeps the true peak within
    `window` samples under the ceiling, smoothed over the same window (so it stays under it), then a final
    static trim catches what the oversampled estimate of the result still shows above the ceiling."""
    ceiling = 10 ** (ceiling_dbtp / 20)
    peak = true_peak_per_sample(waveform, sampling_rate, loop=loop)
    if peak.max(initial=0.0) <= ceiling:
        return waveform
    window = max(1, round(LIMITER_SECONDS * sampling_rate))
    mode = "wrap" if loop else "nearest"
    needed = np.minimum(1.0, ceiling / np.maximum(peak, 1e-12))
    gain = uniform_filter1d(minimum_filter1d(needed, 2 * window + 1, mode=mode), 2 * window + 1, mode=mode)
    limited = waveform * gain
    overshoot = true_peak_per_sample(limited, sampling_rate, loop=loop).max() / ceiling
    return limited / overshoot if overshoot > 1 else limited


def fade(waveform: np.ndarray, sampling_rate: int, seconds: float = FADE_SECONDS) -> np.ndarray:
    """Raised-cosine fade in and out over `seconds` (at most a quarter of the clip each)."""
    length = min(round(seconds * sampling_rate), waveform.size // 4)
    if length == 0:
        return waveform
    ramp = 0.5 - 0.5 * np.cos(np.linspace(0.0, np.pi, length, endpoint=False))
    faded = waveform.copy()
    faded[:length] *= ramp
    faded[-length:] *= ramp[::-1]
    return faded


def master(
    waveform: np.ndarray,
    sampling_rate: int,
    *,
    loudness_lufs: float | None,
    loop: bool = False,
    ceiling_dbtp: float = TRUE_PEAK_CEILING_DBTP,
) -> np.ndarray:
    """Fades (not for loops), gain to `loudness_lufs` (None: the level as generated), then the true-peak
    limiter (always: a generated clip may exceed full scale). Returns float32."""
    audio = np.asarray(waveform, dtype=np.float64)
    if not loop:
        audio = fade(audio, sampling_rate)
    if loudness_lufs is None:
        return limit_true_peak(audio, sampling_rate, ceiling_dbtp, loop=loop).astype(np.float32)
    gain_db, result = 0.0, audio
    for _ in range(LOUDNESS_ROUNDS):
        measured = integrated_loudness(result, sampling_rate)
        if not math.isfinite(measured) or abs(measured - loudness_lufs) <= LOUDNESS_TOLERANCE_LU:
            break
        gain_db = min(gain_db + loudness_lufs - measured, MAX_GAIN_DB)
        result = limit_true_peak(audio * 10 ** (gain_db / 20), sampling_rate, ceiling_dbtp, loop=loop)
    return limit_true_peak(result, sampling_rate, ceiling_dbtp, loop=loop).astype(np.float32)


def deliver(waveform: np.ndarray, sampling_rate: int, request) -> tuple[np.ndarray, bytes]:
    """A resolved GenerationRequest's clip as delivered: mastered (its `loudness_lufs`, `loop`) and
    encoded (its `format`); returns the mastered waveform too (for the spectrogram)."""
    mastered = master(waveform, sampling_rate, loudness_lufs=request.loudness_lufs, loop=bool(request.loop))
    return mastered, encode_audio(mastered, sampling_rate, request.format)
