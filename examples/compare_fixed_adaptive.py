"""Adam + fixed norm clipping vs Adam + adaptive clipping on the mnist1d MLP: validation-loss curves.

Both runs use the hyper-parameters of ``configs/adam_fixed.yaml`` and ``configs/adam_adaptive.yaml`` (found by
``examples/tune.py``, 30 Optuna trials each), train 20 epochs with the same seed and data, and the validation loss
of every epoch is written to a JSON file and drawn into a PNG. Run::

    python examples/compare_fixed_adaptive.py --out examples/out
"""

from __future__ import annotations

import argparse
import json
import os

import lightning.pytorch as pl

from lightning_clip import AdaptiveGradientClipping
from lightning_clip.demo import MNIST1DClassifier, MNIST1DDataModule

SETTINGS = {
    "Adam + fixed clipping (lr 0.0107, clip 2.38)": dict(lr=0.0107, clip=dict(mode="norm", clip_val=2.38)),
    "Adam + adaptive clipping (lr 0.0401, alpha 3.80, beta 0.918)": dict(lr=0.0401, clip=dict(alpha=3.80, beta=0.918)),
}


class _History(pl.Callback):
    def __init__(self) -> None:
        self.val_loss: list[float] = []

    def on_validation_epoch_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.val_loss.append(float(trainer.callback_metrics["val/loss"]))


def curve(lr: float, clip: dict, epochs: int, seed: int = 0) -> list[float]:
    """Validation loss after each epoch."""
    pl.seed_everything(seed, verbose=False)
    history = _History()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[AdaptiveGradientClipping(**clip), history],
    )
    trainer.fit(MNIST1DClassifier(lr=lr), MNIST1DDataModule(seed=42))
    return history.val_loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", default="examples/out")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    curves = {
        name: [curve(s["lr"], s["clip"], args.epochs, seed) for seed in range(args.seeds)]
        for name, s in SETTINGS.items()
    }
    with open(os.path.join(args.out, "compare_fixed_adaptive.json"), "w") as f:
        json.dump(curves, f, indent=1)
    for name, runs in curves.items():
        mean = [sum(r[e] for r in runs) / len(runs) for e in range(args.epochs)]
        print(f"{name}: val loss by epoch (mean of {len(runs)} seeds)")
        print("  " + " ".join(f"{v:.3f}" for v in mean))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for (name, runs), color in zip(curves.items(), ("tab:blue", "tab:orange")):
        for i, r in enumerate(runs):
            ax.plot(range(1, len(r) + 1), r, color=color, alpha=0.9 if i == 0 else 0.35, label=name if i == 0 else None)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation loss")
    ax.set_title("mnist1d MLP: fixed vs adaptive gradient clipping (Adam)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(args.out, "compare_fixed_adaptive.png")
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
