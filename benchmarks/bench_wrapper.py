"""Per-step overhead of AdaptiveClippingOptimizer over the wrapped optimizer's own ``step()``, against the clipping
cost of the AdaptiveGradientClipping callback on the same gradients.

16M float32 parameters in 100 tensors of 400 x 400 (as ``bench_clipping.py``), gradients fixed (at the defaults,
alpha 3.8, the same gradients are never clipped after the first step, so every step does the same work). In each
round, interleaved: the wrapped optimizer's ``step()`` alone (SGD, then Adam), the wrapper's ``step()`` around it,
and the callback's ``on_before_optimizer_step`` on a non-logging step (a minimal stand-in for the Trainer: the hook's
own code runs, Lightning's loop does not). The wrapper's overhead is its step minus the wrapped step of the same
round; the ratio compares the medians of the overhead and of the callback's cost.

Run: ``python benchmarks/bench_wrapper.py`` (``--quick`` for fewer rounds); the figures go to
``benchmarks/out/bench_wrapper.json`` too.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from types import SimpleNamespace

import torch
from torch import nn

from lightning_clip import AdaptiveClippingOptimizer, AdaptiveGradientClipping


def _time_ms(fn, inner: int) -> float:
    start = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - start) / inner * 1e3


def _stand_in_trainer(optimizer: torch.optim.Optimizer) -> SimpleNamespace:
    """What the callback's hook reads from a Trainer on a non-logging step of a single-device fit."""
    precision = SimpleNamespace(
        main_params=lambda opt: [p for g in opt.param_groups for p in g["params"]],
        scaler=None,
    )
    return SimpleNamespace(
        optimizers=[optimizer],
        precision_plugin=precision,
        global_step=0,
        _logger_connector=SimpleNamespace(should_update_logs=False),
        fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(_batches_that_stepped=0)),
    )


def bench(name: str, make, rounds: int, inner: int) -> dict:
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(400, 400) * 0.01) for _ in range(100)]
    for p in params:
        p.grad = torch.randn(400, 400) * 0.01
    plain = make(params)
    wrapped = AdaptiveClippingOptimizer(make(params))  # its own state (Adam), the same parameters and gradients
    callback = AdaptiveGradientClipping()
    trainer = _stand_in_trainer(plain)

    def hook() -> None:
        callback.on_before_optimizer_step(trainer, None, plain)

    for fn in (plain.step, wrapped.step, hook):  # allocate the states
        fn()
    times: dict[str, list[float]] = {"optimizer.step": [], "wrapper.step": [], "callback hook": [], "overhead": []}
    for _ in range(rounds):
        t_plain = _time_ms(plain.step, inner)
        t_wrapped = _time_ms(wrapped.step, inner)
        t_hook = _time_ms(hook, inner)
        times["optimizer.step"].append(t_plain)
        times["wrapper.step"].append(t_wrapped)
        times["callback hook"].append(t_hook)
        times["overhead"].append(t_wrapped - t_plain)
    med = {k: statistics.median(v) for k, v in times.items()}
    med["ratio"] = med["overhead"] / med["callback hook"]
    n = sum(p.numel() for p in params)
    print(f"\n{name}: {n / 1e6:.1f}M float32 parameters in {len(params)} tensors, median of {rounds} rounds x {inner}")
    for key in ("optimizer.step", "wrapper.step", "callback hook", "overhead"):
        print(f"  {key:40s} {med[key]:8.2f} ms")
    print(f"  wrapper overhead / callback clipping cost  {med['ratio']:8.3f}x")
    return {"optimizer": name, **med, "rounds": rounds, "inner": inner}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"))
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    rounds, inner = (5, 3) if args.quick else (15, 3)
    results = [
        bench("SGD(lr=1e-6)", lambda ps: torch.optim.SGD(ps, lr=1e-6), rounds, inner),
        bench("Adam(lr=1e-6)", lambda ps: torch.optim.Adam(ps, lr=1e-6), rounds, inner),
    ]
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "bench_wrapper.json")
    with open(path, "w") as f:
        json.dump({"torch": torch.__version__, "threads": torch.get_num_threads(), "results": results}, f, indent=2)
    print(f"\nwritten: {path}")


if __name__ == "__main__":
    main()
