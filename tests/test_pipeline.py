"""Algorithm 2 end to end on tiny real components: the synapse's contract and the sampler's guarantees."""

from __future__ import annotations

import io
import weakref

import numpy as np
import pytest
import soundfile as sf
import torch
from dummies import make_pipeline
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from melfusion.audio import encode_wav
from melfusion.errors import GenerationCancelled, InputError
from melfusion.request import GenerationRequest
from melfusion.synapse import VisualSynapse

CAPTION = "calm piano at sunset"
FAST = dict(seconds=1.0, num_inference_steps=4)


def generate(pipe, caption=CAPTION, image=None, **kwargs):
    return pipe(caption, image, **{**FAST, "seed": 7, **kwargs}).audios


def test_alpha_zero_reproduces_text_to_music_exactly(image):
    pipe = make_pipeline(synapse=VisualSynapse(initial_alphas=(0.0, 0.0, 0.0), image_grid=4))
    text_only = generate(pipe)
    for mode in ("conditional", "both"):
        assert np.array_equal(generate(pipe, image=image, image_guidance=mode), text_only)


def test_zero_image_strength_reproduces_text_to_music_exactly(pipe, image):
    assert np.array_equal(generate(pipe, image=image, image_strength=0.0), generate(pipe))


def test_image_and_caption_each_change_the_music(pipe, image, other_image):
    base = generate(pipe, image=image)
    assert not np.allclose(base, generate(pipe))  # the synapse is active at the bundle's α
    assert not np.allclose(base, generate(pipe, image=other_image))
    assert not np.allclose(base, generate(pipe, caption="fast drums and electric guitar", image=image))


def test_image_strength_scales_the_image_effect(pipe, image):
    text_only = generate(pipe)
    half = np.abs(generate(pipe, image=image, image_strength=0.5) - text_only).mean()
    full = np.abs(generate(pipe, image=image, image_strength=1.0) - text_only).mean()
    assert 0 < half < full


def test_cfg_branch_that_sees_the_image_is_a_real_choice(pipe, image):
    assert not np.allclose(
        generate(pipe, image=image, image_guidance="conditional"), generate(pipe, image=image, image_guidance="both")
    )


def test_same_seed_gives_identical_wav_bytes_and_other_seeds_differ(pipe, image):
    first = encode_wav(generate(pipe, image=image, seed=11)[0], 16000)
    again = encode_wav(generate(pipe, image=image, seed=11)[0], 16000)
    other = encode_wav(generate(pipe, image=image, seed=12)[0], 16000)
    assert first == again
    assert first != other


def test_a_batch_item_matches_the_same_request_alone(pipe, image, other_image):
    seen = []
    batch = pipe([CAPTION, "rainy jazz night"], [image, other_image], seed=[3, 4], callback=seen.append, **FAST)
    alone = pipe("rainy jazz night", other_image, seed=4, **FAST)
    assert batch.seeds == [3, 4]
    assert seen[-1].step == seen[-1].total == 2 * FAST["num_inference_steps"]  # both photos in one image pass
    np.testing.assert_allclose(batch.audios[1], alone.audios[0], atol=1e-4)


def test_wav_is_16khz_mono_with_the_requested_duration(pipe, image):
    seconds = 1.37  # not a multiple of the latent granularity: the waveform must still be trimmed
    audio = generate(pipe, image=image, seconds=seconds)
    assert np.isfinite(audio).all()
    info = sf.info(io.BytesIO(encode_wav(audio[0], 16000)))
    assert (info.samplerate, info.channels) == (16000, 1)
    assert abs(info.frames - seconds * 16000) <= pipe.config.hop_length


def test_cached_image_features_give_the_same_clip(pipe, image):
    features = pipe.encode_image(image, FAST["num_inference_steps"])
    assert np.array_equal(generate(pipe, image=image), generate(pipe, image_features=features))
    with pytest.raises(InputError, match="image_features"):
        generate(pipe, image_features=features, num_inference_steps=5)


def test_dpm_solver_runs_on_the_shared_grid_and_differs_from_ddim(pipe, image):
    dpm = generate(pipe, image=image, scheduler="dpmpp")
    assert np.isfinite(dpm).all()
    assert not np.allclose(dpm, generate(pipe, image=image, scheduler="ddim"))


def test_schedulers_honour_the_bundle_prediction_type(image):
    from melfusion.presets import sd_scheduler

    epsilon, v_pred = make_pipeline(), make_pipeline(scheduler=sd_scheduler("v_prediction"))
    grid = v_pred.timestep_grid(4)
    for name in ("ddim", "dpmpp"):
        assert v_pred.make_scheduler(name, grid).config.prediction_type == "v_prediction"
        assert torch.equal(v_pred.make_scheduler(name, grid).timesteps, grid)
    assert not np.allclose(generate(v_pred, image=image), generate(epsilon, image=image))


