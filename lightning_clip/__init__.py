"""lightning-clip: adaptive gradient clipping and smoothed sign/norm optimizers for PyTorch Lightning.

The names below are imported on first use, so that ``import lightning_clip.cli`` (the console script) and the pure-torch
core (``lightning_clip.functional``, ``lightning_clip.optim``, ``lightning_clip.sparsity``) do not load Lightning.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    "METRICS": "lightning_clip.callback",
    "AdaptiveGradientClipping": "lightning_clip.callback",
    "ClipRule": "lightning_clip.functional",
    "ClipState": "lightning_clip.functional",
    "ClipStats": "lightning_clip.functional",
    "clip_grads_": "lightning_clip.functional",
    "global_grad_norm": "lightning_clip.norms",
    "SPARSITY_METRICS": "lightning_clip.monitor",
    "UpdateSparsityMonitor": "lightning_clip.monitor",
    "OPTIMIZER_REGISTRY": "lightning_clip.optim",
    "GroupedSmoothedNormSGD": "lightning_clip.optim",
    "GroupedSmoothedSignSGD": "lightning_clip.optim",
    "SmoothedNormSGD": "lightning_clip.optim",
    "SmoothedNormSGDFactory": "lightning_clip.optim",
    "SmoothedSignSGD": "lightning_clip.optim",
    "SmoothedSignSGDFactory": "lightning_clip.optim",
    "create_optimizer": "lightning_clip.optim",
    "UpdateSparsityTracker": "lightning_clip.sparsity",
    "update_sparsity": "lightning_clip.sparsity",
    "AdaptiveClippingOptimizer": "lightning_clip.wrapper",
    "log_clipping": "lightning_clip.wrapper",
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
    from lightning_clip.callback import METRICS, AdaptiveGradientClipping
    from lightning_clip.functional import ClipRule, ClipState, ClipStats, clip_grads_
    from lightning_clip.monitor import SPARSITY_METRICS, UpdateSparsityMonitor
    from lightning_clip.norms import global_grad_norm
    from lightning_clip.optim import (
        OPTIMIZER_REGISTRY,
        GroupedSmoothedNormSGD,
        GroupedSmoothedSignSGD,
        SmoothedNormSGD,
        SmoothedNormSGDFactory,
        SmoothedSignSGD,
        SmoothedSignSGDFactory,
        create_optimizer,
    )
    from lightning_clip.sparsity import UpdateSparsityTracker, update_sparsity
    from lightning_clip.wrapper import AdaptiveClippingOptimizer, log_clipping
