"""Adam + aggressive clipping vs the Smoothed optimizers on a real model: per-step cosine similarity of the updates.

The blog post on sign-based optimizers derives that Adam fed value-clipped gradients (threshold -> 0) takes exactly
SmoothedSignSGD(bias_correction=True)'s step, and Adam fed norm-clipped gradients roughly a constant times
SmoothedNormSGD's. Here the mnist1d MLP trains with Adam (lr ``--lr``) + value (or norm) clipping at a threshold
``c`` through ``AdaptiveClippingOptimizer``; at every step the same raw gradients also go to a shadow
SmoothedSignSGD (or SmoothedNormSGD, global norm), both with beta = Adam's beta1 = 0.9 and bias correction, started
from the current weights, and the cosine similarity between Adam's actual update and the shadow's is recorded. For
each ``c``: the mean, median and minimum cosine over the steps (the first 10 included), and the fraction of gradient
entries (value clipping) or steps (norm clipping) that the threshold did not reach. Writes
``equivalence.{png,md,json}``. Run::

    python examples/equivalence.py            # about a minute on 2 CPU cores
    python examples/equivalence.py --quick    # 1 epoch, two thresholds each
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import mnist1d_loop as loop
import torch
from torch import nn

from lightning_clip import AdaptiveClippingOptimizer, SmoothedNormSGD, SmoothedSignSGD

VALUE_CLIPS = [1e-1, 1e-2, 1e-3, 1e-4, 1e-6]
NORM_CLIPS = [10.0, 1.0, 1e-1, 1e-3]


def cosines(kind: str, clip: float, lr: float, epochs: int, seed: int) -> dict:
    torch.set_num_threads(1)
    x, y, _, _ = loop.data()
    model = loop.mlp(seed)
    params = list(model.parameters())
    mode = "value" if kind == "value" else "norm"
    opt = AdaptiveClippingOptimizer(torch.optim.Adam(params, lr=lr), mode=mode, clip_val=clip)
    shadow = [p.detach().clone() for p in params]
    cls = SmoothedSignSGD if kind == "value" else SmoothedNormSGD
    shadow_opt = cls(shadow, lr=lr, beta=0.9, bias_correction=True)
    gen = torch.Generator().manual_seed(seed)
    cos, below = [], []
    for _ in range(epochs):
        for batch in torch.randperm(len(x), generator=gen).split(100):
            nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            before = [p.detach().clone() for p in params]
            with torch.no_grad():
                for s, p, b in zip(shadow, params, before):
                    s.copy_(b)
                    s.grad = p.grad.detach().clone()
            g = torch.cat([p.grad.flatten() for p in params])
            if kind == "value":
                below.append((g.abs() < clip).float().mean().item())
            else:
                below.append(float(g.norm() <= clip))
            opt.step()
            opt.zero_grad(set_to_none=True)
            shadow_opt.step()
            with torch.no_grad():
                u = torch.cat([(p - b).flatten() for p, b in zip(params, before)])
                v = torch.cat([(s - b).flatten() for s, b in zip(shadow, before)])
                cos.append(nn.functional.cosine_similarity(u, v, dim=0).item())
    return {"cos": cos, "below": statistics.mean(below)}


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    loop.add_common_args(parser)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args()
    value_clips, norm_clips = VALUE_CLIPS, NORM_CLIPS
    if args.quick:
        args.epochs, value_clips, norm_clips = 1, [1e-2, 1e-4], [1.0, 1e-3]
    out = loop.resolve_out(args)
    timer = loop.Timer()
    results = {"value": {}, "norm": {}}
    rows = []
    for kind, clips, pair in (
        ("value", value_clips, "Adam + value clipping vs SmoothedSignSGD(bias_correction=True)"),
        ("norm", norm_clips, "Adam + norm clipping vs SmoothedNormSGD(global, bias_correction=True)"),
    ):
        for c in clips:
            r = cosines(kind, c, args.lr, args.epochs, args.seed)
            results[kind][f"{c:g}"] = r
            cs = r["cos"]
            what = "entries below c" if kind == "value" else "steps with norm <= c"
            rows.append(
                [
                    pair,
                    f"{c:g}",
                    statistics.mean(cs),
                    statistics.median(cs),
                    min(cs),
                    statistics.mean(cs[len(cs) // 2 :]),
                    f"{r['below']:.3f} ({what})",
                ]
            )
            print(rows[-1], flush=True)
    table = loop.md_table(
        ["pair", "threshold c", "mean cosine", "median", "min", "mean over the second half", "not reached by c"],
        rows,
    )

    plt = loop.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, kind, title in (
        (axes[0], "value", "Adam + value clipping at c vs SmoothedSignSGD"),
        (axes[1], "norm", "Adam + norm clipping at c vs SmoothedNormSGD"),
    ):
        for c, r in results[kind].items():
            ax.plot(range(1, len(r["cos"]) + 1), r["cos"], lw=0.8, label=f"c = {c}")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("optimizer step")
        ax.legend(fontsize=8)
    axes[0].set_ylabel("cosine similarity of the two updates")
    fig.suptitle(f"mnist1d MLP, Adam lr {args.lr:g}, same gradients fed to both", fontsize=10)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "equivalence.png"), dpi=110)

    seconds = timer.seconds()
    body = (
        f"{args.epochs} epochs ({len(next(iter(results['value'].values()))['cos'])} steps) of the mnist1d MLP, "
        f"seed {args.seed}, Adam lr {args.lr:g}; both optimizers see the same raw gradients at every step, beta = "
        f"beta1 = 0.9.\n\n{table}\n\n![equivalence](equivalence.png)\n"
    )
    loop.write_md(
        out,
        "equivalence",
        "Adam + aggressive clipping vs SmoothedSignSGD / SmoothedNormSGD",
        body,
        loop.command(),
        seconds,
    )
    with open(os.path.join(out, "equivalence.json"), "w") as f:
        json.dump({**results, "seconds": seconds}, f)
    print(table)
    print(f"run time {seconds:.0f} s; wrote {out}/equivalence.png/.md/.json")
    return {**results, "out": out}


if __name__ == "__main__":
    main()
