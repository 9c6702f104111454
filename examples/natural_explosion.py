"""Gradients that explode by themselves: a deep ReLU MLP without normalisation, initialised above the critical scale.

The clipping overview argues that Adam needs a few iterations before its second moment brakes a large gradient and
that a deep model can produce huge gradients in the first iterations by its depth alone; clipping brakes from step
one. Here nothing is injected: a ``--depth``-layer ReLU MLP (width 64, no normalisation) on mnist1d, every weight
and bias initialised at ``--gain`` times PyTorch's default (the default keeps the activations' scale per layer
about 1/sqrt(3); a gain above sqrt(6) makes them and the gradients grow geometrically with depth). The first
gradient norms are in the thousands; as the weights shrink they fall to order 1, but Adam's second moment (beta2
0.999, a half-life of ~700 steps) remembers the first ones and brakes every later step.

Runs (Adam, lr ``--lr``, the same seed and batches): no clipping; fixed norm clipping at 1; adaptive clipping at
its defaults (alpha 3.8, beta 0.918); adaptive + ``max_norm=1``; adaptive + ``max_norm=10``. Loss, gradient norm
and threshold per step for seed ``--seed``, final validation loss and accuracy for ``--seeds`` seeds. Writes
``natural_explosion.{png,md,json}``. Run::

    python examples/natural_explosion.py            # about a minute on 2 CPU cores
    python examples/natural_explosion.py --quick    # 1 epoch, 1 seed
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics

import mnist1d_loop as loop
import torch
from torch import nn

RUNS = {
    "Adam, no clipping": ("adam", {}),
    "fixed norm clipping at 1": ("fixed", {"clip_val": 1.0}),
    "adaptive (alpha 3.8, beta 0.918)": ("adaptive", {}),
    "adaptive + max_norm 1": ("adaptive", {"max_norm": 1.0}),
    "adaptive + max_norm 10": ("adaptive", {"max_norm": 10.0}),
}


def deep_mlp(depth: int, gain: float, seed: int, width: int = 64) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    w = 40
    for _ in range(depth):
        layers += [nn.Linear(w, width), nn.ReLU()]
        w = width
    layers.append(nn.Linear(w, 10))
    net = nn.Sequential(*layers)
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(gain)
    return net


def train(method: str, hp: dict, depth: int, gain: float, lr: float, epochs: int, seed: int) -> dict:
    torch.set_num_threads(1)
    x, y, x_val, y_val = loop.data()
    model = deep_mlp(depth, gain, seed)
    opt = loop.make_optimizer(method, model.parameters(), lr, **hp)
    gen = torch.Generator().manual_seed(seed)
    loss_s, norm_s, thr_s, val_loss, val_acc = [], [], [], [], []
    for _ in range(epochs):
        model.train()
        for batch in torch.randperm(len(x), generator=gen).split(100):
            loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
            loss.backward()
            if method == "adam":
                norm_s.append(torch.nn.utils.clip_grad_norm_(model.parameters(), math.inf).item())
                thr_s.append(float("nan"))
            opt.step()
            if method != "adam":
                stats = opt.last_stats
                norm_s.append(float(stats.norm))
                thr_s.append(float(stats.threshold))
            opt.zero_grad(set_to_none=True)
            loss_s.append(loss.item())
        model.eval()
        with torch.no_grad():
            logits = model(x_val)
            val_loss.append(nn.functional.cross_entropy(logits, y_val).item())
            val_acc.append((logits.argmax(1) == y_val).float().mean().item())
    return {"loss": loss_s, "norm": norm_s, "threshold": thr_s, "val_loss": val_loss, "val_acc": val_acc}


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    loop.add_common_args(parser)
    parser.add_argument("--depth", type=int, default=12)
    parser.add_argument("--gain", type=float, default=4.0)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    if args.quick:
        args.epochs, args.seeds = 1, 1
    out = loop.resolve_out(args)
    timer = loop.Timer()
    seeds = [args.seed + i for i in range(args.seeds)]
    runs = {
        name: [train(m, hp, args.depth, args.gain, args.lr, args.epochs, s) for s in seeds]
        for name, (m, hp) in RUNS.items()
    }
    # the reference: the same network at the default scale (gain 1), Adam alone
    calm = [train("adam", {}, args.depth, 1.0, args.lr, args.epochs, s) for s in seeds]

    def fin(rs, key, e=-1):
        v = [r[key][e] for r in rs]
        return statistics.mean(v) if all(math.isfinite(a) for a in v) else float("nan")

    e1 = min(1, args.epochs) - 1
    rows, summary = [], {}
    for name, rs in {**runs, "reference: Adam, default init (gain 1)": calm}.items():
        first = [r["norm"][0] for r in rs]
        clipped = [statistics.mean(float(n > t) for n, t in zip(r["norm"], r["threshold"])) for r in rs]
        summary[name] = {"final_loss": fin(rs, "val_loss"), "final_acc": fin(rs, "val_acc")}
        rows.append(
            [
                name,
                statistics.mean(first),
                fin(rs, "val_loss", e1),
                fin(rs, "val_loss"),
                f"{min(r['val_loss'][-1] for r in rs):.3f}-{max(r['val_loss'][-1] for r in rs):.3f}",
                fin(rs, "val_acc"),
                statistics.mean(clipped),
            ]
        )
    table = loop.md_table(
        [
            "run",
            "first gradient norm",
            "val loss, epoch 1",
            f"final val loss (epoch {args.epochs})",
            "min-max over seeds",
            "final val acc",
            "steps clipped",
        ],
        rows,
    )

    plt = loop.pyplot()
    fig, axes = plt.subplots(3, 1, figsize=(9, 9), sharex=True)
    colors = plt.get_cmap("tab10").colors
    for (name, rs), color in zip(runs.items(), colors):
        r = rs[0]
        steps = range(1, len(r["loss"]) + 1)
        axes[0].plot(steps, r["loss"], lw=0.7, color=color, label=name)
        axes[1].plot(steps, r["norm"], lw=0.7, color=color, label=name)
        if any(math.isfinite(t) for t in r["threshold"]):
            axes[2].plot(steps, r["threshold"], lw=0.9, color=color, label=name)
    axes[0].set_ylabel("training loss (batch)")
    axes[0].set_yscale("log")
    axes[1].set_ylabel("gradient norm before clipping")
    axes[1].set_yscale("log")
    axes[2].set_ylabel("clipping threshold")
    axes[2].set_yscale("log")
    axes[2].set_xlabel("optimizer step")
    for ax in axes:
        ax.legend(fontsize=7, loc="upper right")
    fig.suptitle(f"{args.depth}-layer ReLU MLP, init x{args.gain:g}, Adam lr {args.lr:g}, seed {seeds[0]}", fontsize=10)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "natural_explosion.png"), dpi=110)

    seconds = timer.seconds()
    body = (
        f"{args.depth}-layer ReLU MLP (width 64, no normalisation), weights and biases at {args.gain:g}x PyTorch's "
        f"default initialisation, Adam lr {args.lr:g}, batch 100, {args.epochs} epochs, mean of seeds "
        f"{seeds[0]}-{seeds[-1]}; nothing is injected into the loss.\n\n{table}\n\n"
        f"![natural explosion](natural_explosion.png)\n"
    )
    loop.write_md(out, "natural_explosion", "Gradients that explode by themselves", body, loop.command(), seconds)
    with open(os.path.join(out, "natural_explosion.json"), "w") as f:
        json.dump({"summary": summary, "seconds": seconds}, f, indent=1)
    print(table)
    print(f"run time {seconds:.0f} s; wrote {out}/natural_explosion.png/.md/.json")
    return {"summary": summary, "runs": runs, "out": out}


if __name__ == "__main__":
    main()
