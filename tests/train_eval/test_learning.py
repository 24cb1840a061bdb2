"""Training makes the music follow the image: a toy where only the image's colour says which tone plays.

Red images come with a low tone, blue ones with a high tone, and every row has the same caption, so the
only way to lower the loss beyond the two tones' average is through the visual synapse. The bundle is
the tiny one with TANGO's v-prediction: an ε-prediction loss barely rewards knowing a one-bit condition
(the noisy latent itself tells two far-apart sounds apart except near t = T, where ε hardly depends on
the clip), while v ≈ −z_0 at high t makes the condition count wherever the noise hides the sound.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from synthetic import COLOUR_TONES, write_colour_tones

from melfusion.bundle import load_pipeline
from melfusion.dataset.audio import LogMel
from melfusion.dataset.manifest import read_triplets
from melfusion.images import load_image
from melfusion.training.denoiser import SynapseDenoiser
from melfusion.training.image_side import ImageKeyValues
from melfusion.training.loop import Dropout, diffusion_loss, draw_batch, row_generator, train
from melfusion.training.prepare import frozen_fingerprint, load_posterior, prepare_examples

SECONDS = 0.32  # the shortest clip the tiny UNet takes: latent (8, 8, 16)
FEATURE_STEPS = 4


def toy_losses(config, bundle) -> dict[str, float]:
    """Eq. 7 on every row with fixed draws (t, noise, posterior sample): with the row's image, with the
    image hidden (strength 0), and with the other colour's image."""
    pipe = load_pipeline(bundle)
    examples = prepare_examples(pipe, read_triplets(config.data), fingerprint=frozen_fingerprint(config.bundle),
                                cache_dir=config.cache, steps=FEATURE_STEPS, seconds=SECONDS, log=lambda _: None)
    other_colour = [dataclasses.replace(e, trajectory=examples[i ^ 1].trajectory) for i, e in enumerate(examples)]
    model = SynapseDenoiser(pipe.music_unet, pipe.synapse)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    image_kv = ImageKeyValues(pipe, pipe.synapse, FEATURE_STEPS)
    losses = {"image": [], "hidden": [], "other image": []}
    with torch.no_grad():
        for draw in range(8):
            generators = lambda: [row_generator(7, draw, p) for p in range(len(examples))]  # noqa: E731
            batch = draw_batch(pipe, examples, generators(), Dropout(), image_kv.grid)
            losses["image"].append(diffusion_loss(pipe, model, scheduler, image_kv, batch))
            batch.image_strength = torch.zeros_like(batch.image_strength)
            losses["hidden"].append(diffusion_loss(pipe, model, scheduler, image_kv, batch))
            swapped = draw_batch(pipe, other_colour, generators(), Dropout(), image_kv.grid)
            losses["other image"].append(diffusion_loss(pipe, model, scheduler, image_kv, swapped))
    return {name: float(torch.stack(values).mean()) for name, values in losses.items()}


def test_training_learns_to_use_the_image(make_config, v_prediction_bundle, tmp_path):
    manifest = write_colour_tones(tmp_path / "toy", count=8, seconds=SECONDS)
    config = make_config(bundle=v_prediction_bundle, data=manifest, cache_dir=tmp_path / "cache", seconds=SECONDS,
                         batch_size=32, max_steps=100, unet_lr=5e-3, alpha_lr=5e-2, text_dropout=0.0,
                         caption_dropout=0.0, image_dropout=0.0)
    result = train(config)

    # 1. The loss: much lower with the row's own image than with none or with the other colour's
    before, after = toy_losses(config, config.bundle), toy_losses(config, result.bundle)
    assert before["hidden"] == pytest.approx(before["image"], rel=0.02)  # untrained, the image means nothing
    assert after["hidden"] > 1.3 * after["image"] and after["other image"] > 1.3 * after["image"], after

    # 2. Generation: each clip is the tone of its image's colour, measured against the two tones as this
    #    bundle's random decoders render them (a random vocoder cannot play a clean sine)
    pipe = load_pipeline(result.bundle)
    pipe.set_progress_bar_config(disable=True)
    pipe.register_to_config(image_features_from="redenoise")  # the features training mixed in
    rows = read_triplets(manifest).rows
    examples = prepare_examples(pipe, read_triplets(manifest), fingerprint=frozen_fingerprint(config.bundle),
                                cache_dir=config.cache, steps=FEATURE_STEPS, seconds=SECONDS, log=lambda _: None)
    log_mel = LogMel.for_pipeline(pipe)
    spectrum = lambda audio: log_mel(torch.as_tensor(np.asarray(audio, dtype=np.float32))[None])[0]  # noqa: E731
    samples = round(SECONDS * pipe.sampling_rate)
    with torch.no_grad():
        decoded = [pipe.decode_latents(load_posterior(e)[0][None] * pipe.mel_vae.config.scaling_factor, samples)
                   for e in examples[:2]]  # (audio, where NaN/inf began) per tone
        tones = [spectrum(audio[0]) for audio, _ in decoded]
    assert list(COLOUR_TONES) == [load_image(row.image).getpixel((0, 0)) for row in rows[:2]]
    for colour, row in enumerate(rows[:2]):
        # the image's trajectory on the training grid: a random SD UNet's DDIM path depends on its grid
        clips = pipe(["a melody"] * 2, load_image(row.image), seconds=SECONDS, num_inference_steps=20,
                     image_steps=FEATURE_STEPS, guidance_scale=1.0, seed=[0, 1]).audios
        for clip in clips:
            own, other = ((spectrum(clip) - tones[k]).pow(2).mean().sqrt().item() for k in (colour, 1 - colour))
            assert own < 0.75 * other, (colour, own, other)
