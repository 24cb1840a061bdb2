"""The pieces of Algorithm 1 that a wrong index or a wrong flag would break silently."""

from __future__ import annotations

import pytest
import torch

from melfusion.bundle import load_pipeline
from melfusion.dataset.manifest import read_triplets
from melfusion.images import load_image
from melfusion.synapse import VisualSynapse
from melfusion.training.checkpoint import checkpoint_path, load_trainer_state, prune_checkpoints, save_checkpoint
from melfusion.training.image_side import ImageKeyValues, encode_trajectories, grid_segments
from melfusion.training.loop import Dropout, draw_batch, make_optimizer, row_generator, train
from melfusion.training.prepare import frozen_fingerprint, load_trajectories, prepare_examples

STEPS = 4


def segments_of(trajectories: torch.Tensor, image_kv: ImageKeyValues, timesteps: torch.Tensor) -> torch.Tensor:
    """(B, 2, C, h, w): the two steps of each full trajectory (B, steps, C, h, w) that training reads at t.

    Indexed, not stacked, so the latents keep the memory format the pipeline gave them (channels-last from
    the VAE): the SD UNet rounds differently on another layout, ~1e-5 here, which the comparison would see.
    """
    first = grid_segments(image_kv.grid, timesteps)
    return trajectories[torch.arange(len(first))[:, None], first[:, None] + torch.arange(2)]


@pytest.fixture(scope="module")
def pipe(tiny_bundle):
    pipe = load_pipeline(tiny_bundle)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def image(manifest):
    return load_image(read_triplets(manifest).rows[0].image)


def test_image_kv_read_in_training_is_encode_images_step_at_the_music_timestep(pipe, image, make_config):
    # Training reads ε_ψ(z_t^I, ∅, t) on the re-denoised trajectory: what sampling mixes in at step i with the
    # "redenoise" image-feature source (the default "inversion" source approximates it in one pass).
    pipe.register_to_config(image_features_from="redenoise")
    try:
        features = pipe.encode_image(image, STEPS)
    finally:
        pipe.register_to_config(image_features_from="inversion")
    image_kv = ImageKeyValues(pipe, pipe.synapse, STEPS)
    trajectory = encode_trajectories(pipe, [image], STEPS)
    for i, t in enumerate(image_kv.grid.tolist()):
        read = image_kv(segments_of(trajectory, image_kv, torch.tensor([t])), torch.tensor([t]))
        for site in features.keys:
            for kind in ("keys", "values"):
                expected, got = getattr(features, kind)[site][:, 0], getattr(read, kind)[site][0, 0]
                torch.testing.assert_close(got, expected[i], atol=1e-5, rtol=1e-5)
                assert all((expected[j] - got).abs().max() > 1e-2 for j in range(STEPS) if j != i)  # can fail
    # the cache holds those trajectories in float16: the data set's 4 images, encoded as one batch
    # (a random UNet's re-denoising amplifies batch-size rounding differences, so compare like with like)
    config = make_config()
    triplets = read_triplets(config.data)
    batch = encode_trajectories(pipe, [load_image(row.image) for row in triplets.rows], STEPS)
    examples = prepare_examples(pipe, triplets, fingerprint=frozen_fingerprint(config.bundle),
                                cache_dir=config.cache, steps=STEPS, seconds=config.seconds)
    torch.testing.assert_close(load_trajectories(examples), batch.half().float(), atol=0, rtol=0)


