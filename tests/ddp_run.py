"""Fit the tiny regressor with AdaptiveGradientClipping, on one process or with DDP over gloo; dump the state.

Used by tests/test_ddp.py: ``python tests/ddp_run.py OUT DEVICES BATCH_SIZE [PRECISION ...]``: one fit per precision
(default ``32-true``), in the same processes; each rank of each fit writes ``OUT.PRECISION.rankR`` (JSON).

``16-mixed`` is float16 autocast with a real CPU ``GradScaler``, given to the Trainer as Lightning's own
``MixedPrecision`` plugin (for ``precision="16-mixed"`` Lightning picks bf16 on CPU). Its initial scale is large, so
the first steps overflow in float16 and the scaler skips them.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch.utils.data import DataLoader, Subset  # noqa: E402

from lightning_clip import AdaptiveGradientClipping  # noqa: E402
from tests.conftest import TinyRegressor, norm64, regression_loader  # noqa: E402
from tests.lightning_ns import pl  # noqa: E402

#: the initial loss scale of the 16-mixed runs: the first steps' float16 gradients overflow
INIT_SCALE = 2.0**15


class Sharded(TinyRegressor):
    """Rank r of W reads samples r, r+W, r+2W, ... in order: together the ranks read the one-process batches."""

    def __init__(self, devices: int, batch_size: int, optimizer: str = "adam") -> None:
        super().__init__(lr=0.05, optimizer=optimizer)
        self.devices, self.batch_size = devices, batch_size

    def train_dataloader(self):
        data = regression_loader(n=96).dataset
        indices = list(range(self.global_rank, len(data), self.devices))
        return DataLoader(Subset(data, indices), batch_size=self.batch_size, shuffle=False)


class Probe(pl.Callback):
    """Placed before the clipping callback: the float64 norm of the gradients the hook receives (under a
    ``GradScaler``: unscaled, DDP-reduced), and after each batch the scaler's scale and the optimizer's own count of
    the steps it took (Adam's ``step``)."""

    def __init__(self) -> None:
        self.norms: list[float] = []
        self.scales: list[float] = []
        self.adam_steps: list[int] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.norms.append(norm64([p.grad for p in pl_module.parameters() if p.grad is not None]))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None:
            self.scales.append(float(scaler.get_scale()))
        state = trainer.optimizers[0].state.get(next(pl_module.parameters()), {})
        self.adam_steps.append(int(state["step"]) if "step" in state else 0)


def main(out: str, devices: int, batch_size: int, precisions: list[str]) -> None:
    for precision in precisions or ["32-true"]:
        fit(f"{out}.{precision}", devices, batch_size, precision)


def fit(out: str, devices: int, batch_size: int, precision: str) -> None:
    pl.seed_everything(0, verbose=False)
    # Adam in pure float16 underflows its eps and diverges whatever the clipping: SGD for 16-true
    model = Sharded(devices, batch_size, optimizer="sgd" if precision == "16-true" else "adam")
    probe, cb = Probe(), AdaptiveGradientClipping(alpha=1.1, beta=0.7)
    if precision == "16-mixed":
        scaler = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE)
        precision_kwargs = {"plugins": [pl.plugins.precision.MixedPrecision("16-mixed", "cpu", scaler)]}
    else:
        precision_kwargs = {"precision": precision}
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        max_steps=6,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[probe, cb],
        use_distributed_sampler=False,
        **precision_kwargs,
    )
    trainer.fit(model)
    state = cb.clip_state()
    record = {
        "rank": trainer.global_rank,
        "ema": float(state.ema),
        "seen": int(state.seen),
        "steps": int(state.steps),
        "nonfinite": int(state.nonfinite),
        "norms": model.backward_norms,
        "hook_norms": probe.norms,
        "scales": probe.scales,
        "adam_steps": probe.adam_steps,
        "precision_plugin": type(trainer.precision_plugin).__name__,
        "weights": [float(v) for v in model.net[-1].weight.detach().flatten()],
        "grad_dtype": str(model.net[-1].weight.dtype),
    }
    with open(f"{out}.rank{trainer.global_rank}", "w") as f:
        json.dump(record, f)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:])