def test_progress_callback_covers_every_phase_in_order(pipe, image):
    seen = []
    generate(pipe, image=image, callback=seen.append)
    steps = FAST["num_inference_steps"]
    assert [s.phase for s in seen] == ["image_inversion"] * steps + ["music_denoise"] * steps
    assert [s.step for s in seen] == list(range(1, 2 * steps + 1))
    assert seen[-1].fraction == 1.0


def test_cancel_check_stops_between_steps(pipe, image):
    seen = []
    with pytest.raises(GenerationCancelled):
        generate(pipe, image=image, callback=seen.append, should_cancel=lambda: len(seen) >= 5)
    assert len(seen) == 5


class DeviceReads(TorchDispatchMode):
    """Records every op that brings a device tensor's data to the host (a GPU sync on CUDA), with the step
    the loop was at. On the CPU every tensor is a host tensor, so "device" is followed by derivation: the
    model's parameters and whatever is computed from them (latents, UNet outputs, text states); the host
    grid of timesteps and the schedulers' tables are not."""

    HOST_READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
                  torch.ops.aten.is_nonzero.default, torch.ops.aten.equal.default}  # fmt: skip

    def __init__(self, pipe):
        super().__init__()
        self.on_device: dict[int, weakref.ref] = {}
        self.reads: list[tuple[int, str]] = []  # (steps finished when it happened, op)
        self.steps_done = 0
        for module in pipe.components.values():
            if isinstance(module, torch.nn.Module):
                for parameter in module.parameters():
                    self._mark(parameter)

    def _mark(self, tensor: torch.Tensor) -> None:
        self.on_device[id(tensor)] = weakref.ref(tensor)

    def _is_device(self, value) -> bool:
        found = self.on_device.get(id(value)) if isinstance(value, torch.Tensor) else None
        return found is not None and found() is value

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from_device = any(self._is_device(value) for value in tree_leaves((args, kwargs)))
        if from_device and func in self.HOST_READS:
            self.reads.append((self.steps_done, str(func)))
        output = func(*args, **(kwargs or {}))
        if from_device:
            for value in tree_leaves(output):
                if isinstance(value, torch.Tensor):
                    self._mark(value)
        return output


@pytest.mark.parametrize("scheduler", ["ddim", "dpmpp", "ddpm"])
def test_progress_and_cancel_checks_never_read_device_data_in_the_loops(pipe, image, scheduler):
    """A worker reports progress and polls for cancel every step; if any step read device data back (a
    NaN check, an `.item()`, a step index found on the device) the CUDA launch queue would drain every step.
    Reads after the last step (the per-row finite checks, the audio) are once per call."""
    steps = 3
    reads = DeviceReads(pipe)

    def on_step(step) -> None:
        reads.steps_done = step.step

    with reads:
        generate(pipe, ["calm piano", "rainy jazz"], [image, None], scheduler=scheduler, num_inference_steps=steps,
                 callback=on_step, should_cancel=lambda: False)  # fmt: skip
    assert reads.steps_done == 2 * steps  # image inversion, then music
    assert [read for read in reads.reads if read[0] < 2 * steps] == []
    assert reads.reads  # the finite checks after the loop do read the device: the recorder sees them

    # And it would see one in the loop: a UNet hook that reads its output back is caught every music step.
    def read_back(module, args, output) -> None:
        output[0].abs().max().item()

    hook = pipe.music_unet.register_forward_hook(read_back)
    reads.reads, reads.steps_done = [], 0
    try:
        with reads:
            generate(pipe, num_inference_steps=steps, callback=on_step, scheduler=scheduler)
    finally:
        hook.remove()
    assert {done for done, op in reads.reads if op == "aten._local_scalar_dense.default" and done < steps} == {0, 1, 2}


def test_synapse_on_encoder_blocks_also_reaches_the_music(image):
    encoder = VisualSynapse(blocks=("down_blocks.0", "down_blocks.1", "down_blocks.2"), image_grid=4)
    pipe = make_pipeline(synapse=encoder)
    assert not np.allclose(generate(pipe, image=image), generate(pipe))


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(caption=" "), "caption"),
        (dict(seconds=0), "seconds"),
        (dict(seconds=31), "seconds"),
        (dict(num_inference_steps=0), "steps"),
        (dict(image_strength=1.5), "image_strength"),
        (dict(scheduler="euler"), "scheduler"),
        (dict(guidance_scale=-1), "guidance_scale"),
    ],
)
def test_bad_requests_name_the_field(pipe, kwargs, field):
    caption = kwargs.pop("caption", CAPTION)
    with pytest.raises(InputError) as error:
        pipe(caption, None, **{**FAST, **kwargs})
    assert error.value.field == field


