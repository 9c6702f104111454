"""Every Lightning detail the package relies on, in one module: the two namespaces and Lightning's private names.

Lightning ships the same code twice: the ``lightning`` package (``lightning.pytorch``, ``lightning.fabric``) and the
standalone ``pytorch_lightning`` / ``lightning_fabric`` packages, built from the same sources with the imports
rewritten. The classes are distinct: a ``pytorch_lightning.Trainer`` accepts only ``pytorch_lightning.Callback``
instances, and LightningCLI's YAML checks ``class_path`` against the Callback class of its own namespace.

The package's callbacks therefore derive from the ``Callback`` class of *every* installed namespace
(:data:`CALLBACK_BASES`): ``isinstance`` holds for either Trainer and either LightningCLI, with nothing to choose.
Both bases are the same code (hook stubs, ``state_key``), so the method resolution order is irrelevant. Everything
that depends on the Trainer (strategy, precision plugin, loggers) is resolved from the namespace of the Trainer at
hand (:func:`namespace_of`), never from an import made at module load.

The private names (the logger connector's logging decision, the fit loop's step counter, Fabric's fused-unscaling
test, the scaler's asynchronous scale) are read here only, each with a fallback for versions that lack it.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from functools import cache
from types import ModuleType
from typing import Any

import torch

#: The two namespaces Lightning is published under, with the Fabric package that goes with each.
NAMESPACES: dict[str, str] = {"lightning.pytorch": "lightning.fabric", "pytorch_lightning": "lightning_fabric"}

#: Environment variable that picks the namespace of the demo and the ``lightning-clip`` command.
NAMESPACE_ENV = "LIGHTNING_CLIP_NAMESPACE"

_INSTALL_HINT = 'pip install "lightning>=2.4"  (or pip install "pytorch-lightning>=2.4")'


def _try_import(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


@cache
def installed() -> tuple[str, ...]:
    """The importable namespaces, ``lightning.pytorch`` first."""
    return tuple(name for name in NAMESPACES if _try_import(name) is not None)


def _callback_bases() -> tuple[type, ...]:
    bases = tuple(importlib.import_module(f"{name}.callbacks.callback").Callback for name in installed())
    if not bases:
        raise ImportError(f"lightning-clip needs PyTorch Lightning: {_INSTALL_HINT}")
    return bases


#: The ``Callback`` class of every installed namespace: the bases of the package's callbacks.
CALLBACK_BASES: tuple[type, ...] = _callback_bases()


@dataclass(frozen=True)
class Namespace:
    """One Lightning namespace (``lightning.pytorch`` or ``pytorch_lightning``) and its Fabric package."""

    name: str

    @property
    def module(self) -> ModuleType:
        return importlib.import_module(self.name)

    @property
    def fabric(self) -> ModuleType:
        return importlib.import_module(NAMESPACES[self.name])

    def get(self, module: str, attr: str) -> Any:
        """``{namespace}.{module}.{attr}``, or ``None`` when this version lacks it."""
        mod = _try_import(f"{self.name}.{module}" if module else self.name)
        return getattr(mod, attr, None) if mod is not None else None

    def isinstance(self, obj: object, module: str, *attrs: str) -> bool:
        """Whether ``obj`` is an instance of any of ``{namespace}.{module}.{attr}`` that exist in this version."""
        classes = tuple(c for c in (self.get(module, a) for a in attrs) if isinstance(c, type))
        return bool(classes) and isinstance(obj, classes)


def namespace_of(obj: object) -> Namespace:
    """The namespace an object (a Trainer, a strategy, a LightningModule) comes from.

    Raises:
        TypeError: when the object's class is from neither namespace.
    """
    for klass in type(obj).__mro__:
        module = klass.__module__
        for name in NAMESPACES:
            if module == name or module.startswith(f"{name}."):
                return Namespace(name)
    raise TypeError(
        f"Invalid trainer: {type(obj).__qualname__} is neither a lightning.pytorch nor a pytorch_lightning object"
    )


def preferred() -> Namespace:
    """The namespace of the demo and the ``lightning-clip`` command.

    ``$LIGHTNING_CLIP_NAMESPACE`` (``lightning.pytorch`` or ``pytorch_lightning``) when set, else ``lightning.pytorch``
    when installed, else ``pytorch_lightning``.

    Raises:
        ValueError: for an unknown or uninstalled value of the environment variable.
        ImportError: when neither namespace is installed.
    """
    wanted = os.environ.get(NAMESPACE_ENV)
    if wanted:
        aliases = {"lightning": "lightning.pytorch", "pytorch-lightning": "pytorch_lightning"}
        wanted = aliases.get(wanted, wanted)
        if wanted not in installed():
            raise ValueError(
                f"Invalid {NAMESPACE_ENV}: {os.environ[NAMESPACE_ENV]!r}; expected one of the installed namespaces"
                f" {list(installed())}"
            )
        return Namespace(wanted)
    if not installed():
        raise ImportError(f"lightning-clip needs PyTorch Lightning: {_INSTALL_HINT}")
    return Namespace(installed()[0])


# ------------------------------------------------------------------------------------------------ strategies
StrategyKind = str  # "single", "ddp", "xla", "deepspeed", "fsdp", "model_parallel", "other"


def strategy_kind(trainer: Any) -> StrategyKind:
    """How the Trainer's strategy lays out gradients, resolved in the Trainer's own namespace.

    ``"single"`` and ``"ddp"`` / ``"xla"`` hold whole, already reduced gradients on every rank; ``"deepspeed"``,
    ``"fsdp"`` and ``"model_parallel"`` shard them.
    """
    ns = namespace_of(trainer)
    strategy = trainer.strategy
    strategies = "strategies"
    if ns.isinstance(strategy, strategies, "DeepSpeedStrategy"):  # a DDPStrategy subclass: test it first
        return "deepspeed"
    if ns.isinstance(strategy, strategies, "FSDPStrategy"):
        return "fsdp"
    if ns.isinstance(strategy, strategies, "ModelParallelStrategy"):
        return "model_parallel"
    if ns.isinstance(strategy, strategies, "XLAStrategy", "SingleDeviceXLAStrategy"):
        return "xla"
    if ns.isinstance(strategy, strategies, "DDPStrategy"):
        return "ddp"
    if ns.isinstance(strategy, strategies, "SingleDeviceStrategy"):
        return "single"
    return "other"


def strategy_model(trainer: Any) -> torch.nn.Module:
    """The model as the strategy wraps it (``strategy.model``: the ``FullyShardedDataParallel`` root under
    ``FSDPStrategy``), else the LightningModule."""
    model = getattr(trainer.strategy, "model", None)
    return model if isinstance(model, torch.nn.Module) else trainer.lightning_module


# ------------------------------------------------------------------------------------------------ precision
def grad_scaler(trainer: Any) -> torch.amp.GradScaler | None:
    """The enabled ``GradScaler`` of the Trainer's precision plugin (``16-mixed``), or ``None``.

    A disabled scaler (``GradScaler(enabled=False)``, or the CUDA one Lightning makes for ``FSDPStrategy`` on a
    machine without CUDA) neither scales nor skips a step: the gradients are then treated as having no scaler, so
    the callback's own non-finite policy applies."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    return scaler if isinstance(scaler, torch.amp.GradScaler) and scaler.is_enabled() else None


