"""Learning-rate tolerance: final validation loss against lr for Adam, Adam + aggressive clipping and the Smoothed
optimizers, on the mnist1d MLP.

The blog post on sign-based optimizers says Adam with aggressive value or norm clipping, like Smoothed SignSGD and
Smoothed NormSGD, "does well with higher learning rates". Five methods over the same lr grid (``--points`` values
log-spaced over [1e-5, 10], six decades, since SmoothedNormSGD's global-norm update has norm <= lr and so wants an lr
about 100x Adam's): Adam, Adam + value clipping at 1e-4 (below most gradient entries, which are about 1e-2), Adam +
norm clipping at 1e-3 (below every global norm, about 1), SmoothedSignSGD (beta 0.9), SmoothedNormSGD (beta 0.9,
global norm). ``--epochs`` epochs on ``--seeds`` seeds. Per method: the best lr, the width of the lr range whose loss
is within 0.1 of the best (in decades), and the loss at 10x the best lr. Writes ``lr_tolerance.{png,md,json}``. Run::

    python examples/lr_tolerance.py            # about 2 minutes on 2 CPU cores
    python examples/lr_tolerance.py --quick    # 3 lrs, 1 epoch, 1 seed
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics

import mnist1d_loop as loop
import numpy as np

METHODS = {
    "Adam": ("adam", {}),
    "Adam + value clipping at 1e-4": ("value", {"clip_val": 1e-4}),
    "Adam + norm clipping at 1e-3": ("fixed", {"clip_val": 1e-3}),
    "SmoothedSignSGD (beta 0.9)": ("sign", {"beta": 0.9}),
    "SmoothedNormSGD (beta 0.9, global)": ("norm", {"beta": 0.9}),
}
DIVERGED = 2.5  # a final loss that is nan or above this is drawn (and counted) as 2.5: no better than chance (2.30)


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    loop.add_common_args(parser)
    parser.add_argument("--points", type=int, default=13)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args()
    if args.quick:
        args.points, args.seeds, args.epochs = 3, 1, 1
    out = loop.resolve_out(args)
    timer = loop.Timer()
    lrs = np.logspace(-5, 1, args.points)
    seeds = [args.seed + 1 + i for i in range(args.seeds)]
    curves: dict[str, list[float]] = {}
    for name, (method, hp) in METHODS.items():
        curve = []
        for lr in lrs:
            finals = []
            for s in seeds:
                v = loop.train(method, lr=float(lr), epochs=args.epochs, seed=s, **hp)["val_loss"][-1]
                finals.append(DIVERGED if not math.isfinite(v) or v > DIVERGED else v)
            curve.append(statistics.mean(finals))
        curves[name] = curve
        print(name, " ".join(f"{v:.3f}" for v in curve), flush=True)

    step = math.log10(lrs[1] / lrs[0]) if len(lrs) > 1 else 0.0
    rows, summary = [], {}
    for name, curve in curves.items():
        i = int(np.argmin(curve))
        good = [j for j, v in enumerate(curve) if v <= curve[i] + 0.1]
        # the contiguous run of good lrs around the best one
        lo = hi = i
        while lo - 1 in good:
            lo -= 1
        while hi + 1 in good:
            hi += 1
        width = (hi - lo) * step
        j10 = i + max(1, round(1 / step)) if step else len(curve)
        at10 = curve[j10] if j10 < len(curve) else float("nan")
        summary[name] = {
            "best_lr": float(lrs[i]),
            "best_loss": curve[i],
            "width_decades": width,
            "loss_at_10x": at10,
            "largest_good_lr": float(lrs[hi]),
        }
        rows.append([name, f"{lrs[i]:.3g}", curve[i], f"{lrs[lo]:.3g}-{lrs[hi]:.3g}", width, at10])
    table = loop.md_table(
        [
            "method",
            "best lr",
            "final val loss at best lr",
            "lr range within 0.1 of best",
            "width (decades)",
            "loss at 10x best lr",
        ],
        rows,
    )
    grid_table = loop.md_table(
        ["lr", *curves], [[f"{lr:.3g}", *(c[k] for c in curves.values())] for k, lr in enumerate(lrs)]
    )

    plt = loop.pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for (name, curve), marker in zip(curves.items(), "os^vD"):
        ax.plot(lrs, curve, marker + "-", label=name, ms=4)
    ax.axhline(math.log(10), color="grey", lw=0.8, ls=":", label="chance (ln 10)")
    ax.set_xscale("log")
    ax.set_ylim(top=DIVERGED + 0.05)
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel(f"final validation loss (epoch {args.epochs}; diverged = {DIVERGED})")
    ax.set_title(f"mnist1d MLP, mean of {len(seeds)} seeds: tolerance to the learning rate")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "lr_tolerance.png"), dpi=110)

    seconds = timer.seconds()
    body = (
        f"Final validation loss after {args.epochs} epochs, mean of seeds {seeds[0]}-{seeds[-1]} (nan or above "
        f"{DIVERGED} counted as {DIVERGED}).\n\n{table}\n\n<details><summary>every lr</summary>\n\n{grid_table}\n\n"
        f"</details>\n\n![lr tolerance](lr_tolerance.png)\n"
    )
    loop.write_md(out, "lr_tolerance", "Learning-rate tolerance", body, loop.command(), seconds)
    with open(os.path.join(out, "lr_tolerance.json"), "w") as f:
        json.dump({"lrs": lrs.tolist(), "curves": curves, "summary": summary, "seconds": seconds}, f, indent=1)
    print(table)
    print(f"run time {seconds:.0f} s; wrote {out}/lr_tolerance.png/.md/.json")
    return {"curves": curves, "summary": summary, "out": out}


if __name__ == "__main__":
    main()
