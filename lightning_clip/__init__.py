"""lightning-clip: adaptive gradient clipping and smoothed sign/norm optimizers for PyTorch Lightning."""

from lightning_clip.callback import METRICS, AdaptiveGradientClipping
from lightning_clip.functional import ClipRule, ClipState, ClipStats, clip_grads_, global_grad_norm
from lightning_clip.monitor import SPARSITY_METRICS, UpdateSparsityMonitor
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

__version__ = "0.1.0"

__all__ = [
    "METRICS",
    "SPARSITY_METRICS",
    "UpdateSparsityMonitor",
    "UpdateSparsityTracker",
    "update_sparsity",
    "OPTIMIZER_REGISTRY",
    "GroupedSmoothedNormSGD",
    "GroupedSmoothedSignSGD",
    "SmoothedNormSGD",
    "SmoothedNormSGDFactory",
    "SmoothedSignSGD",
    "SmoothedSignSGDFactory",
    "create_optimizer",
    "AdaptiveGradientClipping",
    "ClipRule",
    "ClipState",
    "ClipStats",
    "clip_grads_",
    "global_grad_norm",
]
