"""Fit the tiny regressor with AdaptiveGradientClipping, on one process or with DDP over gloo; dump the state.

Used by tests/test_ddp.py: ``python tests/ddp_run.py OUT DEVICES BATCH_SIZE [PRECISION ...]``: one fit per precision
(default ``32-true``), in the same processes; each rank of each fit writes ``OUT.PRECISION.rankR`` (JSON).
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from torch.utils.data import DataLoader, Subset  # noqa: E402

from lightning_clip import AdaptiveGradientClipping  # noqa: E402
from tests.conftest import TinyRegressor, regression_loader  # noqa: E402
from tests.lightning_ns import pl  # noqa: E402


class Sharded(TinyRegressor):
    """Rank r of W reads samples r, r+W, r+2W, ... in order: together the ranks read the one-process batches."""

    def __init__(self, devices: int, batch_size: int, optimizer: str = "adam") -> None:
        super().__init__(lr=0.05, optimizer=optimizer)
        self.devices, self.batch_size = devices, batch_size

    def train_dataloader(self):
        data = regression_loader(n=96).dataset
        indices = list(range(self.global_rank, len(data), self.devices))
        return DataLoader(Subset(data, indices), batch_size=self.batch_size, shuffle=False)


def main(out: str, devices: int, batch_size: int, precisions: list[str]) -> None:
    for precision in precisions or ["32-true"]:
        fit(f"{out}.{precision}", devices, batch_size, precision)


def fit(out: str, devices: int, batch_size: int, precision: str) -> None:
    pl.seed_everything(0, verbose=False)
    # Adam in pure float16 underflows its eps and diverges whatever the clipping: SGD for 16-true
    model = Sharded(devices, batch_size, optimizer="sgd" if precision == "16-true" else "adam")
    cb = AdaptiveGradientClipping(alpha=1.1, beta=0.7)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        max_steps=6,
        precision=precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[cb],
        use_distributed_sampler=False,
    )
    trainer.fit(model)
    state = cb.clip_state()
    record = {
        "rank": trainer.global_rank,
        "ema": float(state.ema),
        "seen": int(state.seen),
        "norms": model.backward_norms,
        "weights": [float(v) for v in model.net[-1].weight.detach().flatten()],
        "grad_dtype": str(model.net[-1].weight.dtype),
    }
    with open(f"{out}.rank{trainer.global_rank}", "w") as f:
        json.dump(record, f)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:])
