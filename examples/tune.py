"""Tune Adam + fixed clipping and Adam + adaptive clipping on the mnist1d MLP with Optuna, 30 trials each.

Search spaces: fixed {lr in [1e-3, 1e-1] log, clip_val in [0.1, 10] log}; adaptive {lr in [1e-3, 1e-1] log,
alpha in [0.5, 5], beta in [0.8, 0.999]}. Objective: the validation loss after ``--epochs`` epochs (TPE sampler,
seed 0). Prints the best values of each; ``configs/adam_fixed.yaml`` and ``configs/adam_adaptive.yaml`` hold the
values such a search picked. Needs ``pip install -e ".[examples]"``. Run::

    python examples/tune.py --trials 30 --epochs 10
"""

from __future__ import annotations

import argparse
import json

import lightning.pytorch as pl
import optuna

from lightning_clip import AdaptiveGradientClipping
from lightning_clip.demo import MNIST1DClassifier, MNIST1DDataModule


def val_loss(lr: float, clip: dict, epochs: int) -> float:
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[AdaptiveGradientClipping(**clip)],
    )
    trainer.fit(MNIST1DClassifier(lr=lr), MNIST1DDataModule(seed=42))
    loss = float(trainer.callback_metrics["val/loss"])
    return loss if loss == loss else float("inf")


def fixed(trial: optuna.Trial, epochs: int) -> float:
    lr = trial.suggest_float("lr", 1e-3, 1e-1, log=True)
    clip_val = trial.suggest_float("clip_val", 0.1, 10.0, log=True)
    return val_loss(lr, dict(mode="norm", clip_val=clip_val), epochs)


def adaptive(trial: optuna.Trial, epochs: int) -> float:
    lr = trial.suggest_float("lr", 1e-3, 1e-1, log=True)
    alpha = trial.suggest_float("alpha", 0.5, 5.0)
    beta = trial.suggest_float("beta", 0.8, 0.999)
    return val_loss(lr, dict(alpha=alpha, beta=beta), epochs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    best = {}
    for name, objective in (("fixed", fixed), ("adaptive", adaptive)):
        study = optuna.create_study(direction="minimize", sampler=optuna.samplers.TPESampler(seed=0))
        study.optimize(lambda t, objective=objective: objective(t, args.epochs), n_trials=args.trials)
        best[name] = {"val_loss": study.best_value, **study.best_params}
    print(json.dumps(best, indent=2))


if __name__ == "__main__":
    main()
