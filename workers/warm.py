"""The process-wide state a job needs: the pipeline (loaded once, then reused), the storage, the settings.

RQ calls job functions by name with only their arguments, so the worker installs this state before it
starts working and `generate_clip` picks it up with `get_runtime()`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from jobs.settings import Settings
from jobs.storage import Storage

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    settings: Settings
    storage: Storage
    pipeline_loads: int = 0  # the proof of warmth: stays 1 however many jobs run
    _pipeline: object = field(default=None, repr=False)

    def get_pipeline(self):
        """The loaded MelFusionPipeline; loads it on first use only."""
        if self._pipeline is None:
            import torch

            from melfusion.bundle import load_pipeline

            bundle = self.settings.resolve_bundle_dir()
            started = time.perf_counter()
            pipe = load_pipeline(bundle, device=self.settings.device, dtype=getattr(torch, self.settings.dtype))
            pipe.set_progress_bar_config(disable=True)
            if self.settings.feature_cache_mb:
                pipe.enable_feature_cache(self.settings.feature_cache_mb * 2**20)
            self._pipeline = pipe
            self.pipeline_loads += 1
            log.info(
                "loaded pipeline from %s on %s in %.1f s", bundle, self.settings.device, time.perf_counter() - started
            )
        return self._pipeline


_runtime: Runtime | None = None


def install_runtime(runtime: Runtime) -> None:
    global _runtime
    _runtime = runtime


def get_runtime() -> Runtime:
    if _runtime is None:
        raise RuntimeError("no worker runtime installed; run jobs with `python -m workers`")
    return _runtime
