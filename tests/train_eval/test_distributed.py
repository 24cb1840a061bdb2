"""Several CPU processes (DDP over gloo, started by `accelerate launch`) shard the encoding and train what one
process trains; the launch that would silently run one process is refused; the two timeouts are apart."""

from __future__ import annotations

import textwrap
from pathlib import Path

import torch
from processes import processes, run_cli, run_python

from melfusion.bundle import load_pipeline
from melfusion.training.config import TrainConfig

FLAGS = ("max_steps", "batch_size", "unet_lr", "alpha_lr", "encode_batch_size", "checkpoint_every", "seconds",
         "feature_steps", "cache_dir")


def train_arguments(config: TrainConfig) -> list[str]:
    return ["train", "--bundle", str(config.bundle), "--data", str(config.data), "--out", str(config.out),
            *(arg for name in FLAGS for arg in (f"--{name.replace('_', '-')}", str(getattr(config, name))))]


def losses(config: TrainConfig) -> torch.Tensor:
    rows = (config.work_dir / "loss.csv").read_text().splitlines()[1:]
    return torch.tensor([float(row.split(",")[1]) for row in rows])


def cache_files(cache: Path) -> dict[str, bytes]:
    return {str(p.relative_to(cache)): p.read_bytes() for p in sorted(cache.rglob("*.safetensors"))}


def test_two_processes_with_sharded_encoding_agree_with_one(make_config, tmp_path):
    # One image per SD batch in both runs: a random UNet amplifies batch-size rounding differences.
    settings = {"max_steps": 2, "unet_lr": 1e-3, "alpha_lr": 1e-2, "encode_batch_size": 1}
    one = make_config("one", batch_size=4, cache_dir=tmp_path / "cache-one", **settings)
    two = make_config("two", batch_size=2, cache_dir=tmp_path / "cache-two", **settings)
    single = run_cli(train_arguments(one))
    assert single.returncode == 0, single.stderr[-3000:]
    assert "on 1 process(es)" in single.stdout
    double = run_cli(train_arguments(two), launch=processes(2))
    assert double.returncode == 0, double.stderr[-3000:]
    assert "on 2 process(es)" in double.stdout
    assert cache_files(two.cache_dir) == cache_files(one.cache_dir)  # each process wrote its half: same bytes
    # the same rows and draws: the losses (averaged over processes) agree to rounding
    torch.testing.assert_close(losses(two), losses(one), atol=1e-5, rtol=0)
    a, b = load_pipeline(one.out), load_pipeline(two.out)
    torch.testing.assert_close(b.synapse.alphas, a.synapse.alphas, atol=1e-5, rtol=0)
    # Adam moves a weight by ~lr·g/(|g| + 1e-8): where g is ~1e-8, rounding shows; 2 steps move up to 2e-3
    gaps = torch.cat([(x - y).abs().flatten() for x, y in zip(a.music_unet.parameters(), b.music_unet.parameters())])
    assert gaps.max() < 1e-3 and gaps.mean() < 1e-5, (gaps.max(), gaps.mean())
    assert not torch.equal(a.synapse.alphas, torch.full_like(a.synapse.alphas, one.initial_alpha))  # it did train


def test_accelerate_launch_cpu_with_several_processes_is_refused_before_any_work(make_config, tmp_path):
    config = make_config("refused", cache_dir=tmp_path / "cache")
    run = run_cli(train_arguments(config), launch=["--cpu", "--num_processes", "2"], timeout=120)
    assert run.returncode != 0, (run.stdout[-2000:], run.stderr[-2000:])  # the launcher reports our exit 2 as 1
    assert "`accelerate launch --cpu --num_processes N` starts a single process here" in run.stderr
    assert "accelerate launch --multi_gpu --num_processes N" in run.stderr  # what to run instead
    assert not config.cache_dir.exists() and not config.work_dir.exists()  # nothing encoded or written


WEDGED = textwrap.dedent("""
    import time
    from pathlib import Path

    import torch

    from melfusion.training.config import TrainConfig
    from melfusion.training.loop import make_accelerator, make_barrier

    config = TrainConfig(Path(), Path(), Path(), barrier_timeout_minutes=0.5, collective_timeout_minutes=0.05)
    accelerator = make_accelerator(config)
    barrier = make_barrier(accelerator, config)
    rank = accelerator.process_index
    if rank == 1:
        time.sleep(6)  # filling its share of the cache: twice the collective timeout, inside the barrier's
    barrier()
    print(f"rank {rank} passed the barrier", flush=True)
    if rank == 1:
        time.sleep(60)  # wedged in a training step
    started = time.monotonic()
    try:
        accelerator.gather(torch.ones(1))
    finally:
        print(f"rank {rank} left the all-gather after {time.monotonic() - started:.0f} s", flush=True)
""")


def test_cache_fill_waits_use_the_barrier_timeout_and_training_collectives_their_own(tmp_path):
    script = tmp_path / "wedged.py"
    script.write_text(WEDGED)
    run = run_python([str(script)], launch=processes(2), timeout=120)
    out = run.stdout + run.stderr
    assert "rank 0 passed the barrier" in out and "rank 1 passed the barrier" in out, out[-3000:]
    left = [line for line in out.splitlines() if line.startswith("rank 0 left the all-gather after")]
    assert left and int(left[0].split()[-2]) < 30, out[-3000:]  # after the collective's 3 s, not rank 1's 60
    assert run.returncode != 0
