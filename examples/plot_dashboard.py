"""Draw the dashboard's curves from a real run's TensorBoard event files into a PNG (matplotlib).

Without ``--logdir``, trains the mnist1d MLP with Adam and ``AdaptiveGradientClipping`` (defaults, cumulative
sparsity on, ``log_every_n_steps=5``) for ``--epochs`` epochs into ``runs/dashboard_demo``, then plots it; with
``--logdir DIR`` plots the run (the version folder holding ``events.out.tfevents.*``) already there. The panels are
the custom-scalars charts: norm vs threshold (and the moving average), clip coefficient and clipped fraction, update
sparsity; one row per optimizer.

Run: ``python examples/plot_dashboard.py --out dashboard.png`` (about 20 s, data generation included), then
``tensorboard --logdir runs/dashboard_demo`` shows the same curves in the browser (CUSTOM SCALARS tab).
"""

from __future__ import annotations

import argparse
import glob
import os


def read_scalars(log_dir: str) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series of the event files under ``log_dir``, with tensorboard's event-processing API."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(glob.glob(os.path.join(log_dir, "**", "events.out.tfevents.*"), recursive=True)):
        acc = EventAccumulator(path, size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return {k: sorted(v) for k, v in out.items()}


def train(root: str, epochs: int) -> str:
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import TensorBoardLogger

    from lightning_clip import AdaptiveGradientClipping
    from lightning_clip.demo import MNIST1DClassifier, MNIST1DDataModule

    pl.seed_everything(0, verbose=False)
    logger = TensorBoardLogger(root, name="", version=None)
    trainer = pl.Trainer(
        max_epochs=epochs,
        logger=logger,
        log_every_n_steps=5,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[AdaptiveGradientClipping(sparsity_cumulative=True)],
    )
    trainer.fit(MNIST1DClassifier(lr=0.04), MNIST1DDataModule())
    return logger.log_dir


def plot(log_dir: str, out: str, prefix: str = "clip") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = read_scalars(log_dir)
    # one group per optimizer: "clip" alone, or "clip/Adam", "clip/SGD", ...
    groups = sorted({t.rsplit("/", 1)[0] for t in s if t.startswith(f"{prefix}/") and t.endswith("/grad_norm")})
    if not groups:
        raise SystemExit(f"no {prefix}/.../grad_norm series under {log_dir}")
    fig, axes = plt.subplots(len(groups), 3, figsize=(15, 3.8 * len(groups)), squeeze=False)

    def line(ax, tag, **kw):
        if tag in s:
            steps, values = zip(*s[tag])
            ax.plot(steps, values, label=tag.rsplit("/", 1)[1], **kw)

    for row, g in zip(axes, groups):
        ax = row[0]
        line(ax, f"{g}/grad_norm", lw=1)
        line(ax, f"{g}/threshold", lw=1.5, ls="--")
        line(ax, f"{g}/grad_norm_ema", lw=1.5)
        if f"{g}/grad_norm_ema" in s and f"{g}/threshold" in s:  # the margin chart's band
            ema, thr = dict(s[f"{g}/grad_norm_ema"]), dict(s[f"{g}/threshold"])
            steps = sorted(set(ema) & set(thr))
            ax.fill_between(steps, [ema[t] for t in steps], [thr[t] for t in steps], alpha=0.15, label="band")
        ax.set_yscale("log")
        ax.set_title(f"{g}: gradient norm vs threshold")
        ax = row[1]
        for key in ("clip_coef", "clip_coef_min", "clipped_frac"):
            line(ax, f"{g}/{key}", lw=1)
        ax.set_ylim(-0.05, 1.05)
        ax.set_title(f"{g}: clip coefficient and clipped fraction")
        ax = row[2]
        line(ax, f"{g}/update_sparsity", lw=1)
        line(ax, f"{g}/update_sparsity_cumulative", lw=1)
        ax.set_ylim(-0.05, 1.05)
        ax.set_title(f"{g}: update sparsity (|dw| <= 0.1 lr)")
        for ax in row:
            ax.set_xlabel("step")
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out} from {log_dir}")


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
