"""Numerics across dtypes: modules kept in float32 whatever the pipeline's dtype, and where NaN/inf began.

transformers marks layers that overflow in half precision with `_keep_in_fp32_modules` (FLAN-T5: the
feed-forward output `wo`, whose activations exceed float16's 65504) and honours it in `from_pretrained`,
but not in `.to(dtype)`. Everything that casts a whole pipeline goes through `keep_float32_modules`.
NaN/inf are looked for per batch row, so a bad row fails only its own request.
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


def finite_rows(tensor: torch.Tensor) -> torch.Tensor:
    """(B,) True where row b of `tensor` holds no NaN/inf (a device tensor: no host sync)."""
    return torch.isfinite(tensor).flatten(1).all(1)


def first_non_finite(checks: Iterable[tuple[str, torch.dtype, torch.Tensor]]) -> list[NonFiniteOutput | None]:
    """Per batch row, the first component (in pipeline order) whose output for that row has NaN/inf.

    Args:
        checks: (component, its dtype, `finite_rows` of its output) in pipeline order.

    Returns:
        A NonFiniteOutput naming the component for each failed row, None for each clean one. Rows do not
        depend on each other, so one bad row fails only itself. One host sync for all checks, once per call.
    """
    checks = list(checks)
    device = checks[-1][2].device  # the last output's: earlier ones may sit elsewhere (host-made masks)
    finite = torch.stack([rows.to(device) for _, _, rows in checks]).cpu()  # (components, B)
    errors: list[NonFiniteOutput | None] = [None] * finite.shape[1]
    for row in range(finite.shape[1]):
        bad = (~finite[:, row]).nonzero().flatten()
        if len(bad):
            component, dtype, _ = checks[int(bad[0])]
            errors[row] = NonFiniteOutput(component, dtype)
    return errors
