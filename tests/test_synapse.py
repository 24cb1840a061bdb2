"""The synapse's pieces: token matching, pooling, DDIM inversion, gradients to α."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from dummies import make_pipeline

from melfusion.attention import mixing_image_features
from melfusion.synapse import VisualSynapse


def test_caption_tokens_split_the_image_into_bands_and_padding_gets_nothing():
    synapse = VisualSynapse(image_grid=2, token_matching="caption_tokens")
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    weights = synapse.token_matching_matrix(mask, num_image_tokens=4)  # (B, S, N)
    expected_first = torch.tensor([[0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5], [0, 0, 0, 0]])
    torch.testing.assert_close(weights[0], expected_first)
    torch.testing.assert_close(weights[1, 0], torch.full((4,), 0.25))  # a one-token caption gets the mean
    assert weights[1, 1:].abs().sum() == 0


def test_global_matching_gives_every_caption_token_the_image_mean():
    synapse = VisualSynapse(image_grid=2, token_matching="global")
    weights = synapse.token_matching_matrix(torch.tensor([[1, 1, 1, 0]]), num_image_tokens=4)
    torch.testing.assert_close(weights[0, :3], torch.full((3, 4), 0.25))
    assert weights[0, 3].abs().sum() == 0


def test_token_matching_is_a_config_field_that_changes_the_music(image):
    def clip(matching):
        pipe = make_pipeline(synapse=VisualSynapse(image_grid=4, token_matching=matching))
        return pipe("calm piano at sunset", image, seconds=1.0, num_inference_steps=3, seed=1).audios

    assert not torch.allclose(torch.from_numpy(clip("caption_tokens")), torch.from_numpy(clip("global")))
    with pytest.raises(ValueError, match="token_matching"):
        VisualSynapse(token_matching="concat")


def test_image_tokens_are_pooled_to_the_grid_keeping_spatial_means():
    synapse = VisualSynapse(image_grid=2)
    grid = torch.arange(16.0).reshape(1, 4, 4)  # one channel on a 4x4 latent
    kv = grid.flatten(1)[:, :, None]  # (B, H*W, D=1)
    pooled = synapse.pool_image_tokens(kv)
    assert pooled.shape == (1, 4, 1)
    torch.testing.assert_close(pooled[0, :, 0], torch.tensor([2.5, 4.5, 10.5, 12.5]))


def test_shared_alpha_is_one_parameter_for_every_block():
    synapse = VisualSynapse(share_alpha=True, initial_alphas=(0.5,))
    assert synapse.alphas.shape == (1,)
    assert synapse.alpha_for("up_blocks.1") is not None and synapse.alpha_for("up_blocks.3").item() == 0.5


def test_ddim_inversion_round_trip_reconstructs_the_latent(image):
    """Invert then regenerate on the same grid must return to z_0.

    DDIM inversion evaluates ε at z_{t-1} where sampling evaluates it at z_t, so it is exact only for an
    ε that varies slowly with its input — true of a trained denoiser, false of a random UNet, whose
    output we damp 30x (conv_out) to stand in for one. Tolerance 2% of ‖z_0‖: measured 0.6% at 50 steps.
    Since every DDIM step lands on its grid point, z_T also denoises back to z_0 on another grid (51 steps:
    0.6%); diffusers' constant-stride stepping left ~16% there.
    """
    pipe = make_pipeline()
    with torch.no_grad():
        pipe.image_unet.conv_out.weight.mul_(0.03)
        pipe.image_unet.conv_out.bias.mul_(0.03)
        z_0 = pipe.prepare_image_latents(image)
        z_T = pipe.invert_image_latents(z_0, 50)
        reconstructed, features = pipe.denoise_image_latents(z_T, 50)
        on_another_grid, _ = pipe.denoise_image_latents(z_T, 51)
    relative = lambda z: ((z - z_0).norm() / z_0.norm()).item()
    assert relative(z_T) > 0.5  # inversion really moved the latent
    assert relative(reconstructed) < 0.02
    assert relative(on_another_grid) < 0.02
    assert torch.equal(features.timesteps, pipe.timestep_grid(50))


def test_gradients_reach_every_alpha(image):
    pipe = make_pipeline()
    features = pipe.encode_image(image, 3)
    states, mask = pipe.encode_captions(["calm piano"])
    latents = torch.randn(pipe.music_latent_shape(1, 1.0))
    with mixing_image_features(
        pipe.music_unet, pipe.synapse, features, text_mask=mask, row_strength=torch.ones(1)
    ) as state:
        state.step = 1
        prediction = pipe.music_unet(latents, features.timesteps[1], states, encoder_attention_mask=mask).sample
    prediction.pow(2).mean().backward()
    grad = pipe.synapse.alphas.grad
    assert grad is not None and grad.shape == (3,)
    assert torch.isfinite(grad).all() and (grad != 0).all()


def test_processors_are_attached_once_and_never_swapped(pipe, image):
    """A compiled UNet guards on its processors: a call must leave the very same objects in place."""
    before = {k: id(v) for k, v in [*pipe.music_unet.attn_processors.items(), *pipe.image_unet.attn_processors.items()]}
    pipe("calm piano", image, seconds=1.0, num_inference_steps=2, seed=0)
    pipe("calm piano", seconds=1.0, num_inference_steps=2, seed=0)
    after = {k: id(v) for k, v in [*pipe.music_unet.attn_processors.items(), *pipe.image_unet.attn_processors.items()]}
    assert after == before
    kinds = lambda unet: {type(v).__name__ for v in unet.attn_processors.values()}
    assert kinds(pipe.image_unet) == {"AttnProcessor2_0", "SelfAttentionRecorder"}
    assert kinds(pipe.music_unet) == {"AttnProcessor2_0", "SynapseMixer"}


def test_core_imports_without_the_service_stack():
    code = (
        "import sys, melfusion.pipeline, melfusion.bundle, melfusion.cli;"
        "bad = {'fastapi', 'rq', 'redis', 'uvicorn'} & set(sys.modules); assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("steps", [25, 100, 400, 1000])
def test_every_grid_spans_the_whole_schedule_and_both_image_loops_walk_it(pipe, steps):
    grid = pipe.timestep_grid(steps)
    inverse, forward = pipe._image_schedulers(steps)
    assert len(set(grid.tolist())) == steps
    assert grid[0] == 999 and grid[-1] < 1000 // steps + 1  # starts at pure noise, ends near clean
    assert torch.equal(forward.timesteps, grid) and torch.equal(inverse.timesteps.flip(0), grid)
