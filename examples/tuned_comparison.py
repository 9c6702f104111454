"""The original report's comparison, redone: 30-trial Optuna searches, then 20 epochs over 5 seeds, mean and spread.

Four searches (TPE sampler seeded with ``--seed``, 30 trials each, objective: validation loss after 10 epochs of the
mnist1d MLP at seed ``--seed``):

* Adam + fixed norm clipping: lr in [1e-3, 1e-1] log, clip_val in [0.1, 10] log (the original report's space);
* Adam + adaptive clipping: lr in [1e-3, 1e-1] log, alpha in [0.5, 5], beta in [0.8, 0.999] (same);
* SmoothedSignSGD: lr in [1e-4, 1e-1] log, beta in [0.8, 0.999];
* SmoothedNormSGD (global norm; its whole update has norm <= lr, so its lr is larger): lr in [1e-2, 10] log, beta
  in [0.8, 0.999].

Then every tuned setting, the original report's two settings and the two found by ``examples/tune.py`` (the same
searches run through a Lightning Trainer) train 20 epochs on 5 seeds that the searches did not see
(``--seed + 1`` ... ``--seed + 5``). Writes ``tuned_comparison.{png,md,json}``. Run::

    python examples/tuned_comparison.py             # about 2-4 minutes on 2 CPU cores
    python examples/tuned_comparison.py --quick     # 2 trials, 1 epoch, 1 seed
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import mnist1d_loop as loop

SPACES = {
    "fixed": {"lr": (1e-3, 1e-1, True), "clip_val": (0.1, 10.0, True)},
    "adaptive": {"lr": (1e-3, 1e-1, True), "alpha": (0.5, 5.0, False), "beta": (0.8, 0.999, False)},
    "sign": {"lr": (1e-4, 1e-1, True), "beta": (0.8, 0.999, False)},
    "norm": {"lr": (1e-2, 10.0, True), "beta": (0.8, 0.999, False)},
}
LABELS = {
    "fixed": "Adam + fixed clipping",
    "adaptive": "Adam + adaptive clipping",
    "sign": "SmoothedSignSGD",
    "norm": "SmoothedNormSGD",
}
REPORT = {
    "fixed": {"lr": 0.0107, "clip_val": 2.38},
    "adaptive": {"lr": 0.0401, "alpha": 3.80, "beta": 0.918},
}
TUNE_PY = {  # examples/tune.py rerun (Lightning Trainer, 30 trials, 10 epochs)
    "fixed": {"lr": 0.0040, "clip_val": 9.17},
    "adaptive": {"lr": 0.0040, "alpha": 4.69, "beta": 0.842},
}


def search(method: str, trials: int, epochs: int, seed: int) -> dict:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)

    def objective(trial: optuna.Trial) -> float:
        hp = {k: trial.suggest_float(k, lo, hi, log=log) for k, (lo, hi, log) in SPACES[method].items()}
        loss = loop.train(method, epochs=epochs, seed=seed, **hp)["val_loss"][-1]
        return loss if loss == loss else float("inf")

    study = optuna.create_study(direction="minimize", sampler=optuna.samplers.TPESampler(seed=seed))
    study.optimize(objective, n_trials=trials)
    return {"val_loss": study.best_value, **study.best_params}


def fmt(hp: dict) -> str:
    return ", ".join(f"{k} {v:.3g}" for k, v in hp.items())


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    loop.add_common_args(parser)
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--tune-epochs", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args()
    if args.quick:
        args.trials, args.tune_epochs, args.epochs, args.seeds = 2, 1, 2, 1
    out = loop.resolve_out(args)
    timer = loop.Timer()

    found = {m: search(m, args.trials, args.tune_epochs, args.seed) for m in SPACES}
    print("searches:", json.dumps(found, indent=1))
    settings = {}
    for m in ("fixed", "adaptive"):
        settings[f"{LABELS[m]}, original report ({fmt(REPORT[m])})"] = (m, REPORT[m])
        settings[f"{LABELS[m]}, tune.py with a Trainer ({fmt(TUNE_PY[m])})"] = (m, TUNE_PY[m])
    for m in SPACES:
        hp = {k: v for k, v in found[m].items() if k != "val_loss"}
        settings[f"{LABELS[m]}, tuned here ({fmt(hp)})"] = (m, hp)

    lr = found["fixed"]["lr"]
    settings[f"Adam alone, no clipping (lr {lr:.3g}, the fixed search's lr)"] = ("adam", {"lr": lr})
    seeds = [args.seed + 1 + i for i in range(args.seeds)]
    runs = {
        name: [loop.train(m, epochs=args.epochs, seed=s, **hp) for s in seeds] for name, (m, hp) in settings.items()
    }

    rows, summary = [], {}
    for name, rs in runs.items():
        final = [r["val_loss"][-1] for r in rs]
        acc = [r["val_acc"][-1] for r in rs]
        best = [min(r["val_loss"]) for r in rs]
        early = [r["val_loss"][min(2, args.epochs - 1)] for r in rs]
        sd = statistics.stdev(final) if len(final) > 1 else 0.0
        summary[name] = {"final_loss": statistics.mean(final), "final_loss_sd": sd, "final_acc": statistics.mean(acc)}
        rows.append(
            [
                name,
                statistics.mean(early),
                statistics.mean(best),
                statistics.mean(final),
                sd,
                f"{min(final):.3f}-{max(final):.3f}",
                statistics.mean(acc),
            ]
        )
    ep3 = min(3, args.epochs)
    table = loop.md_table(
        [
            "setting",
            f"val loss, epoch {ep3}",
            "best-epoch val loss",
            f"final val loss (epoch {args.epochs})",
            "sd",
            "min-max over seeds",
            "final val acc",
        ],
        rows,
    )
    search_rows = [
        [LABELS[m], fmt({k: v for k, v in f.items() if k != "val_loss"}), f["val_loss"]] for m, f in found.items()
    ]
    search_table = loop.md_table(
        ["method", "best values", f"val loss after {args.tune_epochs} epochs (seed {args.seed})"], search_rows
    )

    plt = loop.pyplot()
    fig, ax = plt.subplots(figsize=(9, 5))
    colors = plt.get_cmap("tab10").colors
    for (name, rs), color in zip(runs.items(), colors):
        epochs = range(1, args.epochs + 1)
        mean = [statistics.mean(r["val_loss"][e] for r in rs) for e in range(args.epochs)]
        lo = [min(r["val_loss"][e] for r in rs) for e in range(args.epochs)]
        hi = [max(r["val_loss"][e] for r in rs) for e in range(args.epochs)]
        style = "--" if "original report" in name else (":" if "tune.py" in name or "alone" in name else "-")
        ax.plot(epochs, mean, style, color=color, label=name)
        ax.fill_between(epochs, lo, hi, color=color, alpha=0.12)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation loss (mean of seeds, band: min-max)")
    ax.set_title(f"mnist1d MLP, {len(seeds)} seeds: tuned settings vs the original report's")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "tuned_comparison.png"), dpi=110)

    seconds = timer.seconds()
    body = (
        f"Searches ({args.trials} TPE trials each, objective: validation loss after {args.tune_epochs} epochs):\n\n"
        f"{search_table}\n\n"
        f"{args.epochs} epochs on seeds {seeds[0]}-{seeds[-1]} (not the search's seed), the mnist1d MLP, batch 100:\n\n"
        f"{table}\n\n![tuned comparison](tuned_comparison.png)\n"
    )
    loop.write_md(
        out,
        "tuned_comparison",
        "Tuned comparison: fixed vs adaptive clipping vs the Smoothed optimizers",
        body,
        loop.command(),
        seconds,
    )
    with open(os.path.join(out, "tuned_comparison.json"), "w") as f:
        json.dump({"searches": found, "summary": summary, "seconds": seconds}, f, indent=1)
    print(table)
    print(f"run time {seconds:.0f} s; wrote {out}/tuned_comparison.png/.md/.json")
    return {"searches": found, "summary": summary, "out": out}


if __name__ == "__main__":
    main()
