"""``AdaptiveClippingOptimizer``: the clipping of :class:`~lightning_clip.AdaptiveGradientClipping` as a torch
optimizer wrapper, for plain PyTorch loops, Lightning Fabric and any trainer that takes a ``torch.optim.Optimizer``.

Pure torch: importing this module does not load Lightning (the TensorBoard helper :func:`log_clipping` loads the
package's layout on its first call). The rule, its state and the per-step logic are the callback's own
(:func:`lightning_clip.functional.clip_step_`): for the same gradients the two do bit for bit the same.
"""

from __future__ import annotations

import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_clip._validation import check_choice, check_kernel_choice, check_str
from lightning_clip.functional import (
    NONFINITE_POLICIES,
    ClipMode,
    ClipRule,
    ClipState,
    ClipStats,
    NonFinitePolicy,
    clip_step_,
    window_metrics,
)

__all__ = ["AdaptiveClippingOptimizer", "log_clipping"]

_CLIPPING_KEY = "clipping"


class AdaptiveClippingOptimizer(Optimizer):
    r"""Wrap a torch optimizer so that its ``step()`` first clips the gradients by the package's rule.

    At each call of :meth:`step`, with ``n_t`` the L2 norm over the gradients of every parameter of the wrapped
    optimizer (all its param groups; the norm ``torch.nn.utils.clip_grad_norm_`` computes)::

        threshold_t = alpha * m_(t-1)                  (from step 2; step 1 seeds m_1 = n_1)
        threshold_t = min(threshold_t, max_norm)       (optional cap, every step, the first included)
        g <- g * min(1, threshold_t / n_t)
        m_t = beta * m_(t-1) + (1 - beta) * n_t        (raw pre-clip norms of informative steps, 0 < n_t < inf)

    then the wrapped optimizer steps. It is the rule of :class:`~lightning_clip.AdaptiveGradientClipping`, run by the
    same code (:func:`lightning_clip.functional.clip_step_`): same defaults, same validation, same meaning of every
    argument, and bit-identical results on the same gradients. With ``nonfinite="zero"`` (the default) a step makes
    no host synchronisation of its own.

    **An optimizer to the ecosystem.** :attr:`param_groups`, :attr:`state` and :attr:`defaults` *are* the wrapped
    optimizer's (the same objects), so ``torch.optim.lr_scheduler`` schedulers, per-group learning rates,
    :meth:`zero_grad` and :meth:`add_param_group` act on it, and step hooks registered on the wrapper run around the
    clipping and the step. :meth:`state_dict` is the wrapped optimizer's state dict plus one key, ``"clipping"``
    (the settings and the state: the average ``m``, the counts), made of plain Python values and CPU tensors: it
    loads with ``torch.load(weights_only=True)`` and a resume continues bit for bit.

    **AMP.** With ``torch.amp.GradScaler`` the standard way (``scaler.scale(loss).backward(); scaler.step(opt);
    scaler.update()``), the scaler unscales the gradients through :attr:`param_groups` before it calls
    :meth:`step` (or ``scaler.unscale_(opt)`` does it earlier, as for any clipping), so the norm is measured on
    unscaled gradients; a step the scaler skips (an ``inf``/``nan`` gradient) never calls :meth:`step`, so it is
    neither clipped nor counted. The wrapper does not claim ``_step_supports_amp_scaling``, so a fused wrapped
    optimizer (``Adam(fused=True)``) steps on gradients the scaler already unscaled.

    **Closures.** ``step(closure)`` evaluates the closure once (under ``torch.enable_grad()``), clips, then steps
    the wrapped optimizer without it. Optimizers that evaluate their closure several times per step (``LBFGS``) are
    not supported.

    **With Lightning.** A ``LightningModule`` may return it from ``configure_optimizers`` (``return
    AdaptiveClippingOptimizer(torch.optim.Adam(self.parameters(), lr=1e-3), alpha=3.8)``) instead of using the
    callback; with the callback as well the fit is refused (every step would be clipped twice). Leave
    ``Trainer(gradient_clip_val=...)`` unset: Lightning would clip first, and the wrapper would see the clipped norm.

    **Distributed.** Under ``DistributedDataParallel`` every rank holds the whole, all-reduced gradient, so every
    rank takes the same norm and the same decision, with no communication of its own.

    Args:
        optimizer: the torch optimizer to step (any ``torch.optim.Optimizer``; not another
            ``AdaptiveClippingOptimizer``).
        alpha: multiple of the moving average that the norm may reach (``mode="adaptive"``); a finite number > 0.
        beta: decay of the moving average, in ``[0, 1)``.
        mode: ``"adaptive"``, ``"norm"`` (fixed threshold ``clip_val`` on the norm) or ``"value"`` (entries clamped to
            ``[-clip_val, clip_val]``).
        clip_val: the fixed bound of ``"norm"`` and ``"value"``; ``None`` in adaptive mode.
        max_norm: optional absolute cap on the norm in adaptive mode, applied from the first step.
        warmup_steps: informative steps after the seeding step during which the adaptive threshold is not applied
            (the average is bias-corrected over them).
        nonfinite: what a step with an ``inf``/``nan`` norm does (such a norm never enters the average):
            ``"zero"`` (default, no host sync): every gradient entry becomes 0, and the wrapped optimizer still
            steps (Adam moves by its momentum, weight decay applies); ``"skip"``: gradients are set to ``None``
            before the wrapped optimizer steps, so torch optimizers leave the parameters and their state untouched
            (one host sync per step); ``"error"``: raise a ``RuntimeError`` naming the step and the parameters
            (one host sync per step).
        foreach: kernel of the multiplication (``None``: by device).
        fused: scale and zero each gradient in one ``torch.compile``-fused pass (compiled on the first step).

    Attributes:
        optimizer: the wrapped optimizer.
        rule: the validated :class:`~lightning_clip.functional.ClipRule`.
        last_stats: what the last step measured and did (:class:`~lightning_clip.functional.ClipStats`: ``norm``,
            ``threshold``, ``coef``, ``clipped``, ``finite`` as 0-d device tensors, read without a sync), ``None``
            before the first step or when no parameter had a gradient.
        steps: the number of :meth:`step` calls that ran (a step a ``GradScaler`` skipped is not one).

    Raises:
        TypeError: naming the argument and its value: an ``optimizer`` that is not a ``torch.optim.Optimizer``, or a
            value of the wrong kind (``alpha=True``, ``fused="no"``).
        ValueError: naming the argument and its value, for a value out of range, an unknown ``mode`` or
            ``nonfinite``, a ``clip_val`` that does not fit the mode, ``fused=True`` with ``foreach=True``, or an
            ``optimizer`` that already is an ``AdaptiveClippingOptimizer`` (double clipping).

    Example::

        >>> import torch
        >>> from lightning_clip import AdaptiveClippingOptimizer
        >>> model = torch.nn.Linear(4, 1)
        >>> opt = AdaptiveClippingOptimizer(torch.optim.Adam(model.parameters(), lr=1e-3), alpha=3.8, beta=0.918)
        >>> model(torch.randn(8, 4)).square().mean().backward()
        >>> opt.step(); opt.zero_grad()
    """

    def __init__(
        self,
        optimizer: Optimizer,
        alpha: float = 3.8,
        beta: float = 0.918,
        mode: ClipMode = "adaptive",
        clip_val: float | None = None,
        max_norm: float | None = None,
        warmup_steps: int = 0,
        nonfinite: NonFinitePolicy = "zero",
        foreach: bool | None = None,
        fused: bool = False,
    ) -> None:
        if isinstance(optimizer, AdaptiveClippingOptimizer):
            raise ValueError(
                f"Invalid optimizer: {type(optimizer).__name__}; expected an optimizer that does not clip already"
                " (wrapping an AdaptiveClippingOptimizer would clip every step twice)"
            )
        if not isinstance(optimizer, Optimizer):
            raise TypeError(
                f"Invalid optimizer: <{type(optimizer).__name__} object>; expected a torch.optim.Optimizer instance"
            )
        # What Optimizer.__init__ sets, except the parameters: param_groups, state and defaults are the wrapped ones.
        self._optimizer_step_pre_hooks: dict[int, Callable] = OrderedDict()
        self._optimizer_step_post_hooks: dict[int, Callable] = OrderedDict()
        self._optimizer_state_dict_pre_hooks: dict[int, Callable] = OrderedDict()
        self._optimizer_state_dict_post_hooks: dict[int, Callable] = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks: dict[int, Callable] = OrderedDict()
        self._optimizer_load_state_dict_post_hooks: dict[int, Callable] = OrderedDict()
        self._patch_step_function()  # step pre/post hooks and the profiler, as for any torch optimizer
        self.optimizer = optimizer
        self.rule = ClipRule(
            mode=mode, alpha=alpha, beta=beta, clip_val=clip_val, max_norm=max_norm, warmup_steps=warmup_steps
        )
        self.nonfinite: NonFinitePolicy = check_choice("nonfinite", nonfinite, NONFINITE_POLICIES)  # type: ignore[assignment]
        self.foreach, self.fused = check_kernel_choice(foreach, fused)
        # the mutable part lives in one object, so that Lightning's and Fabric's optimizer wrappers (which copy
        # this instance's __dict__) share it
        self._clip = _ClipSlot()

    # ------------------------------------------------------------------ the wrapped optimizer's own objects
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        """The wrapped optimizer's param groups (the same list)."""
        return self.optimizer.param_groups

    @property
    def state(self) -> Any:  # type: ignore[override]
        """The wrapped optimizer's per-parameter state (the same mapping)."""
        return self.optimizer.state

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        """The wrapped optimizer's defaults (the same dict)."""
        return self.optimizer.defaults

    # ---------------------------------------------------------------------------------- settings and state
    @property
    def alpha(self) -> float:
        return self.rule.alpha

    @property
    def beta(self) -> float:
        return self.rule.beta

    @property
    def mode(self) -> str:
        return self.rule.mode

    @property
    def clip_val(self) -> float | None:
        return self.rule.clip_val

    @property
    def max_norm(self) -> float | None:
        return self.rule.max_norm

    @property
    def warmup_steps(self) -> int:
        return self.rule.warmup_steps

    @property
    def last_stats(self) -> ClipStats | None:
        return self._clip.last

    @property
    def steps(self) -> int:
        return self._clip.steps

    def clip_state(self) -> ClipState | None:
        """The live state (average ``m``, count ``k``, the logging window), ``None`` before the first step."""
        return self._clip.state

    def __repr__(self) -> str:
        settings = ", ".join(f"{k}={v!r}" for k, v in asdict(self.rule).items())
        return f"{type(self).__name__}({self.optimizer!r}, {settings}, nonfinite={self.nonfinite!r})"

    def __getstate__(self) -> dict[str, Any]:  # copy / pickle the wrapper itself, not Optimizer's fields
        return self.__dict__.copy()

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._patch_step_function()

    # ------------------------------------------------------------------------------------------- the step
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Evaluate ``closure`` (when given), clip the gradients of every parameter of the wrapped optimizer by the
        rule, then step the wrapped optimizer.

        Returns:
            The closure's return value (``None`` without a closure).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with torch.no_grad():
            self._clip_grads()
        self.optimizer.step()
        return loss

    def _clip_grads(self) -> None:
        slot = self._clip
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        slot.steps += 1
        if not params:
            slot.last = None
            return
        if any(p.grad.is_sparse for p in params):
            raise RuntimeError("AdaptiveClippingOptimizer does not support sparse gradients")
        state = slot.state_on(params[0].grad.device)
        slot.last = clip_step_(
            params,
            state,
            self.rule,
            nonfinite=self.nonfinite,
            foreach=self.foreach,
            fused=self.fused,
            where=f"step {slot.steps - 1}",
            owner="AdaptiveClippingOptimizer",
            names=self._param_names,
        )

    def _param_names(self) -> dict[int, str]:
        """``param_names`` of the groups when the optimizer was built from ``named_parameters()`` (torch >= 2.6),
        else ``param_groups[g][i]``."""
        names = {}
        for g, group in enumerate(self.param_groups):
            given = group.get("param_names") or []
            for i, p in enumerate(group["params"]):
                names[id(p)] = given[i] if i < len(given) else f"param_groups[{g}][{i}]"
        return names

    def zero_grad(self, set_to_none: bool = True) -> None:
        """The wrapped optimizer's ``zero_grad``."""
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """The wrapped optimizer's ``add_param_group``: the new group's gradients count in the norm from the next
        step on."""
        self.optimizer.add_param_group(param_group)

    # ---------------------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """The wrapped optimizer's state dict plus ``"clipping"``: ``{"rule": settings, "nonfinite": str,
        "steps": int, "state": {name: CPU tensor}}`` (``"state"`` empty before the first step). Plain Python values
        and tensors only: it loads with ``torch.load(weights_only=True)``."""
        saved = dict(self.optimizer.state_dict())
        saved[_CLIPPING_KEY] = {
            "rule": asdict(self.rule),
            "nonfinite": self.nonfinite,
            "steps": self._clip.steps,
            "state": self._clip.saved(),
        }
        return saved

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        """Load the wrapped optimizer's state and the clipping state.

        The clipping state is used when it was saved with this wrapper's ``mode`` and ``beta`` (what the average
        depends on; ``alpha``, ``max_norm``, ``clip_val``, ``warmup_steps`` and ``nonfinite`` may change on resume);
        otherwise a warning names both and the clipping starts from a fresh state. A plain optimizer state dict
        (without ``"clipping"``) loads into the wrapped optimizer, and the clipping starts fresh.
        """
        state_dict = dict(state_dict)
        clipping = state_dict.pop(_CLIPPING_KEY, None)
        self.optimizer.load_state_dict(state_dict)
        slot = self._clip
        slot.reset()
        if clipping is None:
            return
        slot.steps = int(clipping.get("steps", 0))
        rule = clipping.get("rule") or {}
        saved = {"mode": rule.get("mode"), "beta": rule.get("beta")}
        if saved != {"mode": self.mode, "beta": self.beta}:
            warnings.warn(
                f"AdaptiveClippingOptimizer has mode={self.mode!r}, beta={self.beta!r}, but its clipping state was"
                f" saved with mode={saved['mode']!r}, beta={saved['beta']!r}. The moving average depends on mode and"
                " beta, so it starts from a fresh state (the threshold is rebuilt from the next steps).",
                UserWarning,
                stacklevel=2,
            )
            return
        slot.loaded = dict(clipping.get("state") or {}) or None


class _ClipSlot:
    """The mutable part of a wrapper: the live state (made on the gradients' device at the first step), a state
    loaded but not used yet, the last step's stats, the step count."""

    def __init__(self) -> None:
        self.state: ClipState | None = None
        self.loaded: dict[str, Tensor] | None = None
        self.last: ClipStats | None = None
        self.steps = 0

    def reset(self) -> None:
        self.__init__()  # type: ignore[misc]

    def state_on(self, device: torch.device) -> ClipState:
        if self.state is None:
            loaded, self.loaded = self.loaded, None
            self.state = ClipState.zeros(device) if loaded is None else ClipState.from_state_dict(loaded, device)
        return self.state

    def saved(self) -> dict[str, Tensor]:
        if self.state is not None:
            return self.state.state_dict()
        return {k: v.clone() for k, v in (self.loaded or {}).items()}


# ------------------------------------------------------------------------------------------------- TensorBoard
_LAYOUTS: weakref.WeakKeyDictionary[Any, set[Any]] = weakref.WeakKeyDictionary()


def _unwrap(optimizer: Any) -> AdaptiveClippingOptimizer:
    """The wrapper itself, through Lightning's ``LightningOptimizer`` and Fabric's ``_FabricOptimizer``."""
    while "_optimizer" in getattr(optimizer, "__dict__", {}):
        optimizer = optimizer.__dict__["_optimizer"]
    if not isinstance(optimizer, AdaptiveClippingOptimizer):
        raise TypeError(f"Invalid optimizers: {optimizer!r}; expected AdaptiveClippingOptimizer instances")
    return optimizer


def log_clipping(
    writer: Any,
    optimizers: AdaptiveClippingOptimizer | Sequence[AdaptiveClippingOptimizer],
    step: int | None = None,
    *,
    prefix: str = "clip",
    dashboard: bool = True,
) -> dict[str, float]:
    """Write what the wrappers measured to TensorBoard, with the callback's names and custom-scalars layout.

    For each wrapper, the metrics of the callback (``{prefix}/grad_norm``, ``threshold``, ``grad_norm_ema``,
    ``clip_coef``, ``clip_coef_min``, ``clipped_frac``, ``nonfinite_steps``; ``{prefix}/{Optimizer}/...`` with several
    wrappers, named after the wrapped optimizers as the callback names them). ``clip_coef_min``, ``clipped_frac`` and
    ``nonfinite_steps`` cover the steps since the previous call, which starts a new window. On the first call for a
    writer's run, the layout the callback writes (without the sparsity chart, which the wrapper does not measure).
    One host sync per call: call it every N steps, and on one rank only under DDP.

    Args:
        writer: a ``torch.utils.tensorboard.SummaryWriter``, or a Lightning / Fabric ``TensorBoardLogger`` (its
            ``experiment`` is used).
        optimizers: the wrapper, or the wrappers of a run (also as Fabric or Lightning returns them).
        step: the step to log at; by default the first wrapper's :attr:`~AdaptiveClippingOptimizer.steps` - 1, the
            index of its last step.
        prefix: the metrics' prefix, the callback's ``log_prefix``.
        dashboard: write the layout once per run.

    Returns:
        The values written, by tag (a wrapper that has not stepped yet writes nothing).
    """
    prefix = check_str("prefix", prefix)
    wrappers = [_unwrap(o) for o in ([optimizers] if not isinstance(optimizers, Sequence) else optimizers)]
    writer = getattr(writer, "experiment", writer)
    from lightning_clip.dashboard import clipping_layout, merge_layouts, metric_tag, optimizer_names

    names = optimizer_names([w.optimizer for w in wrappers])  # "Adam", "SGD", "Adam-1": the callback's names
    if dashboard and wrappers:
        written = _LAYOUTS.setdefault(writer, set())
        run = getattr(writer, "log_dir", None)
        if run not in written:
            sections = (
                clipping_layout(
                    lambda key, i=index: metric_tag(prefix, names, i, key),
                    metric_tag(prefix, names, index, "").rstrip("/"),
                    mode=wrapper.mode,
                    sparsity=False,
                    cumulative=False,
                )
                for index, wrapper in enumerate(wrappers)
            )
            writer.add_custom_scalars(merge_layouts(sections))
            written.add(run)
    if step is None:
        step = max(wrappers[0].steps - 1, 0) if wrappers else 0
    out: dict[str, float] = {}
    for index, wrapper in enumerate(wrappers):
        stats, state = wrapper.last_stats, wrapper.clip_state()
        if stats is None or state is None:
            continue
        for key, value in window_metrics(stats, state).items():
            tag = metric_tag(prefix, names, index, key)
            writer.add_scalar(tag, value, global_step=step)
            out[tag] = value
    writer.flush()
    return out
