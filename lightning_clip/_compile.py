"""Compiled kernels for any number of configurations in one process.

``torch.compile(body, fullgraph=True, dynamic=False)`` specialises its graph on every Python constant and every
tensor's shape, stride and dtype it is called with, and keeps all of them in one cache per *code object*: once a
process has seen ``torch._dynamo.config.recompile_limit`` (8) configurations of one kernel (an Optuna sweep, a
notebook, gradual unfreezing), ``fullgraph=True`` raises ``FailOnRecompileLimitHit``.

:class:`CompiledKernel` gives each configuration its own copy of the body's code object, so each configuration
compiles once into a cache of its own and is called at the compiled speed ever after; the copies are kept in a
least-recently-used table of :data:`MAX_CONFIGURATIONS` entries. Where torch cannot compile (a dynamo or inductor
error: no C++ compiler, the process-wide ``accumulated_recompile_limit``), the call runs the same body eagerly, with
one warning that says why. A compile error is raised before the graph runs, so nothing has been written when the
eager body takes over.
"""

from __future__ import annotations

import types
import warnings
from collections import OrderedDict
from collections.abc import Callable, Hashable
from operator import attrgetter
from typing import Any

import torch
from torch import Tensor

__all__ = ["MAX_CONFIGURATIONS", "CompiledKernel", "signature"]

#: Compiled configurations kept per kernel (the least recently used one is dropped beyond it).
MAX_CONFIGURATIONS = 64


_SHAPE, _DTYPE = attrgetter("shape"), attrgetter("dtype")


def signature(args: tuple[Any, ...]) -> Hashable:
    """The configuration of a call, cheaply: for a tensor its shape, dtype and device; for a list of tensors their
    shapes and dtypes and the first one's device; Python scalars (and ``None``) by value; anything else by identity.

    Coarser than what a ``dynamic=False`` graph guards on (strides, ``requires_grad``, ...): a call that differs
    only there reuses the configuration's copy, where dynamo's own guards recompile it (a rare case: at most
    ``recompile_limit`` of them per configuration). About 0.1 us per tensor.
    """
    key: list[Hashable] = []
    for value in args:
        if isinstance(value, Tensor):
            key.append((value.shape, value.dtype, value.device))
        elif isinstance(value, (list, tuple)) and value and isinstance(value[0], Tensor):
            key.append((len(value), tuple(map(_SHAPE, value)), tuple(map(_DTYPE, value)), value[0].device))
        elif isinstance(value, (bool, int, float, str, type(None))):
            key.append((type(value), value))
        elif isinstance(value, (list, tuple)):
            key.append((type(value), signature(tuple(value))))
        else:
            key.append((type(value), id(value)))
    return tuple(key)


def _copy(body: Callable[..., Any]) -> Callable[..., Any]:
    """``body`` with a code object of its own (dynamo keeps its cache on the code object)."""
    code = body.__code__.replace(co_name=body.__code__.co_name)
    return types.FunctionType(code, body.__globals__, body.__name__, body.__defaults__, body.__closure__)


def _compile_errors() -> tuple[type[BaseException], ...]:
    from torch._dynamo import exc

    return (exc.TorchDynamoException, exc.FailOnRecompileLimitHit)


class CompiledKernel:
    """``body(*args)`` through ``torch.compile(fullgraph=True, dynamic=False)``, one compiled copy per configuration.

    Args:
        body: the kernel, a plain Python function that is also correct when run eagerly.
        name: how warnings name it.
    """

    def __init__(self, body: Callable[..., None], name: str) -> None:
        self.body = body
        self.name = name
        self._compiled: OrderedDict[Hashable, Callable[..., None]] = OrderedDict()
        self._eager: set[Hashable] = set()
        self._warned = False

    def __call__(self, *args: Any) -> None:
        key = signature(args)
        if key in self._eager:
            self.body(*args)
            return
        fn = self._compiled.get(key)
        if fn is None:
            fn = self._compiled[key] = torch.compile(_copy(self.body), fullgraph=True, dynamic=False)
            while len(self._compiled) > MAX_CONFIGURATIONS:
                self._compiled.popitem(last=False)
        else:
            self._compiled.move_to_end(key)
        try:
            fn(*args)
        except _compile_errors() as error:
            self._compiled.pop(key, None)
            self._eager.add(key)
            if not self._warned:
                self._warned = True
                cause = getattr(error, "inner_exception", None) or error
                why = next((line for line in str(cause).splitlines() if line.strip()), "")
                warnings.warn(
                    f"lightning-clip: the fused {self.name} kernel could not be compiled for a configuration"
                    f" ({type(cause).__name__}: {why}); such"
                    " configurations run the same kernel eagerly (same results, the speed of the unfused kernels).",
                    RuntimeWarning,
                    stacklevel=2,
                )
            self.body(*args)
