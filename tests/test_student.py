"""The few-step student on the engine (no distillation here: an untrained student is its teacher with a guidance
input), and the guidance interval on a teacher."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import LatentConsistencyModelPipeline, TCDScheduler
from dummies import get_dummy_components, make_pipeline
from torch._dynamo.utils import counters

from melfusion.bundle import save_bundle, verify_bundle
from melfusion.errors import BundleError, InputError
from melfusion.pipeline import MelFusionPipeline, guided_steps
from melfusion.presets import sd_scheduler
from melfusion.request import GenerationRequest
from melfusion.shapes import ShapeBuckets
from melfusion.student import ddim_step, guidance_embedding, student_scheduler, student_unet_from

FAST = {"seconds": 0.5, "num_inference_steps": 4}


def make_student(**config) -> MelFusionPipeline:
    """The tiny pipeline with an untrained student UNet (the teacher's weights, a zero guidance projection)."""
    components = get_dummy_components()
    music_unet = student_unet_from(components["music_unet"])
    pipe = MelFusionPipeline(**{**components, "music_unet": music_unet, "scheduler": student_scheduler(components["scheduler"].config, 40)},
                             default_steps=4, max_steps=8, **config)  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def student() -> MelFusionPipeline:
    return make_student()


def unet_calls(pipe: MelFusionPipeline) -> tuple[list, object]:
    """(batch size, timestep_cond) of every music-UNet call, and the hook's handle."""
    calls = []
    hook = lambda module, args, kwargs: calls.append((args[0].shape[0], kwargs.get("timestep_cond")))
    return calls, pipe.music_unet.register_forward_pre_hook(hook, with_kwargs=True)


def test_an_untrained_student_samples_its_teachers_ode_without_guidance(pipe, student, image):
    # TCD with γ = 0 steps like DDIM, and the zero guidance projection leaves the teacher's UNet as it was
    for row_image in (None, image):
        teacher = pipe("calm piano", row_image, guidance_scale=1.0, scheduler="ddim", seed=3, **FAST).audios
        few = student("calm piano", row_image, guidance_scale=7.0, seed=3, **FAST).audios
        np.testing.assert_allclose(few, teacher, atol=1e-6)


def test_a_student_runs_one_unet_row_per_clip_with_each_rows_guidance_as_input(student, image, other_image):
    calls, hook = unet_calls(student)
    try:
        student(["calm piano", "rainy jazz"], [image, other_image], guidance_scale=[2.0, 5.0], seed=[1, 2], **FAST)
    finally:
        hook.remove()
    assert [size for size, _ in calls] == [2] * 4  # no unconditional rows
    expected = guidance_embedding(torch.tensor([2.0, 5.0]), student.music_unet.config.time_cond_proj_dim)
    assert all(torch.equal(condition, expected) for _, condition in calls)


def test_a_student_reads_guidance_up_to_1_as_1_like_its_teacher(student):
    # ≤ 1 turns guidance off; distillation draws scales ≥ 1, so below 1 the student is asked for 1
    calls, hook = unet_calls(student)
    try:
        student(["calm piano"] * 4, guidance_scale=[0.0, 0.5, 1.0, 3.0], seed=1, **FAST)
    finally:
        hook.remove()
    expected = guidance_embedding(torch.tensor([1.0, 1.0, 1.0, 3.0]), student.music_unet.config.time_cond_proj_dim)
    assert calls and all(torch.equal(condition, expected) for _, condition in calls)


@pytest.mark.parametrize("scheduler", ["tcd", "lcm"])
def test_student_clips_are_seeded_and_strength_zero_is_caption_only(student, image, other_image, scheduler):
    run = lambda *args, **kwargs: student(*args, scheduler=scheduler, **FAST, **kwargs).audios
    first = run("calm piano", image, seed=5)
    assert np.array_equal(first, run("calm piano", image, seed=5))
    assert not np.allclose(first, run("calm piano", image, seed=6))
    assert np.array_equal(run("calm piano", image, seed=5, image_strength=0.0), run("calm piano", seed=5))
    batch = run(["calm piano", "rainy jazz"], [image, other_image], seed=[5, 9])
    np.testing.assert_allclose(batch[0], first[0], atol=1e-4)


def test_verify_refuses_a_mismatched_or_anonymous_student(tmp_path):
    components = get_dummy_components()
    student_unet, lcm = student_unet_from(components["music_unet"]), student_scheduler(components["scheduler"].config, 40)
    for name, mixed in (("student-unet", {"music_unet": student_unet}), ("student-scheduler", {"scheduler": lcm})):
        bundle = save_bundle(MelFusionPipeline(**{**components, **mixed}), tmp_path / name, source="test")
        with pytest.raises(BundleError, match="guidance input"):
            verify_bundle(bundle)
    paired = MelFusionPipeline(**{**components, "music_unet": student_unet, "scheduler": lcm})
    anonymous = save_bundle(paired, tmp_path / "anonymous", source="test")
    with pytest.raises(BundleError, match="name its teacher"):  # a student must say where it came from
        verify_bundle(anonymous)
    origin = {"teacher": {"bundle": "/bundles/tiny"}, "distillation": {"steps": 0}}
    assert verify_bundle(save_bundle(paired, tmp_path / "named", source="test", origin=origin))["origin"] == origin


def test_a_student_has_its_own_samplers_presets_and_bounds(pipe, student):
    limits = student.limits
    assert (limits.schedulers, limits.default_steps, limits.max_steps) == (("tcd", "lcm"), 4, 8)
    fast = GenerationRequest("calm piano", preset="fast").resolved(limits)
    assert (fast.scheduler, fast.steps, fast.guidance_scale, fast.uses_cfg) == ("tcd", 4, 7.0, False)
    refusals = [
        (limits, {"scheduler": "ddim"}, "scheduler"),
        (limits, {"preset": "paper"}, "preset"),
        (limits, {"steps": 9}, "steps"),
        (limits, {"guidance_end": 0.5}, "guidance_end"),
        (limits, {"image_guidance": "both"}, "image_guidance"),
        (pipe.limits, {"preset": "fast"}, "preset"),
        (pipe.limits, {"scheduler": "tcd"}, "scheduler"),
    ]
    for bundle_limits, fields, field in refusals:
        with pytest.raises(InputError) as error:
            GenerationRequest("calm piano", **fields).resolved(bundle_limits)
        assert error.value.field == field, fields
    with pytest.raises(InputError, match="needs a student bundle"):
        GenerationRequest("calm piano", preset="fast").resolved(pipe.limits)
    with pytest.raises(InputError, match="scheduler"):
        student("calm piano", scheduler="ddim", **FAST)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_the_jump_distillation_trains_is_the_step_tcd_samples_with(prediction_type):
    grid = [999, 749, 499, 249]
    scheduler = TCDScheduler.from_config(student_scheduler(sd_scheduler(prediction_type).config, 40).config)
    scheduler.set_timesteps(timesteps=grid)
    generator = torch.Generator().manual_seed(0)
    output, sample = torch.randn(2, 8, 4, 4, generator=generator), torch.randn(2, 8, 4, 4, generator=generator)
    for t, s in zip(grid, [*grid[1:], 0]):  # the last step lands on t = 0
        expected = scheduler.step(output, t, sample, eta=0.0).prev_sample
        got = ddim_step(scheduler, output, sample, torch.full((2,), t), torch.full((2,), s))
        torch.testing.assert_close(got, expected)


def test_the_guidance_input_is_lcms_embedding_of_scale_minus_one():
    scales = torch.tensor([1.0, 3.0, 7.5])
    lcm = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, scales - 1, embedding_dim=256)
    # the same sinusoids; float32 rounds their frequencies differently, which sin at phases up to 6500 shows
    torch.testing.assert_close(guidance_embedding(scales, 256), lcm, atol=1e-3, rtol=0)


