"""The clipping state of each optimizer, as the callback and the optimizer wrapper keep, save and resume it.

One :class:`RuleStates` per callback or wrapper holds, per optimizer index, the live
:class:`~lightning_clip.functional.ClipState` on its gradients' device (made at the first step, from a loaded state
when there is one) and the loaded states not placed yet. A saved state is resumed only when the rule's
:meth:`~lightning_clip.rule.ClipRule.identity` (for the built-in rules: ``mode`` and ``beta``) is the one it was saved
with; otherwise one warning names both and the state starts fresh. Pure torch.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from lightning_clip.functional import ClipState
from lightning_clip.rule import ClipRule

__all__ = ["RuleStates", "rule_entry", "saved_identity", "spell"]


def rule_entry(rule: ClipRule) -> dict[str, Any]:
    """What a checkpoint keeps of ``rule``: its ``mode`` and settings (plain values), and its identity."""
    return {"mode": rule.mode, **rule.settings()}


def saved_identity(entry: Any) -> dict[str, Any] | None:
    """The identity a saved entry (``{"rule": ..., "identity": ...}``) was written with, ``None`` if it has none.

    Entries written before rules had a class of their own carry no ``"identity"``: theirs is the ``mode`` and
    ``beta`` of their ``"rule"`` (``beta`` as a float, so ``2`` and ``2.0`` agree).
    """
    if not isinstance(entry, Mapping):
        return None
    identity = entry.get("identity")
    if isinstance(identity, Mapping):
        return dict(identity)
    rule = entry.get("rule")
    if not isinstance(rule, Mapping) or "mode" not in rule or "beta" not in rule:
        return None
    beta = rule["beta"]
    try:
        beta = float(beta)
    except (TypeError, ValueError):
        pass
    return {"mode": rule["mode"], "beta": beta}


def spell(identity: Mapping[str, Any] | None) -> str:
    """``mode='adaptive', beta=0.9``."""
    return ", ".join(f"{k}={v!r}" for k, v in (identity or {}).items()) or "no rule"


class RuleStates:
    """The rule's state per optimizer index, placed on its device at first use, saved and resumed.

    Args:
        rule: the rule the states belong to.
        owner: how warnings name the owner (``"AdaptiveGradientClipping(log_prefix='clip')"``).
    """

    def __init__(self, rule: ClipRule, owner: str) -> None:
        self.rule = rule
        self.owner = owner
        #: whether this process warns about a saved state it cannot use (rank zero only, under a Trainer)
        self.warn = True
        self._live: dict[int, ClipState] = {}
        self._loaded: dict[int, Mapping[str, Tensor]] = {}

    def get(self, index: int, device: torch.device, *, place: bool = True) -> ClipState:
        """The state of optimizer ``index`` on ``device``: the live one, else the loaded one placed there, else a
        fresh one. ``place=False``: a state not yet made live stays a candidate (:meth:`place` makes it live once
        the step that used it succeeded; until then a saved state stays the one loaded)."""
        state = self._live.get(index)
        if state is None:
            loaded = self._loaded.get(index)
            state = (
                ClipState.zeros(device, rule=self.rule)
                if loaded is None
                else ClipState.from_state_dict(loaded, device, rule=self.rule)
            )
            if place:
                self.place(index, state)
        return state

    def place(self, index: int, state: ClipState) -> None:
        """Make ``state`` the live state of optimizer ``index`` (its loaded state, if any, is used up)."""
        self._live[index] = state
        self._loaded.pop(index, None)

    def live(self, index: int = 0) -> ClipState | None:
        """The live state of optimizer ``index`` (``None`` before its first step)."""
        return self._live.get(index)

    def reset(self) -> None:
        """Forget every state, live or loaded."""
        self._live = {}
        self._loaded = {}

    def saved(self) -> dict[int, dict[str, Tensor]]:
        """Every state as plain CPU tensors: the live ones, and the loaded ones not placed yet."""
        out: dict[int, dict[str, Tensor]] = {i: s.state_dict() for i, s in self._live.items()}
        out.update({i: dict(s) for i, s in self._loaded.items() if i not in out})
        return out

    def identity(self) -> dict[str, Any]:
        """What the states depend on (the rule's identity)."""
        return self.rule.identity()

    def load(self, entry: Mapping[str, Any], states: Mapping[Any, Mapping[str, Tensor]]) -> bool:
        """Take ``states`` (by optimizer index) when ``entry`` was saved with this rule's identity, else warn once
        and start fresh. Returns whether they were taken."""
        self.reset()
        saved = saved_identity(entry)
        if saved != self.identity():
            self.warn_unusable(f"its clipping state was saved with {spell(saved)}")
            return False
        self._loaded = {int(i): s for i, s in states.items()}
        return True

    def warn_unusable(self, why: str) -> None:
        """The one warning about a saved state that is not resumed."""
        if not self.warn:
            return
        keys = " and ".join(self.identity())
        warnings.warn(
            f"{self.owner} has {spell(self.identity())}, but {why}. The rule's state depends on {keys}, so it"
            f" starts from a fresh state (the threshold is rebuilt from the next steps). Resume with the saved {keys}"
            " to keep it.",
            UserWarning,
            stacklevel=3,
        )
