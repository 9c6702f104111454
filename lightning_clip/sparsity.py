r"""Update sparsity of any torch optimizer, as pure torch: which parameter entries did a step (or a window) move?

Nothing here imports Lightning. A measurement holds a copy of the weights only while it is armed: the per-step
measurement copies the parameters right before ``optimizer.step()`` and compares them in a one-shot
``register_step_post_hook`` that frees the copy (the hook is removed by :meth:`UpdateSparsityTracker.disarm`, which
the callbacks call at the end of the batch), so steps that are not measured allocate nothing and run no hook.

**Definition.** For an optimizer with parameter groups ``g`` (learning rate ``lr_g``) and an update
``dw_i = w_i(after) - w_i(before)`` of entry ``i`` of a parameter in group ``g``, the entry's update is
*negligible* when::

    |dw_i| <= tol * lr_g                       (relative_to="lr", the default)
    |dw_i| <= tol * rms(dw)                    (relative_to="rms": rms over every measured entry of the optimizer)

and the update sparsity of the step is the size-weighted fraction over all the measured parameters::

    sparsity = #{i : dw_i negligible} / #{i}

Only the parameters that hold a gradient when the step runs are measured (torch optimizers skip the others, so
counting them would inflate the fraction with entries that could not move).

**Why units of ``lr`` and why ``tol = 0.1``.** The optimizers this is meant for take per-entry steps whose natural
size is ``lr``: Smoothed SignSGD moves an entry by ``lr * |M|`` with ``|M| <= 1``, Adam by
``lr * |m_hat / (sqrt(v_hat) + eps)|``, which is about ``lr`` for a gradient of steady sign and at most
``(1 - beta1) / sqrt(1 - beta2)`` times ``lr``. An entry whose recent gradient signs agree therefore moves by
``~lr``; one whose sign alternates cancels in the momentum: with ``M_t = beta M_(t-1) + (1 - beta) s_t`` and
``s_t = (-1)^t`` the momentum settles at ``|M| = (1 - beta) / (1 + beta)``, ``0.053`` for ``beta = 0.9`` (Adam's
``beta1``, the default of both), and random signs give ``|M|`` of typical size ``sqrt((1 - beta) / (1 + beta))
= 0.23``. ``tol = 0.1``, a tenth of a full step, sits between the two: it counts a cancelled entry as still and
an entry that moves with a persistent sign (``|M| >= 0.19`` from its second step on) as moving, without depending
on the scale of the weights or of the gradients. With ``beta >= 0.82`` the alternating fixed point is below 0.1.

For optimizers whose step is not normalised (plain SGD: ``dw = lr * g``), ``|dw| / lr`` is the gradient itself,
so the lr rule reads "the gradient (or SGD's momentum) is below ``tol``"; use ``relative_to="rms"`` there, which is
scale-free: an entry is negligible when it moved by less than ``tol`` times the root-mean-square update of the
optimizer. A group at ``lr = 0`` counts, under the lr rule, exactly the entries that did not move at all.

**Cumulative sparsity** (opt-in, it holds one extra copy of the weights for the whole window): with
``W_0`` the weights at the start of the window (the previous measurement) and ``S_g = sum of lr_g`` over the
optimizer steps of the window, an entry is negligible over the window when::

    |W_i - W_0,i| <= tol * S_g                 (relative_to="lr")
    |W_i - W_0,i| <= tol * rms(W - W_0)        (relative_to="rms")

An entry whose every step of the window was negligible is negligible over the window too (triangle inequality),
and an entry that oscillates (moves back and forth) is negligible over the window even when single steps are not.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_clip._validation import check_choice, check_flag, check_real
from lightning_clip.functional import real_view

__all__ = [
    "DEFAULT_TOL",
    "RelativeTo",
    "UpdateSparsityTracker",
    "negligible_count",
    "update_sparsity",
]

RelativeTo = Literal["lr", "rms"]
_RELATIVE = ("lr", "rms")

#: Default tolerance: an update is negligible below a tenth of ``lr`` (see the module docstring for the reasoning).
DEFAULT_TOL = 0.1


def _check_tol(tol: float, *, name: str = "tol") -> float:
    """``tol`` as a plain float: finite and ``>= 0`` (``TypeError``/``ValueError`` naming ``name`` otherwise)."""
    return check_real(name, tol, low=0.0)  # type: ignore[return-value]


def _check_relative_to(relative_to: str, *, name: str = "relative_to") -> RelativeTo:
    """``"lr"`` or ``"rms"`` (``TypeError``/``ValueError`` naming ``name`` otherwise)."""
    return check_choice(name, relative_to, _RELATIVE)  # type: ignore[return-value]


def negligible_count(
    deltas: Sequence[Tensor], bounds: Sequence[float | Tensor] | None, *, tol: float, relative_to: RelativeTo = "lr"
) -> tuple[Tensor, int]:
    r"""Count the entries of ``deltas`` whose magnitude is negligible, without a host synchronisation.

    ``|d_i| <= tol * b`` with ``b = bounds[k]`` for every entry of ``deltas[k]`` (``relative_to="lr"``), or
    ``|d_i| <= tol * sqrt(sum_k ||d_k||^2 / N)`` over all ``N`` entries (``relative_to="rms"``; ``bounds`` unused).

    Args:
        deltas: the updates (any float or complex dtype; compared in float32 at least; a complex update by its
            modulus ``|d|``). Left unchanged.
        bounds: per tensor, the unit of the lr rule (the group's lr, or a sum of lrs for a window).
        tol: the tolerance, ``>= 0``.
        relative_to: ``"lr"`` or ``"rms"``.

    Returns:
        ``(count, total)``: a 0-d int64 tensor on the device of ``deltas[0]``, and the number of entries.
    """
    tol = _check_tol(tol)
    relative_to = _check_relative_to(relative_to)
    total = sum(d.numel() for d in deltas)
    if total == 0:
        return torch.zeros((), dtype=torch.int64), 0
    device = deltas[0].device
    if relative_to == "rms":
        reals = [real_view(d) for d in deltas]  # a complex update counts by |d|
        dtype = torch.float64 if any(d.dtype == torch.float64 for d in reals) else torch.float32
        sq = torch.stack([n.to(device) for n in torch._foreach_norm(reals, 2.0, dtype=dtype)]).square().sum()
        limit = torch.sqrt(sq / total) * tol
        limits: list[float | Tensor] = [limit] * len(deltas)
    else:
        if bounds is None or len(bounds) != len(deltas):
            raise ValueError("relative_to='lr' needs one bound per delta tensor")
        limits = [b * tol if isinstance(b, Tensor) else float(b) * tol for b in bounds]
    counts = []
    for d, lim in zip(deltas, limits):
        mag = d.abs() if d.dtype in (torch.float32, torch.float64) or d.is_complex() else d.float().abs()
        lim_t = lim.to(device=d.device, dtype=mag.dtype) if isinstance(lim, Tensor) else lim
        counts.append(mag.le_(lim_t).sum().to(device))
    return torch.stack(counts).sum(), total


def update_sparsity(
    before: Sequence[Tensor],
    after: Sequence[Tensor],
    bounds: Sequence[float | Tensor] | None = None,
    *,
    tol: float = DEFAULT_TOL,
    relative_to: RelativeTo = "lr",
) -> Tensor:
    r"""Fraction of entries whose update ``after - before`` is negligible, weighted by size (a 0-d float tensor).

    ``sum_k #{i : |after_k,i - before_k,i| <= tol * bounds[k]} / sum_k numel_k`` for ``relative_to="lr"``;
    see :func:`negligible_count` for ``"rms"``. ``nan`` when there is no entry.

    Args:
        before: the weights before the update.
        after: the weights after it (same shapes).
        bounds: per tensor, the unit of the lr rule (usually its group's learning rate).
        tol: the tolerance (default :data:`DEFAULT_TOL`).
        relative_to: ``"lr"`` or ``"rms"``.
    """
    deltas = [a.detach() - b.detach() for a, b in zip(after, before)]
    count, total = negligible_count(deltas, bounds, tol=tol, relative_to=relative_to)
    if total == 0:
        return torch.tensor(float("nan"))
    return count.to(torch.float64).div(total).to(torch.float32)


def _lr_of(group: dict) -> float | Tensor:
    lr = group.get("lr", 0.0)
    return lr.detach().clone() if isinstance(lr, Tensor) else float(lr)


class UpdateSparsityTracker:
    r"""Measures the update sparsity of one optimizer on the steps it is armed for.

    * :meth:`arm` (call it right before ``optimizer.step()`` on a measured step) copies the parameters that hold a
      gradient and registers a one-shot step post-hook; the hook computes the sparsity of that step (a device
      tensor, read with :meth:`pop`) and frees the copy; :meth:`disarm` removes the hook. A step that is not armed
      costs nothing.
    * With ``cumulative=True``, :meth:`start_window` copies every trainable parameter of the optimizer (one copy of
      the weights, held for the whole window), :meth:`count_step` adds the step's learning rates to the window's
      ``S_g`` (Python floats, no device work), and a measured step also measures the window (:meth:`pop_cumulative`)
      and starts the next one (:meth:`measure_window` does it by hand).

    Args:
        optimizer: any ``torch.optim.Optimizer``.
        tol: the tolerance of the negligible rule (module docstring), ``>= 0``.
        relative_to: ``"lr"`` (``|dw| <= tol * lr_g``) or ``"rms"`` (``|dw| <= tol * rms(dw)``).
        cumulative: also measure the sparsity of the total movement over a window.

    Complex parameters are measured by the modulus of their update, ``|dw|``.

    Raises:
        TypeError: naming the argument and its value for an ``optimizer`` that is not a torch optimizer, a ``tol``
            that is not a number (a ``bool``, a string), a non-string ``relative_to`` or a non-bool ``cumulative``.
        ValueError: naming the argument and its value for a negative or non-finite ``tol`` or an unknown
            ``relative_to``.
    """

    def __init__(
        self, optimizer: Optimizer, tol: float = DEFAULT_TOL, relative_to: RelativeTo = "lr", cumulative: bool = False
    ) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"Invalid optimizer: {optimizer!r}; expected a torch.optim.Optimizer")
        self.optimizer = optimizer
        self.tol = _check_tol(tol)
        self.relative_to = _check_relative_to(relative_to)
        self.cumulative = check_flag("cumulative", cumulative)
        self._snapshot: list[tuple[Tensor, Tensor, float | Tensor]] | None = None
        self._handle = None
        self._on_done: Callable[[UpdateSparsityTracker], None] | None = None
        self._result: Tensor | None = None
        self._result_cumulative: Tensor | None = None
        self._window: list[tuple[Tensor, Tensor, int]] | None = None
        self._lr_sums: list[float | Tensor] = []

    # ------------------------------------------------------------- per step
    @property
    def armed(self) -> bool:
        """Whether a copy for the next step is held (between :meth:`arm` and the step's post-hook)."""
        return self._snapshot is not None

    @property
    def held_bytes(self) -> int:
        """Bytes of parameter copies held right now (the per-step copy plus the window's)."""
        held = 0
        for entries in (self._snapshot or [], self._window or []):
            held += sum(copy.numel() * copy.element_size() for _, copy, _ in entries)
        return held

    def arm(self, on_done: Callable[[UpdateSparsityTracker], None] | None = None) -> None:
        """Copy the parameters that hold a gradient and measure the next ``optimizer.step()``.

        Args:
            on_done: called with the tracker from the step's post-hook, once the results are ready
                (:meth:`pop`, :meth:`pop_cumulative`).
        """
        self.disarm()
        snapshot = []
        for group in self.optimizer.param_groups:
            lr = _lr_of(group)
            for p in group["params"]:
                if p.grad is not None:
                    snapshot.append((p, p.detach().clone(), lr))
        if not snapshot:
            return
        self._snapshot = snapshot
        self._on_done = on_done
        self._handle = self.optimizer.register_step_post_hook(self._after_step)

    def disarm(self) -> None:
        """Remove the post-hook and drop a pending copy (a step that did not run, e.g. skipped by a ``GradScaler``).

        The post-hook cannot remove itself (torch iterates over the hooks while it runs), so after a measured step
        it stays registered, doing nothing, until this is called (the callbacks call it at the end of the batch).
        """
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self._snapshot = None
        self._on_done = None

    def _after_step(self, optimizer: Optimizer, args: object, kwargs: object) -> None:
        snapshot, on_done = self._snapshot, self._on_done
        self._snapshot, self._on_done = None, None
        if not snapshot:
            return
        entries = [(p, copy, lr) for p, copy, lr in snapshot if p.grad is not None]
        del snapshot
        if entries:
            deltas = [torch.sub(p.detach(), copy, out=copy) for p, copy, _ in entries]  # in place: no new copy
            count, total = negligible_count(
                deltas, [lr for _, _, lr in entries], tol=self.tol, relative_to=self.relative_to
            )
            self._result = count.to(torch.float64).div(total).to(torch.float32)
            del deltas, entries
        if self.cumulative:
            self._result_cumulative = self.measure_window()
        if on_done is not None:
            on_done(self)

    def pop(self) -> Tensor | None:
        """The sparsity of the last measured step (a 0-d device tensor), once; ``None`` if none is pending."""
        result, self._result = self._result, None
        return result

    def pop_cumulative(self) -> Tensor | None:
        """The cumulative sparsity measured with the last measured step (``cumulative=True``), once, or ``None``."""
        result, self._result_cumulative = self._result_cumulative, None
        return result

    # --------------------------------------------------------- cumulative
    def start_window(self) -> None:
        """Copy every trainable parameter of the optimizer (reusing the previous copy's memory) and reset ``S_g``."""
        params = [(p, gi) for gi, g in enumerate(self.optimizer.param_groups) for p in g["params"] if p.requires_grad]
        old = self._window
        if old is not None and len(old) == len(params) and all(a is p for (a, _, _), (p, _) in zip(old, params)):
            for p, copy, _ in old:
                copy.copy_(p.detach())
        else:
            self._window = [(p, p.detach().clone(), gi) for p, gi in params]
        self._lr_sums = [0.0 for _ in self.optimizer.param_groups]

    def count_step(self) -> None:
        """Add this step's learning rates to the window's ``S_g`` (host floats; no device work for float lrs)."""
        if self._window is None:
            return
        groups = self.optimizer.param_groups
        if len(groups) != len(self._lr_sums):
            self._lr_sums = [0.0 for _ in groups]
        for i, g in enumerate(groups):
            self._lr_sums[i] = self._lr_sums[i] + g.get("lr", 0.0)

    def measure_window(self) -> Tensor | None:
        """The sparsity of the movement since the window started, then start the next one (``None`` if none)."""
        window = self._window
        if window is None or not window:
            self.start_window()
            return None
        deltas = [torch.sub(p.detach(), copy, out=copy) for p, copy, _ in window]  # in place: no second copy
        bounds = [self._lr_sums[gi] if gi < len(self._lr_sums) else 0.0 for _, _, gi in window]
        count, total = negligible_count(deltas, bounds, tol=self.tol, relative_to=self.relative_to)
        self.start_window()  # copies the weights back into the same buffers
        return count.to(torch.float64).div(total).to(torch.float32)

    def close(self) -> None:
        """Free every copy and remove the hook."""
        self.disarm()
        self._window = None
        self._result = None
        self._result_cumulative = None
        self._lr_sums = []
