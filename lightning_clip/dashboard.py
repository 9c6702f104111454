"""The TensorBoard dashboard: one custom-scalars layout per run, merged from every callback that logs.

TensorBoard's custom_scalars plugin reads, per run, the first layout written to the tag ``custom_scalars__config__``
(later ones are ignored). Several callbacks of this package may log into the same run, so each of them provides a
part (:meth:`dashboard_layout`) and :func:`write_layout` merges the parts of every callback of the Trainer and
writes the result once per run, to each ``TensorBoardLogger`` of the Trainer
(global rank 0 only). Other loggers (CSV, MLflow, ...) get the scalars as usual and no layout.

A layout part is ``{category: {chart title: [kind, tags]}}`` as ``SummaryWriter.add_custom_scalars`` takes it:
``kind`` ``"Multiline"`` (``tags`` are regular expressions, matched from the start of a tag: write them with
:func:`tag_regex`) or ``"Margin"`` (``tags`` are exactly ``[value, lower, upper]``).
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from torch import Tensor
from torch.optim import Optimizer

from lightning_clip import _lightning as _L

if TYPE_CHECKING:
    import lightning.pytorch as pl

__all__ = [
    "CONFIG_TAG",
    "Layout",
    "LayoutProvider",
    "clipping_layout",
    "log_histogram",
    "merge_layouts",
    "metric_tag",
    "optimizer_names",
    "per_optimizer_layout",
    "sparsity_layout",
    "tag_regex",
    "tensorboard_loggers",
    "write_layout",
]

#: The tag under which TensorBoard's custom_scalars plugin stores a run's layout.
CONFIG_TAG = "custom_scalars__config__"

Layout = dict[str, dict[str, list[Any]]]

# log_dir of every run a layout was written to, per logger (a run gets one layout, whatever writes first)
_WRITTEN: weakref.WeakKeyDictionary[object, set[str]] = weakref.WeakKeyDictionary()


@runtime_checkable
class LayoutProvider(Protocol):
    """A callback that contributes charts to the run's layout."""

    def dashboard_layout(self, trainer: pl.Trainer) -> Layout: ...


def optimizer_names(optimizers: Sequence[Optimizer]) -> list[str]:
    """``Adam``, ``SGD``, and ``Adam-1`` for a second Adam (the naming of ``LearningRateMonitor``)."""
    names: list[str] = []
    for opt in optimizers:
        base = type(opt).__name__
        count = sum(1 for n in names if n == base or n.startswith(f"{base}-"))
        names.append(base if count == 0 else f"{base}-{count}")
    return names


def metric_tag(prefix: str, names: Sequence[str], index: int, metric: str) -> str:
    """``{prefix}/{metric}`` with one optimizer, ``{prefix}/{names[index]}/{metric}`` with several."""
    if len(names) > 1:
        return f"{prefix}/{names[index]}/{metric}"
    return f"{prefix}/{metric}"


def tag_regex(tag: str) -> str:
    """A Multiline-chart pattern that matches exactly ``tag`` (the plugin matches patterns from the tag's start)."""
    return f"^{re.escape(tag)}$"