def test_latents_between_grid_points_follow_the_ddim_step(pipe, image):
    """Off the grid, z_t is the DDIM step from the grid point above, with the ε predicted there."""
    trajectory = encode_trajectories(pipe, [image], STEPS)
    image_kv = ImageKeyValues(pipe, pipe.synapse, STEPS)
    grid, alphas = image_kv.grid, image_kv.alphas_cumprod
    t_a, t_b = grid[1].item(), grid[2].item()
    z_a = trajectory[0, 1].double()
    with torch.no_grad():
        epsilon = pipe.image_unet(z_a[None].float(), t_a, encoder_hidden_states=pipe._empty_prompt_embeds(pipe.device)).sample[0].double()
    x_0 = (z_a - (1 - alphas[t_a]).sqrt() * epsilon) / alphas[t_a].sqrt()
    for t in (t_b, (t_a + t_b) // 2):
        expected = alphas[t].sqrt() * x_0 + (1 - alphas[t]).sqrt() * epsilon
        got = image_kv.latents_at(segments_of(trajectory, image_kv, torch.tensor([t])), torch.tensor([t]))[0]
        torch.testing.assert_close(got, expected, atol=1e-4 * expected.abs().max().item(), rtol=0)


def test_training_timesteps_cover_all_of_t_and_rows_read_the_two_cached_steps_around_theirs(pipe, make_config):
    config = make_config()
    examples = prepare_examples(pipe, read_triplets(config.data), fingerprint=frozen_fingerprint(config.bundle),
                                cache_dir=config.cache, steps=STEPS, seconds=config.seconds)
    image_kv = ImageKeyValues(pipe, pipe.synapse, STEPS)
    batches = [draw_batch(pipe, examples, [row_generator(0, s, p) for p in range(4)], Dropout(), image_kv.grid)
               for s in range(100)]
    drawn = torch.cat([batch.timesteps for batch in batches])
    grid = set(image_kv.grid.tolist())
    assert drawn.min() < 50 and drawn.max() > 950 and len(set(drawn.tolist()) - grid) > 300
    trajectories = load_trajectories(examples)
    assert trajectories.shape[:2] == (4, STEPS)
    for batch in batches[:10]:  # only steps i, i + 1 of each row's file, where t_i >= t >= t_{i+1} inside the grid
        assert batch.image_segments.shape == (4, 2, *trajectories.shape[2:])
        assert torch.equal(batch.image_segments, segments_of(trajectories, image_kv, batch.timesteps))


@pytest.mark.parametrize(("dropout", "caption", "image"), [
    (Dropout(text=1.0), True, True),  # the unconditional branch of image_guidance="conditional"
    (Dropout(caption=1.0), True, False),  # the unconditional branch of image_guidance="both"
    (Dropout(image=1.0), False, True),
    (Dropout(), False, False),
])
def test_caption_dropout_drops_the_image_and_caption_only_dropout_keeps_it(pipe, make_config, dropout, caption, image):
    config = make_config()
    examples = prepare_examples(pipe, read_triplets(config.data), fingerprint=frozen_fingerprint(config.bundle),
                                cache_dir=config.cache, steps=STEPS, seconds=config.seconds)
    batch = draw_batch(pipe, examples, [row_generator(0, 0, p) for p in range(4)], dropout, pipe.timestep_grid(STEPS))
    assert all((c == "") == caption for c in batch.captions)
    assert torch.equal(batch.image_strength, torch.full((4,), 0.0 if image else 1.0))


def test_alpha_has_no_weight_decay(pipe, make_config):
    config = make_config(weight_decay=0.5, alpha_lr=1e-2)
    optimizer = make_optimizer(pipe, config)
    start = pipe.synapse.alphas.detach().clone()
    pipe.synapse.alphas.grad = torch.zeros_like(start)  # no gradient: only decay could move α
    for parameter in pipe.music_unet.parameters():
        parameter.grad = torch.zeros_like(parameter)
    unet_before = next(pipe.music_unet.parameters()).detach().clone()
    optimizer.step()
    assert torch.equal(pipe.synapse.alphas.detach(), start)
    assert not torch.equal(next(pipe.music_unet.parameters()).detach(), unet_before)  # the UNet does decay
    optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        pipe.music_unet.load_state_dict(load_pipeline(config.bundle).music_unet.state_dict())


def test_an_alpha_past_a_bound_is_used_clamped_and_still_learns():
    synapse = VisualSynapse(initial_alphas=(1.2, -0.3, 0.5))
    used = torch.stack([synapse.alpha_for(b) for b in synapse.config.blocks])
    assert torch.equal(used.detach(), torch.tensor([1.0, 0.0, 0.5]))
    used.sum().backward()
    assert torch.equal(synapse.alphas.grad, torch.ones(3))  # a plain clamp gives 0 for the first two


def test_an_alpha_started_past_a_bound_still_learns_and_training_keeps_it_in_range(make_config):
    result = train(make_config(max_steps=3, initial_alpha=1.3, alpha_lr=0.3, freeze_unet=True, text_dropout=0.0,
                               checkpoint_every=1, keep_checkpoints=3))
    # Step 1 ran at α = 1.3: the straight-through clamp's gradient reached α, a plain clamp's would be exactly 0
    first = load_trainer_state(result.checkpoints[0])["optimizer"]["state"][0]  # α's AdamW moments
    assert (first["exp_avg"] != 0).all(), first["exp_avg"]
    alphas = load_pipeline(result.bundle).synapse.alphas
    assert ((alphas >= 0) & (alphas <= 1)).all()  # projected back after every step
    assert (alphas < 1).any(), alphas  # and moved back inside


def test_checkpoints_keep_the_last_k_and_hold_the_grad_scaler(pipe, make_config):
    config = make_config(keep_checkpoints=2)
    optimizer = make_optimizer(pipe, config)
    scaler = torch.amp.GradScaler("cpu", init_scale=1234.0)
    for step in (1, 2, 3):
        save_checkpoint(checkpoint_path(config, step), config=config, step=step, pipe=pipe, optimizer=optimizer,
                        scaler=scaler)
        prune_checkpoints(config)
    kept = sorted(p.name for p in (config.work_dir / "checkpoints").iterdir())
    assert kept == ["step-0000002", "step-0000003"]
    assert load_trainer_state(checkpoint_path(config, 3))["scaler"]["scale"] == 1234.0
