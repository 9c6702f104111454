"""The machinery shared by :mod:`~lightning_clip.optim.sign_sgd` and :mod:`~lightning_clip.optim.norm_sgd`.

* :class:`SmoothedMomentumOptimizer`: the base class of both optimizers. One state tensor per parameter (the
  momentum buffer ``M``), plus, with bias correction, the step count ``t`` kept as ``torch.optim`` keeps it
  (``state["step"]``, a 0-d CPU tensor incremented in place, so that ``torch.compile(optimizer.step)`` counts and
  every kernel runs under it); every parameter group's settings checked when the group is added
  (:func:`check_hyperparameters`); checkpoints of earlier versions restored (``__setstate__``).
* The pieces of the update both optimizers share, ``W <- W (1 - γ λ)`` then ``W <- W - γ_t M_t`` with the
  (bias-corrected) step size ``γ_t = γ / (1 - β^t)`` (:func:`step_size_for`, :func:`descend_`,
  :func:`apply_step_foreach`).
* The for-loop kernels' chunks and scratch space (:data:`CHUNK`, :func:`split_chunks`, :class:`Scratch`), the fused
  (``torch.compile``) kernels' helpers (:func:`run_fused`, :func:`step_size_tensors`, :func:`decay_tensor`,
  :func:`shared_or_list`, :func:`item_of`) and the kernel choice (:func:`pick_kernel`).
* :data:`NORM_KINDS`, the normalisations of :class:`~lightning_clip.optim.SmoothedNormSGD`: here because the
  hyperparameter check validates a ``norm`` setting in any group.

This module imports only ``torch`` (and lightning-clip's own torch-only modules).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, Literal, TypeVar

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer, _get_scalar_dtype

from lightning_clip._compile import CompiledKernel
from lightning_clip._validation import check_choice, check_flag, check_kernel_choice, check_real
from lightning_clip.norms import default_foreach

#: Normalisations accepted by :class:`~lightning_clip.optim.SmoothedNormSGD` (exported by its module,
#: :mod:`~lightning_clip.optim.norm_sgd`; defined here for :func:`check_hyperparameters`).
NORM_KINDS: tuple[str, ...] = ("global", "tensor", "rms")

NormKind = Literal["global", "tensor", "rms"]


#: A step count as the kernels take it: the number of the step being taken (1 for the first), a Python ``int`` or a
#: 0-d tensor (the optimizers' ``state["step"]``, already incremented for this step).
StepCount = int | Tensor


def _bias_corrected_lr(lr: float, beta: float, step: float, bias_correction: bool) -> float:
    if not bias_correction:
        return lr
    return lr / (1.0 - beta**step)


def _scalar_dtype(t: Tensor) -> torch.dtype:
    """The dtype of a 0-d factor for ``t``: float64 for float64 (complex128) tensors, float32 for the others (the
    arithmetic dtype torch uses for float16/bfloat16)."""
    return torch.float64 if t.dtype in (torch.float64, torch.complex128) else torch.float32


def step_size_for(lr: float, beta: float, step: StepCount, bias_correction: bool, like: Tensor) -> float | Tensor:
    """The (bias-corrected) learning rate of one tensor, ``lr / (1 - beta**step)`` (``lr`` without correction).

    A Python float, computed in float64 on the host, when the count can be read there for free: an ``int``, or a
    tensor on the CPU (where the optimizers keep their counts) outside ``torch.compile``, as ``torch.optim``'s
    ``_get_value`` does (``item()`` of a CPU tensor waits for no device). A 0-d tensor (dtype
    :func:`_scalar_dtype` of ``like``) computed where the count lives otherwise: under ``torch.compile``, so that
    the count is read afresh on each call of the compiled step (a Python number would be baked into the graph), and
    for a count on an accelerator (no host synchronisation). The tensor form is ``-lr / expm1(step * log(beta))``,
    the same value without the cancellation of ``1 - beta**step`` when ``beta**step`` is close to 1.
    """
    if not bias_correction:
        return lr
    if isinstance(step, Tensor):
        if torch.compiler.is_compiling() or not step.is_cpu:
            if beta == 0.0:
                return lr
            return torch.expm1(step.to(_scalar_dtype(like)) * math.log(beta)).reciprocal().mul(-lr)
        step = step.item()
    return _bias_corrected_lr(lr, beta, step, bias_correction)


def descend_(param: Tensor, buf: Tensor, step_size: float | Tensor) -> None:
    """``param -= step_size * buf`` in one pass, for a Python float or a 0-d tensor ``step_size``."""
    if isinstance(step_size, Tensor):
        param.addcmul_(buf, step_size, value=-1.0)
    else:
        param.add_(buf, alpha=-step_size)


def _new_step_count(value: Any = 0) -> Tensor:
    """A step count as ``torch.optim`` keeps it: a 0-d float32 tensor (float64 under a float64 default dtype) on
    the CPU."""
    if isinstance(value, Tensor):
        return value.detach().to("cpu")
    return torch.tensor(float(value), dtype=_get_scalar_dtype())


def _increment_(steps: list[Tensor]) -> None:
    """``step += 1`` for every count, in place, as ``torch.optim.Adam`` does (``_foreach_add_``); traced, and so
    replayed on each call, under ``torch.compile``."""
    if not torch.compiler.is_compiling() and steps[0].is_cpu:
        # CPU counts take foreach's per-tensor path: a tensor 1 (wrapped once, not once per count) and an alpha
        # select the overload that does not wrap it again
        torch._foreach_add_(steps, torch.tensor(1.0), alpha=1.0)
    else:
        torch._foreach_add_(steps, 1)


_F = TypeVar("_F", bound=Callable[..., Any])


def no_grad_step(step: _F) -> _F:
    """``step`` under ``torch.no_grad()``, with a graph break on entry and on exit under ``torch.compile``, as
    ``torch.optim``'s ``_use_grad_for_differentiable`` does: the step is then traced as an inference graph, whose
    in-place updates of the parameters and buffers TorchInductor performs in place (no copy of every parameter)."""

    @functools.wraps(step)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        import torch._dynamo

        enabled = torch.is_grad_enabled()
        try:
            torch.set_grad_enabled(False)
            torch._dynamo.graph_break()
            return step(*args, **kwargs)
        finally:
            torch._dynamo.graph_break()
            torch.set_grad_enabled(enabled)

    return wrapped  # type: ignore[return-value]


def check_kernel_args(
    params: list[Tensor], grads: list[Tensor], bufs: list[Tensor], steps: Sequence[StepCount]
) -> None:
    if not (len(params) == len(grads) == len(bufs) == len(steps)):
        raise ValueError(
            "params, grads, momentum_buffers and state_steps must have the same length, got "
            f"{len(params)}, {len(grads)}, {len(bufs)}, {len(steps)}"
        )


#: Entries per chunk of the for-loop kernels (4 MiB of float32). A tensor up to this size is updated whole; a larger
#: one (a vocabulary embedding) one chunk at a time, so that ``sign(g)`` needs a scratch buffer of at most this size
#: rather than a temporary the size of the tensor (allocating and faulting in that temporary each step costs more
#: than the update). Each further chunk costs three more kernel launches, which is why the chunks are this large.
CHUNK = 1 << 20


def split_chunks(*tensors: Tensor) -> list[tuple[Tensor, ...]] | None:
    """Flat views of same-shaped tensors cut into aligned chunks of at most :data:`CHUNK` entries (one chunk for a
    smaller tensor); ``None`` when a tensor is not contiguous or their numbers of entries differ."""
    if not all(t.is_contiguous() for t in tensors):
        return None
    flats = [t.view(-1) for t in tensors]
    if any(f.numel() != flats[0].numel() for f in flats):
        return None
    if flats[0].numel() <= CHUNK:
        return [tuple(flats)]
    return list(zip(*(f.split(CHUNK) for f in flats)))


class Scratch:
    """Scratch space for ``sign(g)``, shared by every tensor of one kernel call: one flat buffer per dtype and
    device (made on first use), as large as the largest of ``tensors`` (at most :data:`CHUNK` entries), and one
    view of it per shape, made once (a model repeats a few shapes; a view costs as much as a small kernel)."""

    def __init__(self, tensors: list[Tensor]) -> None:
        self._size = min(max((t.numel() for t in tensors), default=0), CHUNK)
        self._flat: dict[tuple[torch.dtype, torch.device], Tensor] = {}
        self._views: dict[tuple[torch.dtype, torch.device, torch.Size], Tensor] = {}

    def like(self, t: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """A contiguous tensor of ``t``'s shape and device and of ``dtype`` (default: ``t``'s), for
        ``t.numel() <= CHUNK``; its values undefined."""
        key = (dtype or t.dtype, t.device, t.shape)
        view = self._views.get(key)
        if view is None:
            flat = self._flat.get(key[:2])
            if flat is None:
                flat = self._flat[key[:2]] = torch.empty(self._size, dtype=key[0], device=t.device)
            view = self._views[key] = flat[: t.numel()].view(t.shape)
        return view


def apply_step_foreach(
    params: list[Tensor],
    bufs: list[Tensor],
    steps: Sequence[StepCount],
    *,
    lr: float,
    beta: float,
    bias_correction: bool,
) -> None:
    """``param -= step_size * buf`` for a list, one fused op when all step sizes are the same Python float."""
    step_sizes = [step_size_for(lr, beta, s, bias_correction, p) for p, s in zip(params, steps)]
    if not any(isinstance(s, Tensor) for s in step_sizes):
        if all(s == step_sizes[0] for s in step_sizes):
            torch._foreach_add_(params, bufs, alpha=-step_sizes[0])  # type: ignore[arg-type]
        else:  # parameters that started receiving gradients at different steps
            torch._foreach_add_(params, torch._foreach_mul(bufs, [-s for s in step_sizes]))  # type: ignore[misc]
    else:  # counts read where they live (torch.compile, counts on an accelerator): 0-d tensors, compared nowhere
        factors = [
            s if isinstance(s, Tensor) else torch.tensor(s, dtype=_scalar_dtype(p), device=p.device)
            for p, s in zip(params, step_sizes)
        ]
        torch._foreach_addcmul_(params, bufs, factors, value=-1.0)


# --------------------------------------------------------------------------- #
# fused (torch.compile) kernels: helpers of the one loop per tensor
# --------------------------------------------------------------------------- #
def item_of(values: Any, i: int) -> Tensor:
    """``values[i]`` for a list of per-tensor values, ``values`` itself for one value shared by every tensor (a
    single 0-d tensor: fewer graph inputs, so fewer guards to check on each call)."""
    return values[i] if isinstance(values, list) else values


def run_fused(kernel: CompiledKernel, *args: Any) -> None:
    """``kernel(*args)``; under ``torch.compile`` (a compiled ``optimizer.step``) the body itself, traced into the
    caller's graph."""
    if torch.compiler.is_compiling():
        kernel.body(*args)
    else:
        kernel(*args)


