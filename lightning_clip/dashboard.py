"""The TensorBoard dashboard: one custom-scalars layout per run, merged from every callback that logs.

TensorBoard's custom_scalars plugin reads, per run, the first layout written to the tag ``custom_scalars__config__``
(later ones are ignored). Several callbacks of this package may log into the same run, so each of them provides a
part (:meth:`dashboard_layout`) and :func:`write_layout` merges the parts of every callback of the Trainer and
writes the result once per run, to each ``TensorBoardLogger`` of the Trainer
(global rank 0 only). Other loggers (CSV, MLflow, ...) get the scalars as usual and no layout.

A layout part is ``{category: {chart title: [kind, tags]}}`` as ``SummaryWriter.add_custom_scalars`` takes it:
``kind`` ``"Multiline"`` (``tags`` are regular expressions, matched from the start of a tag: write them with
:func:`tag_regex`) or ``"Margin"`` (``tags`` are exactly ``[value, lower, upper]``).

What the browser shows (TensorBoard 2.x, checked in headless Chromium by ``tests/test_dashboard_browser.py``): the
sections in the layout's order, each with its multiline charts first and its margin charts last; every series of a
run in the run's colour, told apart by a marker symbol listed under the chart's collapsed "Matches". So the key chart
of :func:`clipping_layout`, a margin chart, has a section of its own placed first, and every title names its series.
Smoothing (0.6 by default, URL ``#custom_scalars&_smoothingWeight=0``), "Ignore outliers in chart scaling" (on by
default, kept in the browser's localStorage) and each chart's log-scale button are the viewer's settings: the layout
proto has no field for them.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from torch import Tensor
from torch.optim import Optimizer

if TYPE_CHECKING:
    import lightning.pytorch as pl

    from lightning_clip.rule import ClipRule

__all__ = [
    "BAND_CHART",
    "CONFIG_TAG",
    "Layout",
    "LayoutProvider",
    "band_section",
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

#: The title of the key chart (first in each clipping section): the margin chart of the norm in its band.
BAND_CHART = "grad_norm (line) vs band [grad_norm_ema, threshold] (shaded): above the band = clipped step"

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


def band_section(category: str) -> str:
    """The title of the section that holds only the key chart :data:`BAND_CHART` of the section ``category``."""
    return f"{category}: norm vs its clipping band"


def clipping_layout(
    name: Callable[[str], str], category: str, *, rule: ClipRule, sparsity: bool, cumulative: bool
) -> Layout:
    """The charts of one optimizer of :class:`~lightning_clip.AdaptiveGradientClipping`, the key chart first.

    TensorBoard draws every series of a run in the run's colour (a multiline chart tells its series apart by a
    marker symbol, named only in its collapsed "Matches" list and in the hover tooltip), so each title names its
    series by tag and by shape and says what to look for, and most charts hold one quantity.

    In the norm modes the key chart is the margin chart: the norm is a line, the band from the moving average up
    to the threshold is shaded, so the two stay apart in one colour and the line leaving the band upwards is a
    clipped step. TensorBoard draws a section's margin charts after its multiline charts whatever the layout's
    order, so the key chart gets a section of its own, ``"{category}: norm vs its clipping band"``, placed before
    the section ``category`` that holds the rest: norm and threshold as two lines (spiky, and smooth or flat), the
    clip coefficients, the clipped fraction, the non-finite steps and the sparsity.

    Args:
        name: maps a metric key (``"grad_norm"``) to its logged tag (``"clip/grad_norm"``).
        category: the section's title (the tag prefix, e.g. ``"clip"`` or ``"clip/Adam"``).
        rule: the clipping rule. A rule that clamps entries (``FixedValue``) bounds entries, not the norm, so there
            is no band: the norm and its average share a chart, the bound gets its own, all in the one section
            ``category``.
        sparsity: add the sparsity chart.
        cumulative: add the cumulative sparsity series to it.
    """
    m = lambda *keys: [tag_regex(name(k)) for k in keys]  # noqa: E731
    layout: Layout = {}
    charts: dict[str, list[Any]] = {}
    if rule.action == "clamp":
        charts["grad_norm (spiky) and its moving average grad_norm_ema (smooth); value mode: no norm bound"] = [
            "Multiline",
            m("grad_norm", "grad_norm_ema"),
        ]
        charts["threshold: the per-entry bound clip_val (value mode)"] = ["Multiline", m("threshold")]
    else:
        band = ["Margin", [name("grad_norm"), name("grad_norm_ema"), name("threshold")]]
        layout[band_section(category)] = {BAND_CHART: band}
        shape = rule.threshold_shape
        charts[f"grad_norm (spiky) vs threshold ({shape}): a spike above the threshold is clipped"] = [
            "Multiline",
            m("grad_norm", "threshold"),
        ]
    charts["clip_coef_min, clip_coef: post/pre-clip norm (1 = untouched, a dip = clipped)"] = [
        "Multiline",
        m("clip_coef_min", "clip_coef"),
    ]
    charts["clipped_frac: fraction of the steps since the last log that were clipped"] = [
        "Multiline",
        m("clipped_frac"),
    ]
    charts["nonfinite_steps: inf/nan steps since the last log (0 = none)"] = ["Multiline", m("nonfinite_steps")]
    if sparsity:
        charts.update(sparsity_layout(name, category, cumulative=cumulative)[category])
    layout[category] = charts
    return layout


def sparsity_layout(name: Callable[[str], str], category: str, *, cumulative: bool) -> Layout:
    """The chart of one optimizer of :class:`~lightning_clip.UpdateSparsityMonitor` (and of the clipping section)."""
    if cumulative:
        title = "update_sparsity (this step), update_sparsity_cumulative (since the last log): negligible updates"
        keys: tuple[str, ...] = ("update_sparsity", "update_sparsity_cumulative")
    else:
        title, keys = "update_sparsity: fraction of entries whose update was negligible", ("update_sparsity",)
    return {category: {title: ["Multiline", [tag_regex(name(k)) for k in keys]]}}


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
    """Merge layout parts: categories with one title share a section; a chart title seen twice keeps the first."""
    merged: Layout = {}
    for part in parts:
        for category, charts in part.items():
            section = merged.setdefault(category, {})
            for title, chart in charts.items():
                section.setdefault(title, chart)
    return merged


def tensorboard_loggers(trainer: pl.Trainer) -> list[Any]:
    """The Trainer's TensorBoard loggers (Lightning's and Fabric's, either namespace)."""
    from lightning_clip import _lightning  # Lightning is loaded here, not by the layout functions

    return [lg for lg in trainer.loggers if _lightning.is_tensorboard_logger(lg)]


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
