"""lightning-clip: adaptive gradient clipping and smoothed sign/norm optimizers for PyTorch Lightning.

The names below are imported on first use, so that ``import lightning_clip.cli`` (the console script) and the pure-torch
core (``lightning_clip.functional``, ``lightning_clip.optim``, ``lightning_clip.sparsity``) do not load Lightning.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    # the callback, and the same clipping as an optimizer wrapper (with its TensorBoard helper)
    "AdaptiveGradientClipping": "lightning_clip.callback",
    "AdaptiveClippingOptimizer": "lightning_clip.wrapper",
    "log_clipping": "lightning_clip.wrapper",
    # the rules, for `rule=` (lightning_clip.rule has their formulas)
    "ClipRule": "lightning_clip.rule",
    "AdaptiveNorm": "lightning_clip.rule",
    "FixedNorm": "lightning_clip.rule",
    "FixedValue": "lightning_clip.rule",
    # the optimizers, and their forms that build decay / no-decay groups
    "SmoothedSignSGD": "lightning_clip.optim",
    "SmoothedNormSGD": "lightning_clip.optim",
    "GroupedSmoothedSignSGD": "lightning_clip.optim",
    "GroupedSmoothedNormSGD": "lightning_clip.optim",
    # update sparsity for runs without clipping
    "UpdateSparsityMonitor": "lightning_clip.monitor",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lightning_clip' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


if TYPE_CHECKING:  # pragma: no cover
    from lightning_clip.callback import AdaptiveGradientClipping
    from lightning_clip.monitor import UpdateSparsityMonitor
    from lightning_clip.optim import GroupedSmoothedNormSGD, GroupedSmoothedSignSGD, SmoothedNormSGD, SmoothedSignSGD
    from lightning_clip.rule import AdaptiveNorm, ClipRule, FixedNorm, FixedValue
    from lightning_clip.wrapper import AdaptiveClippingOptimizer, log_clipping
