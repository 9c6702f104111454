"""Sensitivity to the knob: Adam + fixed clipping over a grid of thresholds vs Adam + adaptive clipping over alpha.

The original report hoped adaptive clipping would be less sensitive to its knob than fixed clipping is to its
threshold. Both grids have ``--points`` values log-spaced over two decades, [0.1, 10]: ``clip_val`` (an absolute
norm) for fixed clipping, ``alpha`` (a multiple of the moving average of the norm) for adaptive clipping. Each method
runs at its own tuned learning rate (and adaptive at its tuned beta) from ``examples/tuned_comparison.py``'s searches,
20 epochs on ``--seeds`` seeds. Per grid point: final validation loss and accuracy (mean over seeds) and the fraction
of steps clipped; per method: the spread of the final loss across the grid (max - min, interquartile range).
Writes ``sensitivity.{png,md,json}``. Run::

    python examples/sensitivity.py            # about 2-3 minutes on 2 CPU cores
    python examples/sensitivity.py --quick    # 3 points, 1 seed, 1 epoch
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import mnist1d_loop as loop
import numpy as np

# tuned by examples/tuned_comparison.py (30 TPE trials each, 10 epochs, seed 0)
TUNED = {
    "fixed": {"lr": 0.00394, "clip_val": 1.72},
    "adaptive": {"lr": 0.00233, "alpha": 4.89, "beta": 0.845},
}


def run_grid(method: str, knob: str, grid, lr: float, fixed_hp: dict, epochs: int, seeds: list[int]) -> list[dict]:
    rows = []
    for value in grid:
        finals, accs, clipped, norms = [], [], [], []
        for seed in seeds:
            count = {"clipped": 0, "steps": 0, "norm": 0.0}

            def hook(opt, model, loss, count=count):
                stats = opt.last_stats
                count["steps"] += 1
                count["clipped"] += int(stats.clipped)
                count["norm"] += float(stats.norm)

            r = loop.train(method, lr=lr, epochs=epochs, seed=seed, hook=hook, **fixed_hp, **{knob: float(value)})
            finals.append(r["val_loss"][-1])
            accs.append(r["val_acc"][-1])
            clipped.append(count["clipped"] / count["steps"])
            norms.append(count["norm"] / count["steps"])
        rows.append(
            {
                knob: float(value),
                "final_loss": statistics.mean(finals),
                "final_loss_seeds": finals,
                "final_acc": statistics.mean(accs),
                "clipped_frac": statistics.mean(clipped),
                "mean_norm": statistics.mean(norms),
            }
        )
    return rows


def spread(values: list[float]) -> dict:
    q1, q3 = np.percentile(values, [25, 75])
    return {"range": max(values) - min(values), "iqr": float(q3 - q1), "min": min(values), "max": max(values)}


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    loop.add_common_args(parser)
    parser.add_argument("--points", type=int, default=10)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=20)
    args = parser.parse_args()
    if args.quick:
        args.points, args.seeds, args.epochs = 3, 1, 1
    out = loop.resolve_out(args)
    timer = loop.Timer()
    grid = np.logspace(-1, 1, args.points)
    seeds = [args.seed + 1 + i for i in range(args.seeds)]
    fixed = run_grid("fixed", "clip_val", grid, TUNED["fixed"]["lr"], {}, args.epochs, seeds)
    adaptive = run_grid(
        "adaptive", "alpha", grid, TUNED["adaptive"]["lr"], {"beta": TUNED["adaptive"]["beta"]}, args.epochs, seeds
    )
    results = {
        "fixed": {
            "grid": fixed,
            "loss": spread([r["final_loss"] for r in fixed]),
            "acc": spread([r["final_acc"] for r in fixed]),
        },
        "adaptive": {
            "grid": adaptive,
            "loss": spread([r["final_loss"] for r in adaptive]),
            "acc": spread([r["final_acc"] for r in adaptive]),
        },
    }

    grid_rows = [
        [
            f"{g:.3g}",
            f["final_loss"],
            f["final_acc"],
            f["clipped_frac"],
            a["final_loss"],
            a["final_acc"],
            a["clipped_frac"],
        ]
        for g, f, a in zip(grid, fixed, adaptive)
    ]
    grid_table = loop.md_table(
        [
            "knob (clip_val / alpha)",
            "fixed: final val loss",
            "fixed: val acc",
            "fixed: steps clipped",
            "adaptive: final val loss",
            "adaptive: val acc",
            "adaptive: steps clipped",
        ],
        grid_rows,
    )
    spread_rows = [
        [
            name,
            f"lr {TUNED[m]['lr']}" + (f", beta {TUNED[m]['beta']}" if m == "adaptive" else ""),
            results[m]["loss"]["min"],
            results[m]["loss"]["max"],
            results[m]["loss"]["range"],
            results[m]["loss"]["iqr"],
            results[m]["acc"]["range"],
            results[m]["acc"]["iqr"],
        ]
        for m, name in (
            ("fixed", "Adam + fixed clipping (clip_val grid)"),
            ("adaptive", "Adam + adaptive (alpha grid)"),
        )
    ]
    spread_table = loop.md_table(
        [
            "method",
            "at",
            "best final loss",
            "worst final loss",
            "loss max - min",
            "loss IQR",
            "acc max - min",
            "acc IQR",
        ],
        spread_rows,
    )
    mean_norm = statistics.mean(r["mean_norm"] for r in fixed[-1:])

    plt = loop.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((axes[0], "final_loss", "final validation loss"), (axes[1], "final_acc", "final val acc")):
        for rows, name, color in ((fixed, "fixed: clip_val", "tab:blue"), (adaptive, "adaptive: alpha", "tab:orange")):
            ax.plot(grid, [r[key] for r in rows], "o-", color=color, label=name)
            if key == "final_loss":
                for i, seed in enumerate(seeds):
                    ax.scatter(grid, [r["final_loss_seeds"][i] for r in rows], color=color, s=6, alpha=0.35)
        ax.set_xscale("log")
        ax.set_xlabel("knob value (clip_val for fixed, alpha for adaptive), log scale")
        ax.set_ylabel(label + (" (dots: seeds)" if key == "final_loss" else ""))
        ax.legend(fontsize=8)
    fig.suptitle(f"mnist1d MLP, Adam, {args.epochs} epochs, mean of {len(seeds)} seeds: sensitivity to the knob")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "sensitivity.png"), dpi=110)

    seconds = timer.seconds()
    body = (
        f"Adam at each method's tuned lr, {args.epochs} epochs, seeds {seeds[0]}-{seeds[-1]}, final validation loss "
        f"and accuracy (means over seeds). Mean gradient norm over an unclipped run (the largest fixed clip_val): "
        f"{mean_norm:.2f}, so a clip_val and an alpha of the same value clip at a similar level.\n\n"
        f"{spread_table}\n\n{grid_table}\n\n![sensitivity](sensitivity.png)\n"
    )
    loop.write_md(
        out, "sensitivity", "Sensitivity of fixed and adaptive clipping to their knob", body, loop.command(), seconds
    )
    with open(os.path.join(out, "sensitivity.json"), "w") as f:
        json.dump({**results, "seconds": seconds}, f, indent=1)
    print(spread_table)
    print(grid_table)
    print(f"run time {seconds:.0f} s; wrote {out}/sensitivity.png/.md/.json")
    return {**results, "out": out}


if __name__ == "__main__":
    main()
