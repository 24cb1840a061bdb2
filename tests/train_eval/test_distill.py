"""`melfusion distill` on a tiny teacher: the student's one step lands nearer the teacher's many steps than the
teacher's own one step does (the ratios at 1-8 steps are printed), the student is a bundle like any other,
and a resumed run is the same run."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from melfusion.bundle import load_pipeline, verify_bundle
from melfusion.cli import main
from melfusion.dataset.manifest import read_triplets
from melfusion.errors import InputError
from melfusion.images import load_image
from melfusion.manifest import read_manifest
from melfusion.presets import sd_scheduler
from melfusion.student import ddim_step
from melfusion.training.checkpoint import load_trainer_state
from melfusion.training.config import TrainConfig
from melfusion.training.distill import distill, few_step_distances
from melfusion.training.distill_cli import DistillConfig
from melfusion.training.loop import train

SECONDS = 0.5
GUIDANCE = 3.0  # the student learns one scale here, so a few minutes of CPU teach it
HELD_OUT_SEEDS = list(range(1000, 1008))  # training draws its noise from other generators
# about three minutes of one CPU thread. lr 10⁻³ wrecks the random UNet faster than it folds the guidance
# in (4 steps: 1.29); at 10⁻⁴ the batch decides: 4 steps 0.92 at batch 2, 0.86 at 4, 0.81 at 8, 0.78 at 16
STEPS, LR, BATCH = 150, 1e-4, 16


@pytest.fixture(scope="module")
def teacher(tiny_bundle) -> Path:
    """The tiny bundle (ε-prediction, random weights) as the teacher."""
    return tiny_bundle


@pytest.fixture
def make_config(teacher, manifest, feature_cache, tmp_path):
    def make(name: str = "student", **overrides) -> DistillConfig:
        train = {"max_steps": 2, "batch_size": 2, "seconds": SECONDS, "feature_steps": 4, "cache_dir": feature_cache,
                 "checkpoint_every": 1000, "unet_lr": 1e-3, "weight_decay": 0.0}  # fmt: skip
        distill_settings = {k: overrides.pop(k) for k in list(overrides) if k in DistillConfig.__dataclass_fields__}
        return DistillConfig(TrainConfig(bundle=teacher, data=manifest, out=tmp_path / name, **(train | overrides)),
                             **distill_settings)  # fmt: skip

    return make


@pytest.fixture(scope="module")
def distilled(teacher, manifest, feature_cache, tmp_path_factory) -> Path:
    """The student of the quality test (the run that the other module tests read too)."""
    out = tmp_path_factory.mktemp("distilled") / "student"
    train = TrainConfig(bundle=teacher, data=manifest, out=out, max_steps=STEPS, batch_size=BATCH, seconds=SECONDS,
                        feature_steps=4, cache_dir=feature_cache, checkpoint_every=10**6, unet_lr=LR, weight_decay=0.0)
    distill(DistillConfig(train, guidance_min=GUIDANCE, guidance_max=GUIDANCE))
    return out


def test_distillation_brings_the_students_4_steps_nearer_the_teachers_50_than_the_teachers_own_4(
    teacher, distilled, manifest
):
    """Issue 17's measure: over held-out seeds, the mean L2 of the student's clips from the teacher's 50-step
    clips, divided by that of the teacher's own DDIM clips at the same step count, ≤ 0.8 at 4 steps (it
    prints 1, 2, 4 and 8). The student starts as the teacher's conditional branch (its guidance input is
    zero), so it must fold guidance 3 in as well as take longer steps: undistilled it gives 0.88, 0.91,
    1.05 and 1.62."""
    rows = read_triplets(manifest).rows
    captions = [rows[i % len(rows)].caption for i in range(len(HELD_OUT_SEEDS))]
    images = [load_image(rows[i % len(rows)].image) for i in range(len(HELD_OUT_SEEDS))]
    pipes = [load_pipeline(bundle) for bundle in (teacher, distilled)]
    for pipe in pipes:
        pipe.set_progress_bar_config(disable=True)
    distances = few_step_distances(*pipes, captions, images, seeds=HELD_OUT_SEEDS, guidance_scale=GUIDANCE,
                                   seconds=SECONDS)  # fmt: skip
    print("\nmean L2 from the teacher's 50-step clips (student n steps | teacher n steps | ratio):")
    for n, (student, teacher_n) in distances.items():
        print(f"  {n} steps: {student:.4f} | {teacher_n:.4f} | {student / teacher_n:.3f}")
    student_4, teacher_4 = distances[4]
    assert student_4 <= 0.8 * teacher_4, distances  # measured 0.78


def test_a_student_bundle_verifies_loads_names_its_teacher_and_samples_in_few_steps(teacher, distilled, image):
    manifest = verify_bundle(distilled)
    assert manifest["source"] == "melfusion-distill"
    origin = manifest["origin"]
    assert origin["teacher"]["manifest_sha256"] and origin["teacher"]["bundle"] == str(teacher.resolve())
    assert origin["distillation"]["guidance_range"] == [GUIDANCE, GUIDANCE] and origin["distillation"]["steps"] == STEPS
    teacher_files = read_manifest(teacher)["files"]
    for name, entry in manifest["files"].items():  # every weight file but the music UNet's is the teacher's
        if name.endswith(".safetensors") and not name.startswith("music_unet/"):
            assert teacher_files[name]["sha256"] == entry["sha256"], name
    listed = subprocess.run([sys.executable, "-m", "model_store", "verify", str(distilled)], capture_output=True, text=True)
    assert listed.returncode == 0 and "teacher: bundle" in listed.stdout and "LCMScheduler" in listed.stdout

    student = load_pipeline(distilled)
    student.set_progress_bar_config(disable=True)
    assert student.is_student and student.limits.default_steps == 4 and student.limits.max_steps == 8
    clip = student("calm piano", image, seconds=SECONDS, seed=4).audios
    assert np.array_equal(clip, student("calm piano", image, seconds=SECONDS, seed=4).audios)
    assert np.array_equal(student("calm piano", image, image_strength=0.0, seconds=SECONDS, seed=4).audios,
                          student("calm piano", seconds=SECONDS, seed=4).audios)  # fmt: skip


def test_resuming_from_a_checkpoint_gives_the_same_run(make_config):
    straight = distill(make_config("straight", max_steps=3, checkpoint_every=2, image_dropout=0.5, guidance_max=5.0))
    halfway = straight.checkpoints[0]
    assert load_trainer_state(halfway)["step"] == 2
    resumed = distill(make_config("resumed", max_steps=3, resume=halfway, image_dropout=0.5, guidance_max=5.0))
    assert resumed.losses == straight.losses[2:]
    a, b = (load_pipeline(result.bundle).music_unet for result in (straight, resumed))
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    # a checkpoint of the other command, or no checkpoint at all, is refused by name before any step
    with pytest.raises(InputError, match="resume it with `melfusion distill`"):
        train(dataclasses.replace(make_config("as training").train, resume=halfway))
    with pytest.raises(InputError, match="not a checkpoint folder"):
        distill(make_config("nowhere", resume=halfway.parent / "step-9999999"))


def test_cli_distils_and_generate_uses_the_students_sampler(make_config, tmp_path, capsys):
    config = make_config()
    train = config.train
    assert main(["distill", "--teacher", str(train.bundle), "--data", str(train.data), "--out", str(train.out),
                 "--max-steps", "2", "--batch-size", "2", "--seconds", str(SECONDS), "--feature-steps", "4",
                 "--cache-dir", str(train.cache_dir)]) == 0  # fmt: skip
    assert "distilled 2 steps" in capsys.readouterr().out
    assert (train.work_dir / "loss.csv").read_text().splitlines()[0] == "step,loss,seconds"
    wav = tmp_path / "clip.wav"
    assert main(["generate", "--bundle", str(train.out), "--caption", "calm piano", "--out", str(wav),
                 "--seconds", str(SECONDS), "--steps", "4"]) == 0  # fmt: skip
    assert "4 tcd steps" in capsys.readouterr().out  # the student's sampler, unasked
    assert wav.stat().st_size > 0
    for flags, field in ((["--scheduler", "ddim"], "scheduler"), (["--preset", "paper"], "preset"),
                         (["--steps", "50"], "steps")):  # fmt: skip
        assert main(["generate", "--bundle", str(train.out), "--caption", "x", "--out", str(wav), *flags]) == 2
        assert f"error: {field}:" in capsys.readouterr().err
    assert main(["distill", "--teacher", str(train.out), "--data", str(train.data), "--out", str(tmp_path / "again"),
                 "--seconds", str(SECONDS), "--cache-dir", str(train.cache_dir)]) == 2  # a student is no teacher
    assert "already a distilled student" in capsys.readouterr().err
    assert main(["distill", "--teacher", str(train.bundle), "--data", str(train.data), "--out", str(tmp_path / "bad"),
                 "--guidance-min", "9"]) == 2  # fmt: skip
    assert "error: guidance-min:" in capsys.readouterr().err


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_the_teachers_step_is_ddims(prediction_type):
    scheduler = DDIMScheduler.from_config(sd_scheduler(prediction_type).config, timestep_spacing="trailing")
    scheduler.set_timesteps(4)  # 999, 749, 499, 249: even strides, so DDIM's own previous timestep is exact
    generator = torch.Generator().manual_seed(0)
    prediction, sample = torch.randn(2, 8, 4, 4, generator=generator), torch.randn(2, 8, 4, 4, generator=generator)
    for t in scheduler.timesteps[:-1]:
        expected = scheduler.step(prediction, t, sample).prev_sample
        rows = torch.full((2,), int(t))
        got = ddim_step(scheduler, prediction, sample, rows, rows - 250)
        torch.testing.assert_close(got, expected)
