r"""The clipping rules: where the bound of each step comes from. Pure torch.

One step of the clipping (:func:`lightning_clip.functional.clip_grads_`), with ``n_t`` the L2 norm over all the
gradients of one optimizer (the norm ``torch.nn.utils.clip_grad_norm_`` computes) and ``s`` the rule's state::

    tau_t = rule.threshold(s_(t-1))               the bound, from the state before the step (never from n_t)
    c_t   = min(1, tau_t / max(n_t, tiny))        (action "scale": g <- c_t * g, so the norm becomes tau_t)
    s_t   = rule.update(s_(t-1), n_t)

A rule with ``action = "clamp"`` clamps every entry to ``[-tau_t, tau_t]`` instead (``c_t`` is then the ratio of the
norms after and before). A step whose norm is ``inf``/``nan`` is handled by the step's non-finite policy and never
reaches :meth:`ClipRule.update` as an informative step.

**The built-in rules** keep ``m``, a moving average of the informative norms (``0 < n_t < inf``), and ``k``, their
count; with ``K = warmup_steps``::

    only when 0 < n_t < inf, with k <- k + 1:
    m_t = n_t                                   if k == 1 (the first informative step seeds the average)
    m_t = m_(t-1) + w_k * (n_t - m_(t-1))       w_k = (1 - beta) / (1 - beta^k), while k <= K + 1
    m_t = beta * m_(t-1) + (1 - beta) * n_t     afterwards
    otherwise (n_t = 0, inf or nan) m and k are left unchanged.

During the warm-up ``w_k`` makes ``m`` the bias-corrected moving average of the informative norms so far (Adam's
correction of its moments), ``m_k = sum_(i=1..k) (1 - beta) beta^(k-i) n_i / (1 - beta^k)``: the weights sum to 1
and a later step weighs more than an earlier one, by ``1 / beta`` per step (``w_1 = 1`` seeds it). After ``K`` steps
the first step weighs ``beta^K (1 - beta) / (1 - beta^(K+1))`` instead of ``beta^K`` in the plain seeded average
(with the defaults and ``K = 10``, 0.057 instead of 0.43), so one unrepresentative early step (tiny or huge) does not
set the threshold that follows. With ``K = 0`` the rule is the plain seeded average. A zero norm (zero-initialised
layers, a frozen warm start, a loss constant at the start) says nothing about the scale of the gradients: it neither
seeds nor drags the average, and it does not count as a warm-up step.

* :class:`AdaptiveNorm` (the default): ``tau_t = alpha * m_(t-1)`` once ``k > K``, else ``+inf``; then
  ``min(tau_t, max_norm)`` when ``max_norm`` is set (every step, the first included).
* :class:`FixedNorm`: ``tau_t = clip_val`` (plain norm clipping, as ``torch.nn.utils.clip_grad_norm_``).
* :class:`FixedValue`: every entry clamped to ``[-clip_val, clip_val]`` (as ``torch.nn.utils.clip_grad_value_``;
  a complex entry by its modulus, keeping its phase).

The fixed rules track ``m`` too, so that the logs compare like with like. A new rule is one subclass of
:class:`ClipRule` in this file: its settings (validated in ``__init__``, typed keyword arguments, so LightningCLI
can build it from ``rule: {class_path: ..., init_args: ...}``), :meth:`~ClipRule.init_state`,
:meth:`~ClipRule.threshold`, :meth:`~ClipRule.update`, :meth:`~ClipRule.identity` and :meth:`~ClipRule.metrics`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from lightning_clip._validation import check_choice, check_int, check_real

__all__ = ["AdaptiveNorm", "ClipMode", "ClipRule", "FixedNorm", "FixedValue", "resolve_rule", "rule_from_settings"]

ClipMode = Literal["adaptive", "norm", "value"]
_MODES = ("adaptive", "norm", "value")

#: The state of a rule: named 0-d tensors on the gradients' device (saved bit for bit in checkpoints).
RuleState = dict[str, Tensor]


class ClipRule:
    """The base of every clipping rule: the bound of a step from what the rule has seen, and how it learns.

    Subclasses set :attr:`mode` (the name saved with a state) and, for a per-entry bound, ``action = "clamp"``; they
    implement :meth:`init_state`, :meth:`threshold`, :meth:`update` and may extend :meth:`identity` and
    :meth:`metrics`. Settings are plain Python values (a rule is written to checkpoints that load with
    ``torch.load(weights_only=True)``), read-only after construction.
    """

    #: The name of the rule, saved with its state.
    mode: ClassVar[str] = ""
    #: What the step does with the bound: ``"scale"`` (``g <- c_t * g``) or ``"clamp"`` (entries to ``[-tau, tau]``).
    action: ClassVar[Literal["scale", "clamp"]] = "scale"
    #: How the threshold's series looks on the dashboard (``"smooth"``, ``"flat"``): the chart's title says it.
    threshold_shape: ClassVar[str] = "smooth"

    def init_state(self, device: torch.device | str | None = None) -> RuleState:
        """A fresh state on ``device``."""
        raise NotImplementedError

    def threshold(self, state: Mapping[str, Tensor]) -> Tensor:
        """The bound ``tau_t`` of this step, a 0-d float32 tensor, from the state before the step."""
        raise NotImplementedError

    def update(self, state: RuleState, norm: Tensor, finite: Tensor) -> None:
        """Advance ``state`` in place with the step's pre-clip norm ``n_t`` (on the device, no host read).

        Args:
            state: the rule's state.
            norm: ``n_t``, a 0-d tensor.
            finite: ``isfinite(n_t)``, a 0-d bool tensor.
        """
        raise NotImplementedError

    def settings(self) -> dict[str, Any]:
        """The constructor's arguments, as plain Python values."""
        raise NotImplementedError

    def identity(self) -> dict[str, Any]:
        """What a saved state depends on: a state saved under another identity is not resumed (a warning says why)."""
        return {"mode": self.mode}

    def metrics(self, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The rule's own per-step metrics for the logs, as 0-d device tensors."""
        return {}

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is read-only: build a new rule instead of setting {name!r}")

    def _set(self, **values: Any) -> None:
        for name, value in values.items():
            object.__setattr__(self, name, value)

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.settings() == self.settings()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self), tuple(self.settings().items())))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.settings().items())
        return f"{type(self).__name__}({args})"


