"""Run `melfusion` commands as real processes: one plain process, or several started by `accelerate launch`.

GPUs are hidden, so several processes run on the CPU over gloo on any machine, as they would on a
machine without GPUs.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_cli(args: list[str], *, launch: list[str] | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python -m melfusion.cli ARGS`, or under `accelerate launch LAUNCH... -m melfusion.cli ARGS`."""
    return run_python(["-m", "melfusion.cli", *args], launch=launch, timeout=timeout)


def run_python(args: list[str], *, launch: list[str] | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python ARGS`, or `accelerate launch LAUNCH... ARGS` (ARGS: a script or `-m module`, then its arguments)."""
    command = [sys.executable, *args]
    if launch is not None:
        command = [sys.executable, "-m", "accelerate.commands.launch", *launch, "--num_machines", "1",
                   "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()), *args]
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def processes(count: int) -> list[str]:
    """`accelerate launch` flags for `count` processes (on the CPU here: GPUs are hidden)."""
    return ["--multi_gpu", "--num_processes", str(count)]
