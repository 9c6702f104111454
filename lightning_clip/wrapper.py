"""``AdaptiveClippingOptimizer``: the clipping of :class:`~lightning_clip.AdaptiveGradientClipping` as a torch
optimizer wrapper, for plain PyTorch loops, Lightning Fabric and any trainer that takes a ``torch.optim.Optimizer``.

Pure torch: importing this module does not load Lightning (the TensorBoard helper :func:`log_clipping` loads the
package's layout on its first call). The rule, its state and the per-step logic are the callback's own
(:func:`lightning_clip.functional.clip_step_`): for the same gradients the two do bit for bit the same.
"""

from __future__ import annotations

import inspect
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim import optimizer as _torch_optimizer

from lightning_clip._persist import RuleStates, rule_entry
from lightning_clip._validation import check_choice, check_kernel_choice, check_str
from lightning_clip.functional import (
    NONFINITE_POLICIES,
    ClipState,
    ClipStats,
    NonFinitePolicy,
    clip_step_,
    record_,
    window_metrics,
)
from lightning_clip.rule import ClipMode, ClipRule, resolve_rule

__all__ = ["AdaptiveClippingOptimizer", "log_clipping"]

_CLIPPING_KEY = "clipping"

#: The hook tables of ``torch.optim.Optimizer``. Like torch's own optimizers, the wrapper does not carry them into a
#: copy or a pickle (torch's ``Optimizer.__getstate__`` keeps only ``defaults``, ``state`` and ``param_groups``).
_HOOK_TABLES = (
    "_optimizer_step_pre_hooks",
    "_optimizer_step_post_hooks",
    "_optimizer_state_dict_pre_hooks",
    "_optimizer_state_dict_post_hooks",
    "_optimizer_load_state_dict_pre_hooks",
    "_optimizer_load_state_dict_post_hooks",
)
#: What lives on the instance for the process only: ``step`` is the per-instance patch of an lr scheduler
#: (``torch.optim.lr_scheduler`` wraps ``optimizer.step`` in a function bound to this object by a weak reference, so a
#: copy of it would step the original) and ``_opt_called`` its flag; ``_zero_grad_profile_name`` is rebuilt.
_NOT_COPIED = ("step", "_opt_called", "_zero_grad_profile_name", *_HOOK_TABLES)


