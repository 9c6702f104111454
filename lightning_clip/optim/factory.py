"""Optimizer registry, weight-decay parameter grouping and optimizer factories.

* :data:`OPTIMIZER_REGISTRY` maps a name to an optimizer class.
* :func:`weight_decay_param_groups` splits parameters into a decayed and a
  non-decayed group.
* :func:`create_optimizer` builds an optimizer by name with those groups.
* :class:`SmoothedSignSGDFactory` / :class:`SmoothedNormSGDFactory` are
  callables ``params -> Optimizer`` with explicit, typed init arguments (an
  ``OptimizerCallable`` for code, e.g. ``LightningModule(optimizer=...)``).
* :class:`GroupedSmoothedSignSGD` / :class:`GroupedSmoothedNormSGD` are the
  same optimizers building their decay / no-decay groups in ``__init__``; as
  ``Optimizer`` subclasses they are what a LightningCLI YAML can name as the
  ``class_path`` of an ``OptimizerCallable`` argument.

Which parameters are excluded from weight decay:

* given an ``nn.Module``: every parameter of a normalisation layer
  (``BatchNorm*``, ``InstanceNorm*``, ``LayerNorm``, ``GroupNorm``,
  ``LocalResponseNorm``, ``RMSNorm``), every parameter whose qualified name
  contains one of the ``no_decay`` substrings (default: ``"bias"``) and, when
  ``exclude_1d`` is set (default), every parameter with ``ndim <= 1``;
* given ``(name, parameter)`` pairs (e.g. ``model.named_parameters()``): the
  name rule and the ``ndim <= 1`` rule;
* given bare parameters (what LightningCLI passes: ``self.parameters()``,
  without names): only the ``ndim <= 1`` rule, which covers biases and the
  weights of the usual normalisation layers;
* given dicts (parameter groups already built by the caller): they are used
  as they are.

This module imports only ``torch``.
"""

from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Type, Union

import torch
from torch import nn
from torch.optim.optimizer import Optimizer, ParamsT

from lightning_clip._validation import check_flag, check_real, check_str, check_strings

from .smoothed import NormKind, SmoothedNormSGD, SmoothedSignSGD, _check_hyperparameters

