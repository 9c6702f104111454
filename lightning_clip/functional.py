"""The clipping rules as pure torch: global norms, thresholds, clip coefficients, non-finite handling.

Nothing here imports Lightning. Every per-step decision stays on the gradients' device: no ``.item()``,
``float()``, ``bool()`` or Python ``if`` on a tensor, so the same code runs unchanged on CPU, CUDA, MPS and XLA.

One optimizer step of :func:`clip_grads_` with gradients ``g`` and state ``(m, k)`` (moving average, finite steps
seen) does, for ``mode="adaptive"``::

    n_t = ||g||_2                                  (float32 at least, over every gradient; |z| for complex)
    tau_t = alpha * m_(t-1)   if k > warmup_steps  else +inf   (never depends on n_t)
    tau_t = min(tau_t, max_norm)                   (when max_norm is set: every step, the first included)
    c_t = min(1, tau_t / max(n_t, tiny))           (post-clip norm c_t * n_t = tau_t when n_t > tau_t)
    g <- c_t * g
    only when 0 < n_t < inf (an informative step), with k <- k + 1:
    m_t = n_t                                      if k == 1 (the first informative step seeds the average)
    m_t = m_(t-1) + w_k * (n_t - m_(t-1))          w_k = (1 - beta) / (1 - beta^k), while k <= warmup_steps + 1
    m_t = beta * m_(t-1) + (1 - beta) * n_t        afterwards
    otherwise (n_t = 0, inf or nan) m and k are left unchanged.

A zero norm (zero-initialised layers, a frozen warm start, a loss constant at the start) says nothing about the
scale of the gradients: it neither seeds nor drags the average, and it does not count as a warm-up step. During the
warm-up, ``w_k`` makes ``m`` the bias-corrected moving average of the informative norms so far (Adam's correction of
its moments), ``m_k = sum_(i=1..k) (1 - beta) beta^(k-i) n_i / (1 - beta^k)``: the weights sum to 1 and a later step
weighs more than an earlier one, by ``1 / beta`` per step (``w_1 = 1`` seeds it). After ``warmup_steps = K`` the first
step weighs ``beta^K (1 - beta) / (1 - beta^(K+1))`` instead of ``beta^K`` in the plain seeded average (with the
defaults and ``K = 10``, 0.057 instead of 0.43), so one unrepresentative early step (tiny or huge) does not set the
threshold that follows. With ``warmup_steps = 0`` the rule is the plain seeded average.

Complex gradients are handled as the real pairs ``(Re z, Im z)`` (``torch.view_as_real``): the norm is the one
``torch.nn.utils.clip_grad_norm_`` computes, and norm clipping multiplies ``z`` by the real ``c_t``. In
``mode="value"`` a complex entry's modulus is clamped, ``z <- z * min(1, clip_val / |z|)``, which keeps its phase
(``torch.nn.utils.clip_grad_value_`` refuses complex gradients).

``mode="norm"`` uses the fixed ``tau_t = clip_val`` (plain norm clipping) and ``mode="value"`` clamps every entry
to ``[-clip_val, clip_val]``; both still track ``m`` so that the logs compare like with like.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from lightning_clip._scaling import scale_
from lightning_clip._validation import check_choice, check_int, check_real
from lightning_clip.norms import (
    acc_dtype,
    default_foreach,
    global_grad_norm,
    global_max_abs,
    is_dtensor,
    local_tensor,
    plain_norm,
    real_view,
    real_views,
    reduce_rows,
    sharded_norm,
    squared_norm,
    tensor_norms,
)

# the names optim/smoothed.py imported from here before the norm engine had a module of its own
_default_foreach, _grad_norms, _squared_norm = default_foreach, tensor_norms, squared_norm

__all__ = [
    "CLIP_METRIC_KEYS",
    "NONFINITE_POLICIES",
    "ClipMode",
    "ClipRule",
    "ClipState",
    "ClipStats",
    "NonFinite",
    "NonFinitePolicy",
    "clip_grads_",
    "clip_step_",
    "window_metrics",
]

ClipMode = Literal["adaptive", "norm", "value"]
NonFinite = Literal["zero", "keep"]
#: What a step whose norm is ``inf``/``nan`` does, as the callback and the optimizer wrapper take it.
NonFinitePolicy = Literal["zero", "skip", "error"]
NONFINITE_POLICIES = ("zero", "skip", "error")
_MODES = ("adaptive", "norm", "value")

#: The per-step metrics of the clipping, in the order :func:`window_metrics` reads them.
CLIP_METRIC_KEYS = (
    "grad_norm",
    "threshold",
    "grad_norm_ema",
    "clip_coef",
    "clip_coef_min",
    "clipped_frac",
    "nonfinite_steps",
)

#: Floor of the norm in ``threshold / norm``: keeps ``0 / 0`` out without shifting any non-zero norm.
TINY = torch.finfo(torch.float32).tiny


@dataclass(frozen=True)
class ClipRule:
    """The settings of one clipping rule, validated and normalised at construction.

    Numbers are stored as plain Python ``float`` / ``int`` (numpy scalars are converted), so a rule can be written to
    a checkpoint that loads with ``torch.load(weights_only=True)``.

    Args:
        mode: ``"adaptive"`` (threshold ``alpha * m_(t-1)``), ``"norm"`` (fixed threshold ``clip_val`` on the global
            norm, as ``torch.nn.utils.clip_grad_norm_``) or ``"value"`` (every entry clamped to
            ``[-clip_val, clip_val]``, as ``torch.nn.utils.clip_grad_value_``; complex entries by their modulus).
        alpha: multiple of the moving average that the norm may reach (adaptive mode), a finite number > 0.
            ``alpha < 1`` clips every step to ``alpha`` times the typical norm (aggressive clipping).
        beta: decay of the moving average of the norm, in ``[0, 1)``.
        clip_val: the fixed bound of the ``"norm"`` and ``"value"`` modes, a finite number > 0; must be ``None`` in
            adaptive mode.
        max_norm: optional absolute cap on the global norm, ``> 0`` (``inf``: no cap), applied on every step, the
            first included (adaptive mode only).
        warmup_steps: informative steps after the seeding one during which the adaptive threshold is not applied
            and the average is the bias-corrected moving average of the norms so far,
            ``m_k = sum_(i<=k) (1 - beta) beta^(k-i) n_i / (1 - beta^k)`` (later steps weigh more); an integer
            ``>= 0``.

    Raises:
        TypeError: naming the argument and its value for a value of the wrong kind (``alpha=True``, ``beta="0.9"``,
            ``warmup_steps=2.0``).
        ValueError: naming the argument and its value when a setting is out of range or does not fit the mode.
    """

    mode: ClipMode = "adaptive"
    alpha: float = 3.8
    beta: float = 0.918
    clip_val: float | None = None
    max_norm: float | None = None
    warmup_steps: int = 0

    def __post_init__(self) -> None:
        mode = check_choice("mode", self.mode, _MODES)
        alpha = check_real("alpha", self.alpha, low=0.0, low_open=True)
        beta = check_real("beta", self.beta, low=0.0, high=1.0, high_open=True)
        max_norm = check_real("max_norm", self.max_norm, low=0.0, low_open=True, finite=False, optional=True)
        warmup_steps = check_int("warmup_steps", self.warmup_steps, low=0)
        if mode == "adaptive":
            if self.clip_val is not None:
                raise ValueError(
                    f"Invalid clip_val: {self.clip_val!r}; expected None with mode='adaptive', which takes alpha and"
                    " beta (clip_val is the bound of mode='norm' and mode='value')"
                )
            clip_val = None
        else:
            if self.clip_val is None:
                raise ValueError(f"Invalid clip_val: None; expected a finite number > 0 with mode={mode!r}")
            clip_val = check_real("clip_val", self.clip_val, low=0.0, low_open=True)
            if max_norm is not None:
                raise ValueError(
                    f"Invalid max_norm: {self.max_norm!r}; expected None with mode={mode!r} (max_norm applies to"
                    " mode='adaptive' only)"
                )
        for name, value in (
            ("mode", mode),
            ("alpha", alpha),
            ("beta", beta),
            ("clip_val", clip_val),
            ("max_norm", max_norm),
            ("warmup_steps", warmup_steps),
        ):
            object.__setattr__(self, name, value)

    def threshold(self, state: ClipState) -> Tensor:
        """The bound of this step, from the state before the step (never from the current norm).

        Adaptive: ``alpha * m_(t-1)`` once ``k > warmup_steps`` finite steps were seen, else ``+inf``; then
        ``min(., max_norm)``. Norm and value modes: ``clip_val`` (a norm bound, or a per-entry bound).
        """
        if self.mode != "adaptive":
            return torch.full_like(state.ema, float(self.clip_val))  # type: ignore[arg-type]
        threshold = torch.where(state.seen > self.warmup_steps, state.ema * self.alpha, math.inf)
        if self.max_norm is not None:
            threshold = threshold.clamp(max=self.max_norm)
        return threshold


@dataclass
class ClipState:
    """Device-resident state of one rule applied to one optimizer.

    Attributes:
        ema: ``m``, the moving average of the finite pre-clip norms (float32).
        seen: ``k``, the number of finite steps seen (int64).
        steps: finite steps since the window was last reset (int64).
        clipped: steps of the window whose gradients the rule changed (int64).
        nonfinite: steps of the window whose norm was ``inf`` or ``nan`` (int64).
        coef_min: the smallest clip coefficient of the window (float32; ``1`` when nothing was clipped).
    """

    ema: Tensor
    seen: Tensor
    steps: Tensor
    clipped: Tensor
    nonfinite: Tensor
    coef_min: Tensor

    @classmethod
    def zeros(cls, device: torch.device | str | None = None) -> ClipState:
        """A fresh state on ``device``."""
        f = torch.zeros((), dtype=torch.float32, device=device)
        i = torch.zeros((), dtype=torch.int64, device=device)
        return cls(ema=f, seen=i, steps=i.clone(), clipped=i.clone(), nonfinite=i.clone(), coef_min=f + 1)

    def reset_window(self) -> None:
        """Start a new logging window."""
        self.steps.zero_()
        self.clipped.zero_()
        self.nonfinite.zero_()
        self.coef_min.fill_(1.0)

    def state_dict(self) -> dict[str, Tensor]:
        """Plain CPU copies, bit-exact, for checkpoints."""
        return {k: v.detach().cpu().clone() for k, v in vars(self).items()}

    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor], device: torch.device | str | None = None) -> ClipState:
        """Rebuild a state saved by :meth:`state_dict` on ``device``."""
        fresh = cls.zeros(device)
        for k, v in vars(fresh).items():
            if k in state:
                v.copy_(torch.as_tensor(state[k]))
        return fresh


@dataclass
class ClipStats:
    """What one step of :func:`clip_grads_` measured and did, as 0-d device tensors.

    Attributes:
        norm: pre-clip global norm ``n_t``.
        threshold: the bound that applied (``inf`` when none did).
        coef: the post-clip to pre-clip norm ratio (``1`` when untouched, ``0`` for a zeroed step).
        clipped: whether the rule changed the gradients.
        finite: whether ``n_t`` was finite.
    """

    norm: Tensor
    threshold: Tensor
    coef: Tensor
    clipped: Tensor
    finite: Tensor


def clip_grads_(
    grads: Sequence[Tensor],
    state: ClipState,
    rule: ClipRule,
    *,
    nonfinite: NonFinite = "zero",
    grad_scale: Tensor | None = None,
    foreach: bool | None = None,
    fused: bool = False,
    threshold: Tensor | None = None,
    update: bool = True,
) -> ClipStats:
    """Apply ``rule`` to ``grads`` in place and advance ``state``, without a host synchronisation.

    Args:
        grads: the gradients of one optimizer (dense, non-empty).
        state: the rule's state for that optimizer, on the gradients' device.
        rule: the settings.
        nonfinite: what a step whose norm is ``inf``/``nan`` does to the gradients: ``"zero"`` makes every entry
            ``0`` (``nan`` and ``inf`` included); ``"keep"`` leaves them as they are (for callers that skip the
            step themselves, as ``GradScaler`` does). Such a step never enters the moving average nor the counts
            of steps and clipped steps.
        grad_scale: when the gradients are still multiplied by a loss scale ``S`` (fused optimizers under a
            ``GradScaler``), the 0-d tensor ``S``: the norm and threshold are compared unscaled.
        foreach: kernel choice of the multiplication (:func:`lightning_clip._scaling.scale_`).
        fused: scale (and zero) in one compiled pass instead.
        threshold: the bound to apply instead of ``rule.threshold(state)`` (norm rules only): the bound a step
            already took, for a closure optimizer's later evaluations of the same step.
        update: advance ``state`` (the average and the window's counts); ``False`` for a further evaluation of a
            step already counted.

    Returns:
        The step's :class:`ClipStats`.
    """
    originals = list(grads)
    assert originals, "clip_grads_ needs at least one gradient"
    sharded = any(is_dtensor(g) for g in originals)
    grads = real_views(originals)  # complex entries as (Re, Im) pairs: same norm, and scaling by a real c is the same
    norm = sharded_norm(grads, foreach=foreach) if sharded else plain_norm(grads, foreach=foreach)
    if sharded:  # the norm is the whole model's; the scale and the clamp apply to this rank's shards
        dtensors, originals, grads = grads, [local_tensor(g) for g in originals], [local_tensor(g) for g in grads]
    if grad_scale is not None:
        norm = norm / grad_scale.to(norm)
    finite = torch.isfinite(norm)
    if threshold is None or rule.mode == "value":
        threshold = rule.threshold(state)
    zero = nonfinite == "zero"
    if rule.mode == "value":
        bound = float(rule.clip_val)  # type: ignore[arg-type]
        if grad_scale is not None:
            raise ValueError(
                "mode='value' cannot clip gradients that are still loss-scaled (fused optimizer + GradScaler)"
            )
        real = [g for g in originals if not g.is_complex()]
        complex_grads = [g for g in originals if g.is_complex()]
        largest = global_max_abs(dtensors if sharded else originals).to(norm)  # 0 for empty tensors
        clipped = finite & (largest > bound)
        if real:
            torch._foreach_clamp_min_(real, -bound)
            torch._foreach_clamp_max_(real, bound)
        for z in complex_grads:  # |z| <= bound, phase kept
            z.mul_(torch.clamp(bound / z.abs().clamp_min(TINY), max=1.0))
        post = global_grad_norm(dtensors if sharded else grads, foreach=foreach)
        coef = torch.where(norm > 0, post / norm.clamp_min(TINY), 1.0)
        coef = torch.where(finite, coef, 0.0 if zero else 1.0).to(torch.float32)
        scale_(grads, torch.where(finite, 1.0, coef), zero_nonfinite=zero, foreach=foreach)
    else:
        coef = (threshold / norm.clamp_min(TINY)).clamp(max=1.0)
        clipped = finite & (norm > threshold)
        coef = torch.where(finite, coef, 0.0 if zero else 1.0).to(torch.float32)
        scale_(grads, coef, zero_nonfinite=zero, foreach=foreach, fused=fused)

    if not update:
        return ClipStats(norm=norm, threshold=threshold, coef=coef, clipped=clipped, finite=finite)
    _update_average(state, rule, norm, finite)
    state.steps.add_(finite.long())
    state.clipped.add_(clipped.long())
    state.nonfinite.add_((~finite).long())
    state.coef_min.copy_(torch.minimum(state.coef_min, torch.where(finite, coef, 1.0)))
    return ClipStats(norm=norm, threshold=threshold, coef=coef, clipped=clipped, finite=finite)


def _update_average(state: ClipState, rule: ClipRule, norm: Tensor, finite: Tensor) -> None:
    """Advance ``(m, k)`` with the step's norm ``n``, on the device (``torch.where``, no Python branch on a tensor).

    Only an informative norm, ``0 < n < inf``, enters: ``k <- k + 1``, then ``m = n`` when ``k == 1``,
    ``m <- m + (n - m) (1 - beta) / (1 - beta^k)`` while ``k <= warmup_steps + 1`` (the bias-corrected average)
    and ``m <- beta m + (1 - beta) n`` afterwards. A zero, ``inf`` or ``nan`` norm leaves ``m`` and ``k`` as they
    are.
    """
    n = norm.to(state.ema.dtype)
    informative = finite & (n > 0)
    seen = state.seen + informative.long()  # k, this step included when it is informative
    beta = rule.beta
    averaged = state.ema * beta + n * (1.0 - beta)
    if rule.warmup_steps > 0:  # a setting, not a tensor
        weight = (1.0 - beta) / (1.0 - torch.pow(beta, seen.clamp_min(1).to(n.dtype)))
        averaged = torch.where(seen <= rule.warmup_steps + 1, state.ema + (n - state.ema) * weight, averaged)
    averaged = torch.where(seen == 1, n, averaged)
    state.ema.copy_(torch.where(informative, averaged, state.ema))
    state.seen.copy_(seen)


# --------------------------------------------------------------------------- #
# one optimizer step, as the callback and the optimizer wrapper run it
# --------------------------------------------------------------------------- #
def clip_step_(
    params: Sequence[Tensor],
    state: ClipState,
    rule: ClipRule,
    *,
    nonfinite: NonFinitePolicy = "zero",
    scaler_skips: bool = False,
    grad_scale: Tensor | None = None,
    foreach: bool | None = None,
    fused: bool = False,
    where: str = "step 0",
    owner: str = "AdaptiveGradientClipping",
    names: Callable[[], Mapping[int, str]] | None = None,
    grads: Sequence[Tensor] | None = None,
    threshold: Tensor | None = None,
    update: bool = True,
) -> ClipStats:
    """One optimizer step of the package's clipping: :func:`clip_grads_` on ``params``' gradients, then the
    non-finite policy. The one implementation behind ``AdaptiveGradientClipping`` and ``AdaptiveClippingOptimizer``.

    With ``nonfinite="zero"`` (and under a ``GradScaler``) nothing is read back to the host: a step whose norm is
    ``inf``/``nan`` has every gradient entry set to ``0`` (or, ``scaler_skips``, left as it is for the scaler to
    skip). ``"skip"`` and ``"error"`` read ``isfinite(n_t)`` once (one host sync) and, for such a step, set every
    gradient to ``None`` (torch optimizers then leave the parameters and their state untouched) or raise.

    Args:
        params: the optimizer's parameters that have a gradient (dense, non-empty).
        state: the rule's state for that optimizer, on the gradients' device.
        rule: the settings.
        nonfinite: ``"zero"``, ``"skip"`` or ``"error"``.
        scaler_skips: a ``GradScaler`` skips non-finite steps itself: leave their gradients alone.
        grad_scale: the loss scale ``S`` when the gradients are still scaled (see :func:`clip_grads_`).
        foreach: kernel choice of the multiplication.
        fused: scale (and zero) in one compiled pass.
        where: the step, for the error message (``"global step 3"``).
        owner: the caller, for the error message (``"AdaptiveGradientClipping"``).
        names: called only to build an error message: ``id(parameter) -> name``.
        grads: the gradients of ``params``, one each, when they are not ``p.grad`` as it is (FSDP1 shards wrapped as
            DTensors by :class:`lightning_clip._fsdp.FlatShardLayout`); ``None``: ``[p.grad for p in params]``.
        threshold: the bound to apply instead of the rule's (see :func:`clip_grads_`).
        update: advance ``state`` (see :func:`clip_grads_`).

    Returns:
        The step's :class:`ClipStats`.

    Raises:
        RuntimeError: with ``nonfinite="error"``, on a step whose norm is not finite, naming the step and the
            parameters whose gradients are not finite (or the largest entries, when the norm overflowed). With
            sharded gradients (DTensors) every rank raises the same error: the decision comes from the global norm,
            identical on every rank, and the names from the per-tensor counts reduced over the shards.
    """
    keep = scaler_skips or nonfinite != "zero"
    grads = [p.grad for p in params] if grads is None else list(grads)
    stats = clip_grads_(
        grads,
        state,
        rule,
        nonfinite="keep" if keep else "zero",
        grad_scale=grad_scale,
        foreach=foreach,
        fused=fused,
        threshold=threshold,
        update=update,
    )
    if not scaler_skips and nonfinite != "zero" and not bool(stats.finite):  # one sync, by choice
        _apply_nonfinite_policy(params, grads, stats, nonfinite, where=where, owner=owner, names=names)
    return stats


def _apply_nonfinite_policy(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    stats: ClipStats,
    nonfinite: NonFinitePolicy,
    *,
    where: str,
    owner: str,
    names: Callable[[], Mapping[int, str]] | None,
) -> None:
    """``"skip"``: every ``p.grad = None``. ``"error"``: raise, naming the parameters with a non-finite entry on any
    rank (per tensor: the count of non-finite entries of the local shard, summed over the shards) or, when none has
    one, the three with the largest ``max |g|`` (the local maxima reduced with ``max`` over the shards). The
    reductions are collectives every rank joins in the same order (every rank gets here: ``stats.finite`` is the
    same everywhere), so every rank raises the same message."""
    if nonfinite == "error":
        known = names() if names is not None else {}
        labels = [known.get(id(p), f"<param {i}>") for i, p in enumerate(params)]
        local = [local_tensor(g) for g in grads]
        device = local[0].device
        counts = torch.stack([(~real_view(g).isfinite()).sum().to(device) for g in local])
        counts = reduce_rows(grads, counts, "sum")
        bad = [name for name, c in zip(labels, counts.tolist()) if c > 0]
        if bad:
            raise RuntimeError(f"Non-finite gradients at {where} in: {', '.join(bad)} ({owner}(nonfinite='error'))")
        dtype = acc_dtype(local)
        maxima = torch.stack(
            [g.abs().amax().to(dtype).to(device) if g.numel() else torch.zeros((), dtype=dtype, device=device)
             for g in local]
        )
        maxima = reduce_rows(grads, maxima, "max").tolist()
        sizes = reduce_rows(grads, torch.tensor([g.numel() for g in local], device=device), "sum").tolist()
        largest = sorted(((m, name) for m, name, n in zip(maxima, labels, sizes) if n), reverse=True)
        top = ", ".join(f"{name} (max |g| = {value:.3g})" for value, name in largest[:3])
        raise RuntimeError(
            f"Gradient norm overflow at {where}: every gradient entry is finite, but"
            f" the global norm overflowed to {float(stats.norm)} in {stats.norm.dtype} (it is accumulated in"
            f" float32 for float32 and lower-precision gradients). The largest entries are in: {top}"
            f" ({owner}(nonfinite='error'))"
        )
    for p in params:
        p.grad = None


def window_metrics(stats: ClipStats, state: ClipState) -> dict[str, float]:
    """The metrics of :data:`CLIP_METRIC_KEYS` for the last step and the window since the last read, as floats;
    then starts a new window. One host sync (the one of a logging step).

    ``grad_norm`` ``n_t``, ``threshold`` (``inf`` on a step with no bound: the seeding step, the warm-up),
    ``grad_norm_ema`` ``m_t``, ``clip_coef`` ``c_t``, ``clip_coef_min`` (smallest ``c`` of the window),
    ``clipped_frac`` (clipped / finite steps of the window), ``nonfinite_steps``. Every value is returned, ``inf``
    and ``nan`` included (TensorBoard draws no point for them): a margin chart needs its value, lower and upper
    series at the same steps.
    """
    values = torch.stack(
        [
            stats.norm.float(),
            stats.threshold.float(),
            state.ema.float(),
            stats.coef.float(),
            state.coef_min.float(),
            state.clipped.float() / state.steps.clamp_min(1).float(),
            state.nonfinite.float(),
        ]
    ).tolist()
    state.reset_window()
    return dict(zip(CLIP_METRIC_KEYS, values))
