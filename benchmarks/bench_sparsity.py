"""Cost of update-sparsity logging, and which is sparser: plain Adam or Adam with aggressive value clipping.

1. Cost, in a real Trainer (an MLP of ~4.2M float32 parameters, Adam, ``log_every_n_steps=10``): the time of a
   step that logs and of one that does not, and the parameter copies held inside the step and after it, for
   ``AdaptiveGradientClipping(log_sparsity=False)``, the default (``log_sparsity=True``) and
   ``sparsity_cumulative=True``. Non-logging steps should cost the same with and without sparsity and hold no copy;
   logging steps hold one copy of the weights from ``on_before_optimizer_step`` to the end of the step.
2. The mnist1d MLP (``lightning_clip.demo``), same seed and data order: plain Adam (sparsity from
   ``UpdateSparsityMonitor``), Adam with value clipping at 1e-3 (``AdaptiveGradientClipping(mode="value")``, which
   turns Adam into Smoothed SignSGD with bias correction) and ``SmoothedSignSGD`` itself, at lr 0.01. Prints the
   mean logged sparsity (per step and cumulative over each 10-step window) and the validation accuracy.

Run: ``python benchmarks/bench_sparsity.py`` (``--quick`` for fewer steps, ``--part cost|mnist1d``).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_clip import AdaptiveGradientClipping
from lightning_clip.monitor import UpdateSparsityMonitor

LOG_EVERY = 10


class _Wide(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(512, 1024),
            nn.ReLU(),
            nn.Linear(1024, 1024),
            nn.ReLU(),
            nn.Linear(1024, 1024),
            nn.ReLU(),
            nn.Linear(1024, 1024),
            nn.ReLU(),
            nn.Linear(1024, 512),
        )

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


class _Timer(pl.Callback):
    """Wall time of each batch, and the copies the clipping callback holds inside the step and after it."""

    def __init__(self, clip: AdaptiveGradientClipping) -> None:
        self.clip = clip
        self.times: dict[bool, list[float]] = {True: [], False: []}
        self.held_in: dict[bool, set[int]] = {True: set(), False: set()}
        self.held_after: set[int] = set()

    def _held(self) -> int:
        return sum(t.held_bytes for t in self.clip._sparsity.trackers.values())

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._logging = trainer._logger_connector.should_update_logs
        self._start = time.perf_counter()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):  # runs after the clipping callback's hook
        self.held_in[self._logging].add(self._held())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.times[self._logging].append(time.perf_counter() - self._start)


class _AfterBatch(pl.Callback):
    def __init__(self, timer: _Timer) -> None:
        self.timer = timer

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.timer.held_after.add(self.timer._held())


def bench_cost(steps: int) -> None:
    torch.manual_seed(0)
    x, y = torch.randn(steps * 64, 512), torch.randn(steps * 64, 512)
    n_params = sum(p.numel() for p in _Wide().parameters())
    print(
        f"\n== cost: MLP of {n_params / 1e6:.2f}M float32 parameters ({n_params * 4 / 2**20:.1f} MiB), Adam, "
        f"batch 64, {steps} steps, log_every_n_steps={LOG_EVERY}, {torch.get_num_threads()} threads =="
    )
    variants = {
        "log_sparsity=False": dict(log_sparsity=False),
        "log_sparsity=True (default)": dict(),
        "  + sparsity_cumulative=True": dict(sparsity_cumulative=True),
    }
    results = {}
    for rnd in range(3):  # a warm-up round (discarded), then two interleaved rounds whose medians pool them
        for name, kwargs in variants.items():
            torch.manual_seed(0)
            clip = AdaptiveGradientClipping(**kwargs)
            timer = _Timer(clip)
            with tempfile.TemporaryDirectory() as tmp:
                trainer = pl.Trainer(
                    accelerator="cpu",
                    max_steps=steps,
                    logger=pl.loggers.CSVLogger(tmp),
                    log_every_n_steps=LOG_EVERY,
                    enable_checkpointing=False,
                    enable_progress_bar=False,
                    enable_model_summary=False,
                    callbacks=[clip, timer, _AfterBatch(timer)],
                )
                trainer.fit(_Wide(), DataLoader(TensorDataset(x, y), batch_size=64))
            if rnd == 0:
                continue
            prev = results.get(name)
            if prev is not None:
                for k in (True, False):
                    timer.times[k] += prev.times[k]
                    timer.held_in[k] |= prev.held_in[k]
                timer.held_after |= prev.held_after
            results[name] = timer
    print(
        f"{'':30s} {'non-logging step':>17s} {'logging step':>13s} {'held in step (non-log / log)':>30s}"
        f" {'held after step':>16s}"
    )
    for name, t in results.items():
        non = statistics.median(t.times[False][2:]) * 1e3
        log = statistics.median(t.times[True][1:]) * 1e3
        held = lambda s: "/".join(f"{b / 2**20:.1f}" for b in sorted(s))  # noqa: E731
        print(
            f"{name:30s} {non:14.1f} ms {log:10.1f} ms "
            f"{held(t.held_in[False]) + ' / ' + held(t.held_in[True]) + ' MiB':>30s}"
            f" {held(t.held_after) + ' MiB':>16s}"
        )


def _mnist1d_run(kind: str, epochs: int) -> dict[str, float]:
    from lightning_clip.demo import MNIST1DClassifier, MNIST1DDataModule
    from lightning_clip.optim import SmoothedSignSGD

    pl.seed_everything(0, verbose=False)
    if kind == "adam+value-clip 1e-3":
        cb: pl.Callback = AdaptiveGradientClipping(mode="value", clip_val=1e-3, sparsity_cumulative=True)
    else:
        cb = UpdateSparsityMonitor(cumulative=True)
    optimizer = (lambda p: SmoothedSignSGD(p, lr=0.01, beta=0.9)) if kind == "smoothed-signsgd" else None
    model = MNIST1DClassifier(lr=0.01, optimizer=optimizer)
    series: dict[str, list[float]] = {"step": [], "cum": []}

    class Collect(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            for k, v in cb.last_metrics.items():
                if k.endswith("update_sparsity_cumulative"):
                    series["cum"].append(v)
                elif k.endswith("update_sparsity"):
                    series["step"].append(v)
            cb.last_metrics.clear()

    with tempfile.TemporaryDirectory() as tmp:
        trainer = pl.Trainer(
            accelerator="cpu",
            max_epochs=epochs,
            logger=pl.loggers.CSVLogger(tmp),
            log_every_n_steps=LOG_EVERY,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[cb, Collect()],
        )
        trainer.fit(model, MNIST1DDataModule(batch_size=100))
        acc = float(trainer.callback_metrics["val/acc"])
    return {
        "mean": statistics.mean(series["step"]),
        "first": series["step"][0],
        "last": statistics.mean(series["step"][-4:]),
        "cum": statistics.mean(series["cum"]),
        "n": len(series["step"]),
        "acc": acc,
    }


def bench_mnist1d(epochs: int) -> None:
    print(
        f"\n== mnist1d MLP (40-100-100-10), lr 0.01, batch 100, {epochs} epochs ({epochs * 40} steps), "
        f"sparsity logged every {LOG_EVERY} steps, tol 0.1 (|dw| <= 0.1 lr) =="
    )
    print(f"{'':24s} {'mean':>6s} {'first log':>9s} {'last 4 logs':>11s} {'cumulative mean':>15s} {'val acc':>8s}")
    for kind in ("adam", "adam+value-clip 1e-3", "smoothed-signsgd"):
        r = _mnist1d_run(kind, epochs)
        print(f"{kind:24s} {r['mean']:6.3f} {r['first']:9.3f} {r['last']:11.3f} {r['cum']:15.3f} {r['acc']:8.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps")
    parser.add_argument("--part", choices=("cost", "mnist1d", "all"), default="all")
    args = parser.parse_args()
    if args.part in ("cost", "all"):
        bench_cost(40 if args.quick else 80)
    if args.part in ("mnist1d", "all"):
        bench_mnist1d(2 if args.quick else 10)


if __name__ == "__main__":
    main()
