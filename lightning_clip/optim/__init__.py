"""Optimizers equivalent to Adam with aggressive gradient clipping.

* :class:`SmoothedSignSGD`: momentum of gradient signs (Adam on value-clipped
  gradients, exactly, with ``bias_correction=True``).
* :class:`SmoothedNormSGD`: momentum of normalised gradients (Adam on
  norm-clipped gradients, approximately).
* :func:`create_optimizer`, :data:`OPTIMIZER_REGISTRY` and the
  ``OptimizerCallable`` factories :class:`SmoothedSignSGDFactory` /
  :class:`SmoothedNormSGDFactory`.

This subpackage imports only ``torch``.
"""

from .factory import (
    NORMALIZATION_LAYERS,
    OPTIMIZER_REGISTRY,
    GroupedSmoothedNormSGD,
    GroupedSmoothedSignSGD,
    SmoothedNormSGDFactory,
    SmoothedSignSGDFactory,
    create_optimizer,
    get_optimizer_class,
    register_optimizer,
    weight_decay_param_groups,
)
from .smoothed import (
    NORM_KINDS,
    SmoothedNormSGD,
    SmoothedSignSGD,
    global_grad_norm,
    smoothed_norm_sgd,
    smoothed_sign_sgd,
)

__all__ = [
    "SmoothedSignSGD",
    "SmoothedNormSGD",
    "smoothed_sign_sgd",
    "smoothed_norm_sgd",
    "global_grad_norm",
    "NORM_KINDS",
    "OPTIMIZER_REGISTRY",
    "NORMALIZATION_LAYERS",
    "register_optimizer",
    "get_optimizer_class",
    "weight_decay_param_groups",
    "create_optimizer",
    "SmoothedSignSGDFactory",
    "SmoothedNormSGDFactory",
    "GroupedSmoothedSignSGD",
    "GroupedSmoothedNormSGD",
]
