"""bench.train_step runs the training step it times (the lead runs it at full size on a GPU)."""

from __future__ import annotations

from bench.train_step import main


def test_train_step_benchmark_runs_on_the_cpu_at_tiny_size(capsys):
    main(["--size", "tiny", "--seconds", "1", "--batch-sizes", "1", "2", "--warmup", "0", "--repeats", "1",
          "--encode-steps", "2"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| 1 |") or line.startswith("| 2 |")]
    assert len(rows) == 2 and "cache fill, batches of 2" in out
    assert "cache read per training row: whole trajectory (25,600 B)" in out and "the two steps around t (1,024 B)" in out
