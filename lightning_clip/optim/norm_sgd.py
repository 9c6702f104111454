"""Smoothed NormSGD: the optimizer :class:`SmoothedNormSGD`, its kernels and the functional :func:`smoothed_norm_sgd`.

Smoothed NormSGD is what Adam turns into, approximately, when its input gradients are norm-clipped aggressively:
clipping at a threshold below every ``||G||`` turns the gradient into ``c * G / ||G||``. Adam's denominator is then no
longer a constant, so the correspondence is only approximate (it holds up to a constant when the normalised gradients
are roughly isotropic). It keeps a single state tensor per parameter (the momentum buffer), half of Adam's state.
:data:`NORM_KINDS` lists the norms it normalises by.

Complex parameters (spectral layers, for example) are supported: the norms are those of the moduli,
``sqrt(sum |z|^2)`` (the norm ``clip_grad_norm_`` computes).

Invariance note: ``c * G / ||c * G|| == G / ||G||`` for every ``c > 0``, so gradient *norm* clipping
(``clip_grad_norm_``, Lightning's ``gradient_clip_algorithm="norm"``) in front of this optimizer changes nothing.
Gradient *value* clipping changes the direction of ``G`` and therefore does change Smoothed NormSGD.

The update is implemented by module-level kernels that only see lists of tensors and keyword-only settings, in the
style of ``torch.optim``: ``_single_tensor_smoothed_norm`` (for-loop), ``_multi_tensor_smoothed_norm``
(``torch._foreach_*``) and ``_fused_smoothed_norm`` (``torch.compile``); :func:`smoothed_norm_sgd` dispatches between
them. The machinery shared with Smoothed SignSGD (the base class, step counts, chunks and scratch space, fused-kernel
helpers) is in :mod:`lightning_clip.optim._base`.

This module imports only ``torch`` (and lightning-clip's own torch-only modules).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer, ParamsT

from lightning_clip._compile import CompiledKernel
from lightning_clip.norms import global_grad_norm, is_dtensor, real_view, squared_norm, tensor_norms

from ._base import (
    CHUNK,
    NORM_KINDS,
    NormKind,
    Scratch,
    SmoothedMomentumOptimizer,
    StepCount,
    apply_step_foreach,
    check_hyperparameters,
    check_kernel_args,
    decay_tensor,
    descend_,
    item_of,
    no_grad_step,
    pick_kernel,
    run_fused,
    shared_or_list,
    split_chunks,
    step_size_for,
    step_size_tensors,
)

__all__ = ["SmoothedNormSGD", "smoothed_norm_sgd", "NORM_KINDS"]


#: Floating dtypes whose range cannot hold ``(1 - beta) / ||g||`` for a tiny or zero gradient (float16 overflows
#: above 65504); the kernels form ``g * (1 - beta) / ||g||`` in float32 for them.
_REDUCED = (torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------- #
# kernels
# --------------------------------------------------------------------------- #
def _global_coef(grads: list[Tensor], global_norm: Tensor | None, eps: float, signed: float) -> Tensor:
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


def _scaled_in_float32(grad: Tensor, coef: Tensor, scratch: Scratch | None) -> Tensor:
    """``grad * coef`` in float32 for a float16/bfloat16 ``grad``: ``coef = ±(1 - beta) / max(N(g), eps)`` reaches
    ``(1 - beta) / eps`` for a zero gradient, beyond float16's range, and a kernel that took it in the gradient's
    dtype would turn a zero gradient into ``nan`` (``0 * inf``) and a tiny one into ``inf``; the product itself is at
    most ``1 - beta``. Into ``scratch`` when the tensor fits there, else a temporary."""
    if scratch is not None and grad.numel() <= CHUNK and not is_dtensor(grad):
        out = scratch.like(grad, torch.float32).copy_(grad)
    else:
        out = grad.to(torch.float32)
    return out.mul_(coef)


def _single_tensor_smoothed_norm(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    state_steps: Sequence[StepCount],
    *,
    lr: float,
    beta: float,
    norm: str,
    eps: float,
    weight_decay: float,
    bias_correction: bool,
    maximize: bool,
    global_norm: Tensor | None = None,
) -> None:
    """For-loop kernel.

    With ``norm="global"`` the norm is ``global_norm`` when given (the optimizer
    passes the norm over all of its parameters' gradients), else the global norm
    of ``grads``. For float16/bfloat16 gradients the direction is formed in
    float32 scratch space (:func:`_scaled_in_float32`), one more pass over it;
    other dtypes take one ``addcmul_``.
    """
    check_kernel_args(params, grads, momentum_buffers, state_steps)
    if not params:
        return
    signed = -(1.0 - beta) if maximize else (1.0 - beta)
    coef_global: Tensor | None = None
    if norm == "global":
        coef_global = _global_coef(grads, global_norm, eps, signed)
    elif norm not in NORM_KINDS:
        raise ValueError(f"Invalid norm: {norm!r}; expected one of {NORM_KINDS}")
    compiling = torch.compiler.is_compiling()
    scratch: Scratch | None = None
    decay = 1.0 - lr * weight_decay
    for param, grad, buf, step in zip(params, grads, momentum_buffers, state_steps):
        if coef_global is not None:
            coef = coef_global if coef_global.device == grad.device else coef_global.to(grad.device)
        else:
            coef = _tensor_coef(grad, norm, eps, signed)
        step_size = step_size_for(lr, beta, step, bias_correction, param)
        reduced = grad.dtype in _REDUCED
        if reduced and scratch is None and not compiling:
            scratch = Scratch(grads)
        # the update is linear in (param, grad, buf) with real coefficients: complex tensors run as their real views
        # (a DTensor whole: flat chunks would cross shards; under torch.compile whole: TorchInductor fuses the chain)
        large = not compiling and grad.numel() > CHUNK and not is_dtensor(grad)
        chunks = split_chunks(real_view(param), real_view(grad), real_view(buf)) if large else None
        for p, g, b in chunks or ((param, grad, buf),):
            if weight_decay != 0.0:
                p.mul_(decay)
            # buf = beta * buf + (1 - beta) * grad / max(||grad||, eps)
            if reduced:
                b.mul_(beta).add_(_scaled_in_float32(g, coef, scratch))
            else:
                b.mul_(beta).addcmul_(g, coef)
            descend_(p, b, step_size)


def _scaled_foreach(grads: list[Tensor], factors: Tensor | list[Tensor]) -> list[Tensor]:
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
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    state_steps: Sequence[StepCount],
    *,
    lr: float,
    beta: float,
    norm: str,
    eps: float,
    weight_decay: float,
    bias_correction: bool,
    maximize: bool,
    global_norm: Tensor | None = None,
) -> None:
    """Multi-tensor kernel built on ``torch._foreach_*`` ops."""
    check_kernel_args(params, grads, momentum_buffers, state_steps)
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
        apply_step_foreach(device_params, device_bufs, device_steps, lr=lr, beta=beta, bias_correction=bias_correction)


# --------------------------------------------------------------------------- #
# fused (torch.compile) kernel: the whole chain of one tensor in one loop
# --------------------------------------------------------------------------- #
def _norm_body(
    params: list[Tensor],
    grads: list[Tensor],
    bufs: list[Tensor],
    coefs: Any,
    step_sizes: Any,
    decay: Tensor,
    beta: float,
    apply_decay: bool,
) -> None:
    for i, (param, grad, buf) in enumerate(zip(params, grads, bufs)):
        if apply_decay:
            param.mul_(decay)
        buf.mul_(beta).add_(grad * item_of(coefs, i))
        param.sub_(buf * item_of(step_sizes, i))


#: The compiled kernel: one compiled copy per configuration, as for Smoothed SignSGD
#: (:class:`~lightning_clip._compile.CompiledKernel`).
_NORM_KERNEL = CompiledKernel(_norm_body, "SmoothedNormSGD")


def _fused_smoothed_norm(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    state_steps: Sequence[StepCount],
    *,
    lr: float,
    beta: float,
    norm: str,
    eps: float,
    weight_decay: float,
    bias_correction: bool,
    maximize: bool,
    global_norm: Tensor | None = None,
) -> None:
    """Compiled kernel: the norms as in the for-loop kernel, then one fused loop per tensor (compiled on first use
    for each configuration, :data:`_NORM_KERNEL`; float16/bfloat16 tensors are computed in float32 in the loop)."""
    check_kernel_args(params, grads, momentum_buffers, state_steps)
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
    step_sizes = step_size_tensors(params, state_steps, lr, beta, bias_correction)
    decay = decay_tensor(params, lr, weight_decay)
    run_fused(
        _NORM_KERNEL,
        params,
        grads,
        momentum_buffers,
        shared_or_list(coefs),
        shared_or_list(step_sizes),
        decay,
        beta,
        weight_decay != 0.0,
    )


# --------------------------------------------------------------------------- #
# functional entry point
# --------------------------------------------------------------------------- #
def smoothed_norm_sgd(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    state_steps: Sequence[StepCount],
    *,
    foreach: bool | None = None,
    fused: bool = False,
    lr: float,
    beta: float,
    norm: str = "global",
    eps: float = 1e-12,
    weight_decay: float = 0.0,
    bias_correction: bool = False,
    maximize: bool = False,
    global_norm: Tensor | None = None,
) -> None:
    """Functional Smoothed NormSGD step (see :class:`SmoothedNormSGD`).

    ``state_steps`` as in :func:`smoothed_sign_sgd`. With ``norm="global"``
    the norm is ``global_norm`` when given, else the norm of ``grads``.
    """
    kernel = {
        "fused": _fused_smoothed_norm,
        "foreach": _multi_tensor_smoothed_norm,
        "loop": _single_tensor_smoothed_norm,
    }[pick_kernel(foreach, fused, params)]
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
# optimizer class
# --------------------------------------------------------------------------- #
class SmoothedNormSGD(SmoothedMomentumOptimizer):
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
        foreach: bool | None = None,
        fused: bool = False,
    ) -> None:
        defaults = check_hyperparameters(
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

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("norm", "global")
            group.setdefault("eps", 1e-12)

    @no_grad_step
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
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
        global_norm: Tensor | None = None
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