def test_feature_cache_skips_the_image_side_for_a_repeated_photo(image, other_image):
    pipe = make_pipeline()
    pipe.enable_feature_cache(max_bytes=10_000_000)
    first, second = [], []
    uncached = generate(pipe, image=image, callback=first.append)
    cached = generate(pipe, caption="rainy jazz night", image=image.copy(), callback=second.append)
    assert {s.phase for s in first} == {"image_inversion", "music_denoise"}
    assert {s.phase for s in second} == {"music_denoise"} and second[-1].fraction == 1.0
    assert (pipe.feature_cache.hits, pipe.feature_cache.misses) == (1, 1)
    assert np.array_equal(generate(make_pipeline(), caption="rainy jazz night", image=image), cached)
    assert not np.array_equal(uncached, cached)
    generate(pipe, image=other_image, num_inference_steps=5)  # another image and grid: a second entry
    assert pipe.feature_cache.misses == 2


def test_new_photos_of_a_batch_are_inverted_in_one_pass(image, other_image):
    """One SD UNet call per grid step for all new photos (a photo uploaded twice counted once), each image's
    features as it gets them alone (CPU batch kernels round differently), cached one by one."""
    pipe = make_pipeline()
    pipe.enable_feature_cache(max_bytes=10_000_000)
    calls = []
    pipe.image_unet.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    steps = FAST["num_inference_steps"]
    batch = pipe.encode_images([image, other_image, image.copy()], steps)
    assert calls == [2] * steps
    assert batch[0] is batch[2] and batch[0].batch_size == 1
    alone = make_pipeline().encode_image(other_image, steps)
    for store in ("keys", "values"):
        for site, want in getattr(alone, store).items():
            got = getattr(batch[1], store)[site]
            assert ((got - want).norm() / want.norm()).item() < 1e-4  # measured ~1e-5 over 4 inversion steps
    assert pipe.encode_image(other_image.copy(), steps) is batch[1] and calls == [2] * steps  # from the cache


def test_feature_cache_stays_within_its_byte_budget(image, other_image):
    pipe = make_pipeline()
    one_image = pipe.encode_image(image, FAST["num_inference_steps"]).nbytes()
    pipe.enable_feature_cache(max_bytes=int(one_image * 1.5))
    for photo in (image, other_image, image):
        generate(pipe, image=photo)
    assert pipe.feature_cache.nbytes <= int(one_image * 1.5)
    assert pipe.feature_cache.misses == 3  # the first image was evicted by the second


def _request(caption=CAPTION, **fields):
    return GenerationRequest(caption, **{"seconds": FAST["seconds"], "steps": FAST["num_inference_steps"], **fields})


def test_generate_runs_a_batch_of_requests_each_row_as_it_would_run_alone(pipe, image, other_image):
    requests = [_request(seed=3, guidance_scale=3.0, image_strength=0.5),
                _request("rainy jazz night", seed=4, guidance_scale=7.0, image_strength=1.0)]  # fmt: skip
    requests = [request.resolved(pipe.limits) for request in requests]
    batch = pipe.generate(requests, [image, other_image])
    assert batch.seeds == [3, 4]
    for row, (request, row_image) in enumerate(zip(requests, [image, other_image], strict=True)):
        alone = pipe.generate([request], [row_image])
        np.testing.assert_allclose(batch.audios[row], alone.audios[0], atol=1e-4)


def test_generate_takes_features_or_images_and_refuses_mixed_batches(pipe, image):
    request = _request(seed=5).resolved(pipe.limits)
    features = pipe.encode_image(image, FAST["num_inference_steps"])
    assert np.array_equal(pipe.generate([request], [features]).audios, pipe.generate([request], [image]).audios)
    with pytest.raises(InputError, match="image_features"):
        pipe.generate([request, request], [features, image])
    with pytest.raises(InputError, match="requests"):
        pipe.generate([request, _request(seed=5, steps=2).resolved(pipe.limits)], [image, image])


def test_the_pipeline_is_an_engine_and_warms_up(pipe):
    from melfusion.engine import Engine
    from melfusion.shapes import ShapeBuckets

    assert isinstance(pipe, Engine)  # every member the worker uses (melfusion.engine) is there
    assert pipe.warm_up(ShapeBuckets((2,), (0.5,), (32,))) == 1
    png = pipe.spectrogram_png(np.zeros(8000, dtype=np.float32))
    assert png.startswith(b"\x89PNG")
