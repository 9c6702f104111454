"""Per-step cost of AdaptiveGradientClipping, measured side by side with torch's and Lightning's clipping.

1. The clipping work alone, on ~16M float32 parameters in 100 tensors, against
   ``torch.nn.utils.clip_grad_norm_(foreach=True)`` on the same gradients: the default settings, the share of the
   default non-finite policy (``zero``: the ``nan_to_num`` in the pass of the multiplication), and each kernel.
2. A whole Trainer step (forward, backward, clipping, Adam) with the callback at its defaults against the same
   step with ``Trainer(gradient_clip_val=1.0)``.

Every variant is timed in interleaved rounds in one process; medians and their ratios are printed.
Run: ``python benchmarks/bench_clipping.py`` (``--quick`` for fewer rounds).
"""

from __future__ import annotations

import argparse
import statistics
import time

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_clip import AdaptiveGradientClipping
from lightning_clip.functional import ClipState, clip_grads_, rule_from_settings


def _median_ms(fns: dict, rounds: int, inner: int) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            times[name].append((time.perf_counter() - start) / inner * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def bench_kernels(rounds: int) -> None:
    torch.manual_seed(0)
    params = [nn.Parameter(torch.zeros(400, 400)) for _ in range(100)]
    source = [torch.randn(400, 400) * 0.01 for _ in params]
    for p, g in zip(params, source):
        p.grad = g.clone()
    grads = [p.grad for p in params]
    rule = rule_from_settings()  # defaults: alpha 3.8, beta 0.918
    states = {}

    def ours(nonfinite="zero", foreach=None, fused=False):
        state = states.setdefault((nonfinite, foreach, fused), ClipState.zeros())
        return lambda: clip_grads_(grads, state, rule, nonfinite=nonfinite, foreach=foreach, fused=fused)

    start = time.perf_counter()
    ours(fused=True)()
    compile_s = time.perf_counter() - start

    fns = {
        "torch clip_grad_norm_(foreach=True)": lambda: torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True),
        "callback core, defaults": ours(),
        "  nonfinite='keep' (no zeroing)": ours("keep"),
        "  zero, for-loop kernel": ours("zero", False),
        "  zero, foreach kernel": ours("zero", True),
        "  keep, foreach kernel": ours("keep", True),
        "callback core, fused=True (compiled)": ours(fused=True),
    }
    ms = _median_ms(fns, rounds, inner=5)
    base = ms["torch clip_grad_norm_(foreach=True)"]
    n = sum(p.numel() for p in params)
    print(f"\n1. Clipping work, {n / 1e6:.1f}M float32 parameters in {len(params)} tensors, median of {rounds} rounds")
    print(f"{'variant':40s} {'ms':>8s} {'ratio':>7s}")
    for name, value in ms.items():
        print(f"{name:40s} {value:8.2f} {value / base:7.3f}x")
    share = ms["callback core, defaults"] - ms["  nonfinite='keep' (no zeroing)"]
    print(f"share of the default non-finite policy: {share:.2f} ms ({share / base:.3f}x of the torch baseline)")
    print(f"one-time compilation of the fused kernel: {compile_s:.1f} s")


class _Timer(pl.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.times.append(time.perf_counter() - self._start)


class _Wide(pl.LightningModule):
    def __init__(self, width: int = 2048, depth: int = 4) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(256, width), nn.ReLU()]
        for _ in range(depth - 1):
            layers += [nn.Linear(width, width), nn.ReLU()]
        layers.append(nn.Linear(width, 10))
        self.net = nn.Sequential(*layers)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-4)


def bench_trainer(rounds: int, steps: int) -> None:
    torch.manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(32 * steps, 256), torch.randint(0, 10, (32 * steps,))), batch_size=32)
    results: dict[str, list[float]] = {"gradient_clip_val=1.0": [], "AdaptiveGradientClipping()": []}
    n = None
    for _ in range(rounds):
        for name in results:
            pl.seed_everything(0, verbose=False)
            model = _Wide()
            n = sum(p.numel() for p in model.parameters())
            timer = _Timer()
            clip = {"gradient_clip_val": 1.0} if name.startswith("gradient") else {}
            callbacks = [timer] if clip else [timer, AdaptiveGradientClipping()]
            trainer = pl.Trainer(
                accelerator="cpu",
                max_steps=steps,
                logger=False,
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                callbacks=callbacks,
                **clip,
            )
            trainer.fit(model, data)
            results[name].extend(timer.times[2:])  # the first steps allocate the optimizer state
    med = {k: statistics.median(v) * 1e3 for k, v in results.items()}
    print(
        f"\n2. Whole Trainer step (MLP, {n / 1e6:.1f}M parameters, Adam, batch 32), median of "
        f"{len(results['gradient_clip_val=1.0'])} steps per variant"
    )
    base = med["gradient_clip_val=1.0"]
    for name, value in med.items():
        print(f"{name:40s} {value:8.2f} ms {value / base:7.3f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    bench_kernels(rounds=5 if args.quick else 30)
    bench_trainer(rounds=1 if args.quick else 6, steps=8 if args.quick else 25)


if __name__ == "__main__":
    main()
