"""Two CPU processes (DDP over gloo, started by torchrun) shard the encoding and train what one process trains."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from melfusion.bundle import load_pipeline
from melfusion.training.config import TrainConfig


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun_train(config: TrainConfig, processes: int) -> str:
    """`torchrun --nproc_per_node N -m melfusion.cli train ...` on the CPU; returns its stdout."""
    flags = ("max_steps", "batch_size", "unet_lr", "alpha_lr", "encode_batch_size", "checkpoint_every",
             "seconds", "feature_steps", "cache_dir")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port",
        str(free_port()), "-m", "melfusion.cli", "train", "--bundle", str(config.bundle), "--data", str(config.data),
        "--out", str(config.out),
        *(arg for name in flags for arg in (f"--{name.replace('_', '-')}", str(getattr(config, name)))),
    ]
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[2])}
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout


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
    assert "on 1 process(es)" in torchrun_train(one, 1)
    assert "on 2 process(es)" in torchrun_train(two, 2)
    assert cache_files(two.cache_dir) == cache_files(one.cache_dir)  # each process wrote its half: same bytes
    # the same rows and draws: the losses (averaged over processes) agree to rounding
    torch.testing.assert_close(losses(two), losses(one), atol=1e-5, rtol=0)
    a, b = load_pipeline(one.out), load_pipeline(two.out)
    torch.testing.assert_close(b.synapse.alphas, a.synapse.alphas, atol=1e-5, rtol=0)
    # Adam moves a weight by ~lr·g/(|g| + 1e-8): where g is ~1e-8, rounding shows; 2 steps move up to 2e-3
    gaps = torch.cat([(x - y).abs().flatten() for x, y in zip(a.music_unet.parameters(), b.music_unet.parameters())])
    assert gaps.max() < 1e-3 and gaps.mean() < 1e-5, (gaps.max(), gaps.mean())
    assert not torch.equal(a.synapse.alphas, load_pipeline(one.bundle).synapse.alphas)  # it did train
