"""The step of the clipping: norm, threshold, coefficient, action, update. Pure torch.

Nothing here imports Lightning. Every per-step decision stays on the gradients' device: no ``.item()``,
``float()``, ``bool()`` or Python ``if`` on a tensor, so the same code runs unchanged on CPU, CUDA, MPS and XLA.

One optimizer step of :func:`clip_grads_`, for the gradients ``g`` of one optimizer, a rule (:mod:`lightning_clip.rule`,
where the formulas of the rules are written) and its state ``s``::

    n_t   = ||g||_2                            float32 at least, over every gradient (|z| for complex entries);
                                               the whole model's under DDP, FSDP, tensor parallel (lightning_clip.norms)
    tau_t = rule.threshold(s_(t-1))            never from n_t: a spike cannot raise its own bound
    c_t   = min(1, tau_t / max(n_t, tiny))
    g    <- c_t * g                            (action "scale"; "clamp": every entry to [-clip_val, clip_val])
    s_t   = rule.update(s_(t-1), n_t)          the logging window counts the step, whether it clipped, and min c

A step whose norm is ``inf``/``nan`` gets ``c_t = 0`` (every entry zeroed, ``nan`` and ``inf`` included) or is left
for the caller to skip (:func:`clip_step_`'s non-finite policy); it never enters the rule's state as an informative
step.

Complex gradients are handled as the real pairs ``(Re z, Im z)`` (``torch.view_as_real``): the norm is the one
``torch.nn.utils.clip_grad_norm_`` computes, and norm clipping multiplies ``z`` by the real ``c_t``. Clamping
clamps a complex entry's modulus, ``z <- z * min(1, clip_val / |z|)``, which keeps its phase
(``torch.nn.utils.clip_grad_value_`` refuses complex gradients).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_clip._scaling import scale_
from lightning_clip.norms import (
    acc_dtype,
    global_grad_norm,
    global_max_abs,
    is_dtensor,
    local_tensor,
    plain_norm,
    real_view,
    real_views,
    reduce_rows,
    sharded_norm,
)
from lightning_clip.rule import AdaptiveNorm, ClipMode, ClipRule, RuleState, rule_from_settings

__all__ = [
    "CLIP_METRIC_KEYS",
    "NONFINITE_POLICIES",
    "ClipMode",
    "ClipRule",
    "ClipState",
    "ClipStats",
    "NonFinite",
    "NonFinitePolicy",
    "Window",
    "clip_grads_",
    "clip_step_",
    "record_",
    "rule_from_settings",
    "window_metrics",
]

NonFinite = Literal["zero", "keep"]
#: What a step whose norm is ``inf``/``nan`` does, as the callback and the optimizer wrapper take it.
NonFinitePolicy = Literal["zero", "skip", "error"]
NONFINITE_POLICIES = ("zero", "skip", "error")

#: The per-step metrics of the clipping with the built-in rules, in the order :func:`window_metrics` gives them.
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


@dataclass
class Window:
    """The logging window's counters, on the device, since the window was last read (:func:`window_metrics`).

    Attributes:
        steps: finite steps (int64).
        clipped: steps whose gradients the rule changed (int64).
        nonfinite: steps whose norm was ``inf`` or ``nan`` (int64).
        coef_min: the smallest clip coefficient (float32; ``1`` when nothing was clipped).
    """

    steps: Tensor
    clipped: Tensor
    nonfinite: Tensor
    coef_min: Tensor

    @classmethod
    def zeros(cls, device: torch.device | str | None = None) -> Window:
        i = torch.zeros((), dtype=torch.int64, device=device)
        return cls(steps=i, clipped=i.clone(), nonfinite=i.clone(), coef_min=torch.ones((), device=device))

    def reset(self) -> None:
        self.steps.zero_()
        self.clipped.zero_()
        self.nonfinite.zero_()
        self.coef_min.fill_(1.0)

    def record(self, finite: Tensor, clipped: Tensor, coef: Tensor) -> None:
        self.steps.add_(finite.long())
        self.clipped.add_(clipped.long())
        self.nonfinite.add_((~finite).long())
        self.coef_min.copy_(torch.minimum(self.coef_min, torch.where(finite, coef, 1.0)))


class ClipState:
    """Device-resident state of one rule applied to one optimizer: the rule's own tensors (:attr:`rule`, e.g. the
    moving average ``ema`` and the count ``seen`` of the built-in rules) and the logging window (:attr:`window`).

    Every tensor is also an attribute (``state.ema``, ``state.seen``, ``state.steps``, ``state.coef_min``, ...), and
    :meth:`state_dict` is the flat ``{name: tensor}`` a checkpoint holds.
    """

    def __init__(self, rule: RuleState, window: Window) -> None:
        self.rule = rule
        self.window = window

    @classmethod
    def zeros(cls, device: torch.device | str | None = None, *, rule: ClipRule | None = None) -> ClipState:
        """A fresh state on ``device`` for ``rule`` (``None``: the built-in rules' state)."""
        return cls((rule or _BUILTIN).init_state(device), Window.zeros(device))

    def __getattr__(self, name: str) -> Tensor:
        if name in ("rule", "window"):  # not set yet (copy / unpickling)
            raise AttributeError(name)
        if name in self.rule:
            return self.rule[name]
        if name in _WINDOW_KEYS:
            return getattr(self.window, name)
        raise AttributeError(f"{type(self).__name__} has no tensor {name!r}")

    def reset_window(self) -> None:
        """Start a new logging window."""
        self.window.reset()

    def tensors(self) -> dict[str, Tensor]:
        """Every tensor of the state by name: the rule's, then the window's."""
        return {**self.rule, **{k: getattr(self.window, k) for k in _WINDOW_KEYS}}

    def state_dict(self) -> dict[str, Tensor]:
        """Plain CPU copies, bit-exact, for checkpoints."""
        return {k: v.detach().cpu().clone() for k, v in self.tensors().items()}

    @classmethod
    def from_state_dict(
        cls, state: Mapping[str, Any], device: torch.device | str | None = None, *, rule: ClipRule | None = None
    ) -> ClipState:
        """Rebuild a state saved by :meth:`state_dict` on ``device``."""
        fresh = cls.zeros(device, rule=rule)
        for k, v in fresh.tensors().items():
            if k in state:
                v.copy_(torch.as_tensor(state[k]))
        return fresh

    def __repr__(self) -> str:
        return f"ClipState({', '.join(f'{k}={v!r}' for k, v in self.tensors().items())})"


_BUILTIN = AdaptiveNorm()
_WINDOW_KEYS = ("steps", "clipped", "nonfinite", "coef_min")


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
    """Apply ``rule`` to ``grads`` in place and advance ``state``, without a host synchronisation (module docstring).

    Args:
        grads: the gradients of one optimizer (dense, non-empty).
        state: the rule's state for that optimizer, on the gradients' device.
        rule: the rule (:mod:`lightning_clip.rule`).
        nonfinite: what a step whose norm is ``inf``/``nan`` does to the gradients: ``"zero"`` makes every entry
            ``0`` (``nan`` and ``inf`` included); ``"keep"`` leaves them as they are (for callers that skip the
            step themselves, as ``GradScaler`` does). Such a step never enters the rule's state as an informative
            step, nor the window's counts of steps and clipped steps.
        grad_scale: when the gradients are still multiplied by a loss scale ``S`` (fused optimizers under a
            ``GradScaler``), the 0-d tensor ``S``: the norm and threshold are compared unscaled.
        foreach: kernel choice of the multiplication (:func:`lightning_clip._scaling.scale_`).
        fused: scale (and zero) in one compiled pass instead.
        threshold: the bound to apply instead of ``rule.threshold(state)`` (scaling rules only): the bound a step
            already took, for a closure optimizer's later evaluations of the same step.
        update: advance ``state`` (the rule's state and the window's counts); ``False`` for a further evaluation
            of a step already counted.

    Returns:
        The step's :class:`ClipStats`.
    """
    originals = list(grads)
    assert originals, "clip_grads_ needs at least one gradient"
    sharded = any(is_dtensor(g) for g in originals)
    grads = real_views(originals)  # complex entries as (Re, Im) pairs: same norm, and scaling by a real c is the same
    norm = sharded_norm(grads, foreach=foreach) if sharded else plain_norm(grads, foreach=foreach)
    whole = grads  # the whole tensors (DTensors when sharded), for the norms after a clamp
    if sharded:  # the norm is the whole model's; the scale and the clamp apply to this rank's shards
        originals, grads = [local_tensor(g) for g in originals], [local_tensor(g) for g in grads]
    if grad_scale is not None:
        norm = norm / grad_scale.to(norm)
    finite = torch.isfinite(norm)
    zero = nonfinite == "zero"
    if rule.action == "clamp":
        if grad_scale is not None:
            raise ValueError(
                "mode='value' cannot clip gradients that are still loss-scaled (fused optimizer + GradScaler)"
            )
        threshold = rule.threshold(state.rule)
        bound = float(rule.clip_val)  # type: ignore[attr-defined]
        coef, clipped = _clamp_(originals, whole, norm, finite, bound, sharded=sharded, foreach=foreach)
        coef = torch.where(finite, coef, 0.0 if zero else 1.0).to(torch.float32)
        scale_(grads, torch.where(finite, 1.0, coef), zero_nonfinite=zero, foreach=foreach)
    else:
        if threshold is None:
            threshold = rule.threshold(state.rule)
        coef = (threshold / norm.clamp_min(TINY)).clamp(max=1.0)
        clipped = finite & (norm > threshold)
        coef = torch.where(finite, coef, 0.0 if zero else 1.0).to(torch.float32)
        scale_(grads, coef, zero_nonfinite=zero, foreach=foreach, fused=fused)
    stats = ClipStats(norm=norm, threshold=threshold, coef=coef, clipped=clipped, finite=finite)
    if update:
        record_(state, rule, stats)
    return stats


def record_(state: ClipState, rule: ClipRule, stats: ClipStats) -> None:
    """Advance ``state`` with a step :func:`clip_grads_` measured: the rule learns the step's norm and the window
    counts it (``clip_grads_(update=False)`` then ``record_`` is ``clip_grads_``, for callers that count a step
    only once the optimizer took it)."""
    rule.update(state.rule, stats.norm, stats.finite)
    state.window.record(stats.finite, stats.clipped, stats.coef)


def _clamp_(
    originals: list[Tensor],
    whole: list[Tensor],
    norm: Tensor,
    finite: Tensor,
    bound: float,
    *,
    sharded: bool,
    foreach: bool | None,
) -> tuple[Tensor, Tensor]:
    """The "clamp" action: every entry of ``originals`` to ``[-bound, bound]`` (a complex entry by its modulus);
    returns the post- to pre-clip norm ratio and whether any entry was beyond the bound."""
    largest = global_max_abs(whole if sharded else originals).to(norm)  # 0 for empty tensors
    clipped = finite & (largest > bound)
    real = [g for g in originals if not g.is_complex()]
    if real:
        torch._foreach_clamp_min_(real, -bound)
        torch._foreach_clamp_max_(real, bound)
    for z in originals:
        if z.is_complex():  # |z| <= bound, phase kept
            z.mul_(torch.clamp(bound / z.abs().clamp_min(TINY), max=1.0))
    post = global_grad_norm(whole, foreach=foreach)
    return torch.where(norm > 0, post / norm.clamp_min(TINY), 1.0), clipped


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


def window_metrics(stats: ClipStats, state: ClipState, rule: ClipRule | None = None) -> dict[str, float]:
    """The step's and the window's metrics as floats, then starts a new window. One host sync (the one of a logging
    step).

    ``grad_norm`` ``n_t``, ``threshold`` (``inf`` on a step with no bound: the seeding step, the warm-up), the
    rule's own metrics (:meth:`~lightning_clip.rule.ClipRule.metrics`; the built-in rules: ``grad_norm_ema``
    ``m_t``), ``clip_coef`` ``c_t``, ``clip_coef_min`` (smallest ``c`` of the window), ``clipped_frac`` (clipped /
    finite steps of the window), ``nonfinite_steps``: :data:`CLIP_METRIC_KEYS` for the built-in rules. Every value
    is returned, ``inf`` and ``nan`` included (TensorBoard draws no point for them): a margin chart needs its value,
    lower and upper series at the same steps.
    """
    window = state.window
    values = {
        "grad_norm": stats.norm,
        "threshold": stats.threshold,
        **(rule or _BUILTIN).metrics(state.rule),
        "clip_coef": stats.coef,
        "clip_coef_min": window.coef_min,
        "clipped_frac": window.clipped.float() / window.steps.clamp_min(1).float(),
        "nonfinite_steps": window.nonfinite,
    }
    read = torch.stack([v.float() for v in values.values()]).tolist()
    state.reset_window()
    return dict(zip(values, read))
