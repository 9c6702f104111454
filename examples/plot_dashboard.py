"""Draw the dashboard's curves from a real run's TensorBoard event files into a PNG (matplotlib).

Without ``--logdir``, trains the mnist1d MLP with Adam and ``AdaptiveGradientClipping`` (defaults, cumulative
sparsity on, ``log_every_n_steps=5``) for ``--epochs`` epochs into ``runs/dashboard_demo``, with the demo's gradient
spike (the loss x100 every 100 steps, on a logging step), then plots it; with ``--logdir DIR`` plots the run (the
version folder holding ``events.out.tfevents.*``) already there. The panels are the custom-scalars charts, one row
per optimizer: the gradient norm against the band [moving average, threshold] on a log axis, with the clipped steps
marked; the clip coefficient and the clipped fraction; the update sparsity. Every legend sits under its panel, and a
caption under the figure explains the band.

Run: ``python examples/plot_dashboard.py --out dashboard.png`` (about 10 s, data generation included), then
``tensorboard --logdir runs/dashboard_demo`` shows the same curves in the browser (CUSTOM SCALARS tab).
"""

from __future__ import annotations

import argparse
import glob
import os
from typing import Any

#: A run's scalars: tag -> sorted ``(step, value)`` points.
Series = dict[str, list[tuple[int, float]]]


def read_scalars(log_dir: str) -> Series:
    """Every scalar series of the event files under ``log_dir``, with tensorboard's event-processing API."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: Series = {}
    for path in sorted(glob.glob(os.path.join(log_dir, "**", "events.out.tfevents.*"), recursive=True)):
        acc = EventAccumulator(path, size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return {k: sorted(v) for k, v in out.items()}


#: The line under the figure: what the band of the norm panel is and what a point above it means.
CAPTION = (
    "Shaded band: from the moving average grad_norm_ema (lower edge) to the threshold (upper edge: alpha x the previous"
    " average, or the fixed bound). A grad_norm point above the band (marked x) is a clipped step: its gradient was"
    " scaled down to the threshold, clip_coef = threshold / grad_norm."
)


def train(root: str, epochs: int) -> str:
    """Train the mnist1d MLP with the callback and the demo's spikes into ``root``; returns the run's folder."""
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import TensorBoardLogger

    from lightning_clip import AdaptiveGradientClipping
    from lightning_clip.demo import MNIST1DClassifier, MNIST1DDataModule

    pl.seed_everything(0, verbose=False)
    logger = TensorBoardLogger(root, name="", version=None)
    trainer = pl.Trainer(
        max_epochs=epochs,
        logger=logger,
        log_every_n_steps=5,  # divides spike_every: every spike is a logged point
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[AdaptiveGradientClipping(sparsity_cumulative=True)],
    )
    trainer.fit(MNIST1DClassifier(lr=0.01, spike_every=100, spike_scale=100.0), MNIST1DDataModule())
    return logger.log_dir


def clipped_steps(s: Series, group: str) -> list[tuple[int, float]]:
    """``(step, norm)`` of the logged steps of ``group`` whose norm was above that step's threshold."""
    threshold = dict(s.get(f"{group}/threshold", []))
    return [(t, v) for t, v in s.get(f"{group}/grad_norm", []) if t in threshold and v > threshold[t]]


def plot(log_dir: str, out: str, prefix: str = "clip") -> Any:
    """Draw the run in ``log_dir`` (the callback's ``prefix``) into the PNG ``out``; returns the matplotlib Figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = read_scalars(log_dir)
    # one group per optimizer: "clip" alone, or "clip/Adam", "clip/SGD", ...
    groups = sorted({t.rsplit("/", 1)[0] for t in s if t.startswith(f"{prefix}/") and t.endswith("/grad_norm")})
    if not groups:
        raise SystemExit(f"no {prefix}/.../grad_norm series under {log_dir}")
    rows = len(groups)
    fig, axes = plt.subplots(rows, 3, figsize=(15, 4.2 * rows + 0.4), squeeze=False, layout="constrained")

    def line(ax: Any, tag: str, **kw: Any) -> None:
        if tag in s:
            steps, values = zip(*s[tag])
            ax.plot(steps, values, label=tag.rsplit("/", 1)[1], **kw)

    for row, g in zip(axes, groups):
        ax = row[0]
        if f"{g}/grad_norm_ema" in s and f"{g}/threshold" in s:  # the margin chart's band
            ema, thr = dict(s[f"{g}/grad_norm_ema"]), dict(s[f"{g}/threshold"])
            steps = sorted(set(ema) & set(thr))
            ax.fill_between(
                steps,
                [ema[t] for t in steps],
                [thr[t] for t in steps],
                color="tab:orange",
                alpha=0.2,
                lw=0,
                label="band [grad_norm_ema, threshold]",
            )
        line(ax, f"{g}/threshold", lw=1.2, ls="--", color="tab:red")
        line(ax, f"{g}/grad_norm_ema", lw=1.2, color="tab:orange")
        line(ax, f"{g}/grad_norm", lw=1, color="tab:blue", marker=".", ms=3)
        clipped = clipped_steps(s, g)
        if clipped:
            ax.scatter(*zip(*clipped), marker="x", s=40, color="black", zorder=3, label="clipped step (above band)")
        ax.set_yscale("log")
        ax.set_ylabel("gradient L2 norm (log scale)")
        ax.set_title(f"{g}: gradient norm vs threshold")
        ax = row[1]
        line(ax, f"{g}/clip_coef_min", lw=1.2, color="tab:purple")
        line(ax, f"{g}/clip_coef", lw=1, ls="--", color="tab:green")
        line(ax, f"{g}/clipped_frac", lw=1, color="tab:gray")
        ax.set_ylim(-0.05, 1.05)
        ax.set_ylabel("coefficient, fraction (dimensionless)")
        ax.set_title(f"{g}: clip coefficient and clipped fraction")
        ax = row[2]
        line(ax, f"{g}/update_sparsity", lw=1, color="tab:blue")
        line(ax, f"{g}/update_sparsity_cumulative", lw=1, color="tab:orange")
        ax.set_ylim(-0.05, 1.05)
        ax.set_ylabel("fraction of entries (dimensionless)")
        ax.set_title(f"{g}: update sparsity (|dw| <= 0.1 lr)")
        for ax in row:
            ax.set_xlabel("optimizer step")
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:  # under the panel, outside the data
                ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
    fig.supxlabel(CAPTION, fontsize=9.5, wrap=True)  # the caption, under every panel and legend
    fig.savefig(out, dpi=110)
    print(f"wrote {out} from {log_dir}")
    return fig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logdir", help="a run folder with event files; default: train a fresh mnist1d run")
    parser.add_argument("--root", default="runs/dashboard_demo", help="where the fresh run is written")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--prefix", default="clip", help="the callback's log_prefix")
    parser.add_argument("--out", default="dashboard.png")
    args = parser.parse_args()
    log_dir = args.logdir or train(args.root, args.epochs)
    plot(log_dir, args.out, args.prefix)


if __name__ == "__main__":
    main()