def test_guided_steps_follow_the_interval():
    assert guided_steps(4, 0.0, 1.0) == [True] * 4
    assert guided_steps(4, 0.0, 0.5) == [True, True, False, False]
    assert guided_steps(5, 0.2, 0.6) == [False, True, True, False, False]
    assert guided_steps(4, 0.9, 1.0) == [False] * 4


def test_a_guidance_interval_runs_cfg_rows_only_inside_it(pipe, image):
    run = lambda **kwargs: pipe("calm piano", image, seed=2, scheduler="dpmpp", **FAST, **kwargs).audios
    calls, hook = unet_calls(pipe)
    try:
        half = run(guidance_start=0.5)
    finally:
        hook.remove()
    assert [size for size, _ in calls] == [1, 1, 2, 2]  # conditional rows alone, then [uncond, cond]
    full, unguided = run(), run(guidance_scale=1.0)
    assert np.array_equal(full, run(guidance_start=0.0, guidance_end=1.0))
    assert not np.allclose(half, full) and not np.allclose(half, unguided)
    np.testing.assert_allclose(run(guidance_start=0.9), unguided, atol=1e-5)  # no step inside: no guidance


def test_compiled_pipelines_keep_their_warmed_shapes_through_an_interval_and_as_a_student(pipe, student, image):
    """Graphs exist for the warmed UNet rows only (2·b: CFG rows, or rows without CFG padded to them). Steps
    outside a guidance interval must stay on the CFG batch (its conditional half used), a student's rows on
    the padded batch; each clip is still the eager pipeline's. backend="eager" guards as inductor does."""
    buckets = ShapeBuckets(batch_sizes=(1,), seconds=(0.5,), caption_tokens=(8,))
    cases = ((make_pipeline(), pipe, {"guidance_start": 0.5, "scheduler": "dpmpp"}), (make_student(), student, {}))
    for compiled, eager, fields in cases:
        compiled.compile_unets(backend="eager")
        compiled.shape_buckets = buckets
        torch._dynamo.reset()
        before = counters["stats"]["unique_graphs"]
        compiled.warm_up(buckets)
        try:
            torch._dynamo.config.error_on_recompile = True
            clip = compiled("calm piano", image, seed=2, **FAST, **fields).audios
        finally:
            torch._dynamo.config.error_on_recompile = False
        assert counters["stats"]["unique_graphs"] - before == buckets.graphs and not compiled.shape_misses
        np.testing.assert_allclose(clip, eager("calm piano", image, seed=2, **FAST, **fields).audios, atol=1e-4)
    torch._dynamo.reset()


