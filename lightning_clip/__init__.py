"""lightning-clip: adaptive gradient clipping and smoothed sign/norm optimizers for PyTorch Lightning."""

from lightning_clip.callback import METRICS, AdaptiveGradientClipping
from lightning_clip.functional import ClipRule, ClipState, ClipStats, clip_grads_, global_grad_norm
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

__version__ = "0.1.0"

__all__ = [
    "METRICS",
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
