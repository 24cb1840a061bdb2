"""Numerics across dtypes: modules kept in float32 whatever the pipeline's dtype, and where NaN/inf began.

transformers marks layers that overflow in half precision with `_keep_in_fp32_modules` (FLAN-T5: the
feed-forward output `wo`, whose activations exceed float16's 65504) and honours it in `from_pretrained`,
but not in `.to(dtype)`. Everything that casts a whole pipeline goes through `keep_float32_modules`.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .errors import MelFusionError


class NonFiniteOutput(MelFusionError):
    """A component produced NaN or inf; `component` names the first one that did."""

    def __init__(self, component: str, dtype: torch.dtype):
        super().__init__(
            f"non-finite values (NaN/inf) first appeared in the output of {component} ({dtype}); "
            "try float32 or bfloat16"
        )
        self.component = component


def float32_module_names(model: torch.nn.Module) -> list[str]:
    """Names of the submodules `model`'s library keeps in float32 (transformers' matching rule)."""
    kept = getattr(model, "_keep_in_fp32_modules", None) or ()
    return [name for name, _ in model.named_modules() if name and any(k in name.split(".") for k in kept)]


def keep_float32_modules(model: torch.nn.Module) -> None:
    """Cast the submodules `model` keeps in float32 back to float32 after a whole-model cast."""
    modules = dict(model.named_modules())
    for name in float32_module_names(model):
        modules[name].to(torch.float32)


def raise_if_non_finite(outputs: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Check component outputs in pipeline order; raise NonFiniteOutput naming the first bad one.

    Called once after the loop, not per step, so it costs one device sync per generation.
    """
    for component, tensor in outputs:
        if not torch.isfinite(tensor).all():
            raise NonFiniteOutput(component, tensor.dtype)
