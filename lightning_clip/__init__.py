"""lightning-clip: adaptive gradient clipping and smoothed sign/norm optimizers for PyTorch Lightning."""

from lightning_clip.callback import METRICS, AdaptiveGradientClipping
from lightning_clip.functional import ClipRule, ClipState, ClipStats, clip_grads_, global_grad_norm

__version__ = "0.1.0"

__all__ = [
    "METRICS",
    "AdaptiveGradientClipping",
    "ClipRule",
    "ClipState",
    "ClipStats",
    "clip_grads_",
    "global_grad_norm",
]
