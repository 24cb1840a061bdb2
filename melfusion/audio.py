"""Waveform helpers: clip length <-> latent length, encoding (WAV, FLAC, Ogg Vorbis, Ogg Opus, MP3, all
through libsndfile) and writing."""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from .errors import InputError
from .files import write_atomically


def latent_frames(seconds: float, *, sampling_rate: int, hop_length: int, vae_scale: int, unet_scale: int) -> int:
    """Latent time length for a clip: enough mel frames for `seconds`, rounded up so the UNet can halve it."""
    mel_frames = math.ceil(seconds * sampling_rate / hop_length)
    frames = math.ceil(mel_frames / vae_scale)
    return math.ceil(frames / unet_scale) * unet_scale


@dataclass(frozen=True)
class AudioFormat:
    """A file format a clip can be delivered in: libsndfile's container and codec, and what HTTP calls it."""

    name: str
    extension: str
    content_type: str
    container: str  # libsndfile's major format
    subtype: str  # libsndfile's codec
    # The rates the codec is written at (empty: any): a clip at another rate is resampled to the lowest one
    # above it. MP3 is written at 32 kHz and up (MPEG-1): at 16 kHz (MPEG-2) LAME low-passes at about
    # 5.5 kHz, which took 1.2 LU off the tiny model's clips. Opus at 48 kHz, the rate it codes at.
    sampling_rates: tuple[int, ...] = ()
    # libsndfile's 0 (best) .. 1 (smallest): Opus's default band-limits 16 kHz clips (-3 LU on noise).
    compression_level: float | None = None

    def rate_for(self, sampling_rate: int) -> int:
        """The rate a clip at `sampling_rate` is written at."""
        if not self.sampling_rates or sampling_rate in self.sampling_rates:
            return sampling_rate
        return min((rate for rate in self.sampling_rates if rate > sampling_rate), default=max(self.sampling_rates))


OPUS_RATES = (48000,)  # Opus codes at 48 kHz inside whatever it is given; at 16 kHz the tiny model's clips came back 1 LU louder
MPEG1_RATES = (32000, 44100, 48000)
AUDIO_FORMATS: dict[str, AudioFormat] = {
    f.name: f
    for f in (
        AudioFormat("wav", "wav", "audio/wav", "WAV", "PCM_16"),
        AudioFormat("flac", "flac", "audio/flac", "FLAC", "PCM_16"),
        AudioFormat("ogg", "ogg", "audio/ogg", "OGG", "VORBIS", compression_level=0.3),
        AudioFormat("opus", "opus", "audio/ogg; codecs=opus", "OGG", "OPUS", OPUS_RATES, compression_level=0.5),
        AudioFormat("mp3", "mp3", "audio/mpeg", "MP3", "MPEG_LAYER_III", MPEG1_RATES),
    )
}
DEFAULT_FORMAT = "wav"


def audio_format(name: str) -> AudioFormat:
    """The format called `name`; InputError naming `format` otherwise."""
    if name not in AUDIO_FORMATS:
        raise InputError("format", f"must be one of {tuple(AUDIO_FORMATS)}, got {name!r}")
    return AUDIO_FORMATS[name]


def format_of_extension(extension: str) -> AudioFormat | None:
    return next((f for f in AUDIO_FORMATS.values() if f.extension == extension.lower().lstrip(".")), None)


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
