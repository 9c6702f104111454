"""Decay / no-decay parameter groups: :func:`weight_decay_param_groups` and the optimizers that build them.

* :func:`weight_decay_param_groups` splits parameters into a decayed group (``weight_decay = λ``) and a non-decayed
  one (``weight_decay = 0``), for any optimizer.
* :class:`GroupedSmoothedSignSGD` / :class:`GroupedSmoothedNormSGD` are :class:`~lightning_clip.optim.SmoothedSignSGD`
  / :class:`~lightning_clip.optim.SmoothedNormSGD` building those groups in ``__init__``; as ``Optimizer`` subclasses
  they are what a LightningCLI YAML can name as the ``class_path`` of an ``OptimizerCallable`` argument.

Which parameters are excluded from weight decay:

* given an ``nn.Module``: every parameter of a normalisation layer
  (``BatchNorm*``, ``InstanceNorm*``, ``LayerNorm``, ``GroupNorm``,
  ``LocalResponseNorm``, ``RMSNorm``: :data:`NORMALIZATION_LAYERS`), every parameter whose qualified name
  contains one of the ``no_decay`` substrings (default: ``"bias"``) and, when
  ``exclude_1d`` is set (default), every parameter with ``ndim <= 1``;
* given ``(name, parameter)`` pairs (e.g. ``model.named_parameters()``): the
  name rule and the ``ndim <= 1`` rule;
* given bare parameters (what LightningCLI passes: ``self.parameters()``,
  without names): only the ``ndim <= 1`` rule, which covers biases and the
  weights of the usual normalisation layers;
* given dicts (parameter groups already built by the caller): they are used
  as they are.

This module imports only ``torch`` (and lightning-clip's own torch-only modules).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.optim.optimizer import ParamsT

from lightning_clip._validation import check_flag, check_real, check_strings

from ._base import NormKind
from .norm_sgd import SmoothedNormSGD
from .sign_sgd import SmoothedSignSGD

__all__ = [
    "NORMALIZATION_LAYERS",
    "weight_decay_param_groups",
    "GroupedSmoothedSignSGD",
    "GroupedSmoothedNormSGD",
]

_norm_layers: list[type] = [
    nn.modules.batchnorm._NormBase,  # BatchNorm*, InstanceNorm*, SyncBatchNorm
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
]
if hasattr(nn, "RMSNorm"):
    _norm_layers.append(nn.RMSNorm)
#: Module types whose parameters are never weight-decayed.
NORMALIZATION_LAYERS: tuple[type, ...] = tuple(_norm_layers)

DEFAULT_NO_DECAY: tuple[str, ...] = ("bias",)


def _decay_split_module(
    module: nn.Module, no_decay: Sequence[str], exclude_1d: bool
) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    decay: list[nn.Parameter] = []
    skip: list[nn.Parameter] = []
    seen = set()
    for module_name, sub in module.named_modules():
        for param_name, p in sub.named_parameters(recurse=False):
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            full = f"{module_name}.{param_name}" if module_name else param_name
            excluded = (
                isinstance(sub, NORMALIZATION_LAYERS)
                or any(s in full for s in no_decay)
                or (exclude_1d and p.ndim <= 1)
            )
            (skip if excluded else decay).append(p)
    return decay, skip


def weight_decay_param_groups(
    model_or_params: nn.Module | ParamsT,
    weight_decay: float,
    no_decay: Sequence[str] = DEFAULT_NO_DECAY,
    exclude_1d: bool = True,
) -> list[dict[str, Any]]:
    """Split parameters into a ``weight_decay`` group and a ``0.0`` group.

    Args:
        model_or_params: a module, an iterable of parameters, of
            ``(name, parameter)`` pairs, or of parameter-group dicts (returned
            unchanged, as a list).
        weight_decay: weight decay of the decayed group.
        no_decay: substrings of qualified parameter names excluded from weight
            decay (needs names: a module or ``(name, parameter)`` pairs).
        exclude_1d: exclude every parameter with ``ndim <= 1`` (biases, norm
            scales and shifts).

    Returns:
        a list of at most two groups, ``{"params": [...], "weight_decay": wd}``
        then ``{"params": [...], "weight_decay": 0.0}``; empty groups are left
        out; parameters with ``requires_grad=False`` are left out; shared
        parameters appear once.

    Raises:
        TypeError: naming the argument for a ``weight_decay`` that is not a
            number, a string as ``no_decay`` (it would be read letter by
            letter) or a non-bool ``exclude_1d``.
        ValueError: for a negative or non-finite ``weight_decay``.
    """
    weight_decay = check_real("weight_decay", weight_decay, low=0.0)  # type: ignore[assignment]
    no_decay = check_strings("no_decay", no_decay)
    exclude_1d = check_flag("exclude_1d", exclude_1d)  # type: ignore[assignment]
    if isinstance(model_or_params, nn.Module):
        decay, skip = _decay_split_module(model_or_params, no_decay, exclude_1d)
    else:
        items = list(model_or_params)
        if items and all(isinstance(x, Mapping) for x in items):
            return [dict(x) for x in items]  # type: ignore[arg-type]
        decay, skip = [], []
        seen = set()
        for item in items:
            if isinstance(item, tuple):
                name, p = item
            elif isinstance(item, torch.Tensor):
                name, p = None, item
            else:
                raise TypeError(
                    f"expected parameters, (name, parameter) pairs or parameter-group dicts, got {type(item).__name__}"
                )
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            excluded = (exclude_1d and p.ndim <= 1) or (name is not None and any(s in name for s in no_decay))
            (skip if excluded else decay).append(p)
    groups: list[dict[str, Any]] = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if skip:
        groups.append({"params": skip, "weight_decay": 0.0})
    return groups


class GroupedSmoothedSignSGD(SmoothedSignSGD):
    """:class:`SmoothedSignSGD` that builds its own decay / no-decay groups.

    ``params`` is split by :func:`weight_decay_param_groups`: the decayed group gets ``weight_decay`` λ (decoupled,
    ``W <- W (1 - γ λ)`` before each update), the other group ``0``; the update is :class:`SmoothedSignSGD`'s.

    Being an ``Optimizer`` subclass whose first argument is ``params``, it can be given as ``class_path`` of a
    LightningCLI ``optimizer`` (jsonargparse only accepts optimizer subclasses there). LightningCLI passes bare
    parameters, so the grouping rule is ``exclude_1d`` (no weight decay for ``ndim <= 1``: biases and normalisation
    weights); given a module or named parameters the ``no_decay`` name rule applies too (and, for a module, the
    normalisation-layer rule).

    Args:
        params: a module, an iterable of parameters, of ``(name, parameter)`` pairs, or of parameter-group dicts
            (used as they are).
        lr, beta, weight_decay, bias_correction, maximize, foreach, fused: as :class:`SmoothedSignSGD`;
            ``weight_decay`` applies to the decayed group only.
        exclude_1d: no weight decay for parameters with ``ndim <= 1``.
        no_decay: substrings of qualified parameter names excluded from weight decay (when names are available).

    Raises:
        TypeError / ValueError: naming the argument and its value, as :func:`weight_decay_param_groups` and
            :class:`SmoothedSignSGD` do.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
        >>> opt = GroupedSmoothedSignSGD(model, lr=0.01, weight_decay=0.1)
        >>> [g["weight_decay"] for g in opt.param_groups]
        [0.1, 0.0]
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        beta: float = 0.9,
        weight_decay: float = 0.0,
        bias_correction: bool = False,
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool = False,
        exclude_1d: bool = True,
        no_decay: Sequence[str] = DEFAULT_NO_DECAY,
    ) -> None:
        groups = weight_decay_param_groups(params, weight_decay, no_decay, exclude_1d)  # type: ignore[arg-type]
        super().__init__(
            groups,
            lr=lr,
            beta=beta,
            weight_decay=weight_decay,
            bias_correction=bias_correction,
            maximize=maximize,
            foreach=foreach,
            fused=fused,
        )


