"""WAV encoding and the spectrogram picture."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from melfusion import audio
from melfusion.spectrogram import spectrogram_png


def test_latent_frames_cover_the_clip_and_divide_by_the_unet_scale():
    frames = audio.latent_frames(10.0, sampling_rate=16000, hop_length=160, vae_scale=4, unet_scale=8)
    assert frames == 256  # 1000 mel frames -> 250 latent frames -> next multiple of 8
    assert frames * 4 * 160 >= 10.0 * 16000


def test_encode_wav_clips_to_pcm16_range():
    data = audio.encode_wav(np.array([0.0, 2.0, -2.0, 0.5], dtype=np.float32), 16000)
    samples, rate = sf.read(io.BytesIO(data), dtype="int16")
    assert rate == 16000
    assert samples.tolist() == [0, 32767, -32768, 16384]


@pytest.mark.parametrize("seconds", [0.5, 10.0])
def test_spectrogram_is_a_png_of_the_stated_size_for_short_and_long_clips(pipe, seconds):
    waveform = np.random.default_rng(0).standard_normal(int(seconds * pipe.sampling_rate)).astype(np.float32) * 0.1
    picture = Image.open(io.BytesIO(spectrogram_png(pipe, waveform, width_px=960, height_px=320)))
    assert (picture.format, picture.size) == ("PNG", (960, 320))
    pixels = np.asarray(picture.convert("L"), dtype=float)
    assert pixels[60:260, 100:800].std() > 10  # the spectrogram itself fills the plot area, not a blank
