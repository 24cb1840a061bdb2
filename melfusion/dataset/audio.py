"""Waveform loading and TANGO/AudioLDM log-mel spectrograms (paper section 3.2: w -> s before the mel VAE).

The convention matches what TANGO's mel VAE and HiFi-GAN were trained on (`audioldm/audio/stft.py`,
`tango/tools/torch_tools.py`): mean-removed waveform peak-normalised to 0.5, magnitude STFT with a Hann
window and reflect padding (n_fft/2 each side), slaney-scale slaney-normalised mel filters, log(clamp(x, 1e-5)).
"""

from __future__ import annotations

import math
import os

import numpy as np
import soundfile as sf
import torch
from transformers.audio_utils import mel_filter_bank


def resample(waveform: np.ndarray, source_rate: int, target_rate: int) -> np.ndarray:
    """Polyphase resampling (scipy's anti-aliased FIR), exact for integer rate ratios like 44.1k -> 16k."""
    if source_rate == target_rate:
        return waveform
    from scipy.signal import resample_poly

    divisor = math.gcd(source_rate, target_rate)
    return resample_poly(waveform, target_rate // divisor, source_rate // divisor).astype(np.float32)


def load_audio(path: str | os.PathLike, sampling_rate: int) -> np.ndarray:
    """Mono float32 waveform at `sampling_rate`; ValueError naming the file if it cannot be decoded."""
    try:
        waveform, rate = sf.read(path, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError) as exc:
        raise ValueError(f"audio file {path} is not readable ({exc})") from None
    if waveform.shape[0] == 0:
        raise ValueError(f"audio file {path} is empty")
    return resample(waveform.mean(axis=1), rate, sampling_rate)


def fit_length(waveform: np.ndarray, num_samples: int) -> np.ndarray:
    """Cut to `num_samples`, or zero-pad the end (TANGO pads short clips with silence)."""
    if len(waveform) >= num_samples:
        return waveform[:num_samples]
    return np.pad(waveform, (0, num_samples - len(waveform)))


def normalize_peak(waveform: np.ndarray) -> np.ndarray:
    """TANGO's `normalize_wav`: remove the mean, scale the peak to 0.5."""
    waveform = waveform - waveform.mean()
    return 0.5 * waveform / (np.abs(waveform).max() + 1e-8)


class LogMel(torch.nn.Module):
    """(B, samples) waveform -> (B, frames, mels) log-mel, frames = samples // hop + 1."""

    def __init__(self, *, sampling_rate: int, n_fft: int, win_length: int, hop_length: int, n_mels: int,
                 fmin: float, fmax: float):
        super().__init__()
        self.n_fft, self.win_length, self.hop_length = n_fft, win_length, hop_length
        filters = mel_filter_bank(n_fft // 2 + 1, n_mels, fmin, fmax, sampling_rate, norm="slaney", mel_scale="slaney")
        self.register_buffer("filters", torch.tensor(filters, dtype=torch.float32), persistent=False)  # (freq, mels)
        self.register_buffer("window", torch.hann_window(win_length), persistent=False)

    @classmethod
    def for_pipeline(cls, pipe) -> LogMel:
        """The mel settings a bundle's mel VAE and vocoder expect (model_index.json, vocoder config)."""
        c = pipe.config
        return cls(
            sampling_rate=pipe.sampling_rate, n_fft=c.n_fft, win_length=c.win_length, hop_length=c.hop_length,
            n_mels=pipe.vocoder.config.model_in_dim, fmin=c.mel_fmin, fmax=c.mel_fmax,
        )

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        spec = torch.stft(
            waveform, self.n_fft, self.hop_length, self.win_length, self.window,
            center=True, pad_mode="reflect", return_complex=True,
        ).abs()  # (B, freq, frames)
        mel = self.filters.T @ spec  # (B, mels, frames)
        return torch.log(torch.clamp(mel, min=1e-5)).transpose(1, 2)
