"""Clips longer than the trained length and loops: windows of the trained length, cross-faded per step.

The tiny pipeline here says it was trained on 1 s clips (`window_seconds=1.0`: 32 latent frames), so a 3 s
clip takes three windows and the tests stay fast."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from dummies import make_pipeline

from melfusion.errors import InputError
from melfusion.request import GenerationRequest
from melfusion.windows import MIN_OVERLAP, plan_windows

STEPS = 4


@pytest.fixture(scope="module")
def short_window_pipe():
    return make_pipeline(window_seconds=1.0)


def test_windows_cover_a_long_clip_with_the_least_overlap_and_stay_in_it():
    windows = plan_windows([80], [False], 32)
    starts = windows.frames[:, 0].tolist()
    assert windows.length == 32 and starts[0] == 0 and windows.frames[-1, -1] == 79
    assert all(32 - (b - a) >= MIN_OVERLAP * 32 for a, b in zip(starts, starts[1:]))
    assert len(windows) == 3  # the fewest that do


def test_a_loop_wraps_its_windows_and_a_short_plain_clip_is_one_window():
    loop = plan_windows([38], [True], 32)
    assert len(loop) >= 2 and loop.frames.max() == 37 and (loop.frames[-1] < loop.frames[-1, 0]).any()  # wraps
    covered = torch.zeros(38)
    covered.index_add_(0, loop.frames.flatten(), loop.weights.flatten())
    assert (covered > 0).all()
    short = plan_windows([16, 16], [False, False], 32)
    assert short.frames.tolist() == [list(range(16))] * 2 and short.weights.eq(1).all()
    with pytest.raises(ValueError):
        plan_windows([16, 80], [False, False], 32)  # a short clip cannot share windows of another length


def test_blending_cross_fades_where_windows_overlap_instead_of_switching():
    """Each window predicts its own constant: the blend moves between them in steps no larger than the
    difference spread over the overlap (a hard seam would jump by the whole difference at one frame)."""
    windows = plan_windows([80], [False], 32)
    latents = torch.zeros(1, 1, 80, 2)
    predictions = torch.arange(len(windows), dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 1, 32, 2)
    blended = windows.blend(predictions, latents)[0, 0, :, 0]
    overlap = 32 - int((windows.frames[1, 0] - windows.frames[0, 0]))
    assert blended[0] == 0 and blended[-1] == len(windows) - 1
    assert blended.diff().abs().max() <= 1.0 / overlap + 1e-6
    assert (blended.diff() >= -1e-6).all()  # monotone: no overshoot at the seams


def audio_frame_energy(audio: np.ndarray, samples_per_frame: int) -> np.ndarray:
    """Mean |x[n+1] - x[n]| per latent frame: where a seam would click."""
    steps = np.abs(np.diff(audio))
    frames = steps.size // samples_per_frame
    return steps[: frames * samples_per_frame].reshape(frames, samples_per_frame).mean(axis=1)


def test_a_long_clip_is_windows_of_the_trained_shape_and_its_seams_are_smooth(short_window_pipe):
    pipe = short_window_pipe
    shapes = []
    hook = pipe.music_unet.register_forward_pre_hook(lambda module, args: shapes.append(tuple(args[0].shape)))
    try:
        output = pipe("calm piano", seconds=3.0, num_inference_steps=STEPS, seed=1)
    finally:
        hook.remove()
    assert set(shapes) == {(2, 8, pipe.window_frames, 16)}  # CFG pair of one window: the batch-1 shape
    audio = output.clip(0)
    assert audio.shape == (48000,) and np.isfinite(audio).all() and np.abs(audio).max() > 0
    windows = plan_windows([pipe.clip_frames(3.0, False)], [False], pipe.window_frames)
    edges = {int(frames[0]) for frames in windows.frames[1:]} | {int(frames[-1]) for frames in windows.frames[:-1]}
    energy = audio_frame_energy(audio, pipe.samples_per_latent_frame)
    at_edges = energy[sorted(edge for edge in edges if edge < energy.size)]
    assert at_edges.max() <= 1.6 * energy.mean()


def test_a_loop_ends_where_it_starts(short_window_pipe):
    pipe = short_window_pipe
    output = pipe("calm piano", seconds=1.5, loop=True, num_inference_steps=STEPS, seed=1)
    frames = pipe.clip_frames(1.5, True)
    audio = output.clip(0)
    assert audio.size == frames * pipe.samples_per_latent_frame  # a whole number of frames: 1.52 s
    steps = np.abs(np.diff(audio))
    assert abs(float(audio[0] - audio[-1])) <= 3 * steps.mean()  # the wrap is a step like the others
    twice = np.concatenate([audio, audio])
    around_seam = np.abs(np.diff(twice[audio.size - 160 : audio.size + 160])).mean()
    assert around_seam <= 1.6 * steps.mean()


def test_a_batch_mixes_long_short_and_looping_clips_each_as_alone(short_window_pipe):
    """Windows run `batch` at a time (the warmed shape of a batch of this size); each row gets what it gets
    alone, up to float rounding of another batch shape."""
    pipe = short_window_pipe
    requests = [
        GenerationRequest("calm piano", seconds=1.0, steps=STEPS, seed=3),
        GenerationRequest("rainy jazz", seconds=2.5, steps=STEPS, seed=4, guidance_scale=3.0),
        GenerationRequest("drum loop", seconds=1.2, steps=STEPS, seed=5, loop=True),
    ]
    requests = [request.resolved(pipe.limits) for request in requests]
    shapes = []
    hook = pipe.music_unet.register_forward_pre_hook(lambda module, args: shapes.append(tuple(args[0].shape)))
    try:
        batch = pipe.generate(requests, [None] * 3)
    finally:
        hook.remove()
    assert set(shapes) == {(6, 8, pipe.window_frames, 16)}  # CFG rows of 3 windows at a time
    for row, request in enumerate(requests):
        alone = pipe.generate([request], [None])
        assert batch.lengths[row] == alone.lengths[0]
        np.testing.assert_allclose(batch.clip(row), alone.clip(0), atol=1e-5)


def test_clips_shorter_than_the_window_keep_their_own_latent(short_window_pipe):
    """Below the trained length nothing changes: one latent of the clip's own length, as before windows."""
    shapes = []
    hook = short_window_pipe.music_unet.register_forward_pre_hook(lambda m, args: shapes.append(args[0].shape[2]))
    try:
        short_window_pipe("calm piano", seconds=0.5, num_inference_steps=2, seed=1)
    finally:
        hook.remove()
    assert set(shapes) == {short_window_pipe.clip_frames(0.5, False)} and shapes[0] < short_window_pipe.window_frames
    with pytest.raises(InputError, match="seconds"):
        short_window_pipe(["a", "b"], seconds=[0.5, 3.0], num_inference_steps=2)
