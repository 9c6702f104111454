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

**Bounded memory (sampling).** A measurement copies at most ``max_entries`` entries per optimizer (default
:data:`DEFAULT_MAX_ENTRIES` ``= 2**16``), whatever the size of the model. When the optimizer's ``N`` trainable
entries (on this rank: a DTensor's local shard) are at most ``max_entries``, every entry is measured exactly.
Otherwise each tensor ``i`` of ``n_i`` entries gets a fixed random sample (drawn once, with replacement, from a
generator seeded by the tensor's position: the same on every rank) of ``k_i = ceil(max_entries * n_i / N)``
entries (every entry when ``k_i >= n_i``), and the fraction is the stratified estimate
``sum_i n_i * (c_i / k_i) / sum_i n_i`` (``c_i`` negligible entries among the ``k_i``; under ``"rms"`` the rms is
estimated the same way). It is unbiased, and its standard error is at most ``1 / (2 sqrt(max_entries))``
(``0.002`` at the default): ``Var = sum_i (n_i / N)^2 p_i (1 - p_i) / k_i <= 1 / (4 max_entries)``. Extra memory
of a logging step: the sampled values (``(max_entries + T) * element_size`` for ``T`` tensors) and their indices
(8 bytes each, held for the run), and the temporaries of the comparison (one sampled delta and its mask): about
1.2 MiB for float32 weights at the default, independent of the model's size; ``max_entries=None`` measures every
entry (one full copy of the weights).

**Sharded parameters** (DTensors: FSDP2, tensor parallel): each rank measures its local shards, and the counts are
summed over the ranks holding the other shards (:func:`lightning_clip.norms.sum_over_shards`), so every rank
logs the fraction of the whole model.

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

from lightning_clip._validation import check_choice, check_flag, check_int, check_real
from lightning_clip.norms import local_tensor, real_view, sum_over_shards

__all__ = [
    "DEFAULT_MAX_ENTRIES",
    "DEFAULT_TOL",
    "RelativeTo",
    "UpdateSparsityTracker",
    "check_relative_to",
    "check_tol",
    "negligible_count",
    "update_sparsity",
]

RelativeTo = Literal["lr", "rms"]
_RELATIVE = ("lr", "rms")

#: Default tolerance: an update is negligible below a tenth of ``lr`` (see the module docstring for the reasoning).
DEFAULT_TOL = 0.1

#: Default bound on the entries a measurement copies per optimizer (module docstring: standard error <= 0.002).
DEFAULT_MAX_ENTRIES = 2**16


def check_tol(tol: float, *, name: str = "tol") -> float:
    """``tol`` as a plain float: finite and ``>= 0`` (``TypeError``/``ValueError`` naming ``name`` otherwise)."""
    return check_real(name, tol, low=0.0)  # type: ignore[return-value]


def check_relative_to(relative_to: str, *, name: str = "relative_to") -> RelativeTo:
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
    tol = check_tol(tol)
    relative_to = check_relative_to(relative_to)
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


class _Sampled:
    """What a measurement reads of one parameter: all of its (local) entries, or a fixed random sample of them.

    ``values(p)`` returns the measured entries as a flat tensor: a copy when sampled (``index`` set), the local
    tensor's flat view (no copy) otherwise; ``weight = n / k`` is the number of entries each measured one stands for.
    """

    __slots__ = ("index", "numel", "weight")

    def __init__(self, index: Tensor | None, numel: int) -> None:
        self.index = index
        self.numel = numel
        self.weight = 1.0 if index is None else numel / index.numel()

    def values(self, param: Tensor) -> Tensor:
        flat = local_tensor(param.detach()).reshape(-1)
        return flat if self.index is None else flat[self.index]

    @property
    def index_bytes(self) -> int:
        return 0 if self.index is None else self.index.numel() * self.index.element_size()


def _sample_plan(params: Sequence[Tensor], max_entries: int | None) -> dict[int, _Sampled]:
    """``{id(p): _Sampled}``: every entry when the (local) entries number at most ``max_entries``, else
    ``k_i = ceil(max_entries * n_i / N)`` entries of tensor ``i``, drawn with replacement from a generator seeded
    with ``i`` (the same on every rank), or every entry when ``k_i >= n_i``."""
    numels = [local_tensor(p).numel() for p in params]
    total = sum(numels)
    plan = {}
    for i, (p, n) in enumerate(zip(params, numels)):
        k = n if max_entries is None or total <= max_entries else -(-max_entries * n // total)
        if k >= n:
            plan[id(p)] = _Sampled(None, n)
            continue
        gen = torch.Generator().manual_seed(i)
        index = torch.randint(0, n, (k,), generator=gen).to(local_tensor(p).device)
        plan[id(p)] = _Sampled(index, n)
    return plan


def _measure(
    params: Sequence[Tensor],
    deltas: Sequence[Tensor],
    samples: Sequence[_Sampled],
    bounds: Sequence[float | Tensor],
    *,
    tol: float,
    relative_to: RelativeTo,
) -> Tensor:
    """The (estimated) negligible fraction of the whole model's entries from the measured ``deltas`` (flat), each
    standing for ``weight`` entries, summed over the shards of sharded ``params`` (module docstring)."""
    device = deltas[0].device
    dtype = torch.float64
    numels = torch.tensor([float(s.numel) for s in samples], dtype=dtype, device=device)
    weights = torch.tensor([s.weight for s in samples], dtype=dtype, device=device)
    if relative_to == "rms":
        reals = [real_view(d) for d in deltas]
        acc = torch.float64 if any(d.dtype == torch.float64 for d in reals) else torch.float32
        squares = torch.stack([n.to(device).to(dtype) for n in torch._foreach_norm(reals, 2.0, dtype=acc)]).square()
        rows = sum_over_shards(params, torch.stack([squares * weights, numels], dim=1)).sum(0)
        limit = torch.sqrt(rows[0] / rows[1].clamp_min(1)) * tol
        limits: list[float | Tensor] = [limit] * len(deltas)
    else:
        limits = [b * tol if isinstance(b, Tensor) else float(b) * tol for b in bounds]
    counts = []
    for d, lim in zip(deltas, limits):
        mag = d.abs() if d.dtype in (torch.float32, torch.float64) or d.is_complex() else d.float().abs()
        lim_t = lim.to(device=d.device, dtype=mag.dtype) if isinstance(lim, Tensor) else lim
        counts.append(mag.le_(lim_t).sum().to(device))
    counts_t = torch.stack(counts).to(dtype)
    rows = sum_over_shards(params, torch.stack([counts_t * weights, numels], dim=1)).sum(0)
    return (rows[0] / rows[1]).to(torch.float32)


class UpdateSparsityTracker:
    r"""Measures the update sparsity of one optimizer on the steps it is armed for.

    * :meth:`arm` (call it right before ``optimizer.step()`` on a measured step) copies the measured entries of the
      parameters that hold a gradient (all of them, or a bounded sample: ``max_entries``) and registers a one-shot
      step post-hook; the hook computes the sparsity of that step (a device tensor, read with :meth:`pop`) and
      frees the copy; :meth:`disarm` removes the hook. A step that is not armed costs nothing.
    * With ``cumulative=True``, :meth:`start_window` copies the measured entries of every trainable parameter of
      the optimizer (held for the whole window), :meth:`count_step` adds the step's learning rates to the window's
      ``S_g`` (Python floats, no device work), and a measured step also measures the window (:meth:`pop_cumulative`)
      and starts the next one (:meth:`measure_window` does it by hand).

    Args:
        optimizer: any ``torch.optim.Optimizer``.
        tol: the tolerance of the negligible rule (module docstring), ``>= 0``.
        relative_to: ``"lr"`` (``|dw| <= tol * lr_g``) or ``"rms"`` (``|dw| <= tol * rms(dw)``).
        cumulative: also measure the sparsity of the total movement over a window.
        max_entries: the most entries a measurement copies (an integer ``>= 1``; module docstring: exact below it,
            a stratified random sample above it, standard error ``<= 1 / (2 sqrt(max_entries))``); ``None``: every
            entry (one copy of the weights).

    Complex parameters are measured by the modulus of their update, ``|dw|``. With DTensor parameters, every rank
    of their meshes must measure the same steps (the counts are all-reduced).

    Raises:
        TypeError: naming the argument and its value for an ``optimizer`` that is not a torch optimizer, a ``tol``
            that is not a number (a ``bool``, a string), a non-string ``relative_to`` or a non-bool ``cumulative``.
        ValueError: naming the argument and its value for a negative or non-finite ``tol``, an unknown
            ``relative_to`` or a ``max_entries < 1``.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        tol: float = DEFAULT_TOL,
        relative_to: RelativeTo = "lr",
        cumulative: bool = False,
        max_entries: int | None = DEFAULT_MAX_ENTRIES,
    ) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"Invalid optimizer: {optimizer!r}; expected a torch.optim.Optimizer")
        self.optimizer = optimizer
        self.tol = check_tol(tol)
        self.relative_to = check_relative_to(relative_to)
        self.cumulative = check_flag("cumulative", cumulative)
        self.max_entries = check_int("max_entries", max_entries, low=1, optional=True)
        self._plan: dict[int, _Sampled] | None = None
        self._snapshot: list[tuple[Tensor, Tensor, float | Tensor]] | None = None
        self._handle = None
        self._on_done: Callable[[UpdateSparsityTracker], None] | None = None
        self._result: Tensor | None = None
        self._result_cumulative: Tensor | None = None
        self._window: list[tuple[Tensor, Tensor, int]] | None = None
        self._lr_sums: list[float | Tensor] = []

    def _sampled(self, param: Tensor) -> _Sampled:
        """The measurement plan of ``param``, made once for every parameter of the optimizer (sampled entries)."""
        plan = self._plan
        if plan is None or id(param) not in plan:
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            plan = self._plan = _sample_plan(params, self.max_entries)
        return plan[id(param)]

    # ------------------------------------------------------------- per step
    @property
    def armed(self) -> bool:
        """Whether a copy for the next step is held (between :meth:`arm` and the step's post-hook)."""
        return self._snapshot is not None

    @property
    def held_bytes(self) -> int:
        """Bytes of parameter copies held right now (the per-step copy plus the window's; sample indices aside:
        :attr:`index_bytes`)."""
        held = 0
        for entries in (self._snapshot or [], self._window or []):
            held += sum(copy.numel() * copy.element_size() for _, copy, _ in entries)
        return held

    @property
    def index_bytes(self) -> int:
        """Bytes of the sample indices (held for the run once a measurement was made; ``0`` when exact)."""
        return sum(s.index_bytes for s in (self._plan or {}).values())

    def arm(self, on_done: Callable[[UpdateSparsityTracker], None] | None = None) -> None:
        """Copy the measured entries of the parameters that hold a gradient and measure the next ``optimizer.step()``.

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
                    snapshot.append((p, self._sampled(p).values(p).clone(), lr))
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

    def _deltas(self, entries: Sequence[tuple[Tensor, Tensor, object]]) -> list[Tensor]:
        """``w(now) - w(copy)`` of the measured entries, written into the copies (no new full-size tensor)."""
        out = []
        for p, copy, _ in entries:
            sampled = self._sampled(p)
            now = sampled.values(p)
            out.append(torch.sub(now, copy, out=copy))
        return out

    def _after_step(self, optimizer: Optimizer, args: object, kwargs: object) -> None:
        snapshot, on_done = self._snapshot, self._on_done
        self._snapshot, self._on_done = None, None
        if not snapshot:
            return
        entries = [(p, copy, lr) for p, copy, lr in snapshot if p.grad is not None]
        del snapshot
        if entries:
            deltas = self._deltas(entries)
            params = [p for p, _, _ in entries]
            self._result = _measure(
                params,
                deltas,
                [self._sampled(p) for p in params],
                [lr for _, _, lr in entries],
                tol=self.tol,
                relative_to=self.relative_to,
            )
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
        """Copy the measured entries of every trainable parameter (reusing the previous copy's memory); reset
        ``S_g``."""
        params = [(p, gi) for gi, g in enumerate(self.optimizer.param_groups) for p in g["params"] if p.requires_grad]
        old = self._window
        if old is not None and len(old) == len(params) and all(a is p for (a, _, _), (p, _) in zip(old, params)):
            for p, copy, _ in old:
                copy.copy_(self._sampled(p).values(p))
        else:
            self._window = [(p, self._sampled(p).values(p).clone(), gi) for p, gi in params]
        self._lr_sums = [0.0 for _ in self.optimizer.param_groups]

    def count_step(self) -> None:
        """Add this step's learning rates to the window's ``S_g`` (host floats; no device work for float lrs)."""
        if self._window is None:
            return
        groups = self.optimizer.param_groups
        # a group added mid-window (gradual unfreezing) starts its sum at 0; the others keep theirs (the new group's
        # parameters are not in this window's copy: they are measured from the next window on)
        self._lr_sums += [0.0] * (len(groups) - len(self._lr_sums))
        for i, g in enumerate(groups):
            self._lr_sums[i] = self._lr_sums[i] + g.get("lr", 0.0)

    def measure_window(self) -> Tensor | None:
        """The sparsity of the movement since the window started, then start the next one (``None`` if none)."""
        window = self._window
        if window is None or not window:
            self.start_window()
            return None
        deltas = self._deltas(window)  # in place: no second copy
        bounds = [self._lr_sums[gi] if gi < len(self._lr_sums) else 0.0 for _, _, gi in window]
        params = [p for p, _, _ in window]
        result = _measure(
            params, deltas, [self._sampled(p) for p in params], bounds, tol=self.tol, relative_to=self.relative_to
        )
        self.start_window()  # copies the weights back into the same buffers
        return result

    def close(self) -> None:
        """Free every copy and remove the hook."""
        self.disarm()
        self._window = None
        self._result = None
        self._result_cumulative = None
        self._lr_sums = []
