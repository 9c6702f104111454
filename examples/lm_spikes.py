"""Loss spikes in a small language model: no clipping, Lightning's norm clipping, ZClip and adaptive clipping.

The data ship with Python: the source code of twenty standard-library modules (``inspect.getsource``; about 0.9 MB
under Python 3.11), as bytes (non-ASCII bytes become ``?``), a character-level vocabulary of 128. The first 90% train,
the last 10% validate; nothing is downloaded. The model is a small decoder-only transformer: token and position
embeddings, ``--layers`` pre-LN ``nn.TransformerEncoderLayer`` blocks (``--d-model`` wide, 4 heads, GELU, no dropout,
no final norm) under a causal mask, a linear head; batches of ``--batch`` random windows of ``--context`` bytes drawn
from a seeded generator. AdamW (betas 0.9/0.95, weight decay 0.1) at a constant ``--lr`` (0.1) with no warm-up: high
enough that the loss spikes without clipping (an explosion in the first steps, then spikes of 10-100x the running
loss that take tens to hundreds of steps to recover) yet recovers. (The post-LN variant at lr 0.015-0.03 did not
spike: it stalled on a plateau near the unigram loss.)

Methods, every one in the same plain loop (forward, backward, the method's clipping, the optimizer step):

* no clipping;
* Lightning's ``gradient_clip_val``: ``Trainer(gradient_clip_val=c)`` (algorithm ``"norm"``) calls
  ``torch.nn.utils.clip_grad_norm_(params, c)`` before the step; the loop calls it directly, ``c`` = ``--clip-val``;
* ZClip (``pip install zclip``) at its defaults, through its core ``ZClip().step(model)``, which is what its own
  Lightning callback calls in ``on_before_optimizer_step`` (its defaults include ``max_grad_norm=1.0``, a fixed cap
  on top of its z-score rule), and once more with ``max_grad_norm=None``, its z-score rule alone; marked "not
  installed" when the package is missing;
* this project's adaptive clipping (``AdaptiveClippingOptimizer``, the callback's rule) at its defaults (alpha 3.8,
  beta 0.918) and tuned: a small grid over alpha, beta and max_norm on the first seed (lowest final validation loss),
  the winner then run on the other seeds.

A spike: a step whose training loss exceeds ``--spike-x`` times the median of the previous ``--spike-w`` steps' losses.
Steps lost to it: the steps until the loss is back at or below that median (a spike that never recovers loses every
remaining step; a non-finite loss is a spike that never recovers). Further spikes are looked for after recovery.
Wall time per step and the time of clipping + optimizer step are measured in the same runs (one thread; the machine
is shared and the runs are niced, so compare them with care). Writes ``lm_spikes.{png,md,json}``. Run::

    nice -n 19 python examples/lm_spikes.py            # about 10 minutes on 2 CPU cores
    python examples/lm_spikes.py --quick               # a tiny model, a few steps, 1 seed
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import math
import os
import statistics
import time

import mnist1d_loop as loop
import torch
from torch import nn

from lightning_clip import AdaptiveClippingOptimizer

MODULES = (
    "argparse collections dataclasses functools inspect textwrap typing json.decoder json.encoder csv string "
    "fractions statistics heapq bisect enum pathlib shutil random calendar"
).split()

_TEXT: dict = {}


def corpus() -> tuple[torch.Tensor, torch.Tensor]:
    """The standard-library sources as int64 byte codes < 128: (train, validation)."""
    if not _TEXT:
        text = "".join(inspect.getsource(importlib.import_module(m)) for m in MODULES)
        data = torch.tensor(list(text.encode("ascii", errors="replace")), dtype=torch.long)
        cut = int(0.9 * len(data))
        _TEXT["t"] = (data[:cut], data[cut:])
    return _TEXT["t"]


class TinyLM(nn.Module):
    def __init__(self, vocab: int, d_model: int, layers: int, context: int, heads: int = 4) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(context, d_model)
        block = nn.TransformerEncoderLayer(
            d_model, heads, 4 * d_model, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(context), persistent=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        h = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        h = self.blocks(h, mask=self.mask[:t, :t], is_causal=True)
        return self.head(h)


def batch(data: torch.Tensor, n: int, context: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    start = torch.randint(0, len(data) - context - 1, (n,), generator=gen)
    idx = start[:, None] + torch.arange(context + 1)
    w = data[idx]
    return w[:, :-1], w[:, 1:]


def lm_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = model(x)
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def zclip_available() -> bool:
    return importlib.util.find_spec("zclip") is not None


def train(method: str, hp: dict, args, seed: int) -> dict:
    """One run; ``method`` in ``none``, ``norm`` (clip_grad_norm_ at ``clip_val``), ``zclip``, ``adaptive``."""
    torch.set_num_threads(1)
    train_data, val_data = corpus()
    torch.manual_seed(seed)
    model = TinyLM(128, args.d_model, args.layers, args.context)
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    clip = None
    if method == "adaptive":
        opt = AdaptiveClippingOptimizer(opt, **hp)
    elif method == "zclip":
        from zclip import ZClip

        zc = ZClip(**hp)
        clip = lambda: zc.step(model)  # noqa: E731  (returns the pre-clip norm)
    elif method == "norm":
        clip = lambda: torch.nn.utils.clip_grad_norm_(params, hp["clip_val"])  # noqa: E731
    gen = torch.Generator().manual_seed(1000 + seed)  # the same batches for every method under one seed
    val_gen = torch.Generator().manual_seed(12345)  # the same held-out windows for every run
    x_val, y_val = batch(val_data, args.val_windows, args.context, val_gen)
    losses, norms, step_s, clip_s = [], [], [], []
    for _ in range(args.steps):
        x, y = batch(train_data, args.batch, args.context, gen)
        t0 = time.perf_counter()
        loss = lm_loss(model, x, y)
        loss.backward()
        if method == "none":  # the norm for the plot only, outside the timed clip + step
            t_pause = time.perf_counter()
            norm = float(torch.nn.utils.clip_grad_norm_(params, math.inf))
            t0 += time.perf_counter() - t_pause
        t1 = time.perf_counter()
        if clip is not None:
            norm = float(clip())
        opt.step()
        opt.zero_grad(set_to_none=True)
        lv = loss.item()
        t2 = time.perf_counter()
        if method == "adaptive":
            norm = float(opt.last_stats.norm)
        step_s.append(t2 - t0)
        clip_s.append(t2 - t1)
        losses.append(lv if math.isfinite(lv) else float("nan"))
        norms.append(norm)
        if not math.isfinite(lv):  # diverged: the rest of the run is lost
            losses += [float("nan")] * (args.steps - len(losses))
            break
    with torch.no_grad():
        val = lm_loss(model, x_val, y_val).item()
    return {
        "loss": losses,
        "norm": norms,
        "val_loss": val if math.isfinite(val) else float("nan"),
        "ms_per_step": 1000 * statistics.median(step_s),
        "ms_clip_and_step": 1000 * statistics.median(clip_s),
    }


def spikes(losses: list[float], w: int, x: float) -> list[tuple[int, int]]:
    """(step, steps lost) of every spike: loss > ``x`` times the median of the previous ``w`` losses; lost until the
    loss is back at or below that median (to the end of the run when it never is, or when it is not finite)."""
    out, t, n = [], w, len(losses)
    while t < n:
        ref = statistics.median(losses[t - w : t])
        if not math.isfinite(ref):
            break
        if not (losses[t] <= x * ref):  # a nan counts as a spike
            s = t + 1
            while s < n and not (losses[s] <= ref):
                s += 1
            out.append((t, s - t))
            t = s + 1
        else:
            t += 1
    return out


def tuning_grid(quick: bool) -> list[dict]:
    if quick:
        return [{"alpha": 1.5}, {"alpha": 3.8, "max_norm": 1.0}]
    return [
        {"alpha": a, "beta": b, **({"max_norm": m} if m else {})}
        for a in (1.5, 3.8)
        for b in (0.918, 0.98)
        for m in (None, 1.0)
    ]


def label(hp: dict) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in hp.items())


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    loop.add_common_args(parser)
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--seeds", type=int, default=5, help="evaluation seeds, after the tuning seed --seed")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--context", type=int, default=32)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--val-windows", type=int, default=512)
    parser.add_argument("--clip-val", type=float, default=1.0, help="Lightning's gradient_clip_val")
    parser.add_argument("--spike-x", type=float, default=1.5)
    parser.add_argument("--spike-w", type=int, default=20)
    args = parser.parse_args()
    if args.quick:
        args.steps, args.seeds, args.layers, args.d_model, args.batch, args.val_windows = 60, 1, 1, 32, 8, 32
    out = loop.resolve_out(args)
    timer = loop.Timer()
    tune_seed = args.seed
    seeds = [args.seed + 1 + i for i in range(args.seeds)]

    # the tuning: a small grid on the tuning seed, lowest final validation loss wins
    search = []
    for hp in tuning_grid(args.quick):
        r = train("adaptive", hp, args, tune_seed)
        n_spikes = len(spikes(r["loss"], args.spike_w, args.spike_x))
        search.append({"hp": hp, "val_loss": r["val_loss"], "spikes": n_spikes})
        print(f"tuning seed {tune_seed}: {label(hp)}: val loss {r['val_loss']:.3f}", flush=True)
    best = min(search, key=lambda s: s["val_loss"] if math.isfinite(s["val_loss"]) else math.inf)["hp"]

    have_zclip = zclip_available()
    methods = {
        "no clipping": ("none", {}),
        f"Lightning gradient_clip_val={args.clip_val:g}": ("norm", {"clip_val": args.clip_val}),
        "ZClip (defaults)" if have_zclip else "ZClip (not installed)": ("zclip", {}),
        "ZClip, max_grad_norm=None (z-score rule alone)"
        if have_zclip
        else "ZClip, max_grad_norm=None (not installed)": ("zclip", {"max_grad_norm": None}),
        "adaptive, defaults (alpha 3.8, beta 0.918)": ("adaptive", {}),
        f"adaptive, tuned ({label(best)})": ("adaptive", best),
    }
    runs: dict = {}
    for name, (method, hp) in methods.items():
        if method == "zclip" and not have_zclip:
            runs[name] = None
            continue
        runs[name] = [train(method, hp, args, s) for s in seeds]
        print(f"{name}: val loss {[round(r['val_loss'], 3) for r in runs[name]]}", flush=True)

    def mean(v):
        return statistics.mean(v) if all(math.isfinite(a) for a in v) else float("nan")

    rows, summary = [], {}
    for name, rs in runs.items():
        if rs is None:
            rows.append([name] + ["not installed"] * 6)
            summary[name] = None
            continue
        sp = [spikes(r["loss"], args.spike_w, args.spike_x) for r in rs]
        s = {
            "final_val_loss": mean([r["val_loss"] for r in rs]),
            "val_loss_per_seed": [r["val_loss"] for r in rs],
            "spikes": statistics.mean(len(x) for x in sp),
            "steps_lost": statistics.mean(sum(n for _, n in x) for x in sp),
            "spike_steps": [[t for t, _ in x] for x in sp],
            "ms_per_step": statistics.mean(r["ms_per_step"] for r in rs),
            "ms_clip_and_step": statistics.mean(r["ms_clip_and_step"] for r in rs),
        }
        summary[name] = s
        lo, hi = min(s["val_loss_per_seed"]), max(s["val_loss_per_seed"])
        rows.append(
            [
                name,
                s["final_val_loss"],
                f"{lo:.3f}-{hi:.3f}",
                s["spikes"],
                s["steps_lost"],
                s["ms_per_step"],
                s["ms_clip_and_step"],
            ]
        )
    table = loop.md_table(
        [
            "method",
            "final val loss (mean)",
            "min-max over seeds",
            "spikes per run",
            "steps lost per run",
            "ms per step",
            "ms clip + optimizer step",
        ],
        rows,
    )
    search_table = loop.md_table(
        ["adaptive setting (seed %d)" % tune_seed, "final val loss", "spikes"],
        [[label(s["hp"]) or "defaults", s["val_loss"], s["spikes"]] for s in search],
    )
    done = {k: v for k, v in summary.items() if v is not None and math.isfinite(v["final_val_loss"])}
    winner = min(done, key=lambda k: done[k]["final_val_loss"]) if done else "none"
    fewest = min(done, key=lambda k: (done[k]["steps_lost"], done[k]["final_val_loss"])) if done else "none"

    plt = loop.pyplot()
    fig, axes = plt.subplots(2, 1, figsize=(9, 7.5), sharex=True)
    colors = plt.get_cmap("tab10").colors
    for (name, rs), color in zip(runs.items(), colors):
        if rs is None or "alone" in name:
            continue
        r = rs[0]
        steps = range(1, len(r["loss"]) + 1)
        axes[0].plot(steps, r["loss"], lw=0.7, color=color, label=name)
        axes[1].plot(range(1, len(r["norm"]) + 1), r["norm"], lw=0.7, color=color, label=name)
        for t in summary[name]["spike_steps"][0]:
            axes[0].plot(t + 1, r["loss"][t], "v", color=color, ms=5)
    axes[0].set_ylabel("training loss (batch), v = spike")
    axes[0].set_yscale("log")
    axes[1].set_ylabel("gradient norm before clipping")
    axes[1].set_yscale("log")
    axes[1].set_xlabel("optimizer step")
    for ax in axes:
        ax.legend(fontsize=7, loc="upper right")
    fig.suptitle(
        f"{args.layers}-layer transformer LM (d {args.d_model}), AdamW lr {args.lr:g}, no warm-up, seed {seeds[0]}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(os.path.join(out, "lm_spikes.png"), dpi=110)

    seconds = timer.seconds()
    n_params = sum(p.numel() for p in TinyLM(128, args.d_model, args.layers, args.context).parameters())
    body = (
        f"Character-level language model on the source of {len(MODULES)} standard-library modules (bytes, vocabulary "
        f"128; first 90% train, last 10% validate). {args.layers}-layer pre-LN decoder-only transformer, d_model "
        f"{args.d_model}, 4 heads, context {args.context}, {n_params} parameters; AdamW (betas 0.9/0.95, weight decay "
        f"0.1) at a constant lr {args.lr:g}, no warm-up, batch {args.batch}, {args.steps} steps. Seeds "
        f"{seeds[0]}-{seeds[-1]} for every method (the same initialisation and batches per seed); the tuned setting "
        f"was picked on seed {tune_seed}. Final val loss: cross-entropy (nats per byte) on {args.val_windows} fixed "
        f"held-out windows after the last step (nan: diverged).\n\n"
        f"A spike: a step whose training loss exceeds {args.spike_x:g}x the median of the previous {args.spike_w} "
        f"steps' losses; steps lost: steps until the loss is back at or below that median (the rest of the run if it "
        f"never is). Times: median per run, mean over seeds, one thread, niced, on a shared machine.\n\n{table}\n\n"
        f"Lowest final loss: **{winner}**. Fewest steps lost to spikes: **{fewest}**.\n\n"
        f"The tuning grid (adaptive clipping, seed {tune_seed}):\n\n{search_table}\n\n"
        f"![lm spikes](lm_spikes.png)\n"
    )
    loop.write_md(out, "lm_spikes", "Loss spikes in a small language model", body, loop.command(), seconds)
    with open(os.path.join(out, "lm_spikes.json"), "w") as f:
        json.dump(
            {"args": vars(args), "search": search, "best": best, "summary": summary, "seconds": seconds}, f, indent=1
        )
    print(table)
    print(search_table)
    print(f"run time {seconds:.0f} s; wrote {out}/lm_spikes.png/.md/.json")
    return {"summary": summary, "runs": runs, "search": search, "best": best, "out": out, "rows": rows}


if __name__ == "__main__":
    main()
