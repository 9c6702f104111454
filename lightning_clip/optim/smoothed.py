"""Smoothed SignSGD and Smoothed NormSGD.

Both optimizers are what Adam turns into when its input gradients are clipped
aggressively:

* **Value clipping** at a threshold ``alpha`` below every ``|g_i|`` turns every
  gradient entry into ``alpha * sign(g_i)``.  Adam's second moment then equals
  ``alpha**2 * (1 - beta2**t)`` for every entry, the bias-corrected denominator
  is exactly ``alpha`` and Adam's step becomes
  ``lr * M_t / (1 - beta1**t)`` with ``M_t`` the momentum of the *signs*:
  Smoothed SignSGD with ``bias_correction=True`` (checked to float64 precision
  in the tests).
* **Norm clipping** at a threshold below every ``||G||`` turns the gradient into
  ``c * G / ||G||``.  Adam's denominator is then no longer a constant, so the
  correspondence with Smoothed NormSGD is only approximate (it holds up to a
  constant when the normalised gradients are roughly isotropic).

Both optimizers keep a single state tensor per parameter (the momentum buffer),
half of Adam's state.

Complex parameters (spectral layers, for example) are supported. Smoothed
SignSGD takes the complex sign ``sgn(z) = z / |z|`` (``0`` for ``z = 0``,
``torch.sgn``): the unit-modulus number with the phase of ``z``, which is the
real sign for real ``z``. Smoothed NormSGD divides by the norms of the moduli,
``sqrt(sum |z|^2)`` (the norm ``clip_grad_norm_`` computes). The Adam
correspondence above holds for real parameters: ``torch.optim.Adam`` treats a
complex entry as the pair ``(Re z, Im z)``.

Invariance note: ``sign(c * G) == sign(G)`` and
``c * G / ||c * G|| == G / ||G||`` for every ``c > 0``, so gradient *norm*
clipping (``clip_grad_norm_``, Lightning's ``gradient_clip_algorithm="norm"``)
in front of these optimizers changes nothing.  Gradient *value* clipping changes
the direction of ``G`` and therefore does change Smoothed NormSGD (it does not
change Smoothed SignSGD, unless the clip threshold is 0).

Every update rule is implemented by module-level kernels that only see lists of
tensors and keyword-only settings, in the style of ``torch.optim``:

* ``_single_tensor_smoothed_sign`` / ``_multi_tensor_smoothed_sign`` / ``_fused_smoothed_sign``
* ``_single_tensor_smoothed_norm`` / ``_multi_tensor_smoothed_norm`` / ``_fused_smoothed_norm``

and the functional entry points :func:`smoothed_sign_sgd` and
:func:`smoothed_norm_sgd` dispatch between them. Step counts are kept as
``torch.optim`` keeps them (``state["step"]``, a 0-d CPU tensor incremented in
place), so that ``torch.compile(optimizer.step)`` counts and every kernel runs
under it.

This module imports only ``torch`` (and lightning-clip's own torch-only
modules).
"""

import functools
import math
from typing import Any, Callable, Dict, List, Literal, Optional, Sequence, Tuple, TypeVar, Union

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer, ParamsT, _get_scalar_dtype

from lightning_clip._compile import CompiledKernel
from lightning_clip._validation import check_choice, check_flag, check_kernel_choice, check_real
from lightning_clip.norms import default_foreach, global_grad_norm, is_dtensor, real_view, squared_norm, tensor_norms

__all__ = [
    "SmoothedSignSGD",
    "SmoothedNormSGD",
    "smoothed_sign_sgd",
    "smoothed_norm_sgd",
    "global_grad_norm",
    "NORM_KINDS",
]

#: Normalisations accepted by :class:`SmoothedNormSGD`.
NORM_KINDS: Tuple[str, ...] = ("global", "tensor", "rms")

NormKind = Literal["global", "tensor", "rms"]


#: A step count as the kernels take it: the number of the step being taken (1 for the first), a Python ``int`` or a
#: 0-d tensor (the optimizers' ``state["step"]``, already incremented for this step).
StepCount = Union[int, Tensor]

#: Floating dtypes whose range cannot hold ``(1 - beta) / ||g||`` for a tiny or zero gradient (float16 overflows
#: above 65504); the kernels form ``g * (1 - beta) / ||g||`` in float32 for them.
_REDUCED = (torch.float16, torch.bfloat16)


def _bias_corrected_lr(lr: float, beta: float, step: float, bias_correction: bool) -> float:
    if not bias_correction:
        return lr
    return lr / (1.0 - beta**step)


def _scalar_dtype(t: Tensor) -> torch.dtype:
    """The dtype of a 0-d factor for ``t``: float64 for float64 (complex128) tensors, float32 for the others (the
    arithmetic dtype torch uses for float16/bfloat16)."""
    return torch.float64 if t.dtype in (torch.float64, torch.complex128) else torch.float32


def _step_size(lr: float, beta: float, step: StepCount, bias_correction: bool, like: Tensor) -> Union[float, Tensor]:
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


def _descend(param: Tensor, buf: Tensor, step_size: Union[float, Tensor]) -> None:
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


def _increment_(steps: List[Tensor]) -> None:
    """``step += 1`` for every count, in place, as ``torch.optim.Adam`` does (``_foreach_add_``); traced, and so
    replayed on each call, under ``torch.compile``."""
    if not torch.compiler.is_compiling() and steps[0].is_cpu:
        # CPU counts take foreach's per-tensor path: a tensor 1 (wrapped once, not once per count) and an alpha
        # select the overload that does not wrap it again
        torch._foreach_add_(steps, torch.tensor(1.0), alpha=1.0)
    else:
        torch._foreach_add_(steps, 1)


_F = TypeVar("_F", bound=Callable[..., Any])


