"""bench.train_step runs the training step it times (the lead runs it at full size on a GPU)."""

from __future__ import annotations

import subprocess
import sys

from bench.train_step import main
from embedded.processes import PROJECT_ROOT


def test_train_step_benchmark_runs_on_the_cpu_at_tiny_size(capsys):
    main(["--size", "tiny", "--seconds", "1", "--batch-sizes", "1", "2", "--warmup", "0", "--repeats", "1",
          "--encode-steps", "2"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| 1 |") or line.startswith("| 2 |")]
    assert len(rows) == 2 and "cache fill, batches of 2" in out
    assert "cache read per training row: whole trajectory (25,600 B)" in out and "the two steps around t (1,024 B)" in out


def test_the_training_benchmark_explains_itself_without_the_training_extra():
    """`--help` needs no accelerate; running without it says which extra to install."""
    code = ("import runpy, sys; sys.modules['accelerate'] = None; sys.argv[0] = 'bench.train_step'; "
            "runpy.run_module('bench.train_step', run_name='__main__')")  # fmt: skip
    runs = [subprocess.run([sys.executable, "-c", code, *args], cwd=PROJECT_ROOT, capture_output=True, text=True,
                           timeout=120, check=False) for args in (["--help"], [])]  # fmt: skip
    assert runs[0].returncode == 0 and "--encode-steps" in runs[0].stdout, runs[0].stderr
    assert runs[1].returncode == 1 and runs[1].stderr.strip() == (
        "bench.train_step needs the training extra: pip install -e '.[train]'")