def step_size_tensors(
    params: list[Tensor], state_steps: Sequence[StepCount], lr: float, beta: float, bias_correction: bool
) -> list[Tensor]:
    """The (bias-corrected) learning rates as 0-d tensors (float32, float64 for float64 parameters) on each
    parameter's device: a tensor argument, unlike a Python float, does not make the compiled kernel recompile when a
    scheduler changes ``lr`` or the step count grows."""
    cache: dict[tuple[torch.device, torch.dtype, float], Tensor] = {}
    out = []
    for param, step in zip(params, state_steps):
        value = step_size_for(lr, beta, step, bias_correction, param)
        if isinstance(value, Tensor):  # counts read where they live (torch.compile, counts on an accelerator)
            out.append(value.to(param.device))
            continue
        key = (param.device, _scalar_dtype(param), value)
        if key not in cache:
            cache[key] = torch.tensor(value, dtype=key[1], device=param.device)
        out.append(cache[key])
    return out


def decay_tensor(params: list[Tensor], lr: float, weight_decay: float) -> Tensor:
    """``1 - lr * weight_decay`` as a 0-d tensor on the first parameter's device (float64 when a parameter is
    float64, else float32: a float16 factor would round ``1 - 1e-5`` to ``1``)."""
    dtype = torch.float64 if any(_scalar_dtype(p) == torch.float64 for p in params) else torch.float32
    return torch.tensor(1.0 - lr * weight_decay, dtype=dtype, device=params[0].device)