class GroupedSmoothedNormSGD(SmoothedNormSGD):
    """:class:`SmoothedNormSGD` that builds its own decay / no-decay groups.

    Same grouping rules and LightningCLI use as :class:`GroupedSmoothedSignSGD`; the update is
    :class:`SmoothedNormSGD`'s (with ``norm="global"`` the norm is taken over both groups).

    Args:
        params: a module, an iterable of parameters, of ``(name, parameter)`` pairs, or of parameter-group dicts
            (used as they are).
        lr, beta, norm, eps, weight_decay, bias_correction, maximize, foreach, fused: as :class:`SmoothedNormSGD`;
            ``weight_decay`` applies to the decayed group only.
        exclude_1d: no weight decay for parameters with ``ndim <= 1``.
        no_decay: substrings of qualified parameter names excluded from weight decay (when names are available).

    Raises:
        TypeError / ValueError: naming the argument and its value, as :func:`weight_decay_param_groups` and
            :class:`SmoothedNormSGD` do.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
        >>> opt = GroupedSmoothedNormSGD(model, lr=0.01, weight_decay=0.1)
        >>> [g["weight_decay"] for g in opt.param_groups]
        [0.1, 0.0]
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        beta: float = 0.9,
        norm: NormKind = "global",
        eps: float = 1e-12,
        weight_decay: float = 0.0,
        bias_correction: bool = False,
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool = False,
        exclude_1d: bool = True,
        no_decay: Sequence[str] = DEFAULT_NO_DECAY,
    ) -> None:
        groups = weight_decay_param_groups(params, weight_decay, no_decay, exclude_1d)  # type: ignore[arg-type]
        super().__init__(
            groups,
            lr=lr,
            beta=beta,
            norm=norm,
            eps=eps,
            weight_decay=weight_decay,
            bias_correction=bias_correction,
            maximize=maximize,
            foreach=foreach,
            fused=fused,
        )
