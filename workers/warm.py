"""The process-wide state a job needs: the pipeline (loaded, compiled and warmed up once, then reused), the
storage, the settings. Jobs ask of the pipeline only what `melfusion.engine.Engine` declares; loading,
compiling and shape buckets are MelFusionPipeline's, here.

A compiled pipeline is warmed on every shape of its `ShapeBuckets` and pads each call up to one of them,
so serving never compiles; a graph compiled after warm-up is a miss the worker reports (log and
/metrics), and in `MELFUSION_COMPILE_MODE=check` an error that fails the job.

RQ calls callbacks by name with only their arguments, so the worker installs this state before it starts
working and `tasks.on_job_failure` picks it up with `get_runtime()`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from jobs.settings import Settings
from jobs.storage import Storage
from melfusion.engine import Engine
from melfusion.shapes import ShapeBuckets

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    settings: Settings
    storage: Storage
    pipeline_loads: int = 0  # the proof of warmth: stays 1 however many jobs run
    warming_up: bool = True  # until `warm_up` ends; /readyz does not count the worker before that
    _pipeline: object = field(default=None, repr=False)
    _graphs_seen: int = 0  # graphs dynamo had compiled when last looked at (`take_new_graphs`)

    def get_pipeline(self) -> Engine:
        """The loaded MelFusionPipeline; loads it on first use only."""
        if self._pipeline is None:
            import torch

            from melfusion.bundle import ensure_tiny_bundle, load_pipeline

            bundle = self.settings.bundle_dir or ensure_tiny_bundle()
            started = time.perf_counter()
            pipe = load_pipeline(bundle, device=self.settings.device, dtype=getattr(torch, self.settings.dtype))
            pipe.set_progress_bar_config(disable=True)
            if self.settings.feature_cache_mb:
                pipe.enable_feature_cache(self.settings.feature_cache_mb * 2**20)
            if self.settings.compile_mode != "off":
                if not hasattr(pipe, "compile_unets"):
                    raise SystemExit(
                        f"MELFUSION_COMPILE_MODE={self.settings.compile_mode}: this engine has no "
                        "MelFusionPipeline.compile_unets; use MELFUSION_COMPILE_MODE=off"
                    )
                self._compile(pipe)
            self._pipeline = pipe
            self.pipeline_loads += 1
            log.info(
                "loaded pipeline from %s on %s in %.1f s", bundle, self.settings.device, time.perf_counter() - started
            )
        return self._pipeline

    def _compile(self, pipe) -> None:
        """Compile both UNets as the settings say; "check" traces with dynamo and runs eagerly."""
        mode = self.settings.compile_mode
        if mode == "check":
            pipe.compile_unets(backend="eager")
            return
        image_backend = None if self.settings.image_compile_backend == "same" else self.settings.image_compile_backend
        pipe.compile_unets(None if mode == "default" else mode, image_backend=image_backend)

    @property
    def shape_buckets(self) -> ShapeBuckets | None:
        settings = self.settings
        if not (settings.warmup_batch_sizes and settings.warmup_seconds):
            return None
        return ShapeBuckets(tuple(settings.warmup_batch_sizes), tuple(settings.warmup_seconds),
                            tuple(settings.warmup_caption_tokens))  # fmt: skip

    def warm_up(self) -> None:
        """Run every warm-up shape once, so that no job pays for compilation (torch.compile compiles on
        first call); a compiled pipeline then pads every call to those shapes. The worker takes jobs only
        after this."""
        started = time.perf_counter()
        pipe = self.get_pipeline()
        buckets = self.shape_buckets
        if buckets is not None:
            if self.settings.compile_mode != "off":
                pipe.shape_buckets = buckets
            calls = pipe.warm_up(buckets)
            log.info(
                "warmed up over %d calls (batch sizes %s x seconds %s x caption tokens %s) in %.1f s",
                calls, list(buckets.batch_sizes), list(buckets.seconds), list(buckets.caption_tokens),
                time.perf_counter() - started,
            )  # fmt: skip
        if self.settings.compile_mode != "off":
            import torch

            self._graphs_seen = compiled_graphs()
            log.info("compiled %d graphs (both UNets) before taking jobs", self._graphs_seen)
            if self.settings.compile_mode == "check":
                torch._dynamo.config.error_on_recompile = True  # from now on a new graph fails its job
        self.warming_up = False

    def take_new_graphs(self) -> int:
        """Graphs compiled since warm-up or the last look: each one a shape that missed the warmed set."""
        if self.settings.compile_mode == "off":
            return 0
        seen, self._graphs_seen = self._graphs_seen, compiled_graphs()
        return self._graphs_seen - seen


def compiled_graphs() -> int:
    """How many graphs dynamo has compiled in this process."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


_runtime: Runtime | None = None


def install_runtime(runtime: Runtime) -> None:
    global _runtime
    _runtime = runtime


def get_runtime() -> Runtime:
    if _runtime is None:
        raise RuntimeError("no worker runtime installed; run jobs with `python -m workers`")
    return _runtime
