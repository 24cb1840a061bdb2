"""The queue side: RQ workers that keep a MelFusion pipeline loaded and run jobs in-process."""

from melfusion.cpus import let_idle_threads_sleep

let_idle_threads_sleep()  # before anything imports torch (OpenMP reads it once, at load)
