"""The process-wide state a job needs: the engine (loaded, compiled and warmed up once, then reused), the
storage, the settings. The worker asks of its engine only what `melfusion.engine.Engine` declares.

RQ calls job functions by name with only their arguments, so the worker installs this state before it
starts working and `generate_clip` picks it up with `get_runtime()`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from jobs.settings import Settings
from jobs.storage import Storage
from melfusion.engine import Engine

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    settings: Settings
    storage: Storage
    pipeline_loads: int = 0  # the proof of warmth: stays 1 however many jobs run
    warming_up: bool = True  # until `warm_up` ends; /readyz does not count the worker before that
    _pipeline: object = field(default=None, repr=False)

    def get_engine(self) -> Engine:
        """The loaded engine (a MelFusionPipeline); loads it on first use only."""
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
                pipe.compile_unets(self.settings.compile_mode)
            self._pipeline = pipe
            self.pipeline_loads += 1
            log.info(
                "loaded pipeline from %s on %s in %.1f s", bundle, self.settings.device, time.perf_counter() - started
            )
        return self._pipeline

    def warm_up(self) -> None:
        """Run every configured (batch size, seconds) shape once, so that no job pays for compilation
        (torch.compile compiles on first call); the worker takes jobs only after this."""
        started = time.perf_counter()
        sizes, lengths = self.settings.warmup_batch_sizes, self.settings.warmup_seconds
        self.get_engine().warm_up(sizes, lengths)
        self.warming_up = False
        log.info(
            "warmed up over %d shapes (batch sizes %s x seconds %s) in %.1f s",
            len(sizes) * len(lengths), sizes, lengths, time.perf_counter() - started,
        )  # fmt: skip


_runtime: Runtime | None = None


def install_runtime(runtime: Runtime) -> None:
    global _runtime
    _runtime = runtime


def get_runtime() -> Runtime:
    if _runtime is None:
        raise RuntimeError("no worker runtime installed; run jobs with `python -m workers`")
    return _runtime