class AdaptiveClippingOptimizer(Optimizer):
    r"""Wrap a torch optimizer so that its ``step()`` first clips the gradients by the package's rule.

    At each call of :meth:`step`, with ``n_t`` the L2 norm over the gradients of every parameter of the wrapped
    optimizer (all its param groups; the norm ``torch.nn.utils.clip_grad_norm_`` computes), the gradients are
    multiplied by ``min(1, tau_t / n_t)`` with the rule's bound ``tau_t`` (:mod:`lightning_clip.rule` has the
    formulas; by default ``tau_t = alpha * m_(t-1)``, ``m`` the moving average of the pre-clip norms), then the
    wrapped optimizer steps. It is the rule of :class:`~lightning_clip.AdaptiveGradientClipping`, run by the
    same code (:func:`lightning_clip.functional.clip_step_`): same defaults, same validation, same meaning of every
    argument, and bit-identical results on the same gradients. With ``nonfinite="zero"`` (the default) a step makes
    no host synchronisation of its own.

    **An optimizer to the ecosystem.** :attr:`param_groups`, :attr:`state` and :attr:`defaults` *are* the wrapped
    optimizer's (the same objects), so ``torch.optim.lr_scheduler`` schedulers, per-group learning rates,
    :meth:`zero_grad` and :meth:`add_param_group` act on it, and step hooks registered on the wrapper run around the
    clipping and the step (torch's global optimizer hooks, ``register_optimizer_step_pre_hook`` / ``_post_hook``,
    once per step with the wrapper as the optimizer; hooks registered on the wrapped optimizer run around its own
    step). :meth:`state_dict` is the wrapped optimizer's state dict plus one key, ``"clipping"``
    (the settings and the state: the average ``m``, the counts), made of plain Python values and CPU tensors: it
    loads with ``torch.load(weights_only=True)`` and a resume continues bit for bit.

    **AMP.** With ``torch.amp.GradScaler`` the standard way (``scaler.scale(loss).backward(); scaler.step(opt);
    scaler.update()``), the scaler unscales the gradients through :attr:`param_groups` before it calls
    :meth:`step` (or ``scaler.unscale_(opt)`` does it earlier, as for any clipping), so the norm is measured on
    unscaled gradients; a step the scaler skips (an ``inf``/``nan`` gradient) never calls :meth:`step`, so it is
    neither clipped nor counted. The wrapper does not claim ``_step_supports_amp_scaling``, so a fused wrapped
    optimizer (``Adam(fused=True)``) steps on gradients the scaler already unscaled.

    **Closures.** For an optimizer whose ``step`` takes an optional closure (``SGD``, ``Adam``, ...),
    ``step(closure)`` evaluates the closure once (under ``torch.enable_grad()``), clips, then steps the wrapped
    optimizer without it. An optimizer whose ``step`` *requires* a closure (its ``closure`` parameter has no default,
    as ``torch.optim.LBFGS``) evaluates it as often as it likes: the wrapper passes it a closure that runs the user's
    closure and clips the gradients it produced, on every evaluation. Every evaluation of one :meth:`step` is clipped
    at the threshold of the state *before* that step, and the rule's state (the average ``m``, the counts) and
    :attr:`steps` advance once per :meth:`step`, with the norm of the first evaluation: the gradient at the current
    parameters, the one a closure-free optimizer would be clipped on (the later evaluations are at the trial points
    of the optimizer's own search). :attr:`last_stats` is the first evaluation's too. Such an optimizer's
    ``step()`` without a closure raises a ``TypeError``.

    **Failed steps.** A :meth:`step` that raises (sparse gradients, which the wrapper refuses; ``nonfinite="error"``;
    the wrapped optimizer or the closure raising) is not counted in :attr:`steps`, and the clipping state and
    :attr:`last_stats` are left as they were before it (the gradients may have been clipped already): the rule's state
    and the window advance only once the wrapped optimizer's step returned.

    **Copies, pickles, hooks, compile.** ``copy.deepcopy`` and ``pickle`` copy the wrapped optimizer, the rule and the
    clipping state (the average, the counts, :attr:`steps`), and a copy steps itself (its own parameters), also when
    an lr scheduler had patched the original's ``step``. As for torch's optimizers (``Optimizer.__getstate__``), the
    registered hooks and the scheduler's patch are not copied: attach schedulers and hooks to the copy. The
    checkpoint hooks (``register_state_dict_pre_hook``, ``register_state_dict_post_hook``,
    ``register_load_state_dict_pre_hook``, ``register_load_state_dict_post_hook``, with ``prepend``) run as torch's
    optimizers run them, around the whole state dict (``"clipping"`` included), with the wrapper as the optimizer;
    the wrapped optimizer's own hooks run inside. ``torch.compile(opt.step)`` (torch's recipe for compiled
    optimizers) gives the eager results; the CPU fast path's read of the clip coefficient and ``nonfinite="skip"``
    / ``"error"`` are graph breaks, and :attr:`steps` is a Python int counted after the step succeeded (dynamo
    replays the increment), while the rule's counts are device tensors.

    **With Lightning.** A ``LightningModule`` may return it from ``configure_optimizers`` (``return
    AdaptiveClippingOptimizer(torch.optim.Adam(self.parameters(), lr=1e-3), alpha=3.8)``) instead of using the
    callback; with the callback as well the fit is refused (every step would be clipped twice). Leave
    ``Trainer(gradient_clip_val=...)`` unset: Lightning would clip first, and the wrapper would see the clipped norm.

    **Distributed.** Under ``DistributedDataParallel`` every rank holds the whole, all-reduced gradient, so every
    rank takes the same norm and the same decision, with no communication of its own.

    Args:
        optimizer: the torch optimizer to step (any ``torch.optim.Optimizer``; not another
            ``AdaptiveClippingOptimizer``).
        rule: the clipping rule (:mod:`lightning_clip.rule`), instead of the flat arguments ``mode``, ``alpha``,
            ``beta``, ``clip_val``, ``max_norm``, ``warmup_steps``, which build the built-in rules
            (:func:`~lightning_clip.rule.rule_from_settings`).
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
        rule: the rule (:class:`~lightning_clip.rule.ClipRule`).
        last_stats: what the last step measured and did (:class:`~lightning_clip.functional.ClipStats`: ``norm``,
            ``threshold``, ``coef``, ``clipped``, ``finite`` as 0-d device tensors, read without a sync), ``None``
            before the first step or when no parameter had a gradient.
        steps: the number of :meth:`step` calls that completed (a step that raised, or one a ``GradScaler``
            skipped, is not one; a closure optimizer's step counts once however often it evaluated the closure).

    Raises:
        TypeError: naming the argument and its value: an ``optimizer`` that is not a ``torch.optim.Optimizer``, or a
            value of the wrong kind (``alpha=True``, ``fused="no"``).
        ValueError: naming the argument and its value, for a value out of range, an unknown ``mode`` or
            ``nonfinite``, a ``clip_val`` that does not fit the mode, ``fused=True`` with ``foreach=True``, a
            ``rule`` given with flat rule arguments, or an ``optimizer`` that already is an
            ``AdaptiveClippingOptimizer`` (double clipping).

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
        rule: ClipRule | None = None,
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
        self.rule: ClipRule = resolve_rule(
            rule, mode=mode, alpha=alpha, beta=beta, clip_val=clip_val, max_norm=max_norm, warmup_steps=warmup_steps
        )
        self.nonfinite: NonFinitePolicy = check_choice("nonfinite", nonfinite, NONFINITE_POLICIES)  # type: ignore[assignment]
        self.foreach, self.fused = check_kernel_choice(foreach, fused)
        # the mutable part lives in one object, so that Lightning's and Fabric's optimizer wrappers (which copy
        # this instance's __dict__) share it
        self._clip = _ClipSlot(self.rule)
        self._closure_optimizer = _requires_closure(optimizer)

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
    def mode(self) -> str:
        """The rule's name (``"adaptive"``, ``"norm"``, ``"value"`` for the built-in rules)."""
        return self.rule.mode

    @property
    def alpha(self) -> float | None:
        return getattr(self.rule, "alpha", None)

    @property
    def beta(self) -> float | None:
        return getattr(self.rule, "beta", None)

    @property
    def clip_val(self) -> float | None:
        return getattr(self.rule, "clip_val", None)

    @property
    def max_norm(self) -> float | None:
        return getattr(self.rule, "max_norm", None)

    @property
    def warmup_steps(self) -> int | None:
        return getattr(self.rule, "warmup_steps", None)

    @property
    def last_stats(self) -> ClipStats | None:
        return self._clip.last

    @property
    def steps(self) -> int:
        return self._clip.steps

    def clip_state(self) -> ClipState | None:
        """The live state (average ``m``, count ``k``, the logging window), ``None`` before the first step."""
        return self._clip.states.live()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.optimizer!r}, rule={self.rule!r}, nonfinite={self.nonfinite!r})"

    def __getstate__(self) -> dict[str, Any]:
        """What ``copy.deepcopy`` and ``pickle`` carry: the wrapped optimizer, the settings and the clipping state;
        not the hooks nor an lr scheduler's patch of ``step`` (bound to this object), as for torch's optimizers."""
        return {k: v for k, v in self.__dict__.items() if k not in _NOT_COPIED}

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Rebuild a copy: empty hook tables and the class's hooked ``step``, as ``Optimizer.__setstate__`` does."""
        self.__dict__.update(state)
        for name in _HOOK_TABLES:
            if name not in self.__dict__:
                setattr(self, name, OrderedDict())
        if "_closure_optimizer" not in self.__dict__:
            self._closure_optimizer = _requires_closure(self.optimizer)
        self._patch_step_function()

    # ------------------------------------------------------------------------------------------- the step
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Clip the gradients of every parameter of the wrapped optimizer by the rule, then step the wrapped
        optimizer.

        With a closure and an optimizer whose ``step`` takes an optional one, the closure is evaluated once (under
        ``torch.enable_grad()``) before the clipping. With an optimizer that requires a closure (``LBFGS``), every
        evaluation the optimizer makes is clipped, at the threshold of the state before this step; the state and
        :attr:`steps` advance once, with the first evaluation's norm (see the class docstring). A step that raises
        is not counted and leaves the clipping state as it was.

        Args:
            closure: re-evaluates the model and returns the loss (``zero_grad`` and ``backward`` included).

        Returns:
            The closure's return value, or the wrapped optimizer's for a closure optimizer (``None`` without a
            closure).

        Raises:
            TypeError: no closure for an optimizer that requires one.
            RuntimeError: sparse gradients; with ``nonfinite="error"``, a step whose norm is not finite.
        """
        if self._closure_optimizer:
            return self._closure_step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with torch.no_grad():
            measured = self._clip_grads()
        self._step_wrapped()
        self._clip.count(measured)
        return loss

    def _closure_step(self, closure: Callable[[], Any] | None) -> Any:
        """:meth:`step` for an optimizer that requires a closure: it steps on a closure that clips what it computes."""
        if closure is None:
            raise TypeError(
                f"{type(self.optimizer).__name__}.step requires a closure (it re-evaluates the loss); call"
                " AdaptiveClippingOptimizer.step(closure) with a closure that recomputes the loss and its gradients"
            )
        slot = self._clip
        evaluations = 0
        first: tuple[ClipState, ClipStats] | None = None  # the first evaluation: the step's own gradient

        def clipping_closure() -> Any:
            nonlocal evaluations, first
            with torch.enable_grad():
                loss = closure()
            evaluations += 1
            where = f"step {slot.steps} (closure evaluation {evaluations})"
            with torch.no_grad():
                if evaluations == 1:
                    first = self._clip_grads(where=where)
                elif first is not None:  # a trial point of the optimizer's search: the step's bound, not counted
                    self._clip_grads(where=where, threshold=first[1].threshold)
            return loss

        out = self._step_wrapped(clipping_closure)
        slot.count(first)
        return out

    def _step_wrapped(self, *args: Any) -> Any:
        """The wrapped optimizer's ``step`` (its own hooks and an lr scheduler's patch included), without torch's
        global optimizer hooks (``register_optimizer_step_pre_hook`` / ``_post_hook``): they ran around this
        wrapper's step already, and run once per step, as for any torch optimizer."""
        pre = getattr(_torch_optimizer, "_global_optimizer_pre_hooks", None)
        post = getattr(_torch_optimizer, "_global_optimizer_post_hooks", None)
        if not pre and not post:  # the usual case: nothing to hold back
            return self.optimizer.step(*args)
        held = [(table, table.copy()) for table in (pre, post) if table]
        for table, _ in held:
            table.clear()
        try:
            return self.optimizer.step(*args)
        finally:
            for table, hooks in held:
                added = table.copy()  # a hook registered during the step comes after the others
                table.clear()
                table.update(hooks)
                table.update(added)

    def _params_with_grads(self) -> list[Tensor]:
        """The wrapped optimizer's parameters that have a gradient (refusing sparse gradients)."""
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        if any(p.grad.is_sparse for p in params):
            raise RuntimeError("AdaptiveClippingOptimizer does not support sparse gradients")
        return params

    def _clip_grads(
        self, *, where: str | None = None, threshold: Tensor | None = None
    ) -> tuple[ClipState, ClipStats] | None:
        """Clip the gradients by the rule, without advancing its state (:meth:`_ClipSlot.count` does, once the step
        succeeded); ``threshold``: the bound to apply instead of the rule's. Returns the state and what was measured,
        ``None`` when no parameter has a gradient."""
        params = self._params_with_grads()
        if not params:
            return None
        slot = self._clip
        state = slot.states.get(0, params[0].grad.device, place=False)
        stats = clip_step_(
            params,
            state,
            self.rule,
            nonfinite=self.nonfinite,
            foreach=self.foreach,
            fused=self.fused,
            where=f"step {slot.steps}" if where is None else where,
            owner="AdaptiveClippingOptimizer",
            names=self._param_names,
            threshold=threshold,
            update=False,
        )
        return state, stats

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
        and tensors only: it loads with ``torch.load(weights_only=True)``.

        The state-dict hooks registered on the wrapper run as torch's optimizers run them: the pre hooks
        (``hook(optimizer)``) first, the post hooks (``hook(optimizer, state_dict)``, which may return a new state
        dict) on the whole dict, ``"clipping"`` included; the wrapped optimizer's own hooks run inside.
        """
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        saved = dict(self.optimizer.state_dict())
        saved[_CLIPPING_KEY] = {
            "rule": rule_entry(self.rule),
            "identity": self.rule.identity(),
            "nonfinite": self.nonfinite,
            "steps": self._clip.steps,
            "state": self._clip.states.saved().get(0, {}),
        }
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, saved)
            if result is not None:
                saved = result
        return saved

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        """Load the wrapped optimizer's state and the clipping state.

        The clipping state is used when it was saved with this wrapper's ``mode`` and ``beta`` (what the average
        depends on; ``alpha``, ``max_norm``, ``clip_val``, ``warmup_steps`` and ``nonfinite`` may change on resume);
        otherwise a warning names both and the clipping starts from a fresh state. A plain optimizer state dict
        (without ``"clipping"``) loads into the wrapped optimizer, and the clipping starts fresh.

        As in torch's optimizers, the load pre hooks (``hook(optimizer, state_dict)``) get a shallow copy of
        ``state_dict`` (``"clipping"`` included) and may return the one to load; the post hooks
        (``hook(optimizer)``) run once everything is loaded.
        """
        state_dict = dict(state_dict)  # shallow copy, as torch's optimizers take it
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        clipping = state_dict.get(_CLIPPING_KEY)
        self.optimizer.load_state_dict({k: v for k, v in state_dict.items() if k != _CLIPPING_KEY})
        self._load_clipping(clipping)
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _load_clipping(self, clipping: dict[str, Any] | None) -> None:
        slot = self._clip
        slot.reset()
        if clipping is None:
            return
        slot.steps = int(clipping.get("steps", 0))
        state = clipping.get("state")
        slot.states.load(clipping, {0: state} if state else {})


def _requires_closure(optimizer: Optimizer) -> bool:
    """Whether ``optimizer.step`` requires a closure (its first parameter has no default, as ``LBFGS.step``): such
    an optimizer may evaluate it several times per step."""
    try:
        parameters = list(inspect.signature(optimizer.step).parameters.values())
    except (TypeError, ValueError):  # a builtin or an odd callable: treat it as closure-free
        return False
    if not parameters:
        return False
    first = parameters[0]
    return first.kind in (first.POSITIONAL_ONLY, first.POSITIONAL_OR_KEYWORD) and first.default is first.empty


class _ClipSlot:
    """The mutable part of a wrapper: the rule's state (made on the gradients' device at the first step, from a
    loaded state when there is one), the last step's stats, the step count."""

    def __init__(self, rule: ClipRule) -> None:
        self.states = RuleStates(rule, owner="AdaptiveClippingOptimizer")
        self.last: ClipStats | None = None
        self.steps = 0

    def reset(self) -> None:
        self.states.reset()
        self.last = None
        self.steps = 0

    def count(self, measured: tuple[ClipState, ClipStats] | None) -> None:
        """A step that succeeded: the rule's state and the window advance with what it measured."""
        if measured is not None:
            state, stats = measured
            record_(state, self.states.rule, stats)
            self.states.place(0, state)
            self.last = stats
        else:
            self.last = None
        self.steps += 1


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
                    rule=wrapper.rule,
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
        for key, value in window_metrics(stats, state, wrapper.rule).items():
            tag = metric_tag(prefix, names, index, key)
            writer.add_scalar(tag, value, global_step=step)
            out[tag] = value
    writer.flush()
    return out