def _no_grad_step(step: _F) -> _F:
    """``step`` under ``torch.no_grad()``, with a graph break on entry and on exit under ``torch.compile``, as
    ``torch.optim``'s ``_use_grad_for_differentiable`` does: the step is then traced as an inference graph, whose
    in-place updates of the parameters and buffers TorchInductor performs in place (no copy of every parameter)."""

    @functools.wraps(step)
    def no_grad_step(*args: Any, **kwargs: Any) -> Any:
        import torch._dynamo

        enabled = torch.is_grad_enabled()
        try:
            torch.set_grad_enabled(False)
            torch._dynamo.graph_break()
            return step(*args, **kwargs)
        finally:
            torch._dynamo.graph_break()
            torch.set_grad_enabled(enabled)

    return no_grad_step  # type: ignore[return-value]


def _sign(grad: Tensor) -> Tensor:
    """``sign(g)`` for real tensors, ``sgn(z) = z / |z|`` (``0`` at ``0``) for complex ones."""
    return torch.sgn(grad) if grad.is_complex() else torch.sign(grad)


def _check_kernel_args(
    params: List[Tensor], grads: List[Tensor], bufs: List[Tensor], steps: Sequence[StepCount]
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
_CHUNK = 1 << 20


def _chunks(*tensors: Tensor) -> Optional[List[Tuple[Tensor, ...]]]:
    """Flat views of same-shaped tensors cut into aligned chunks of at most :data:`_CHUNK` entries (one chunk for a
    smaller tensor); ``None`` when a tensor is not contiguous or their numbers of entries differ."""
    if not all(t.is_contiguous() for t in tensors):
        return None
    flats = [t.view(-1) for t in tensors]
    if any(f.numel() != flats[0].numel() for f in flats):
        return None
    if flats[0].numel() <= _CHUNK:
        return [tuple(flats)]
    return list(zip(*(f.split(_CHUNK) for f in flats)))


class _Scratch:
    """Scratch space for ``sign(g)``, shared by every tensor of one kernel call: one flat buffer per dtype and
    device (made on first use), as large as the largest of ``tensors`` (at most :data:`_CHUNK` entries), and one
    view of it per shape, made once (a model repeats a few shapes; a view costs as much as a small kernel)."""

    def __init__(self, tensors: List[Tensor]) -> None:
        self._size = min(max((t.numel() for t in tensors), default=0), _CHUNK)
        self._flat: Dict[Tuple[torch.dtype, torch.device], Tensor] = {}
        self._views: Dict[Tuple[torch.dtype, torch.device, torch.Size], Tensor] = {}

    def like(self, t: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
        """A contiguous tensor of ``t``'s shape and device and of ``dtype`` (default: ``t``'s), for
        ``t.numel() <= _CHUNK``; its values undefined."""
        key = (dtype or t.dtype, t.device, t.shape)
        view = self._views.get(key)
        if view is None:
            flat = self._flat.get(key[:2])
            if flat is None:
                flat = self._flat[key[:2]] = torch.empty(self._size, dtype=key[0], device=t.device)
            view = self._views[key] = flat[: t.numel()].view(t.shape)
        return view


# --------------------------------------------------------------------------- #
# Smoothed SignSGD kernels
# --------------------------------------------------------------------------- #
def _single_tensor_smoothed_sign(
    params: List[Tensor],
    grads: List[Tensor],
    momentum_buffers: List[Tensor],
    state_steps: Sequence[StepCount],
    *,
    lr: float,
    beta: float,
    weight_decay: float,
    bias_correction: bool,
    maximize: bool,
) -> None:
    """For-loop kernel: per tensor, ``sign(g)`` into scratch space, then ``buf.lerp_`` and ``param.add_``.

    ``sign(g)`` goes into one scratch buffer of at most :data:`_CHUNK` entries, reused by every tensor (no
    allocation per tensor); a tensor larger than that is updated one chunk at a time, the whole chain per chunk.
    DTensors (FSDP2, tensor parallel) are updated whole, through DTensor's own ops: a flat chunk of a sharded tensor
    would cross the shards. Under ``torch.compile`` every tensor is updated whole, without scratch space
    (TorchInductor fuses the chain).
    """
    _check_kernel_args(params, grads, momentum_buffers, state_steps)
    compiling = torch.compiler.is_compiling()
    scratch = None if compiling else _Scratch(grads)
    weight = 1.0 - beta
    decay = 1.0 - lr * weight_decay
    for param, grad, buf, step in zip(params, grads, momentum_buffers, state_steps):
        step_size = _step_size(lr, beta, step, bias_correction, param)
        flat = scratch is not None and not grad.is_complex() and grad.dtype == buf.dtype and not is_dtensor(grad)
        chunks = _chunks(param, grad, buf) if flat and grad.numel() > _CHUNK else None
        for p, g, b in chunks or ((param, grad, buf),):
            if weight_decay != 0.0:
                p.mul_(decay)
            if scratch is not None and flat and g.numel() <= _CHUNK:
                direction = torch.sign(g, out=scratch.like(g))
            else:  # compiling, complex, a DTensor, or large and not contiguous: a temporary the size of the tensor
                direction = _sign(g)
            if maximize:
                direction.neg_()
            # buf = beta * buf + (1 - beta) * sign(grad)
            b.lerp_(direction, weight)
            _descend(p, b, step_size)


def _apply_step_foreach(
    params: List[Tensor],
    bufs: List[Tensor],
    steps: Sequence[StepCount],
    *,
    lr: float,
    beta: float,
    bias_correction: bool,
) -> None:
    """``param -= step_size * buf`` for a list, one fused op when all step sizes are the same Python float."""
    step_sizes = [_step_size(lr, beta, s, bias_correction, p) for p, s in zip(params, steps)]
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


def _multi_tensor_smoothed_sign(
    params: List[Tensor],
    grads: List[Tensor],
    momentum_buffers: List[Tensor],
    state_steps: Sequence[StepCount],
    *,
    lr: float,
    beta: float,
    weight_decay: float,
    bias_correction: bool,
    maximize: bool,
) -> None:
    """Multi-tensor kernel built on ``torch._foreach_*`` ops."""
    _check_kernel_args(params, grads, momentum_buffers, state_steps)
    if not params:
        return
    # one group of every tensor under torch.compile (TorchInductor groups them itself)
    grouped = Optimizer._group_tensors_by_device_and_dtype([params, grads, momentum_buffers], with_indices=True)  # type: ignore[list-item]
    for (device_params, device_grads, device_bufs), indices in grouped.values():
        device_steps = [state_steps[i] for i in indices]
        if weight_decay != 0.0:
            torch._foreach_mul_(device_params, 1.0 - lr * weight_decay)
        # grouped by dtype, except under torch.compile (one group); torch has no foreach sgn
        compiling = torch.compiler.is_compiling()
        if device_grads[0].is_complex() or (compiling and any(g.is_complex() for g in device_grads)):
            directions = [_sign(g) for g in device_grads]
        else:
            directions = torch._foreach_sign(device_grads)
        if maximize:
            torch._foreach_neg_(directions)
        torch._foreach_lerp_(device_bufs, directions, 1.0 - beta)
        del directions
        _apply_step_foreach(device_params, device_bufs, device_steps, lr=lr, beta=beta, bias_correction=bias_correction)


def smoothed_sign_sgd(
    params: List[Tensor],
    grads: List[Tensor],
    momentum_buffers: List[Tensor],
    state_steps: Sequence[StepCount],
    *,
    foreach: Optional[bool] = None,
    fused: bool = False,
    lr: float,
    beta: float,
    weight_decay: float = 0.0,
    bias_correction: bool = False,
    maximize: bool = False,
) -> None:
    """Functional Smoothed SignSGD step (see :class:`SmoothedSignSGD`).

    ``state_steps`` holds, per parameter, the number of the step being taken
    (1 for the first step), a Python ``int`` or a 0-d tensor (the optimizer
    passes its ``state["step"]`` tensors, already incremented); it is only
    read when ``bias_correction`` is set, and never changed. ``foreach=None``
    picks the multi-tensor kernel on devices with native foreach kernels
    (CUDA, XPU) and the for-loop kernel elsewhere (CPU).
    """
    kernel = {
        "fused": _fused_smoothed_sign,
        "foreach": _multi_tensor_smoothed_sign,
        "loop": _single_tensor_smoothed_sign,
    }[_pick(foreach, fused, params)]
    kernel(
        params,
        grads,
        momentum_buffers,
        state_steps,
        lr=lr,
        beta=beta,
        weight_decay=weight_decay,
        bias_correction=bias_correction,
        maximize=maximize,
    )


# --------------------------------------------------------------------------- #
# Smoothed NormSGD kernels
# --------------------------------------------------------------------------- #
def _global_coef(grads: List[Tensor], global_norm: Optional[Tensor], eps: float, signed: float) -> Tensor:
    """``±(1 - beta) / max(||G||, eps)`` over all ``grads`` as a 0-d tensor: no host synchronisation."""
    if global_norm is None:
        global_norm = global_grad_norm(grads, foreach=False)
    assert global_norm is not None
    return torch.reciprocal(global_norm.clamp_min(eps)).mul_(signed)


def _tensor_coef(grad: Tensor, norm: str, eps: float, signed: float) -> Tensor:
    """``±(1 - beta) / max(N(grad), eps)`` for the per-tensor norms ``"tensor"`` and ``"rms"``."""
    n = torch.sqrt(squared_norm(grad))
    if norm == "rms":
        n = n.mul_(1.0 / math.sqrt(max(grad.numel(), 1)))
    return torch.reciprocal(n.clamp_min_(eps)).mul_(signed)


def _scaled_in_float32(grad: Tensor, coef: Tensor, scratch: Optional[_Scratch]) -> Tensor:
    """``grad * coef`` in float32 for a float16/bfloat16 ``grad``: ``coef = ±(1 - beta) / max(N(g), eps)`` reaches
    ``(1 - beta) / eps`` for a zero gradient, beyond float16's range, and a kernel that took it in the gradient's
    dtype would turn a zero gradient into ``nan`` (``0 * inf``) and a tiny one into ``inf``; the product itself is at
    most ``1 - beta``. Into ``scratch`` when the tensor fits there, else a temporary."""
    if scratch is not None and grad.numel() <= _CHUNK and not is_dtensor(grad):
        out = scratch.like(grad, torch.float32).copy_(grad)
    else:
        out = grad.to(torch.float32)
    return out.mul_(coef)


def _single_tensor_smoothed_norm(
    params: List[Tensor],
    grads: List[Tensor],
    momentum_buffers: List[Tensor],
    state_steps: Sequence[StepCount],
    *,
    lr: float,
    beta: float,
    norm: str,
    eps: float,
    weight_decay: float,
    bias_correction: bool,
    maximize: bool,
    global_norm: Optional[Tensor] = None,
) -> None:
    """For-loop kernel.

    With ``norm="global"`` the norm is ``global_norm`` when given (the optimizer
    passes the norm over all of its parameters' gradients), else the global norm
    of ``grads``. For float16/bfloat16 gradients the direction is formed in
    float32 scratch space (:func:`_scaled_in_float32`), one more pass over it;
    other dtypes take one ``addcmul_``.
    """
    _check_kernel_args(params, grads, momentum_buffers, state_steps)
    if not params:
        return
    signed = -(1.0 - beta) if maximize else (1.0 - beta)
    coef_global: Optional[Tensor] = None
    if norm == "global":
        coef_global = _global_coef(grads, global_norm, eps, signed)
    elif norm not in NORM_KINDS:
        raise ValueError(f"Invalid norm: {norm!r}; expected one of {NORM_KINDS}")
    compiling = torch.compiler.is_compiling()
    scratch: Optional[_Scratch] = None
    decay = 1.0 - lr * weight_decay
    for param, grad, buf, step in zip(params, grads, momentum_buffers, state_steps):
        if coef_global is not None:
            coef = coef_global if coef_global.device == grad.device else coef_global.to(grad.device)
        else:
            coef = _tensor_coef(grad, norm, eps, signed)
        step_size = _step_size(lr, beta, step, bias_correction, param)
        reduced = grad.dtype in _REDUCED
        if reduced and scratch is None and not compiling:
            scratch = _Scratch(grads)
        # the update is linear in (param, grad, buf) with real coefficients: complex tensors run as their real views
        # (a DTensor whole: flat chunks would cross shards; under torch.compile whole: TorchInductor fuses the chain)
        large = not compiling and grad.numel() > _CHUNK and not is_dtensor(grad)
        chunks = _chunks(real_view(param), real_view(grad), real_view(buf)) if large else None
        for p, g, b in chunks or ((param, grad, buf),):
            if weight_decay != 0.0:
                p.mul_(decay)
            # buf = beta * buf + (1 - beta) * grad / max(||grad||, eps)
            if reduced:
                b.mul_(beta).add_(_scaled_in_float32(g, coef, scratch))
            else:
                b.mul_(beta).addcmul_(g, coef)
            _descend(p, b, step_size)


def _scaled_foreach(grads: List[Tensor], factors: Union[Tensor, List[Tensor]]) -> List[Tensor]:
    """``g * factor`` for every gradient, new tensors (float32 ones for float16/bfloat16 gradients: see
    :func:`_scaled_in_float32`)."""
    if torch.compiler.is_compiling():  # one group of every dtype: per tensor (TorchInductor fuses them)
        each = factors if isinstance(factors, list) else [factors] * len(grads)
        return [(g.float() if g.dtype in _REDUCED else g) * f for g, f in zip(grads, each)]
    if grads[0].dtype in _REDUCED:  # grouped by dtype
        scaled = [g.to(torch.float32) for g in grads]
        torch._foreach_mul_(scaled, factors)
        return scaled
    return list(torch._foreach_mul(grads, factors))


def _multi_tensor_smoothed_norm(
    params: List[Tensor],
    grads: List[Tensor],
    momentum_buffers: List[Tensor],
    state_steps: Sequence[StepCount],
    *,
    lr: float,
    beta: float,
    norm: str,
    eps: float,
    weight_decay: float,
    bias_correction: bool,
    maximize: bool,
    global_norm: Optional[Tensor] = None,
) -> None:
    """Multi-tensor kernel built on ``torch._foreach_*`` ops."""
    _check_kernel_args(params, grads, momentum_buffers, state_steps)
    if not params:
        return
    if norm not in NORM_KINDS:
        raise ValueError(f"Invalid norm: {norm!r}; expected one of {NORM_KINDS}")
    signed = -(1.0 - beta) if maximize else (1.0 - beta)
    if norm == "global" and global_norm is None:
        global_norm = global_grad_norm(grads, foreach=True)
    grouped = Optimizer._group_tensors_by_device_and_dtype([params, grads, momentum_buffers], with_indices=True)  # type: ignore[list-item]
    for (device_params, device_grads, device_bufs), indices in grouped.values():
        device_steps = [state_steps[i] for i in indices]
        if weight_decay != 0.0:
            torch._foreach_mul_(device_params, 1.0 - lr * weight_decay)
        if norm == "global":
            assert global_norm is not None
            coef = torch.reciprocal(global_norm.to(device_grads[0].device).clamp_min(eps)).mul_(signed)
            scaled = _scaled_foreach(device_grads, coef)
        else:
            norms = tensor_norms(device_grads, foreach=True)
            if norm == "rms":
                torch._foreach_mul_(norms, [1.0 / math.sqrt(max(g.numel(), 1)) for g in device_grads])
            torch._foreach_clamp_min_(norms, eps)
            torch._foreach_reciprocal_(norms)
            torch._foreach_mul_(norms, signed)
            scaled = _scaled_foreach(device_grads, norms)
        # buf = beta * buf + (1 - beta) * grad / max(||grad||, eps)
        torch._foreach_mul_(device_bufs, beta)
        torch._foreach_add_(device_bufs, scaled)
        del scaled
        _apply_step_foreach(device_params, device_bufs, device_steps, lr=lr, beta=beta, bias_correction=bias_correction)


def smoothed_norm_sgd(
    params: List[Tensor],
    grads: List[Tensor],
    momentum_buffers: List[Tensor],
    state_steps: Sequence[StepCount],
    *,
    foreach: Optional[bool] = None,
    fused: bool = False,
    lr: float,
    beta: float,
    norm: str = "global",
    eps: float = 1e-12,
    weight_decay: float = 0.0,
    bias_correction: bool = False,
    maximize: bool = False,
    global_norm: Optional[Tensor] = None,
) -> None:
    """Functional Smoothed NormSGD step (see :class:`SmoothedNormSGD`).

    ``state_steps`` as in :func:`smoothed_sign_sgd`. With ``norm="global"``
    the norm is ``global_norm`` when given, else the norm of ``grads``.
    """
    kernel = {
        "fused": _fused_smoothed_norm,
        "foreach": _multi_tensor_smoothed_norm,
        "loop": _single_tensor_smoothed_norm,
    }[_pick(foreach, fused, params)]
    kernel(
        params,
        grads,
        momentum_buffers,
        state_steps,
        lr=lr,
        beta=beta,
        norm=norm,
        eps=eps,
        weight_decay=weight_decay,
        bias_correction=bias_correction,
        maximize=maximize,
        global_norm=global_norm,
    )


# --------------------------------------------------------------------------- #
# fused (torch.compile) kernels: the whole chain of one tensor in one loop
# --------------------------------------------------------------------------- #
def _one(values: Any, i: int) -> Tensor:
    """``values[i]`` for a list of per-tensor values, ``values`` itself for one value shared by every tensor (a
    single 0-d tensor: fewer graph inputs, so fewer guards to check on each call)."""
    return values[i] if isinstance(values, list) else values


def _sign_body(
    params: List[Tensor],
    grads: List[Tensor],
    bufs: List[Tensor],
    step_sizes: Any,
    decay: Tensor,
    one_minus_beta: float,
    direction: float,
    apply_decay: bool,
) -> None:
    for i, (param, grad, buf) in enumerate(zip(params, grads, bufs)):
        if apply_decay:
            param.mul_(decay)
        buf.lerp_(torch.sign(grad) * direction, one_minus_beta)  # real tensors only (complex: the loop kernel)
        param.sub_(buf * _one(step_sizes, i))


def _norm_body(
    params: List[Tensor],
    grads: List[Tensor],
    bufs: List[Tensor],
    coefs: Any,
    step_sizes: Any,
    decay: Tensor,
    beta: float,
    apply_decay: bool,
) -> None:
    for i, (param, grad, buf) in enumerate(zip(params, grads, bufs)):
        if apply_decay:
            param.mul_(decay)
        buf.mul_(beta).add_(grad * _one(coefs, i))
        param.sub_(buf * _one(step_sizes, i))


#: The compiled kernels: one compiled copy per configuration (shapes, dtypes, ``beta``, ``maximize``, ...), any
#: number of configurations in a process (a sweep, a notebook, gradual unfreezing); where TorchInductor cannot compile
#: one, that configuration runs the same body eagerly, with one warning
#: (:class:`~lightning_clip._compile.CompiledKernel`).
_SIGN_KERNEL = CompiledKernel(_sign_body, "SmoothedSignSGD")
_NORM_KERNEL = CompiledKernel(_norm_body, "SmoothedNormSGD")


def _run_fused(kernel: CompiledKernel, *args: Any) -> None:
    """``kernel(*args)``; under ``torch.compile`` (a compiled ``optimizer.step``) the body itself, traced into the
    caller's graph."""
    if torch.compiler.is_compiling():
        kernel.body(*args)
    else:
        kernel(*args)


def _step_size_tensors(
    params: List[Tensor], state_steps: Sequence[StepCount], lr: float, beta: float, bias_correction: bool
) -> List[Tensor]:
    """The (bias-corrected) learning rates as 0-d tensors (float32, float64 for float64 parameters) on each
    parameter's device: a tensor argument, unlike a Python float, does not make the compiled kernel recompile when a
    scheduler changes ``lr`` or the step count grows."""
    cache: Dict[Tuple[torch.device, torch.dtype, float], Tensor] = {}
    out = []
    for param, step in zip(params, state_steps):
        value = _step_size(lr, beta, step, bias_correction, param)
        if isinstance(value, Tensor):  # counts read where they live (torch.compile, counts on an accelerator)
            out.append(value.to(param.device))
            continue
        key = (param.device, _scalar_dtype(param), value)
        if key not in cache:
            cache[key] = torch.tensor(value, dtype=key[1], device=param.device)
        out.append(cache[key])
    return out


def _decay_tensor(params: List[Tensor], lr: float, weight_decay: float) -> Tensor:
    """``1 - lr * weight_decay`` as a 0-d tensor on the first parameter's device (float64 when a parameter is
    float64, else float32: a float16 factor would round ``1 - 1e-5`` to ``1``)."""
    dtype = torch.float64 if any(_scalar_dtype(p) == torch.float64 for p in params) else torch.float32
    return torch.tensor(1.0 - lr * weight_decay, dtype=dtype, device=params[0].device)


def _shared(values: List[Tensor]) -> Any:
    """The one tensor of ``values`` when every entry is that same tensor (the common case: one step size, one global
    coefficient), else the list."""
    return values[0] if all(v is values[0] for v in values) else values


def _fused_smoothed_sign(
    params: List[Tensor],
    grads: List[Tensor],
    momentum_buffers: List[Tensor],
    state_steps: Sequence[StepCount],
    *,
    lr: float,
    beta: float,
    weight_decay: float,
    bias_correction: bool,
    maximize: bool,
) -> None:
    """Compiled kernel: one fused loop per tensor (compiled on first use for each configuration: list of shapes and
    dtypes, ``beta``, ``maximize``, whether there is weight decay; :data:`_SIGN_KERNEL`).

    Complex parameters take the for-loop kernel (TorchInductor generates no code for complex operations).
    """
    _check_kernel_args(params, grads, momentum_buffers, state_steps)
    is_complex = [p.is_complex() for p in params]
    if any(is_complex):

        def select(xs: List[Any], keep: bool) -> List[Any]:
            return [x for x, c in zip(xs, is_complex) if c == keep]

        lists = (params, grads, momentum_buffers, state_steps)
        _single_tensor_smoothed_sign(
            *(select(xs, True) for xs in lists),
            lr=lr,
            beta=beta,
            weight_decay=weight_decay,
            bias_correction=bias_correction,
            maximize=maximize,
        )
        params, grads, momentum_buffers, state_steps = (select(xs, False) for xs in lists)
    if not params:
        return
    step_sizes = _step_size_tensors(params, state_steps, lr, beta, bias_correction)
    decay = _decay_tensor(params, lr, weight_decay)
    _run_fused(
        _SIGN_KERNEL,
        params,
        grads,
        momentum_buffers,
        _shared(step_sizes),
        decay,
        1.0 - beta,
        -1.0 if maximize else 1.0,
        weight_decay != 0.0,
    )


def _fused_smoothed_norm(
    params: List[Tensor],
    grads: List[Tensor],
    momentum_buffers: List[Tensor],
    state_steps: Sequence[StepCount],
    *,
    lr: float,
    beta: float,
    norm: str,
    eps: float,
    weight_decay: float,
    bias_correction: bool,
    maximize: bool,
    global_norm: Optional[Tensor] = None,
) -> None:
    """Compiled kernel: the norms as in the for-loop kernel, then one fused loop per tensor (compiled on first use
    for each configuration, :data:`_NORM_KERNEL`; float16/bfloat16 tensors are computed in float32 in the loop)."""
    _check_kernel_args(params, grads, momentum_buffers, state_steps)
    if not params:
        return
    signed = -(1.0 - beta) if maximize else (1.0 - beta)
    if norm == "global":
        coef = _global_coef(grads, global_norm, eps, signed)
        coefs = [coef if coef.device == g.device else coef.to(g.device) for g in grads]
    elif norm in NORM_KINDS:
        coefs = [_tensor_coef(grad, norm, eps, signed) for grad in grads]
    else:
        raise ValueError(f"Invalid norm: {norm!r}; expected one of {NORM_KINDS}")
    # the update is linear in (param, grad, buf) with real coefficients: complex tensors run as their real views
    params, grads, momentum_buffers = ([real_view(t) for t in ts] for ts in (params, grads, momentum_buffers))
    step_sizes = _step_size_tensors(params, state_steps, lr, beta, bias_correction)
    decay = _decay_tensor(params, lr, weight_decay)
    _run_fused(
        _NORM_KERNEL,
        params,
        grads,
        momentum_buffers,
        _shared(coefs),
        _shared(step_sizes),
        decay,
        beta,
        weight_decay != 0.0,
    )


def _pick(foreach: Optional[bool], fused: bool, params: List[Tensor]) -> str:
    foreach, fused = check_kernel_choice(foreach, fused)
    if fused:
        return "fused"
    if foreach is None:
        foreach = default_foreach(params)
    if foreach and torch.jit.is_scripting():
        raise RuntimeError("torch.jit.script is not supported with foreach optimizers")
    return "foreach" if foreach else "loop"


# --------------------------------------------------------------------------- #
# optimizer classes
# --------------------------------------------------------------------------- #
def _check_hyperparameters(settings: Dict[str, Any], where: str = "") -> Dict[str, Any]:
    """The optimizers' settings present in ``settings``, validated and as plain Python values.

    ``lr`` and ``weight_decay``: finite, ``>= 0``; ``beta``: in ``[0, 1)``; ``eps``: finite, ``> 0``; ``norm``: one
    of :data:`NORM_KINDS`; ``bias_correction``, ``maximize``, ``fused``: ``True``/``False``; ``foreach``: ``None``,
    ``True`` or ``False``, and not ``True`` with ``fused=True``. ``where`` (`` of param group 1``) goes into the
    message after the name.

    Raises:
        TypeError: for a value of the wrong kind (a ``bool`` or a string as a number, a non-bool flag).
        ValueError: for a value out of range (``nan`` and ``inf`` included).
    """
    checks: Dict[str, Callable[[str, Any], Any]] = {
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


class _SmoothedMomentumOptimizer(Optimizer):
    """Shared state handling: one momentum buffer per parameter (+ a step count, a 0-d CPU tensor, with bias
    correction); every parameter group's settings are validated when the group is added (at construction, and by
    ``add_param_group`` later)."""

    _name = "SmoothedMomentumOptimizer"

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        """Add a group as ``torch.optim.Optimizer`` does, then check its settings (:func:`_check_hyperparameters`)."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:  # the defaults were checked already: a failure here is the group's own setting
            group.update(_check_hyperparameters(group, f" of param group {len(self.param_groups) - 1}"))
        except (TypeError, ValueError):
            self.param_groups.pop()
            raise

    def __setstate__(self, state: Dict[str, Any]) -> None:
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
        group: Dict[str, Any],
        params: List[Tensor],
        grads: List[Tensor],
        momentum_buffers: List[Tensor],
        state_steps: List[StepCount],
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

    def _collect(self, group: Dict[str, Any]) -> Tuple[List[Tensor], List[Tensor], List[Tensor], List[StepCount]]:
        """The group's parameters with a gradient, their gradients, buffers and step counts, the counts incremented
        for the step being taken."""
        params: List[Tensor] = []
        grads: List[Tensor] = []
        bufs: List[Tensor] = []
        steps: List[StepCount] = []
        self._init_group(group, params, grads, bufs, steps)
        if params and group["bias_correction"]:
            _increment_(steps)  # type: ignore[arg-type]
        return params, grads, bufs, steps


class SmoothedSignSGD(_SmoothedMomentumOptimizer):
    r"""Smoothed SignSGD: momentum of the gradient *signs*.

    The sign is taken *before* the momentum (unlike Signum / Lion, which take
    the sign of the momentum), so entries whose gradient sign keeps flipping
    cancel in the buffer and get small steps.  This is exactly Adam's update on
    gradients value-clipped below their smallest magnitude (with
    ``bias_correction=True``, ``beta = beta1`` and ``eps -> 0``).

    .. code-block:: text

        input: lr (γ), beta (β), weight_decay (λ), bias_correction, maximize
        M_0 = 0
        for t = 1, 2, ...:
            G_t = ∇f(W_t)                       (-∇f(W_t) if maximize)
            W_t = W_t * (1 - γ λ)               (decoupled, as AdamW; skipped if λ = 0)
            M_t = β M_{t-1} + (1 - β) sign(G_t)
            M̂_t = M_t / (1 - β^t)  if bias_correction  else  M_t
            W_{t+1} = W_t - γ M̂_t

    With the defaults this is exactly Definition 1 (``M_0 = 0``,
    ``M_t = β M_{t-1} + (1 - β) sign(G_t)``, ``W_{t+1} = W_t - γ M_t``).

    Args:
        params: iterable of parameters, of ``(name, parameter)`` pairs, or of
            dicts defining parameter groups (each group may override ``lr``,
            ``beta``, ``weight_decay``, ...).
        lr: learning rate γ, a finite number ``>= 0``.
        beta: momentum coefficient β in ``[0, 1)``; ``beta=0`` is plain SignSGD.
        weight_decay: decoupled weight decay λ ``>= 0`` (``W <- W (1 - γ λ)``
            before the update, as in AdamW).
        bias_correction: divide ``M_t`` by ``1 - β^t``.  Keeps a step count
            per parameter (``state["step"]``, see State) only when enabled.
        maximize: maximise the objective instead of minimising it.
        foreach: ``True`` for the multi-tensor (``torch._foreach_*``) kernel,
            ``False`` for the for-loop kernel, ``None`` (default) for the faster
            one on the parameters' device: multi-tensor on CUDA/XPU, for-loop on
            CPU.  Measured on CPU (16M float32 parameters in 100 tensors, 2
            cores): the for-loop step takes 1.1x the time of
            ``torch.optim.SGD(momentum=0.9, foreach=False)``, the multi-tensor
            one 3.5x (``python benchmarks/bench_all.py --part optimizers``).
        fused: run the whole update of each tensor in one ``torch.compile``-fused
            loop, compiled on the first step of each configuration (list of
            shapes and dtypes, ``beta``, ``maximize``, weight decay or not:
            tens of seconds on CPU for a hundred tensors, cached on disk by
            TorchInductor). Any number of configurations may run in one
            process (a sweep, a notebook, gradual unfreezing); one that
            TorchInductor cannot compile runs the same loop eagerly, after a
            single warning. ``lr`` and the bias correction reach the compiled
            kernel as tensors, so neither a scheduler nor the step count
            triggers recompilation. Not with ``foreach=True``.

    State:
        exactly one tensor per parameter, ``state["momentum_buffer"]`` (same
        shape/dtype as the parameter), plus, when ``bias_correction`` is set,
        the step count ``state["step"]`` as ``torch.optim`` keeps it: a 0-d
        float32 tensor (float64 under a float64 default dtype) on the CPU,
        incremented in place (so ``torch.compile(opt.step)`` counts too) and
        read on the host without a device synchronisation. A checkpoint that
        holds the count as a Python ``int`` (lightning-clip 0.1.0) loads as
        the same count. The state takes 1x the parameters' memory, half of
        Adam's 2x.

    Notes:
        * ``step`` does not synchronise with the device: hyper-parameters are
          Python floats read from ``param_groups`` (so LR schedulers work), and
          no device tensor is read on the host (the step count lives on the
          CPU).
        * ``torch.compile(opt.step)``, the recipe torch documents for
          optimizers, works with every kernel: the step counts are then read
          inside the compiled graph (dynamo moves them to the parameters'
          device, as for ``torch.optim`` optimizers), each step with its own
          bias correction.
        * Gradient norm clipping in front of this optimizer has no effect
          (``sign(c G) = sign(G)`` for ``c > 0``); value clipping has none
          either, unless the threshold is 0.
        * Sparse gradients are not supported (``RuntimeError``).
        * ``sign(0) = 0``: entries with a zero gradient only decay their
          momentum.
        * Complex parameters: ``sign`` is the complex sign
          ``sgn(z) = z / |z|`` (``0`` at ``0``, ``torch.sgn``), so the buffer
          averages unit phasors and ``|M_t| <= 1`` as for real entries; a
          complex parameter with zero imaginary parts moves exactly as the
          real one. With ``fused=True`` complex parameters take the for-loop
          kernel (TorchInductor generates no complex code).

    Raises:
        TypeError: naming the argument and its value, for a value of the wrong
            kind: a ``bool`` or a string where a number goes (``lr="0.1"``),
            anything but ``True``/``False`` where a flag goes
            (``bias_correction="no"``), in the arguments or in a parameter
            group (``Invalid lr of param group 1: ...``).
        ValueError: naming the argument and its value, for a value out of
            range (``nan`` and ``inf`` included) or ``fused=True`` with
            ``foreach=True``.

    Example:
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = SmoothedSignSGD(model.parameters(), lr=1e-3, beta=0.9)
        >>> model(torch.randn(8, 4)).pow(2).mean().backward()
        >>> opt.step()
    """

    _name = "SmoothedSignSGD"

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
    ) -> None:
        defaults = _check_hyperparameters(
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
        super().__init__(params, defaults)

    @_no_grad_step
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:  # type: ignore[override]
        """Perform a single optimisation step.

        Args:
            closure: optional callable that re-evaluates the model and returns
                the loss; it is run with gradients enabled.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, bufs, steps = self._collect(group)
            if not params:
                continue
            smoothed_sign_sgd(
                params,
                grads,
                bufs,
                steps,
                foreach=group["foreach"],
                fused=group["fused"],
                lr=group["lr"],
                beta=group["beta"],
                weight_decay=group["weight_decay"],
                bias_correction=group["bias_correction"],
                maximize=group["maximize"],
            )
        return loss


class SmoothedNormSGD(_SmoothedMomentumOptimizer):
    r"""Smoothed NormSGD: momentum of the *normalised* gradient.

    .. code-block:: text

        input: lr (γ), beta (β), norm N, eps (ε), weight_decay (λ),
               bias_correction, maximize
        M_0 = 0
        for t = 1, 2, ...:
            G_t = ∇f(W_t)                       (-∇f(W_t) if maximize)
            W_t = W_t * (1 - γ λ)               (decoupled, as AdamW; skipped if λ = 0)
            D_t = G_t / max(N(G_t), ε)
            M_t = β M_{t-1} + (1 - β) D_t
            M̂_t = M_t / (1 - β^t)  if bias_correction  else  M_t
            W_{t+1} = W_t - γ M̂_t

    The norm ``N`` is fixed a priori:

    * ``"global"`` (default): the L2 norm of *all* the optimizer's gradients
      concatenated, across every parameter group (the norm
      ``torch.nn.utils.clip_grad_norm_`` computes over the same parameters).
      Groups may mix ``"global"`` with the per-tensor kinds; the global norm is
      always taken over all parameters with a gradient.
    * ``"tensor"``: per-tensor L2 norm (layer-wise normalisation).
    * ``"rms"``: per-tensor RMS, ``||G|| / sqrt(numel)``: each tensor's
      direction has unit RMS, so the step size per entry does not depend on
      the tensor's size.

    A spectral (per-matrix operator norm) option is deliberately not included:
    an exact spectral norm needs an SVD per matrix and every step, and the
    Muon-style alternative is an orthogonalisation, a different update.

    ``eps`` enters as a floor on the norm, ``G / max(N(G), eps)`` (the
    convention of ``torch.nn.functional.normalize``): with ``N(G) = 0`` the
    gradient is zero, so the direction is exactly zero (never NaN) and the
    momentum just decays by β; gradients with ``N(G) < eps`` get a direction
    shorter than one.  Norms are accumulated in float32 (float64 for float64
    gradients) whatever the parameter dtype.

    Args:
        params: iterable of parameters, of ``(name, parameter)`` pairs, or of
            dicts defining parameter groups (each group may override ``lr``,
            ``beta``, ``norm``, ...).
        lr: learning rate γ, a finite number ``>= 0``.
        beta: momentum coefficient β in ``[0, 1)``.
        norm: ``"global"``, ``"tensor"`` or ``"rms"`` (see above).
        eps: floor ε ``> 0`` of the norm.
        weight_decay: decoupled weight decay λ ``>= 0`` (as AdamW).
        bias_correction: divide ``M_t`` by ``1 - β^t``.  Keeps a step count
            per parameter (``state["step"]``, see State) only when enabled.
        maximize: maximise the objective instead of minimising it.
        foreach: ``True`` for the multi-tensor (``torch._foreach_*``) kernel,
            ``False`` for the for-loop kernel, ``None`` (default) for the faster
            one on the parameters' device: multi-tensor on CUDA/XPU, for-loop on
            CPU.  Measured on CPU (16M float32 parameters in 100 tensors, 2
            cores, global norm): for-loop 1.3x-1.4x the time of
            ``torch.optim.SGD(momentum=0.9, foreach=False)`` (the extra cost is
            the norm pass, which must read every gradient before any update),
            multi-tensor 4x.
        fused: run the whole update of each tensor in one ``torch.compile``-fused
            loop, compiled on the first step of each configuration (list of
            shapes and dtypes, ``beta``, ``maximize``, weight decay or not:
            tens of seconds on CPU for a hundred tensors, cached on disk by
            TorchInductor). Any number of configurations may run in one
            process (a sweep, a notebook, gradual unfreezing); one that
            TorchInductor cannot compile runs the same loop eagerly, after a
            single warning. ``lr`` and the bias correction reach the compiled
            kernel as tensors, so neither a scheduler nor the step count
            triggers recompilation. Not with ``foreach=True``.

    State:
        exactly one tensor per parameter, ``state["momentum_buffer"]``, plus
        the step count ``state["step"]`` when ``bias_correction`` is set, kept
        as in :class:`SmoothedSignSGD` (a 0-d float32 CPU tensor; a Python
        ``int`` in a checkpoint loads as the same count): 1x the parameters'
        memory, half of Adam's.

    Notes:
        * ``step`` does not synchronise with the device: the norm stays a
          tensor and enters the update as a tensor factor.
        * ``torch.compile(opt.step)`` works with every kernel, as for
          :class:`SmoothedSignSGD`.
        * float16/bfloat16 parameters: every kernel forms the direction
          ``(1 - β) G / max(N(G), ε)`` in float32 (the factor
          ``(1 - β) / max(N(G), ε)`` alone exceeds float16's range for a
          zero or tiny gradient), so zero and tiny gradients move the
          parameters as the float64 formula does, up to rounding to the
          dtype.
        * Gradient norm clipping in front of this optimizer has no effect
          (``c G / ||c G|| = G / ||G||`` for ``c > 0``; with the ``"global"``
          norm this holds for global clipping, with ``"tensor"``/``"rms"``
          for any positive per-tensor rescaling).  Gradient *value* clipping
          changes the direction of ``G`` and therefore the update.
        * Sparse gradients are not supported (``RuntimeError``).
        * Complex parameters: ``N`` is taken over the moduli,
          ``sqrt(sum |z|^2)`` (the norm ``clip_grad_norm_`` gives them), and
          ``D_t = G_t / N`` keeps each entry's phase. Every kernel handles
          them (the fused one runs on their real views: the update is linear
          with real coefficients).

    Raises:
        TypeError: naming the argument and its value, for a value of the wrong
            kind (a ``bool`` or a string where a number goes, a non-bool
            flag), in the arguments or in a parameter group.
        ValueError: naming the argument and its value, for a value out of
            range (``eps <= 0``, ``nan`` and ``inf`` included), an unknown
            ``norm`` or ``fused=True`` with ``foreach=True``.

    Example:
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = SmoothedNormSGD(model.parameters(), lr=1e-2, norm="global")
        >>> model(torch.randn(8, 4)).pow(2).mean().backward()
        >>> opt.step()
    """

    _name = "SmoothedNormSGD"

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
    ) -> None:
        defaults = _check_hyperparameters(
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
        super().__init__(params, defaults)

    def __setstate__(self, state: Dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("norm", "global")
            group.setdefault("eps", 1e-12)

    @_no_grad_step
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:  # type: ignore[override]
        """Perform a single optimisation step.

        Args:
            closure: optional callable that re-evaluates the model and returns
                the loss; it is run with gradients enabled.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        collected = []
        for group in self.param_groups:
            if group["norm"] not in NORM_KINDS:
                raise ValueError(f"Invalid norm: {group['norm']!r}; expected one of {NORM_KINDS}")
            collected.append((group, *self._collect(group)))
        global_norm: Optional[Tensor] = None
        if any(group["norm"] == "global" and params for group, params, *_ in collected):
            all_grads = [g for _, _, grads, _, _ in collected for g in grads]
            foreach = collected[0][0]["foreach"]
            global_norm = global_grad_norm(all_grads, foreach=foreach)
        for group, params, grads, bufs, steps in collected:
            if not params:
                continue
            smoothed_norm_sgd(
                params,
                grads,
                bufs,
                steps,
                foreach=group["foreach"],
                fused=group["fused"],
                lr=group["lr"],
                beta=group["beta"],
                norm=group["norm"],
                eps=group["eps"],
                weight_decay=group["weight_decay"],
                bias_correction=group["bias_correction"],
                maximize=group["maximize"],
                global_norm=global_norm if group["norm"] == "global" else None,
            )
        return loss
