"""The ``lightning-clip`` console script: a LightningCLI over the built-in mnist1d example.

Run ``lightning-clip fit --config configs/adam_adaptive.yaml``; every argument of the model, the data, the
Trainer, its callbacks (``AdaptiveGradientClipping`` among them) and the optimizer is settable from YAML or the
command line (``lightning-clip fit --help``).
"""

from __future__ import annotations

import os
import sys

from pytorch_lightning.cli import ArgsType, LightningCLI
from pytorch_lightning.loggers import TensorBoardLogger

from lightning_clip.demo import MNIST1DClassifier, MNIST1DDataModule


class ClipCLI(LightningCLI):
    """LightningCLI that says, after ``fit``, where the TensorBoard logs are and how to open them."""

    def after_fit(self) -> None:
        for logger in self.trainer.loggers:
            if isinstance(logger, TensorBoardLogger) and self.trainer.is_global_zero:
                print(
                    f"\nTensorBoard logs: {os.path.abspath(logger.log_dir)}\n"
                    f"Open the dashboard with:  tensorboard --logdir {logger.save_dir}\n"
                    "then browse http://localhost:6006 (the CUSTOM SCALARS tab holds the clipping charts).",
                    flush=True,
                )


def build_cli(args: ArgsType = None, run: bool = True) -> ClipCLI:
    """The CLI over the mnist1d example; ``args`` and ``run`` as for :class:`~pytorch_lightning.cli.LightningCLI`."""
    return ClipCLI(
        MNIST1DClassifier,
        MNIST1DDataModule,
        seed_everything_default=0,
        args=args,
        run=run,
    )


def main(args: ArgsType = None) -> None:
    """Entry point of the ``lightning-clip`` console script."""
    build_cli(args)


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
