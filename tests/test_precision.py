"""Numerics in every dtype: T5's `wo` stays float32, NaN is blamed on the right component, random
bundles stay finite in float16, and the saved schedulers carry the pipeline's grid."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from dummies import make_pipeline

from melfusion.attention import ImageFeatures
from melfusion.bundle import load_pipeline, save_bundle
from melfusion.pipeline import MelFusionPipeline
from melfusion.precision import NonFiniteOutput, keep_float32_modules
from melfusion.presets import build_components

FAST = {"seconds": 1.0, "num_inference_steps": 2, "guidance_scale": 3.0, "seed": 0}


def wo_dtypes(t5: torch.nn.Module) -> set[torch.dtype]:
    return {module.weight.dtype for name, module in t5.named_modules() if name.endswith(".wo")}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_bundle_keeps_t5_wo_in_float32_after_save_and_load(tmp_path, dtype):
    pipe = MelFusionPipeline(**build_components("tiny", seed=0)).to(dtype=dtype)
    assert wo_dtypes(pipe.text_encoder) == {torch.float32}
    assert pipe.music_unet.dtype == dtype
    loaded = load_pipeline(save_bundle(pipe, tmp_path / "half", source="test"), dtype=dtype)
    assert wo_dtypes(loaded.text_encoder) == {torch.float32}
    assert loaded.text_encoder.shared.weight.dtype == dtype  # only the kept layers, not the whole encoder


def _overflowing_t5_wo_scale(t5: torch.nn.Module, ids: torch.Tensor) -> float:
    """The smallest power of 10 by which `wo` must be scaled for a fully float16 T5 to overflow in it."""
    for exponent in range(1, 9):
        model = _scaled_copy(t5, 10.0**exponent).to(torch.float16)
        overflowed = []
        hooks = [m.register_forward_hook(lambda m, i, out: overflowed.append(torch.isinf(out).any().item()))
                 for name, m in model.named_modules() if name.endswith(".wo")]  # fmt: skip
        with torch.no_grad():
            model(ids)
        for hook in hooks:
            hook.remove()
        if any(overflowed):
            return 10.0**exponent
    raise AssertionError("wo never overflowed")


def _scaled_copy(t5: torch.nn.Module, scale: float) -> torch.nn.Module:
    model = type(t5)(t5.config).eval()
    model.load_state_dict(t5.state_dict())
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith(".wo"):
                module.weight.mul_(scale)
    return model


def test_t5_that_overflows_in_float16_stays_finite_with_wo_in_float32():
    t5 = build_components("tiny", seed=0)["text_encoder"]
    ids = torch.tensor([[5, 6, 7, 8, 9, 1]])
    scale = _overflowing_t5_wo_scale(t5, ids)
    reference = _scaled_copy(t5, scale)
    kept = _scaled_copy(t5, scale).to(torch.float16)
    keep_float32_modules(kept)
    fully_half = _scaled_copy(t5, scale).to(torch.float16)
    with torch.no_grad():
        expected = reference(ids)[0]
        states = kept(ids)[0].float()
        clamped = fully_half(ids)[0].float()  # T5 clamps inf to float16's max: finite but wrong
    relative_error = lambda x: ((x - expected).norm() / expected.norm()).item()
    assert torch.isfinite(states).all()
    assert relative_error(states) < 0.01
    assert relative_error(clamped) > 0.1


@pytest.mark.parametrize(
    ("component", "parameter"),
    [("text_encoder", "encoder.final_layer_norm.weight"), ("mel_vae", "decoder.conv_out.weight"), ("vocoder", "conv_post.weight")],
)
def test_non_finite_audio_names_the_component_where_it_began(component, parameter):
    pipe = make_pipeline()
    with torch.no_grad():
        getattr(pipe, component).get_parameter(parameter).fill_(float("nan"))
    with pytest.raises(NonFiniteOutput, match=f"first appeared in the output of {component}") as caught:
        pipe("calm piano", **FAST)
    assert caught.value.component == component


def test_a_non_finite_row_fails_alone_and_a_strength_zero_row_never_reads_its_image(image):
    """Rows never mix: image features with NaN fail the rows that read them (blamed on the image UNet),
    while a row at strength 0 reads zeros, not its image, and stays exactly caption only."""
    pipe = make_pipeline()
    features = pipe.encode_images([image, image.transpose(0)], FAST["num_inference_steps"])
    poisoned = ImageFeatures.concat(features)
    for tensor in poisoned.keys.values():
        tensor[:, 1] = float("nan")
    captions = ["calm piano", "rainy jazz", "happy drums"]
    rows = dict(image_strength=[1.0, 1.0, 0.0], **FAST)
    output = pipe(captions, image_features=_rows_of(poisoned, [0, 1, 1]), on_non_finite="report", **rows)
    assert output.errors[0] is None and output.errors[2] is None
    assert output.errors[1].component == "image_unet" and not np.isfinite(output.audios[1]).all()
    clean = pipe(captions, image_features=_rows_of(ImageFeatures.concat(features), [0, 1, 1]), **rows).audios
    np.testing.assert_array_equal(output.audios[[0, 2]], clean[[0, 2]])
    with pytest.raises(NonFiniteOutput, match="first appeared in the output of image_unet"):
        pipe(captions, image_features=_rows_of(poisoned, [0, 1, 1]), **rows)


def _rows_of(features: ImageFeatures, rows: list[int]) -> ImageFeatures:
    """Features with one row per caption, row i being image rows[i]."""
    index = torch.tensor(rows)
    return ImageFeatures(features.timesteps, {k: v[:, index] for k, v in features.keys.items()},
                         {k: v[:, index] for k, v in features.values.items()})  # fmt: skip


def test_random_small_vocoder_stays_finite_and_bounded_in_float16():
    vocoder = build_components("small", seed=0)["vocoder"].to(torch.float16)
    peaks = []
    for module in vocoder.modules():
        module.register_forward_hook(lambda m, i, out: peaks.append(out.abs().max().item()))
    mel = torch.randn(1, 100, 64, generator=torch.Generator().manual_seed(0)).to(torch.float16)
    with torch.no_grad():
        audio = vocoder(mel)
    assert torch.isfinite(audio).all() and max(peaks) < 1e3  # HiFi-GAN's own init reached 4e12 here
    assert audio.float().std() > 1e-3  # audible noise, not 16-bit silence


def test_saved_schedulers_carry_the_pipelines_trailing_grid(tmp_path):
    pipe = make_pipeline()
    saved = save_bundle(pipe, tmp_path / "bundle", source="test")
    for folder in ("scheduler", "image_scheduler"):
        alone = DDIMScheduler.from_pretrained(saved / folder)
        alone.set_timesteps(50)
        assert alone.config.timestep_spacing == "trailing"
        assert torch.equal(alone.timesteps, pipe.timestep_grid(50))
        assert alone.timesteps[0] == 999


def test_full_size_random_components_use_tangos_v_prediction():
    with torch.device("meta"):  # the 2.3 B-parameter architecture, without allocating it
        components = build_components("full")
    assert components["scheduler"].config.prediction_type == "v_prediction"
    assert components["image_scheduler"].config.prediction_type == "epsilon"


def test_ddpm_tango_sampler_is_seeded_per_row(pipe):
    ddpm = {**FAST, "scheduler": "ddpm", "seed": [3, 4]}
    batch = pipe(["calm piano", "rainy jazz"], **ddpm).audios
    alone = pipe("rainy jazz", **{**ddpm, "seed": 4}).audios
    again = pipe("rainy jazz", **{**ddpm, "seed": 4}).audios
    np.testing.assert_array_equal(alone, again)
    np.testing.assert_allclose(batch[1], alone[0], atol=1e-4)
    assert not np.allclose(alone, pipe("rainy jazz", **{**ddpm, "seed": 5}).audios)
