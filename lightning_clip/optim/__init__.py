"""Optimizers equivalent to Adam with aggressive gradient clipping, one per module as ``torch.optim`` keeps them.

* :mod:`~lightning_clip.optim.sign_sgd`: :class:`SmoothedSignSGD`, momentum of gradient signs
  (``M_t = β M_{t-1} + (1 - β) sign(G_t)``, ``W_{t+1} = W_t - γ M_t``: Adam on value-clipped gradients, exactly,
  with ``bias_correction=True``), and its functional form :func:`smoothed_sign_sgd`.
* :mod:`~lightning_clip.optim.norm_sgd`: :class:`SmoothedNormSGD`, momentum of normalised gradients
  (``M_t = β M_{t-1} + (1 - β) G_t / max(N(G_t), ε)``: Adam on norm-clipped gradients, approximately), its
  functional form :func:`smoothed_norm_sgd` and the norms ``N`` it accepts, :data:`NORM_KINDS`.
* :mod:`~lightning_clip.optim.grouped`: :func:`weight_decay_param_groups` (decay / no-decay parameter groups, for any
  optimizer; :data:`NORMALIZATION_LAYERS` are never decayed) and :class:`GroupedSmoothedSignSGD` /
  :class:`GroupedSmoothedNormSGD`, the two optimizers building those groups themselves (what a LightningCLI YAML
  names).
* :mod:`~lightning_clip.optim._base` (private): the machinery both optimizers share (base class, hyperparameter
  checks, step counts, kernel helpers).

This subpackage imports only ``torch``.
"""

from __future__ import annotations

from .grouped import NORMALIZATION_LAYERS, GroupedSmoothedNormSGD, GroupedSmoothedSignSGD, weight_decay_param_groups
from .norm_sgd import NORM_KINDS, SmoothedNormSGD, smoothed_norm_sgd
from .sign_sgd import SmoothedSignSGD, smoothed_sign_sgd

__all__ = [
    "SmoothedSignSGD",
    "SmoothedNormSGD",
    "GroupedSmoothedSignSGD",
    "GroupedSmoothedNormSGD",
    "smoothed_sign_sgd",
    "smoothed_norm_sgd",
    "NORM_KINDS",
    "weight_decay_param_groups",
    "NORMALIZATION_LAYERS",
]
