"""GenerationRequest: one spelling of a generation's fields and one order of defaults."""

from __future__ import annotations

import json

import pytest

from melfusion.errors import InputError
from melfusion.limits import SAMPLING_PRESETS, GenerationLimits
from melfusion.request import MAX_SEED, GenerationRequest

LIMITS = GenerationLimits(
    max_seconds=30.0, default_seconds=10.0, max_steps=1000, default_steps=100, default_guidance_scale=7.0,
)  # fmt: skip


def test_defaults_come_from_request_then_preset_then_bundle_then_fixed_defaults():
    bare = GenerationRequest("calm piano").resolved(LIMITS)
    assert (bare.seconds, bare.steps, bare.guidance_scale, bare.scheduler) == (10.0, 100, 7.0, "ddim")
    assert (bare.image_strength, bare.image_guidance, bare.image_steps) == (1.0, "conditional", 100)
    tango = SAMPLING_PRESETS["tango"]
    preset = GenerationRequest("calm piano", preset="tango").resolved(LIMITS)
    assert (preset.steps, preset.guidance_scale, preset.scheduler) == (tango.steps, tango.guidance_scale, "ddpm")
    own = GenerationRequest("calm piano", preset="tango", steps=20, scheduler="dpmpp").resolved(LIMITS)
    assert (own.steps, own.guidance_scale, own.scheduler, own.preset) == (20, tango.guidance_scale, "dpmpp", "tango")
    assert (preset.image_steps, own.image_steps) == (tango.steps, 20)  # one image pass per step of the grid
    assert GenerationRequest("calm piano", steps=50, image_steps=10).resolved(LIMITS).image_steps == 10


def test_a_seed_is_chosen_in_the_one_range_and_kept_once_resolved():
    seeds = {GenerationRequest("x").resolved(LIMITS).seed for _ in range(50)}
    assert len(seeds) > 1 and all(0 <= seed <= MAX_SEED for seed in seeds)
    resolved = GenerationRequest("x", seed=MAX_SEED).resolved(LIMITS)
    assert resolved.resolved(LIMITS) == resolved


@pytest.mark.parametrize(
    "fields, field",
    [
        ({"caption": " "}, "caption"),
        ({"negative_caption": ""}, "negative_caption"),
        ({"steps": 2.5}, "steps"),
        ({"seconds": "long"}, "seconds"),
        ({"seconds": 31.0}, "seconds"),
        ({"steps": 0}, "steps"),
        ({"image_strength": 1.5}, "image_strength"),
        ({"scheduler": "euler"}, "scheduler"),
        ({"image_guidance": "neither"}, "image_guidance"),
        ({"seed": MAX_SEED + 1}, "seed"),
        ({"preset": "fast"}, "preset"),
        ({"steps": 10, "image_steps": 11}, "image_steps"),
        ({"image_steps": 0}, "image_steps"),
    ],
)
def test_bad_fields_are_named(fields, field):
    with pytest.raises(InputError) as error:
        GenerationRequest(**{"caption": "x", **fields}).resolved(LIMITS)
    assert error.value.field == field


def test_queue_payload_round_trips_through_json():
    request = GenerationRequest("calm piano", steps=3, preset="paper").resolved(LIMITS)
    assert GenerationRequest.from_dict(json.loads(json.dumps(request.to_dict()))) == request


def test_queue_payloads_of_other_versions_still_load():
    current = GenerationRequest("calm piano", steps=30).resolved(LIMITS).to_dict()
    # A payload from before image_steps, negative_caption and num_outputs existed: each takes its default.
    later = ("image_steps", "negative_caption", "num_outputs")
    older = {name: value for name, value in current.items() if name not in later}
    loaded = GenerationRequest.from_dict(older)
    assert loaded.num_outputs == 1 and loaded.negative_caption is None
    assert loaded.resolved(LIMITS) == GenerationRequest.from_dict(current)  # image_steps = steps
    newer = {**current, "a_later_field": 1}
    assert GenerationRequest.from_dict(newer) == GenerationRequest.from_dict(current)