__all__ = [
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

#: name -> optimizer class.  Names are matched case-insensitively, with ``-``
#: treated as ``_``.
OPTIMIZER_REGISTRY: Dict[str, Type[Optimizer]] = {
    "smoothed_sign_sgd": SmoothedSignSGD,
    "smoothed_norm_sgd": SmoothedNormSGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "sgd": torch.optim.SGD,
}

_norm_layers: List[type] = [
    nn.modules.batchnorm._NormBase,  # BatchNorm*, InstanceNorm*, SyncBatchNorm
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
]
if hasattr(nn, "RMSNorm"):
    _norm_layers.append(nn.RMSNorm)
#: Module types whose parameters are never weight-decayed.
NORMALIZATION_LAYERS: Tuple[type, ...] = tuple(_norm_layers)

DEFAULT_NO_DECAY: Tuple[str, ...] = ("bias",)


def _canonical(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def register_optimizer(name: str, optimizer_class: Type[Optimizer]) -> None:
    """Add ``optimizer_class`` to :data:`OPTIMIZER_REGISTRY` under ``name``."""
    if not (isinstance(optimizer_class, type) and issubclass(optimizer_class, Optimizer)):
        raise TypeError(f"optimizer_class must be a torch.optim.Optimizer subclass, got {optimizer_class!r}")
    OPTIMIZER_REGISTRY[_canonical(name)] = optimizer_class


def get_optimizer_class(name: str) -> Type[Optimizer]:
    """Look ``name`` up in :data:`OPTIMIZER_REGISTRY` (``ValueError`` if unknown, ``TypeError`` if not a string)."""
    check_str("name", name)
    try:
        return OPTIMIZER_REGISTRY[_canonical(name)]
    except KeyError:
        known = ", ".join(sorted(OPTIMIZER_REGISTRY))
        raise ValueError(f"Invalid name: {name!r}; expected a registered optimizer name ({known})") from None


def _decay_split_module(
    module: nn.Module, no_decay: Sequence[str], exclude_1d: bool
) -> Tuple[List[nn.Parameter], List[nn.Parameter]]:
    decay: List[nn.Parameter] = []
    skip: List[nn.Parameter] = []
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
    model_or_params: Union[nn.Module, ParamsT],
    weight_decay: float,
    no_decay: Sequence[str] = DEFAULT_NO_DECAY,
    exclude_1d: bool = True,
) -> List[Dict[str, Any]]:
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
    groups: List[Dict[str, Any]] = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if skip:
        groups.append({"params": skip, "weight_decay": 0.0})
    return groups


def create_optimizer(
    model_or_params: Union[nn.Module, ParamsT],
    name: str = "smoothed_sign_sgd",
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    no_decay: Sequence[str] = DEFAULT_NO_DECAY,
    exclude_1d: bool = True,
    optimizer_kwargs: Optional[Dict[str, Any]] = None,
) -> Optimizer:
    """Build the optimizer registered as ``name`` with decay / no-decay groups.

    Args:
        model_or_params: a module (preferred: normalisation layers are
            recognised by type), parameters, ``(name, parameter)`` pairs or
            parameter-group dicts.
        name: a key of :data:`OPTIMIZER_REGISTRY` (``"smoothed_sign_sgd"``,
            ``"smoothed_norm_sgd"``, ``"adam"``, ``"adamw"``, ``"sgd"``, ...).
        lr: learning rate.
        weight_decay: weight decay of the decayed group (the other group gets
            0).  With ``torch.optim.Adam`` / ``SGD`` this is coupled (L2)
            weight decay, with AdamW and the smoothed optimizers it is
            decoupled.
        no_decay: name substrings excluded from weight decay.
        exclude_1d: exclude parameters with ``ndim <= 1`` from weight decay.
        optimizer_kwargs: further keyword arguments of the optimizer class
            (e.g. ``{"beta": 0.95}`` or ``{"betas": (0.9, 0.95)}``).

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
        >>> opt = create_optimizer(model, "smoothed_norm_sgd", lr=0.01, weight_decay=0.1)
        >>> [g["weight_decay"] for g in opt.param_groups]
        [0.1, 0.0]

    Raises:
        TypeError / ValueError: naming the argument and its value for a bad
            setting (an unknown ``name``, a negative or non-finite ``lr``, ...).
    """
    cls = get_optimizer_class(name)
    lr = check_real("lr", lr, low=0.0)  # type: ignore[assignment]
    if optimizer_kwargs is not None and not isinstance(optimizer_kwargs, Mapping):
        raise TypeError(f"Invalid optimizer_kwargs: {optimizer_kwargs!r}; expected None or a dict of keyword arguments")
    groups = weight_decay_param_groups(model_or_params, weight_decay, no_decay=no_decay, exclude_1d=exclude_1d)
    return cls(groups, lr=lr, weight_decay=weight_decay, **(optimizer_kwargs or {}))


class SmoothedSignSGDFactory:
    """Callable ``params -> SmoothedSignSGD`` with decay / no-decay groups.

    Usable where LightningCLI expects an ``OptimizerCallable``: LightningCLI
    calls it with ``module.parameters()`` (bare parameters, no names), in which
    case parameters with ``ndim <= 1`` (biases, normalisation weights) get no
    weight decay when ``exclude_1d`` is set.  Called with a module or with
    ``named_parameters()`` it also applies the ``no_decay`` name rule (and the
    normalisation-layer rule for a module).

    Args:
        lr: learning rate.
        beta: momentum coefficient in ``[0, 1)``.
        weight_decay: decoupled weight decay of the decayed group.
        bias_correction: divide the momentum by ``1 - beta^t``.
        maximize: maximise instead of minimise.
        foreach: kernel choice, see :class:`SmoothedSignSGD`.
        fused: compiled kernel, see :class:`SmoothedSignSGD`.
        exclude_1d: no weight decay for parameters with ``ndim <= 1``.
        no_decay: name substrings excluded from weight decay (when names are
            available).

    Raises:
        TypeError / ValueError: at construction, naming the argument and its
            value, as :class:`SmoothedSignSGD` does.
    """

    def __init__(
        self,
        lr: float = 1e-3,
        beta: float = 0.9,
        weight_decay: float = 0.0,
        bias_correction: bool = False,
        maximize: bool = False,
        foreach: Optional[bool] = None,
        fused: bool = False,
        exclude_1d: bool = True,
        no_decay: Sequence[str] = DEFAULT_NO_DECAY,
    ) -> None:
        checked = _check_hyperparameters(
            dict(
                lr=lr,
                beta=beta,
                weight_decay=weight_decay,
                bias_correction=bias_correction,
                maximize=maximize,
                foreach=foreach,
                fused=fused,
            )
        )
        self.lr = checked["lr"]
        self.beta = checked["beta"]
        self.weight_decay = checked["weight_decay"]
        self.bias_correction = checked["bias_correction"]
        self.maximize = checked["maximize"]
        self.foreach = checked["foreach"]
        self.fused = checked["fused"]
        self.exclude_1d = check_flag("exclude_1d", exclude_1d)
        self.no_decay = check_strings("no_decay", no_decay)

    def __call__(self, params: Union[nn.Module, ParamsT]) -> SmoothedSignSGD:
        groups = weight_decay_param_groups(params, self.weight_decay, self.no_decay, self.exclude_1d)
        return SmoothedSignSGD(
            groups,
            lr=self.lr,
            beta=self.beta,
            weight_decay=self.weight_decay,
            bias_correction=self.bias_correction,
            maximize=self.maximize,
            foreach=self.foreach,
            fused=self.fused,
        )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(lr={self.lr}, beta={self.beta}, weight_decay={self.weight_decay}, "
            f"bias_correction={self.bias_correction}, maximize={self.maximize}, foreach={self.foreach}, "
            f"fused={self.fused}, exclude_1d={self.exclude_1d}, no_decay={self.no_decay})"
        )


class SmoothedNormSGDFactory:
    """Callable ``params -> SmoothedNormSGD`` with decay / no-decay groups.

    Same grouping rules as :class:`SmoothedSignSGDFactory`.

    Args:
        lr: learning rate.
        beta: momentum coefficient in ``[0, 1)``.
        norm: ``"global"``, ``"tensor"`` or ``"rms"`` (see :class:`SmoothedNormSGD`).
        eps: floor of the norm.
        weight_decay: decoupled weight decay of the decayed group.
        bias_correction: divide the momentum by ``1 - beta^t``.
        maximize: maximise instead of minimise.
        foreach: kernel choice, see :class:`SmoothedNormSGD`.
        fused: compiled kernel, see :class:`SmoothedNormSGD`.
        exclude_1d: no weight decay for parameters with ``ndim <= 1``.
        no_decay: name substrings excluded from weight decay (when names are
            available).

    Raises:
        TypeError / ValueError: at construction, naming the argument and its
            value, as :class:`SmoothedNormSGD` does.
    """

    def __init__(
        self,
        lr: float = 1e-3,
        beta: float = 0.9,
        norm: NormKind = "global",
        eps: float = 1e-12,
        weight_decay: float = 0.0,
        bias_correction: bool = False,
        maximize: bool = False,
        foreach: Optional[bool] = None,
        fused: bool = False,
        exclude_1d: bool = True,
        no_decay: Sequence[str] = DEFAULT_NO_DECAY,
    ) -> None:
        checked = _check_hyperparameters(
            dict(
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
        )
        self.lr = checked["lr"]
        self.beta = checked["beta"]
        self.norm = checked["norm"]
        self.eps = checked["eps"]
        self.weight_decay = checked["weight_decay"]
        self.bias_correction = checked["bias_correction"]
        self.maximize = checked["maximize"]
        self.foreach = checked["foreach"]
        self.fused = checked["fused"]
        self.exclude_1d = check_flag("exclude_1d", exclude_1d)
        self.no_decay = check_strings("no_decay", no_decay)

    def __call__(self, params: Union[nn.Module, ParamsT]) -> SmoothedNormSGD:
        groups = weight_decay_param_groups(params, self.weight_decay, self.no_decay, self.exclude_1d)
        return SmoothedNormSGD(
            groups,
            lr=self.lr,
            beta=self.beta,
            norm=self.norm,
            eps=self.eps,
            weight_decay=self.weight_decay,
            bias_correction=self.bias_correction,
            maximize=self.maximize,
            foreach=self.foreach,
            fused=self.fused,
        )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(lr={self.lr}, beta={self.beta}, norm={self.norm!r}, eps={self.eps}, "
            f"weight_decay={self.weight_decay}, bias_correction={self.bias_correction}, "
            f"maximize={self.maximize}, foreach={self.foreach}, fused={self.fused}, exclude_1d={self.exclude_1d}, "
            f"no_decay={self.no_decay})"
        )


class GroupedSmoothedSignSGD(SmoothedSignSGD):
    """:class:`SmoothedSignSGD` that builds its own decay / no-decay groups.

    Being an ``Optimizer`` subclass whose first argument is ``params``, it can
    be given as ``class_path`` of a LightningCLI ``optimizer`` (jsonargparse
    only accepts optimizer subclasses there, so the callable factories above
    cannot be used from YAML).  LightningCLI passes bare parameters, so the
    grouping rule is ``exclude_1d`` (no weight decay for ``ndim <= 1``:
    biases and normalisation weights); given a module or named parameters the
    ``no_decay`` name rule applies too.  See :class:`SmoothedSignSGD` for the
    other arguments.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        beta: float = 0.9,
        weight_decay: float = 0.0,
        bias_correction: bool = False,
        maximize: bool = False,
        foreach: Optional[bool] = None,
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

    Same grouping rules and LightningCLI use as :class:`GroupedSmoothedSignSGD`;
    see :class:`SmoothedNormSGD` for the other arguments.
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
        foreach: Optional[bool] = None,
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