def test_guidance_interval_fields_are_checked_and_keep_batches_apart():
    limits = make_pipeline().limits
    for fields, field in (({"guidance_start": 1.0}, "guidance_start"),
                          ({"guidance_start": 0.5, "guidance_end": 0.5}, "guidance_end")):  # fmt: skip
        with pytest.raises(InputError) as error:
            GenerationRequest("x", **fields).resolved(limits)
        assert error.value.field == field
    base = GenerationRequest("x", steps=4).resolved(limits)
    assert (base.guidance_start, base.guidance_end) == (0.0, 1.0)
    assert GenerationRequest("x", steps=4, guidance_end=0.5).resolved(limits).batch_key(limits) != base.batch_key(limits)
    older = {k: v for k, v in base.to_dict().items() if k not in ("guidance_start", "guidance_end")}
    assert GenerationRequest.from_dict(older) == base  # a queue payload from before the interval


def test_long_clips_keep_the_guidance_interval_and_a_students_guidance_in_every_window():
    """Clips longer than the trained window run in windows, `batch` at a time: outside the interval the
    teacher's windows run on their conditional rows only, and a student's windows each read their clip's
    guidance input; every clip is what it is alone."""
    teacher, few = make_pipeline(window_seconds=1.0), make_student(window_seconds=1.0)
    cases = ((teacher, {"guidance_start": 0.5}, [2, 2, 4, 4]), (few, {}, [2, 2, 2, 2]))
    for pipe, fields, batch_per_step in cases:
        requests = [GenerationRequest("calm piano", seconds=2.5, steps=4, seed=3, guidance_scale=3.0, **fields),
                    GenerationRequest("rainy jazz", seconds=1.5, steps=4, seed=4, guidance_scale=7.0, **fields)]  # fmt: skip
        requests = [request.resolved(pipe.limits) for request in requests]
        calls, hook = unet_calls(pipe)
        try:
            batch = pipe.generate(requests, [None, None])
        finally:
            hook.remove()
        chunks = len(calls) // 4  # the windows of both clips, two at a time, at every step
        assert chunks > 1 and [size for size, _ in calls[::chunks]] == batch_per_step
        assert all((condition is None) == (pipe is teacher) for _, condition in calls)
        for row, request in enumerate(requests):
            alone = pipe.generate([request], [None])
            np.testing.assert_allclose(batch.clip(row), alone.clip(0), atol=1e-5)
