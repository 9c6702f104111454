"""Smoothed SignSGD: the optimizer :class:`SmoothedSignSGD`, its kernels and the functional :func:`smoothed_sign_sgd`.

Smoothed SignSGD is what Adam turns into when its input gradients are value-clipped aggressively: clipping at a
threshold ``alpha`` below every ``|g_i|`` turns every gradient entry into ``alpha * sign(g_i)``. Adam's second moment
then equals ``alpha**2 * (1 - beta2**t)`` for every entry, the bias-corrected denominator is exactly ``alpha`` and
Adam's step becomes ``lr * M_t / (1 - beta1**t)`` with ``M_t`` the momentum of the *signs*: Smoothed SignSGD with
``bias_correction=True`` (checked to float64 precision in the tests). It keeps a single state tensor per parameter
(the momentum buffer), half of Adam's state.

Complex parameters (spectral layers, for example) are supported: the sign is the complex sign ``sgn(z) = z / |z|``
(``0`` for ``z = 0``, ``torch.sgn``), the unit-modulus number with the phase of ``z``, which is the real sign for real
``z``. The Adam correspondence above holds for real parameters: ``torch.optim.Adam`` treats a complex entry as the
pair ``(Re z, Im z)``.

Invariance note: ``sign(c * G) == sign(G)`` for every ``c > 0``, so gradient *norm* clipping (``clip_grad_norm_``,
Lightning's ``gradient_clip_algorithm="norm"``) in front of this optimizer changes nothing, and neither does gradient
*value* clipping, unless the clip threshold is 0.

The update is implemented by module-level kernels that only see lists of tensors and keyword-only settings, in the
style of ``torch.optim``: ``_single_tensor_smoothed_sign`` (for-loop), ``_multi_tensor_smoothed_sign``
(``torch._foreach_*``) and ``_fused_smoothed_sign`` (``torch.compile``); :func:`smoothed_sign_sgd` dispatches between
them. The machinery shared with Smoothed NormSGD (the base class, step counts, chunks and scratch space, fused-kernel
helpers) is in :mod:`lightning_clip.optim._base`.

This module imports only ``torch`` (and lightning-clip's own torch-only modules).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer, ParamsT

from lightning_clip._compile import CompiledKernel
from lightning_clip.norms import is_dtensor

from ._base import (
    CHUNK,
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

__all__ = ["SmoothedSignSGD", "smoothed_sign_sgd"]


def _sign(grad: Tensor) -> Tensor:
    """``sign(g)`` for real tensors, ``sgn(z) = z / |z|`` (``0`` at ``0``) for complex ones."""
    return torch.sgn(grad) if grad.is_complex() else torch.sign(grad)


# --------------------------------------------------------------------------- #
# kernels
# --------------------------------------------------------------------------- #
def _single_tensor_smoothed_sign(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    state_steps: Sequence[StepCount],
    *,
    lr: float,
    beta: float,
    weight_decay: float,
    bias_correction: bool,
    maximize: bool,
) -> None:
    """For-loop kernel: per tensor, ``sign(g)`` into scratch space, then ``buf.lerp_`` and ``param.add_``.

    ``sign(g)`` goes into one scratch buffer of at most :data:`CHUNK` entries, reused by every tensor (no
    allocation per tensor); a tensor larger than that is updated one chunk at a time, the whole chain per chunk.
    DTensors (FSDP2, tensor parallel) are updated whole, through DTensor's own ops: a flat chunk of a sharded tensor
    would cross the shards. Under ``torch.compile`` every tensor is updated whole, without scratch space
    (TorchInductor fuses the chain).
    """
    check_kernel_args(params, grads, momentum_buffers, state_steps)
    compiling = torch.compiler.is_compiling()
    scratch = None if compiling else Scratch(grads)
    weight = 1.0 - beta
    decay = 1.0 - lr * weight_decay
    for param, grad, buf, step in zip(params, grads, momentum_buffers, state_steps):
        step_size = step_size_for(lr, beta, step, bias_correction, param)
        flat = scratch is not None and not grad.is_complex() and grad.dtype == buf.dtype and not is_dtensor(grad)
        chunks = split_chunks(param, grad, buf) if flat and grad.numel() > CHUNK else None
        for p, g, b in chunks or ((param, grad, buf),):
            if weight_decay != 0.0:
                p.mul_(decay)
            if scratch is not None and flat and g.numel() <= CHUNK:
                direction = torch.sign(g, out=scratch.like(g))
            else:  # compiling, complex, a DTensor, or large and not contiguous: a temporary the size of the tensor
                direction = _sign(g)
            if maximize:
                direction.neg_()
            # buf = beta * buf + (1 - beta) * sign(grad)
            b.lerp_(direction, weight)
            descend_(p, b, step_size)


def _multi_tensor_smoothed_sign(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    state_steps: Sequence[StepCount],
    *,
    lr: float,
    beta: float,
    weight_decay: float,
    bias_correction: bool,
    maximize: bool,
) -> None:
    """Multi-tensor kernel built on ``torch._foreach_*`` ops."""
    check_kernel_args(params, grads, momentum_buffers, state_steps)
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
        apply_step_foreach(device_params, device_bufs, device_steps, lr=lr, beta=beta, bias_correction=bias_correction)


# --------------------------------------------------------------------------- #
# fused (torch.compile) kernel: the whole chain of one tensor in one loop
# --------------------------------------------------------------------------- #
def _sign_body(
    params: list[Tensor],
    grads: list[Tensor],
    bufs: list[Tensor],
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
        param.sub_(buf * item_of(step_sizes, i))


#: The compiled kernel: one compiled copy per configuration (shapes, dtypes, ``beta``, ``maximize``, ...), any
#: number of configurations in a process (a sweep, a notebook, gradual unfreezing); where TorchInductor cannot compile
#: one, that configuration runs the same body eagerly, with one warning
#: (:class:`~lightning_clip._compile.CompiledKernel`).
_SIGN_KERNEL = CompiledKernel(_sign_body, "SmoothedSignSGD")


def _fused_smoothed_sign(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
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
    check_kernel_args(params, grads, momentum_buffers, state_steps)
    is_complex = [p.is_complex() for p in params]
    if any(is_complex):

        def select(xs: list[Any], keep: bool) -> list[Any]:
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
    step_sizes = step_size_tensors(params, state_steps, lr, beta, bias_correction)
    decay = decay_tensor(params, lr, weight_decay)
    run_fused(
        _SIGN_KERNEL,
        params,
        grads,
        momentum_buffers,
        shared_or_list(step_sizes),
        decay,
        1.0 - beta,
        -1.0 if maximize else 1.0,
        weight_decay != 0.0,
    )


# --------------------------------------------------------------------------- #
# functional entry point
# --------------------------------------------------------------------------- #
def smoothed_sign_sgd(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    state_steps: Sequence[StepCount],
    *,
    foreach: bool | None = None,
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
    }[pick_kernel(foreach, fused, params)]
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
# optimizer class
# --------------------------------------------------------------------------- #
class SmoothedSignSGD(SmoothedMomentumOptimizer):
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
        foreach: bool | None = None,
        fused: bool = False,
    ) -> None:
        defaults = check_hyperparameters(
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
