"""Algorithm 1 on the tiny bundle: loss goes down, α and UNet move at their own lr, resume is exact, export serves."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

from melfusion.bundle import load_pipeline, read_manifest, verify_bundle
from melfusion.cli import build_parser, main
from melfusion.dataset.manifest import read_triplets
from melfusion.errors import InputError
from melfusion.images import load_image
from melfusion.presets import sd_scheduler
from melfusion.training.checkpoint import load_trainer_state
from melfusion.training.denoiser import SynapseDenoiser
from melfusion.training.image_side import ImageKeyValues
from melfusion.training.cli import config_from
from melfusion.training.loop import (
    Dropout,
    diffusion_loss,
    draw_batch,
    row_generator,
    train,
    training_synapse,
    training_target,
)
from melfusion.training.prepare import frozen_fingerprint, prepare_examples

FROZEN = ("image_vae", "image_unet", "image_text_encoder", "text_encoder", "mel_vae", "vocoder")


def fixed_batch_loss(config, bundle) -> float:
    """Eq. 7 on the whole synthetic set with the same t, ε and posterior draws for every bundle compared."""
    pipe = load_pipeline(bundle)
    examples = prepare_examples(
        pipe, read_triplets(config.data), fingerprint=frozen_fingerprint(config.bundle), cache_dir=config.cache_dir,
        steps=config.feature_steps, seconds=config.seconds,
    )
    model = SynapseDenoiser(pipe.music_unet, pipe.synapse)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    image_key_values = ImageKeyValues(pipe, pipe.synapse, config.feature_steps)
    with torch.no_grad():
        batches = [draw_batch(pipe, examples, [row_generator(99, i, p) for p in range(len(examples))], Dropout(),
                              image_key_values.grid) for i in range(4)]
        losses = [diffusion_loss(pipe, model, scheduler, image_key_values, batch) for batch in batches]
    return float(torch.stack(losses).mean())


def files_of(bundle, component: str) -> dict:
    """Checksums of a component's weight files (configs gain a `_name_or_path` on the way through)."""
    files = read_manifest(bundle)["files"].items()
    return {k: v["sha256"] for k, v in files if k.startswith(component + "/") and k.endswith(".safetensors")}


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])  # the paper's and TANGO's parametrisation
def test_a_few_steps_reduce_the_loss_on_a_fixed_batch(make_config, v_prediction_bundle, prediction_type):
    bundle = {"v_prediction": {"bundle": v_prediction_bundle}}.get(prediction_type, {})
    config = make_config(max_steps=8, unet_lr=1e-3, alpha_lr=1e-2, text_dropout=0.0, **bundle)
    assert load_pipeline(config.bundle).scheduler.config.prediction_type == prediction_type
    before = fixed_batch_loss(config, config.bundle)
    result = train(config)
    after = fixed_batch_loss(config, result.bundle)
    assert len(result.losses) == 8
    assert after < 0.95 * before, (before, after)


def test_every_alpha_gets_gradient_and_moves_at_its_own_lr(make_config):
    config = make_config(max_steps=1, unet_lr=1e-4, alpha_lr=1e-2, weight_decay=0.0, text_dropout=0.0)
    start = load_pipeline(config.bundle)
    result = train(config)
    trained = load_pipeline(result.bundle)
    # Adam's first step moves each parameter by lr · g/(|g| + eps): exactly lr wherever the gradient is non-zero
    alpha_moves = (trained.synapse.alphas - config.initial_alpha).abs()  # from 0.5, not the bundle's α
    assert torch.allclose(alpha_moves, torch.full_like(alpha_moves, 1e-2), rtol=1e-3), alpha_moves
    unet_moves = torch.cat([(a - b).abs().flatten() for a, b in zip(trained.music_unet.parameters(), start.music_unet.parameters())])
    assert 0.99e-4 <= unet_moves.max() <= 1.001e-4
    for component in FROZEN:
        assert files_of(config.bundle, component), component
        assert files_of(result.bundle, component) == files_of(config.bundle, component), component


def test_alpha_only_training_leaves_the_unet_unchanged(make_config):
    config = make_config(freeze_unet=True, alpha_lr=1e-2, placement="both", share_alpha=True, initial_alpha=0.4)
    result = train(config)
    assert files_of(result.bundle, "music_unet") == files_of(config.bundle, "music_unet")
    synapse = load_pipeline(result.bundle).synapse
    assert synapse.config.share_alpha and len(synapse.config.blocks) == 6
    assert synapse.alphas.shape == (1,) and abs(synapse.alphas.item() - 0.4) > 1e-3


def test_fixed_alpha_stays_put_while_the_unet_trains(make_config):
    config = make_config(fix_alpha=0.3, unet_lr=1e-4)
    result = train(config)
    trained = load_pipeline(result.bundle)
    assert torch.equal(trained.synapse.alphas, torch.full((3,), 0.3))
    assert files_of(result.bundle, "music_unet") != files_of(config.bundle, "music_unet")