class _AveragedNorm(ClipRule):
    """The built-in rules' state: ``m``, the moving average of the informative norms, and ``k``, their count (module
    docstring)."""

    beta: float
    warmup_steps: int

    def init_state(self, device: torch.device | str | None = None) -> RuleState:
        return {
            "ema": torch.zeros((), dtype=torch.float32, device=device),
            "seen": torch.zeros((), dtype=torch.int64, device=device),
        }

    def update(self, state: RuleState, norm: Tensor, finite: Tensor) -> None:
        ema = state["ema"]
        n = norm.to(ema.dtype)
        informative = finite & (n > 0)
        seen = state["seen"] + informative.long()  # k, this step included when it is informative
        beta = self.beta
        averaged = ema * beta + n * (1.0 - beta)
        if self.warmup_steps > 0:  # a setting, not a tensor
            weight = (1.0 - beta) / (1.0 - torch.pow(beta, seen.clamp_min(1).to(n.dtype)))
            averaged = torch.where(seen <= self.warmup_steps + 1, ema + (n - ema) * weight, averaged)
        averaged = torch.where(seen == 1, n, averaged)
        ema.copy_(torch.where(informative, averaged, ema))
        state["seen"].copy_(seen)

    def identity(self) -> dict[str, Any]:
        return {"mode": self.mode, "beta": self.beta}

    def metrics(self, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {"grad_norm_ema": state["ema"]}


class AdaptiveNorm(_AveragedNorm):
    """``tau_t = alpha * m_(t-1)`` (from step ``warmup_steps + 2``), capped by ``max_norm``: a spike is held to
    ``alpha`` times the recent norm, ordinary steps are left alone (module docstring).

    Defaults: ``alpha=3.8, beta=0.918`` are the values an Optuna search (30 trials) picked for Adam on an MLP over
    mnist1d at lr 0.04. With ``beta=0.918`` the average forgets with a half-life of about 8 steps. ``alpha < 1``
    holds every step at ``alpha`` times the typical norm (the average takes the pre-clip norm, so it does not
    shrink towards zero).

    Args:
        alpha: multiple of the moving average that the norm may reach, a finite number > 0.
        beta: decay of the moving average, in ``[0, 1)``.
        max_norm: optional absolute cap on the norm, ``> 0`` (``inf``: no cap), from the first step: Adam's second
            moment needs a few steps before it brakes a large gradient, the cap brakes from step one.
        warmup_steps: informative steps after the seeding one during which no adaptive bound applies and the
            average is the bias-corrected one, ``m_k = sum_(i<=k) (1 - beta) beta^(k-i) n_i / (1 - beta^k)``
            (later steps weigh more); an integer ``>= 0``.

    Raises:
        TypeError: naming the argument and its value for a value of the wrong kind (``alpha=True``).
        ValueError: naming the argument and its value when a setting is out of range.
    """

    mode: ClassVar[str] = "adaptive"

    def __init__(
        self, alpha: float = 3.8, beta: float = 0.918, max_norm: float | None = None, warmup_steps: int = 0
    ) -> None:
        self._set(
            alpha=check_real("alpha", alpha, low=0.0, low_open=True),
            beta=check_real("beta", beta, low=0.0, high=1.0, high_open=True),
            max_norm=check_real("max_norm", max_norm, low=0.0, low_open=True, finite=False, optional=True),
            warmup_steps=check_int("warmup_steps", warmup_steps, low=0),
        )

    alpha: float
    max_norm: float | None

    def settings(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "beta": self.beta, "max_norm": self.max_norm, "warmup_steps": self.warmup_steps}

    def threshold(self, state: Mapping[str, Tensor]) -> Tensor:
        threshold = torch.where(state["seen"] > self.warmup_steps, state["ema"] * self.alpha, math.inf)
        if self.max_norm is not None:
            threshold = threshold.clamp(max=self.max_norm)
        return threshold


class FixedNorm(_AveragedNorm):
    """``tau_t = clip_val``: plain norm clipping, as ``torch.nn.utils.clip_grad_norm_(params, clip_val)``; the
    average ``m`` is kept for the logs only.

    Args:
        clip_val: the bound of the global norm, a finite number > 0.
        beta: decay of the logged moving average, in ``[0, 1)``.
        warmup_steps: steps of the logged average's bias correction, an integer ``>= 0``.
    """

    mode: ClassVar[str] = "norm"
    threshold_shape: ClassVar[str] = "flat"
    clip_val: float

    def __init__(self, clip_val: float, beta: float = 0.918, warmup_steps: int = 0) -> None:
        self._set(
            clip_val=check_real("clip_val", clip_val, low=0.0, low_open=True),
            beta=check_real("beta", beta, low=0.0, high=1.0, high_open=True),
            warmup_steps=check_int("warmup_steps", warmup_steps, low=0),
        )

    def settings(self) -> dict[str, Any]:
        return {"clip_val": self.clip_val, "beta": self.beta, "warmup_steps": self.warmup_steps}

    def threshold(self, state: Mapping[str, Tensor]) -> Tensor:
        return torch.full_like(state["ema"], self.clip_val)


class FixedValue(FixedNorm):
    """Every entry clamped to ``[-clip_val, clip_val]``, as ``torch.nn.utils.clip_grad_value_`` (a complex entry's
    modulus is clamped and its phase kept, which ``clip_grad_value_`` refuses); the average ``m`` of the pre-clip
    norms is kept for the logs only.

    Args:
        clip_val: the bound of every entry, a finite number > 0.
        beta: decay of the logged moving average, in ``[0, 1)``.
        warmup_steps: steps of the logged average's bias correction, an integer ``>= 0``.
    """

    mode: ClassVar[str] = "value"
    action: ClassVar[Literal["scale", "clamp"]] = "clamp"


def rule_from_settings(
    mode: str = "adaptive",
    alpha: float = 3.8,
    beta: float = 0.918,
    clip_val: float | None = None,
    max_norm: float | None = None,
    warmup_steps: int = 0,
) -> ClipRule:
    """The rule of the callback's and the wrapper's flat arguments: :class:`AdaptiveNorm` for ``mode="adaptive"``,
    :class:`FixedNorm` for ``"norm"``, :class:`FixedValue` for ``"value"``.

    Raises:
        TypeError / ValueError: naming the argument and its value, also for a ``clip_val`` or ``max_norm`` that does
            not fit the mode.
    """
    mode = check_choice("mode", mode, _MODES)
    alpha = check_real("alpha", alpha, low=0.0, low_open=True)
    beta = check_real("beta", beta, low=0.0, high=1.0, high_open=True)
    max_norm = check_real("max_norm", max_norm, low=0.0, low_open=True, finite=False, optional=True)
    warmup_steps = check_int("warmup_steps", warmup_steps, low=0)
    if mode == "adaptive":
        if clip_val is not None:
            raise ValueError(
                f"Invalid clip_val: {clip_val!r}; expected None with mode='adaptive', which takes alpha and"
                " beta (clip_val is the bound of mode='norm' and mode='value')"
            )
        return AdaptiveNorm(alpha=alpha, beta=beta, max_norm=max_norm, warmup_steps=warmup_steps)
    if clip_val is None:
        raise ValueError(f"Invalid clip_val: None; expected a finite number > 0 with mode={mode!r}")
    clip_val = check_real("clip_val", clip_val, low=0.0, low_open=True)
    if max_norm is not None:
        raise ValueError(
            f"Invalid max_norm: {max_norm!r}; expected None with mode={mode!r} (max_norm applies to"
            " mode='adaptive' only)"
        )
    cls = FixedNorm if mode == "norm" else FixedValue
    return cls(clip_val=clip_val, beta=beta, warmup_steps=warmup_steps)


#: The flat arguments of the callback and the wrapper, and their defaults.
FLAT_DEFAULTS: dict[str, Any] = {
    "mode": "adaptive",
    "alpha": 3.8,
    "beta": 0.918,
    "clip_val": None,
    "max_norm": None,
    "warmup_steps": 0,
}


def resolve_rule(
    rule: ClipRule | None,
    *,
    mode: str = "adaptive",
    alpha: float = 3.8,
    beta: float = 0.918,
    clip_val: float | None = None,
    max_norm: float | None = None,
    warmup_steps: int = 0,
) -> ClipRule:
    """``rule`` when given (the flat arguments then at their defaults), else the rule the flat arguments build
    (:func:`rule_from_settings`).

    Raises:
        TypeError: a ``rule`` that is not a :class:`ClipRule`.
        ValueError: a ``rule`` given together with flat arguments that differ from their defaults.
    """
    flat = {
        "mode": mode,
        "alpha": alpha,
        "beta": beta,
        "clip_val": clip_val,
        "max_norm": max_norm,
        "warmup_steps": warmup_steps,
    }
    if rule is None:
        return rule_from_settings(**flat)
    if not isinstance(rule, ClipRule):
        raise TypeError(
            f"Invalid rule: {rule!r}; expected a lightning_clip.rule.ClipRule (AdaptiveNorm, FixedNorm, ...)"
        )
    changed = [f"{k}={v!r}" for k, v in flat.items() if v != FLAT_DEFAULTS[k] or type(v) is not type(FLAT_DEFAULTS[k])]
    if changed:
        raise ValueError(
            f"Invalid rule: {rule!r} with {', '.join(changed)}; give either a rule or the flat arguments"
            " (mode, alpha, beta, clip_val, max_norm, warmup_steps), not both"
        )
    return rule
