"""``UpdateSparsityMonitor``: the update sparsity of every optimizer, logged for runs with or without clipping."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_clip import _lightning as _L
from lightning_clip._validation import check_flag, check_str
from lightning_clip.dashboard import (
    Layout,
    metric_tag,
    optimizer_names,
    per_optimizer_layout,
    sparsity_layout,
    write_layout,
)
from lightning_clip.sparsity import DEFAULT_TOL, RelativeTo, UpdateSparsityTracker, check_relative_to, check_tol

if TYPE_CHECKING:
    import lightning.pytorch as pl

__all__ = ["SPARSITY_METRICS", "UpdateSparsityMonitor"]

#: The sparsity metrics, with what they mean (``tol`` and ``lr_g`` as in :mod:`lightning_clip.sparsity`).
SPARSITY_METRICS: dict[str, str] = {
    "update_sparsity": "fraction of the entries (with a gradient) whose update this step was <= tol * lr_g",
    "update_sparsity_cumulative": "fraction of the entries whose movement since the last log was <= tol * sum(lr_g)",
}


def log_values(
    trainer: pl.Trainer,
    values: dict[str, float | Tensor],
    tag: Callable[[str], str],
    step: int,
    sink: dict[str, float],
    *,
    keep_nan: bool = True,
) -> dict[str, float]:
    """Write ``values`` (floats, or 0-d device tensors read back in one host sync) to every logger of ``trainer`` at
    ``step`` under ``tag(key)``, straight to the loggers (as ``LearningRateMonitor`` does: an optimizer that did not
    step leaves no stale value behind); ``sink`` gets them too. ``keep_nan=False`` drops the ``nan`` ones."""
    tensors = [v for v in values.values() if isinstance(v, Tensor)]
    read = iter(torch.stack([v.to(torch.float32).to(tensors[0].device) for v in tensors]).tolist() if tensors else [])
    host = {k: next(read) if isinstance(v, Tensor) else float(v) for k, v in values.items()}
    metrics = {tag(k): v for k, v in host.items() if keep_nan or v == v}
    sink.update(metrics)
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)
    return metrics


class SparsityLogging:
    """The per-optimizer trackers of a callback and their logging (shared by both callbacks of the package).

    On a logging step, :meth:`before_step` arms the optimizer's tracker (a copy of the weights) and the tracker's
    post-hook logs the values at the step number of that batch; :meth:`end_batch` drops whatever is left, so the
    copy lives only from the hook to the end of the step. Other steps only add the learning rates to the cumulative
    window's sums (when enabled): no device work, no allocation, no host synchronisation.
    """

    def __init__(self, tol: float, relative_to: RelativeTo, cumulative: bool) -> None:
        self.tol = tol
        self.relative_to = relative_to
        self.cumulative = cumulative
        self.trackers: dict[int, UpdateSparsityTracker] = {}

    def tracker(self, index: int, optimizer: Optimizer) -> UpdateSparsityTracker:
        tracker = self.trackers.get(index)
        if tracker is None or tracker.optimizer is not optimizer:
            if tracker is not None:
                tracker.close()
            tracker = UpdateSparsityTracker(optimizer, self.tol, self.relative_to, self.cumulative)
            self.trackers[index] = tracker
        return tracker

    def start(self, trainer: pl.Trainer) -> None:
        """Create the trackers and, with ``cumulative``, copy the weights that start the first window."""
        for index, opt in enumerate(trainer.optimizers):
            tracker = self.tracker(index, opt)
            if self.cumulative:
                tracker.start_window()

    def before_step(
        self, index: int, optimizer: Optimizer, *, logging: bool, write: Callable[[int, dict[str, Tensor]], None]
    ) -> None:
        """Count the step in the cumulative window; on a logging step, arm the tracker so that its post-hook hands
        the step's values (0-d device tensors) to ``write(index, values)``, the owner's logging path."""
        tracker = self.tracker(index, optimizer)
        if self.cumulative:
            tracker.count_step()
        if not logging:
            return

        def done(t: UpdateSparsityTracker) -> None:
            values = {"update_sparsity": t.pop(), "update_sparsity_cumulative": t.pop_cumulative()}
            found = {k: v for k, v in values.items() if v is not None}
            if found:
                write(index, found)

        tracker.arm(on_done=done)

    def end_batch(self) -> None:
        for tracker in self.trackers.values():
            tracker.disarm()

    def close(self) -> None:
        for tracker in self.trackers.values():
            tracker.close()
        self.trackers = {}


class UpdateSparsityMonitor(*_L.CALLBACK_BASES):
    r"""Log the update sparsity of every optimizer at the Trainer's ``log_every_n_steps``: which entries moved?

    At a logging step, right before ``optimizer.step()`` (``on_before_optimizer_step``), the parameters that hold a
    gradient are copied; a one-shot optimizer step post-hook compares them with the updated weights and logs::

        update_sparsity = #{i : |w_i(after) - w_i(before)| <= tol * lr_g} / #{i}

    over all the optimizer's parameters (weighted by size), ``lr_g`` being the learning rate of the entry's group
    (see :mod:`lightning_clip.sparsity` for the definition, the ``"rms"`` alternative and why ``tol = 0.1``). The
    copy is freed at the end of the step: other steps allocate nothing, run no hook and make no host
    synchronisation. A logging step costs one copy of the weights, one comparison pass and one host sync.

    With ``cumulative=True`` it also logs ``update_sparsity_cumulative``, the fraction of entries whose total
    movement since the previous log is at most ``tol`` times the sum of their group's learning rates over those
    steps. That holds **one extra copy of the weights for the whole run** (the weights at the last log).

    For a run with :class:`~lightning_clip.AdaptiveGradientClipping`, use its own sparsity logging instead
    (``log_sparsity=True``, the default), which logs under its prefix.

    Metrics: ``{log_prefix}/update_sparsity`` and ``{log_prefix}/update_sparsity_cumulative``; with several
    optimizers ``{log_prefix}/{OptimizerName}/update_sparsity`` (``Adam``, ``SGD``, ``Adam-1``, ...).

    Args:
        tol: an update is negligible when ``|dw| <= tol * lr_g`` (or ``tol * rms(dw)``), ``>= 0``.
        relative_to: ``"lr"`` (units of the group's learning rate) or ``"rms"`` (scale-free: units of the
            root-mean-square update of the optimizer; for optimizers whose step is not normalised, like SGD).
        cumulative: also log the cumulative sparsity over the logging window (holds one copy of the weights).
        log_prefix: the prefix of the metric names.
        dashboard: write the custom-scalars layout of the run to the TensorBoard loggers (once per run).

    Raises:
        TypeError: naming the argument and its value for a value of the wrong kind (a ``bool`` or a string as
            ``tol``, a non-bool flag, a non-string ``log_prefix``).
        ValueError: naming the argument and its value for a negative or non-finite ``tol``, an unknown
            ``relative_to`` or an empty ``log_prefix``.
    """

    def __init__(
        self,
        tol: float = DEFAULT_TOL,
        relative_to: RelativeTo = "lr",
        cumulative: bool = False,
        log_prefix: str = "sparsity",
        dashboard: bool = True,
    ) -> None:
        super().__init__()
        self.tol = check_tol(tol)
        self.relative_to = check_relative_to(relative_to)
        self.cumulative = check_flag("cumulative", cumulative)
        self.log_prefix = check_str("log_prefix", log_prefix)
        self.dashboard = check_flag("dashboard", dashboard)
        self._sparsity = SparsityLogging(self.tol, self.relative_to, self.cumulative)
        self._names: list[str] = []
        #: the values written at the last logging step, by metric name
        self.last_metrics: dict[str, float] = {}

    def metric_name(self, metric: str, index: int = 0) -> str:
        """The logged name of ``metric`` (a key of :data:`SPARSITY_METRICS`) for the optimizer at ``index``."""
        return metric_tag(self.log_prefix, self._names, index, metric)

    def dashboard_layout(self, trainer: pl.Trainer) -> Layout:
        """This callback's part of the run's custom-scalars layout."""
        if not self.dashboard:
            return {}
        return per_optimizer_layout(
            self.log_prefix,
            trainer.optimizers,
            lambda name, category: sparsity_layout(name, category, cumulative=self.cumulative),
        )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._names = optimizer_names(trainer.optimizers)
        if self.dashboard:
            write_layout(trainer)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._sparsity.start(trainer)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        optimizer = getattr(optimizer, "optimizer", optimizer)
        index = next((i for i, o in enumerate(trainer.optimizers) if o is optimizer), 0)
        step, logging = _L.batches_that_stepped(trainer), _L.should_update_logs(trainer)

        def write(i: int, values: dict[str, Tensor]) -> None:
            log_values(trainer, values, lambda k: self.metric_name(k, i), step, self.last_metrics, keep_nan=False)

        self._sparsity.before_step(index, optimizer, logging=logging, write=write)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._sparsity.end_batch()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._sparsity.close()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._sparsity.close()