def optimizer_handles_unscaling(optimizer: Any) -> bool:
    """Whether the optimizer unscales inside ``step()`` (fused Adam & co.), so Lightning does not unscale before
    the hook. Fabric's ``_optimizer_handles_unscaling`` reads the same torch attribute."""
    optimizer = getattr(optimizer, "optimizer", optimizer)
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False))


def scale_tensor(scaler: torch.amp.GradScaler) -> torch.Tensor | None:
    """The scaler's current scale as a device tensor, read without a host synchronisation."""
    get = getattr(scaler, "_get_scale_async", None)
    return get() if get is not None else getattr(scaler, "_scale", None)


# ------------------------------------------------------------------------------------------------ the loop
def batches_that_stepped(trainer: Any) -> int:
    """The step number Lightning logs a training batch's metrics at (``_batches_that_stepped``).

    Fallback: the global step (the same number unless several optimizers step per batch).
    """
    value = getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", None)
    return int(value) if value is not None else int(trainer.global_step)


def should_update_logs(trainer: Any) -> bool:
    """Whether this training step is a logging step, as Lightning's logger connector decides it."""
    value = getattr(getattr(trainer, "_logger_connector", None), "should_update_logs", None)
    return value if isinstance(value, bool) else should_update_logs_fallback(trainer)


def should_update_logs_fallback(trainer: Any) -> bool:
    """Lightning's rule for a training step, from public names: every ``log_every_n_steps`` batches that stepped,
    counted from 1, and on the step where the run stops."""
    every = trainer.log_every_n_steps
    if not every:
        return False
    return (batches_that_stepped(trainer) + 1) % every == 0 or bool(trainer.should_stop)


# ------------------------------------------------------------------------------------------------ loggers
@cache
def _tensorboard_logger_classes() -> tuple[type, ...]:
    classes = []
    for fabric in NAMESPACES.values():
        cls = getattr(_try_import(f"{fabric}.loggers.tensorboard"), "TensorBoardLogger", None)
        if isinstance(cls, type):
            classes.append(cls)
    return tuple(classes)


def is_tensorboard_logger(logger: object) -> bool:
    """Whether the logger writes TensorBoard event files (Lightning's or Fabric's, either namespace)."""
    return isinstance(logger, _tensorboard_logger_classes())