def test_resume_gives_the_same_next_steps_as_uninterrupted_training(make_config):
    straight = train(make_config("straight", max_steps=3, checkpoint_every=2, unet_lr=1e-3, alpha_lr=1e-2))
    halfway = straight.checkpoints[0]
    assert load_trainer_state(halfway)["step"] == 2
    resumed = train(make_config("resumed", max_steps=3, unet_lr=1e-3, alpha_lr=1e-2, resume=halfway))
    assert len(resumed.losses) == 1 and resumed.losses == straight.losses[2:]
    a, b = load_pipeline(straight.bundle), load_pipeline(resumed.bundle)
    assert torch.equal(a.synapse.alphas, b.synapse.alphas)
    assert all(torch.equal(x, y) for x, y in zip(a.music_unet.parameters(), b.music_unet.parameters()))


def test_cli_trains_and_the_exported_bundle_serves(make_config, capsys):
    config = make_config()
    code = main([
        "train", "--bundle", str(config.bundle), "--data", str(config.data), "--out", str(config.out),
        "--max-steps", "2", "--seconds", str(config.seconds), "--feature-steps", "4", "--cache-dir", str(config.cache_dir),
    ])
    assert code == 0
    assert "trained 2 steps" in capsys.readouterr().out
    log = (config.work_dir / "loss.csv").read_text().splitlines()
    assert log[0].startswith("step,loss,seconds,alpha_0") and len(log) == 3
    verify_bundle(config.out)
    pipe = load_pipeline(config.out)
    pipe.set_progress_bar_config(disable=True)
    image = load_image(read_triplets(config.data).rows[0].image)
    output = pipe("calm piano", image, seconds=0.5, num_inference_steps=2, seed=0)
    assert output.audios.shape == (1, 8000) and abs(output.audios).max() > 0


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_the_loss_targets_what_the_bundle_scheduler_predicts(prediction_type):
    scheduler = DDPMScheduler.from_config(sd_scheduler(prediction_type).config)
    generator = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(2, 8, 4, 4, generator=generator), torch.randn(2, 8, 4, 4, generator=generator)
    timesteps = torch.tensor([10, 900])
    target = training_target(scheduler, latents, noise, timesteps)
    if prediction_type == "epsilon":
        assert torch.equal(target, noise)
    else:
        alpha_bar = scheduler.alphas_cumprod[timesteps][:, None, None, None]
        assert torch.allclose(target, alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * latents, atol=1e-6)


def test_encode_command_fills_the_cache_that_training_then_reads(make_config, tmp_path, capsys):
    config = make_config(cache_dir=tmp_path / "cache")
    flags = ["--bundle", str(config.bundle), "--data", str(config.data), "--out", str(config.out), "--seconds",
             str(config.seconds), "--feature-steps", str(config.feature_steps), "--cache-dir", str(config.cache_dir)]
    assert main(["encode", *flags]) == 0
    assert "writing 4 image trajectories x 2,048 bytes" in capsys.readouterr().out  # exact size, said first
    assert len(list((tmp_path / "cache" / "images").glob("*.safetensors"))) == 4
    assert main(["train", *flags, "--max-steps", "1"]) == 0
    assert "writing 0 image trajectories" in capsys.readouterr().out


def test_epochs_set_the_steps_from_rows_processes_batch_and_accumulation(make_config, capsys):
    paper = make_config(epochs=30, batch_size=8, gradient_accumulation=4)
    assert paper.steps_for(11_250, 8) == 1_319  # README: MeLBench, 8 GPUs x 8 rows x 4 micro-batches
    assert paper.steps_for(11_250, 1) == 10_547  # one GPU: 8 times the steps
    result = train(make_config(epochs=1.5, max_steps=99, batch_size=2))  # 4 rows: 1.5 passes = 3 steps of 2
    assert len(result.losses) == 3
    assert "1.5 epochs of 4 rows in steps of 1 process(es) x 2 rows x 1 micro-batches: 3 steps" in capsys.readouterr().out
    with pytest.raises(InputError, match="epochs: must be positive"):
        make_config(epochs=0)


def test_a_run_starts_every_alpha_at_one_value_unless_told_to_keep_the_bundles(make_config):
    bundle_synapse = load_pipeline(make_config().bundle).synapse
    assert training_synapse(bundle_synapse, make_config()).alphas.tolist() == [0.5, 0.5, 0.5]  # not the paper's
    assert training_synapse(bundle_synapse, make_config(initial_alpha=None)) is bundle_synapse
    with pytest.raises(InputError, match="initial_alpha: the bundle's α belong to blocks"):
        training_synapse(bundle_synapse, make_config(initial_alpha=None, placement="encoder"))
    parsed = build_parser().parse_args(["train", "--bundle", "b", "--data", "d", "--out", "o", "--initial-alpha", "bundle"])
    assert config_from(parsed).initial_alpha is None
    with pytest.raises(SystemExit):  # one length or the other
        build_parser().parse_args(["train", "--bundle", "b", "--data", "d", "--out", "o", "--epochs", "3", "--max-steps", "9"])
