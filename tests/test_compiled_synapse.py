"""The synapse as a compiler sees it: processors attached once, state in tensors, calls padded to warmed
shapes and no recompilation over varied batches; one image pass (features recorded during inversion) and
a coarse grid."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0
from dummies import make_pipeline, noise_image
from torch._dynamo.utils import counters

from melfusion.pipeline import MelFusionPipeline, nearest_steps
from melfusion.presets import build_components
from melfusion.shapes import ShapeBuckets

FAST = {"seconds": 1.0, "num_inference_steps": 3, "guidance_scale": 3.0}


def test_caption_only_through_the_mixers_is_exactly_plain_text_to_music():
    """Strength 0 runs the same processors as an image request; it must equal the stock UNet bit for bit."""
    pipe = make_pipeline()
    mixed = pipe("calm piano", image=noise_image(0), image_strength=0.0, seed=2, **FAST).audios
    caption_only = pipe("calm piano", seed=2, **FAST).audios
    pipe.music_unet.set_attn_processor(AttnProcessor2_0())  # diffusers' own attention everywhere
    plain = pipe("calm piano", seed=2, **FAST).audios
    np.testing.assert_array_equal(caption_only, plain)
    np.testing.assert_array_equal(mixed, plain)


def test_rows_of_one_batch_keep_their_own_guidance_strength_and_image(image, other_image):
    pipe = make_pipeline()
    rows = dict(seed=[1, 2, 3], guidance_scale=[3.0, 5.0, 3.0], image_strength=[1.0, 0.5, 0.0])
    batch = pipe(["calm piano", "rainy jazz", "happy drums"], [image, other_image, None], **{**FAST, **rows})
    alone = [
        pipe("calm piano", image, seed=1, **{**FAST, "guidance_scale": 3.0}).audios[0],
        pipe("rainy jazz", other_image, seed=2, image_strength=0.5, **{**FAST, "guidance_scale": 5.0}).audios[0],
        pipe("happy drums", seed=3, **FAST).audios[0],
    ]
    for row, expected in zip(batch.audios, alone):
        np.testing.assert_allclose(row, expected, atol=1e-4)  # CPU batch kernels round differently (~1e-6)


def test_warmed_compiled_pipeline_serves_mixed_batches_without_recompiling(image, other_image):
    """After `warm_up`, every warmed batch size with several photos, a repeated photo, caption-only and
    strength-0 rows, CFG on and off, both caption buckets and a clip shorter than its bucket must reuse the
    warmed graphs: the image K/V buffer has one row per UNet row, whatever carries a photo.

    backend="eager" (MELFUSION_COMPILE_MODE=check) traces and guards exactly as inductor does: whether a
    call recompiles is decided by dynamo's guards, before the backend, without minutes of C++ compilation.
    """
    buckets = ShapeBuckets(batch_sizes=(1, 2, 4), seconds=(1.0,), caption_tokens=(8, 32))
    compiled = make_pipeline()
    compiled.compile_unets(backend="eager")
    compiled.shape_buckets = buckets
    torch._dynamo.reset()
    before = counters["stats"]["unique_graphs"]
    compiled.warm_up(buckets)
    assert counters["stats"]["unique_graphs"] - before == buckets.graphs == 9  # one image-UNet graph per size
    long_caption = "calm piano with soft strings and slow drums in the summer night rain " * 2  # 25 tokens
    repeated = image.copy()  # decoded apart, as two uploads of one photo are
    third = noise_image(2)
    mixed = {  # (captions, images, per-row fields)
        "one photo": (["calm piano"], [image], {}),
        "two photos, CFG off": (["rainy jazz", "happy drums"], [image, other_image], {"guidance_scale": 1.0}),
        "photo and caption only": (["rainy jazz", "happy drums"], [other_image, None], {}),
        "one photo uploaded twice, strength 0 in one": (
            ["rainy jazz", "happy drums"], [image, repeated], {"image_strength": [0.7, 0.0]}),
        "photo, repeated photo, caption only (padded to 4)": (
            ["calm piano", long_caption, "sad violin"], [image, repeated, None], {"seed": [1, 2, 3]}),
        "four photos, strength 0 in one": (
            ["a", "b c", "calm piano", long_caption], [image, other_image, third, repeated],
            {"image_strength": [1.0, 0.0, 0.5, 1.0], "guidance_scale": [3.0, 7.0, 1.0, 2.0]}),
        "three rows without CFG (padded to 4 UNet rows)": (
            ["x", "y", "z"], [third, None, image], {"guidance_scale": 1.0}),
        "caption only, clip shorter than its bucket": (["calm piano"], None, {"seconds": 0.5}),
    }  # fmt: skip
    outputs = {}
    try:
        torch._dynamo.config.error_on_recompile = True
        for case, (captions, images, fields) in mixed.items():
            outputs[case] = compiled(captions, images, **{**FAST, "seed": 4, **fields})
    finally:
        torch._dynamo.config.error_on_recompile = False
    assert counters["stats"]["unique_graphs"] - before == buckets.graphs
    assert not compiled.shape_misses
    assert outputs["caption only, clip shorter than its bucket"].audios.shape == (1, 8000)
    # Padding is thrown away: each row is the clip the eager, unpadded pipeline makes for it.
    padded = "photo, repeated photo, caption only (padded to 4)"
    captions, images, fields = mixed[padded]
    eager = make_pipeline()
    for row, (caption, row_image) in enumerate(zip(captions, images)):
        alone = eager(caption, row_image, **{**FAST, "seed": fields["seed"][row]}).audios[0]
        np.testing.assert_allclose(outputs[padded].audios[row], alone, atol=1e-4)


def test_a_shape_outside_the_buckets_is_counted_and_still_served():
    pipe = make_pipeline()
    pipe.shape_buckets = ShapeBuckets(batch_sizes=(1,), seconds=(0.5,), caption_tokens=(8,))
    output = pipe(["calm piano", "rainy jazz night with soft piano and strings"], seed=0, **FAST)
    assert output.audios.shape == (2, 16000)
    assert pipe.shape_misses == {"batch_size": 1, "seconds": 1, "caption_tokens": 1}


def damped_pipeline(**config) -> MelFusionPipeline:
    """A random UNet damped 30× so DDIM inversion is nearly exact (see the round-trip test)."""
    pipe = MelFusionPipeline(**build_components("tiny", seed=0), **config)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        pipe.image_unet.conv_out.weight.mul_(0.03)
        pipe.image_unet.conv_out.bias.mul_(0.03)
    return pipe


def _relative_difference(a, b) -> float:
    """Mean over synapse layers of ‖K_a − K_b‖ / ‖K_b‖."""
    return float(np.mean([((a.keys[s] - b.keys[s]).norm() / b.keys[s].norm()).item() for s in a.keys]))


def test_features_recorded_during_inversion_approach_a_second_denoising_pass(image, other_image):
    """One pass reads ε_ψ at (z_{t-Δ}, t), the second pass at (z_t, t); with an exact inversion the two
    converge as the grid gets finer. Measured on the damped tiny UNet (whose random K/V are far more
    sensitive to their input than a trained UNet's): 0.21 at 50 steps, 0.15 at 200, against 0.6+ for
    another image. Stated tolerance: under 0.3 at 50 steps, under half the other image's distance.
    """
    one_pass = damped_pipeline().encode_image(image, 50)
    two_pass = damped_pipeline(image_features_from="redenoise").encode_image(image, 50)
    other = damped_pipeline(image_features_from="redenoise").encode_image(other_image, 50)
    assert torch.equal(one_pass.timesteps, two_pass.timesteps)
    assert _relative_difference(one_pass, two_pass) < 0.3
    assert _relative_difference(one_pass, two_pass) < 0.5 * _relative_difference(other, two_pass)
    finer_one, finer_two = (damped_pipeline(image_features_from=f).encode_image(image, 200) for f in ("inversion", "redenoise"))
    assert _relative_difference(finer_one, finer_two) < _relative_difference(one_pass, two_pass)


def test_redenoise_source_costs_a_second_image_pass(image):
    pipe = make_pipeline(image_features_from="redenoise")
    seen = []
    pipe("calm piano", image, callback=seen.append, seed=0, **FAST)
    assert [s.phase for s in seen] == ["image_inversion"] * 3 + ["image_denoise"] * 3 + ["music_denoise"] * 3


def test_coarse_image_grid_runs_fewer_image_passes_and_maps_to_the_nearest_step(image):
    pipe = make_pipeline()
    seen = []
    coarse = pipe("calm piano", image, image_steps=2, callback=seen.append, seed=0, **{**FAST, "num_inference_steps": 6})
    assert [s.phase for s in seen].count("image_inversion") == 2
    full = pipe("calm piano", image, seed=0, **{**FAST, "num_inference_steps": 6})
    assert not np.array_equal(coarse.audios, full.audios)
    assert nearest_steps(pipe.timestep_grid(6), pipe.timestep_grid(2)) == [0, 0, 1, 1, 1, 1]
    assert nearest_steps(pipe.timestep_grid(6), pipe.timestep_grid(6)) == list(range(6))
    with pytest.raises(ValueError, match="image_steps"):
        pipe("calm piano", image, image_steps=7, seed=0, **{**FAST, "num_inference_steps": 6})