def test_caption_or_image_at_least_one():
    GenerationRequest().check_condition(has_image=True)  # image only: the paper's image-only setting
    GenerationRequest("calm piano").check_condition(has_image=False)  # caption only: TANGO
    with pytest.raises(InputError) as error:
        GenerationRequest().resolved(LIMITS).check_condition(has_image=False)
    assert error.value.field == "caption"


def test_variations_take_consecutive_seeds_and_one_output_each():
    request = GenerationRequest("x", num_outputs=3, seed=MAX_SEED - 1).resolved(LIMITS)
    variations = request.variations()
    assert [v.seed for v in variations] == [MAX_SEED - 1, MAX_SEED, 0]  # wraps within the seed range
    assert {v.num_outputs for v in variations} == {1} and {v.batch_key(LIMITS) for v in variations} == {request.batch_key(LIMITS)}
    for bad in (0, 9):
        with pytest.raises(InputError, match="num_outputs"):
            GenerationRequest("x", num_outputs=bad).resolved(LIMITS)


def test_negative_caption_needs_cfg():
    assert GenerationRequest("x", negative_caption="noise").resolved(LIMITS).negative_caption == "noise"
    with pytest.raises(InputError) as error:
        GenerationRequest("x", negative_caption="noise", guidance_scale=1.0).resolved(LIMITS)
    assert error.value.field == "negative_caption"


def test_interface_states_the_bundle_bounds_and_defaults():
    described = {field.name: field for field in GenerationRequest.interface(LIMITS)}
    assert set(described) == set(GenerationRequest.field_names())
    assert (described["seconds"].gt, described["seconds"].le) == (0, LIMITS.max_seconds)
    assert "default 10.0" in described["seconds"].help and described["num_outputs"].le == 8
    unbound = {field.name: field for field in GenerationRequest.interface()}
    assert unbound["seconds"].le is None and unbound["scheduler"].choices is None  # checked once the bundle is known


def test_batch_key_groups_what_can_share_one_pipeline_call():
    base = GenerationRequest("a", seconds=2.0, steps=4, seed=1, guidance_scale=3.0).resolved(LIMITS)
    partner = GenerationRequest("b", seconds=2.0, steps=4, seed=9, guidance_scale=5.0, image_strength=0.2)
    assert partner.resolved(LIMITS).batch_key(LIMITS) == base.batch_key(LIMITS)
    for other in ({"steps": 5}, {"seconds": 3.0}, {"scheduler": "dpmpp"}, {"image_guidance": "both"},
                  {"guidance_scale": 1.0}, {"image_steps": 2}):  # fmt: skip
        changed = GenerationRequest(**{"caption": "b", "seconds": 2.0, "steps": 4, **other}).resolved(LIMITS)
        assert changed.batch_key(LIMITS) != base.batch_key(LIMITS), other


def test_clips_run_in_windows_batch_together_whatever_their_length():
    """Clips of the trained length and longer, and loops, all meet the UNet as windows of the trained length."""
    key = lambda **fields: GenerationRequest("a", steps=4, **fields).resolved(LIMITS).batch_key(LIMITS)  # noqa: E731
    window = LIMITS.window_seconds
    assert key(seconds=window) == key(seconds=LIMITS.max_seconds) == key(seconds=1.0, loop=True)
    assert key(seconds=window / 2) != key(seconds=window)
    assert key(seconds=1.0, format="mp3", loudness_lufs=None) == key(seconds=1.0)  # post-processing only


def test_delivery_fields_resolve_and_are_checked():
    request = GenerationRequest("a").resolved(LIMITS)
    assert (request.format, request.loudness_lufs, request.loop) == ("wav", -14.0, False)
    assert GenerationRequest("a", loudness_lufs=None).resolved(LIMITS).loudness_lufs is None  # off
    with pytest.raises(InputError, match="format"):
        GenerationRequest("a", format="aiff").resolved(LIMITS)
    with pytest.raises(InputError, match="loudness_lufs"):
        GenerationRequest("a", loudness_lufs=0.0).resolved(LIMITS)


def test_a_payload_from_before_the_delivery_fields_loads_with_their_defaults():
    current = GenerationRequest("a", steps=3).resolved(LIMITS).to_dict()
    older = {name: value for name, value in current.items() if name not in ("loop", "format", "loudness_lufs")}
    assert GenerationRequest.from_dict(older) == GenerationRequest.from_dict(current)