def shared_or_list(values: list[Tensor]) -> Any:
    """The one tensor of ``values`` when every entry is that same tensor (the common case: one step size, one global
    coefficient), else the list."""
    return values[0] if all(v is values[0] for v in values) else values


def pick_kernel(foreach: bool | None, fused: bool, params: list[Tensor]) -> str:
    foreach, fused = check_kernel_choice(foreach, fused)
    if fused:
        return "fused"
    if foreach is None:
        foreach = default_foreach(params)
    if foreach and torch.jit.is_scripting():
        raise RuntimeError("torch.jit.script is not supported with foreach optimizers")
    return "foreach" if foreach else "loop"


# --------------------------------------------------------------------------- #
# hyperparameters and the base optimizer class
# --------------------------------------------------------------------------- #
def check_hyperparameters(settings: dict[str, Any], where: str = "") -> dict[str, Any]:
    """The optimizers' settings present in ``settings``, validated and as plain Python values.

    ``lr`` and ``weight_decay``: finite, ``>= 0``; ``beta``: in ``[0, 1)``; ``eps``: finite, ``> 0``; ``norm``: one
    of :data:`NORM_KINDS`; ``bias_correction``, ``maximize``, ``fused``: ``True``/``False``; ``foreach``: ``None``,
    ``True`` or ``False``, and not ``True`` with ``fused=True``. ``where`` (`` of param group 1``) goes into the
    message after the name.

    Raises:
        TypeError: for a value of the wrong kind (a ``bool`` or a string as a number, a non-bool flag).
        ValueError: for a value out of range (``nan`` and ``inf`` included).
    """
    checks: dict[str, Callable[[str, Any], Any]] = {
        "lr": lambda n, v: check_real(n, v, low=0.0),
        "beta": lambda n, v: check_real(n, v, low=0.0, high=1.0, high_open=True),
        "weight_decay": lambda n, v: check_real(n, v, low=0.0),
        "eps": lambda n, v: check_real(n, v, low=0.0, low_open=True),
        "norm": lambda n, v: check_choice(n, v, NORM_KINDS),
        "bias_correction": check_flag,
        "maximize": check_flag,
    }
    out = {key: checks[key](f"{key}{where}", settings[key]) for key in checks if key in settings}
    if "foreach" in settings or "fused" in settings:
        out["foreach"], out["fused"] = check_kernel_choice(settings.get("foreach"), settings.get("fused", False))
    return out


