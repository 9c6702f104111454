"""Adam alone vs Adam + AdaptiveGradientClipping when the gradient explodes in the first steps.

Adam's step is ``lr * m_hat / sqrt(v_hat)``. When the gradient explodes at step ``t`` after a few ordinary
steps, the second moment ``v`` has not yet seen anything that large, so the step that follows is up to
``(1 - beta1) / sqrt(1 - beta2) ~ 3.2`` times the usual size in the spike's direction, and the momentum keeps
pushing that way for the next ~10 steps; meanwhile ``v`` now holds the spike (``beta2 = 0.999``: a half-life of
~700 steps), so every ordinary gradient afterwards moves the weights by a tiny fraction of ``lr``. The weights
are thrown away from where training was going and the brake stays on.

Clipping acts from the first step: ``max_norm`` caps the norm before any average exists, and from step 2 the
adaptive threshold cuts the spike back to ``alpha`` times the recent norm, so ``m`` and ``v`` never see it.

The explosion is made reproducible by multiplying the loss by ``--spike-scale`` on the steps ``--spike-at``
(exactly what a diverging activation does to the gradient). Run::

    python examples/adam_first_steps.py               # prints the validation loss/accuracy of both runs
    python examples/adam_first_steps.py --epochs 2    # quicker
"""

from __future__ import annotations

import argparse
import json

import lightning.pytorch as pl
import torch

from lightning_clip import AdaptiveGradientClipping
from lightning_clip.demo import MNIST1DClassifier, MNIST1DDataModule


class SpikedClassifier(MNIST1DClassifier):
    """The mnist1d MLP whose loss (hence gradient) is multiplied by ``spike_scale`` on the ``spike_at`` steps."""

    def __init__(self, spike_at: tuple[int, ...] = (3,), spike_scale: float = 1e4, lr: float = 0.01) -> None:
        super().__init__(lr=lr)
        self.spike_at = set(spike_at)
        self.spike_scale = spike_scale

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * self.spike_scale if self.global_step in self.spike_at else loss


def run(clip: bool, epochs: int, spike_at: tuple[int, ...], spike_scale: float, seed: int = 0) -> dict[str, float]:
    """Fit one run and return its final validation metrics."""
    pl.seed_everything(seed, verbose=False)
    model = SpikedClassifier(spike_at=spike_at, spike_scale=spike_scale)
    callbacks = [AdaptiveGradientClipping(max_norm=10.0)] if clip else []
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    trainer.fit(model, MNIST1DDataModule(seed=42))
    return {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--spike-at", type=int, nargs="+", default=[3])
    parser.add_argument("--spike-scale", type=float, default=1e4)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    spiked = {
        "Adam": run(False, args.epochs, tuple(args.spike_at), args.spike_scale),
        "Adam + AdaptiveGradientClipping": run(True, args.epochs, tuple(args.spike_at), args.spike_scale),
    }
    calm = run(False, args.epochs, (), 1.0)
    print(json.dumps({"no spike, Adam": calm, **spiked}, indent=2))


if __name__ == "__main__":
    main()