def clipping_layout(
    name: Callable[[str], str], category: str, *, mode: str, sparsity: bool, cumulative: bool
) -> Layout:
    """The charts of one optimizer of :class:`~lightning_clip.AdaptiveGradientClipping`.

    Args:
        name: maps a metric key (``"grad_norm"``) to its logged tag (``"clip/grad_norm"``).
        category: the section's title (the tag prefix, e.g. ``"clip"`` or ``"clip/Adam"``).
        mode: the clipping mode: in ``"value"`` mode the threshold bounds entries, not the norm, so it gets its
            own chart instead of sharing the norm's.
        sparsity: add the sparsity chart.
        cumulative: add the cumulative sparsity series to it.
    """
    m = lambda *keys: [tag_regex(name(k)) for k in keys]  # noqa: E731
    charts: dict[str, list[Any]] = {}
    if mode == "value":
        charts["gradient norm and its moving average"] = ["Multiline", m("grad_norm", "grad_norm_ema")]
        charts["per-entry bound clip_val"] = ["Multiline", m("threshold")]
    else:
        charts["gradient norm vs threshold"] = ["Multiline", m("grad_norm", "threshold", "grad_norm_ema")]
        charts["norm in the band [moving average, threshold]"] = [
            "Margin",
            [name("grad_norm"), name("grad_norm_ema"), name("threshold")],
        ]
    charts["clip coefficient and clipped fraction"] = ["Multiline", m("clip_coef", "clip_coef_min", "clipped_frac")]
    charts["non-finite steps"] = ["Multiline", m("nonfinite_steps")]
    if sparsity:
        keys = ("update_sparsity", "update_sparsity_cumulative") if cumulative else ("update_sparsity",)
        charts["update sparsity"] = ["Multiline", m(*keys)]
    return {category: charts}


def sparsity_layout(name: Callable[[str], str], category: str, *, cumulative: bool) -> Layout:
    """The chart of one optimizer of :class:`~lightning_clip.UpdateSparsityMonitor`."""
    keys = ("update_sparsity", "update_sparsity_cumulative") if cumulative else ("update_sparsity",)
    return {category: {"update sparsity": ["Multiline", [tag_regex(name(k)) for k in keys]]}}


def per_optimizer_layout(
    prefix: str, optimizers: Sequence[Optimizer], section: Callable[[Callable[[str], str], str], Layout]
) -> Layout:
    """One section per optimizer: ``section(name, category)`` with that optimizer's tag function and title."""
    names = optimizer_names(optimizers)
    layout: Layout = {}
    for index in range(len(names)):
        category = metric_tag(prefix, names, index, "").rstrip("/")
        layout.update(section(lambda key, i=index: metric_tag(prefix, names, i, key), category))
    return layout


def merge_layouts(parts: Iterable[Layout]) -> Layout:
    """Merge layout parts: categories with the same title share one section; a chart title seen twice keeps the first."""
    merged: Layout = {}
    for part in parts:
        for category, charts in part.items():
            section = merged.setdefault(category, {})
            for title, chart in charts.items():
                section.setdefault(title, chart)
    return merged


def tensorboard_loggers(trainer: pl.Trainer) -> list[Any]:
    """The Trainer's TensorBoard loggers (Lightning's and Fabric's, either namespace)."""
    return [lg for lg in trainer.loggers if _L.is_tensorboard_logger(lg)]


def write_layout(trainer: pl.Trainer) -> bool:
    """Write the merged layout of the Trainer's callbacks to each of its TensorBoard loggers, once per run.

    Does nothing on ranks other than 0, without a TensorBoard logger, or when the run already has a layout from
    this process. Returns whether a layout was written.
    """
    if trainer.global_rank != 0:
        return False
    loggers = [lg for lg in tensorboard_loggers(trainer) if lg.log_dir not in _WRITTEN.get(lg, set())]
    if not loggers:
        return False
    layout = merge_layouts(cb.dashboard_layout(trainer) for cb in trainer.callbacks if isinstance(cb, LayoutProvider))
    if not layout:
        return False
    for logger in loggers:
        writer = logger.experiment
        writer.add_custom_scalars(layout)
        writer.flush()
        _WRITTEN.setdefault(logger, set()).add(logger.log_dir)
    return True


def log_histogram(trainer: pl.Trainer, tag: str, values: Tensor, step: int) -> None:
    """Write a histogram of ``values`` to the Trainer's TensorBoard loggers (rank 0; one host copy of ``values``)."""
    if trainer.global_rank != 0:
        return
    loggers = tensorboard_loggers(trainer)
    if not loggers:
        return
    host = values.detach().float().cpu()
    for logger in loggers:
        logger.experiment.add_histogram(tag, host, global_step=step)