class SmoothedMomentumOptimizer(Optimizer):
    """Shared state handling: one momentum buffer per parameter (+ a step count, a 0-d CPU tensor, with bias
    correction); every parameter group's settings are validated when the group is added (at construction, and by
    ``add_param_group`` later)."""

    _name = "SmoothedMomentumOptimizer"

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group as ``torch.optim.Optimizer`` does, then check its settings (:func:`check_hyperparameters`)."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:  # the defaults were checked already: a failure here is the group's own setting
            group.update(check_hyperparameters(group, f" of param group {len(self.param_groups) - 1}"))
        except (TypeError, ValueError):
            self.param_groups.pop()
            raise

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Restore the state (``load_state_dict`` ends here too): settings added since a checkpoint get their
        defaults, and every step count becomes a 0-d CPU tensor: the Python ``int`` that lightning-clip 0.1.0 stored
        as the same count, and a tensor that ``Optimizer.load_state_dict`` moved to the parameter's device (it does so
        in groups with a ``fused`` key) back to the CPU, where it is read without a device synchronisation (one copy,
        at load time)."""
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("weight_decay", 0.0)
            group.setdefault("bias_correction", False)
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("fused", False)
        for param_state in self.state.values():
            step = param_state.get("step")
            if step is not None and not (isinstance(step, Tensor) and step.is_cpu):
                param_state["step"] = _new_step_count(step)

    def _init_group(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        momentum_buffers: list[Tensor],
        state_steps: list[StepCount],
    ) -> None:
        """Collect the parameters of ``group`` that have a gradient, with their state, made on first use.

        Changes no value: ``torch.compile`` runs this method once, when it traces ``step``, not on every call of the
        compiled step (dynamo's ``OptimizerVariable``), so the step counts are incremented by the caller, in the
        traced code (:func:`_increment_`).
        """
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(
                    f"{self._name} does not support sparse gradients; use a dense gradient "
                    "(e.g. nn.Embedding(sparse=False))"
                )
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if group["bias_correction"]:
                step = state.get("step")
                if not isinstance(step, Tensor):  # new, or an int set by hand
                    step = state["step"] = _new_step_count(step or 0)
                state_steps.append(step)
            else:
                state_steps.append(0)
            params.append(p)
            grads.append(p.grad)
            momentum_buffers.append(state["momentum_buffer"])

    def _collect(self, group: dict[str, Any]) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[StepCount]]:
        """The group's parameters with a gradient, their gradients, buffers and step counts, the counts incremented
        for the step being taken."""
        params: list[Tensor] = []
        grads: list[Tensor] = []
        bufs: list[Tensor] = []
        steps: list[StepCount] = []
        self._init_group(group, params, grads, bufs, steps)
        if params and group["bias_correction"]:
            _increment_(steps)  # type: ignore[arg-type]
        return params, grads, bufs, steps
