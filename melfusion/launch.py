"""How `train`, `encode` and `eval` are started on several processes, and the one launch they refuse.

`accelerate launch --multi_gpu --num_processes N` (or `torchrun --nproc_per_node N`) starts N processes;
on a machine without GPUs they run on the CPU and talk over gloo. `accelerate launch --cpu --num_processes N`
does not: accelerate 1.x starts several CPU processes only through MPI (`--mpirun_hostfile`), and
otherwise runs the command once, as one process, without a word. Training would then run N times longer
than planned on one process; we stop it instead, before anything heavy is imported.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from .errors import InputError

if TYPE_CHECKING:
    from accelerate import PartialState

# Set by every MPI launcher accelerate can use (Intel MPI / MPICH, Open MPI, MVAPICH).
MPI_WORLD_SIZE = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def refuse_single_process_cpu_launch() -> None:
    """Raise when `accelerate launch --cpu --num_processes N` (N > 1) started this lone process.

    Its simple launcher marks the run with ACCELERATE_USE_CPU and, only when asked for several processes
    or machines, sets MASTER_ADDR/MASTER_PORT; a real multi-process launch also sets WORLD_SIZE (or MPI's size).
    """
    environ = os.environ
    asked_for_cpu = environ.get("ACCELERATE_USE_CPU", "").lower() in ("true", "1", "yes")
    asked_for_several = "MASTER_PORT" in environ and "MASTER_ADDR" in environ
    started_several = "WORLD_SIZE" in environ or any(name in environ for name in MPI_WORLD_SIZE)
    if asked_for_cpu and asked_for_several and not started_several:
        raise InputError(
            "accelerate",
            "`accelerate launch --cpu --num_processes N` starts a single process here (accelerate runs several "
            "CPU processes only through MPI, --mpirun_hostfile). For N CPU processes over gloo run "
            "`accelerate launch --multi_gpu --num_processes N -m melfusion.cli ...` on a machine without GPUs, "
            "or `torchrun --nproc_per_node N -m melfusion.cli ...`; for one process, leave out --num_processes.",
        )


def process_state() -> PartialState:
    """This process's place among those launched: on a machine without GPUs, CPU processes over gloo.

    Accelerate otherwise leaves processes that `--multi_gpu` started on such a machine unaware of each other.
    """
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())
