"""MelFusion core: image + caption -> music (CVPR 2024). Imports neither FastAPI nor RQ.

Torch-heavy names load on first use, so `melfusion.limits`, `melfusion.images` and `melfusion.errors`
stay cheap to import for the HTTP side.
"""

from importlib import import_module

from .errors import BundleError, GenerationCancelled, InputError, MelFusionError
from .limits import GenerationLimits, read_limits

_LAZY = {
    "MelFusionPipeline": "pipeline",
    "MelFusionOutput": "pipeline",
    "StepInfo": "pipeline",
    "ImageFeatures": "attention",
    "VisualSynapse": "synapse",
    "load_pipeline": "bundle",
    "save_bundle": "bundle",
    "verify_bundle": "bundle",
    "ensure_tiny_bundle": "bundle",
}

__all__ = ["BundleError", "GenerationCancelled", "GenerationLimits", "InputError", "MelFusionError", "read_limits", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
