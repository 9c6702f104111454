"""Step-time and state-memory benchmark of the smoothed optimizers.

Measures, side by side in one run (repetitions interleaved across optimizers so
that drifts of the machine hit all of them alike), the median ``step()`` time of

* ``torch.optim.SGD(momentum=0.9)`` (both kernels; the faster is the baseline),
* :class:`~lightning_clip.optim.SmoothedSignSGD` (for-loop and foreach kernels),
* :class:`~lightning_clip.optim.SmoothedNormSGD` with the global norm (both kernels),
* ``torch.optim.Adam`` (default kernel) and ``torch.optim.Adam(fused=True)``,
* ``pytorch_optimizer``'s ``SignSGD`` and ``Lion`` when that package is
  importable (benchmark-only dependency; skipped otherwise),
* optionally (``--compile``) the smoothed optimizers with ``fused=True``
  (their ``torch.compile``-fused kernels; the first steps compile),

and the state memory of each optimizer (bytes of state tensors / bytes of
parameters).  Default problem: 100 float32 tensors of shape (400, 400), i.e.
16M parameters, with random gradients.

Usage::

    python benchmarks/bench_optimizers.py            # full run
    python benchmarks/bench_optimizers.py --quick    # short run
    python benchmarks/bench_optimizers.py --device cuda --compile
"""

import argparse
import statistics
import time
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from lightning_clip.optim import SmoothedNormSGD, SmoothedSignSGD


def state_bytes(opt: torch.optim.Optimizer) -> int:
    total = 0
    for st in opt.state.values():
        for v in st.values():
            if torch.is_tensor(v):
                total += v.numel() * v.element_size()
    return total


def build(params: List[nn.Parameter], device: torch.device, with_compile: bool) -> Dict[str, object]:
    lr = 1e-5
    opts: Dict[str, object] = {
        "SGD(momentum=0.9, foreach=False)": torch.optim.SGD(params, lr=lr, momentum=0.9, foreach=False),
        "SGD(momentum=0.9, foreach=True)": torch.optim.SGD(params, lr=lr, momentum=0.9, foreach=True),
        "SmoothedSignSGD(foreach=False)": SmoothedSignSGD(params, lr=lr, foreach=False),
        "SmoothedSignSGD(foreach=True)": SmoothedSignSGD(params, lr=lr, foreach=True),
        "SmoothedSignSGD(default)": SmoothedSignSGD(params, lr=lr),
        "SmoothedNormSGD(global, foreach=False)": SmoothedNormSGD(params, lr=lr, foreach=False),
        "SmoothedNormSGD(global, foreach=True)": SmoothedNormSGD(params, lr=lr, foreach=True),
        "SmoothedNormSGD(global, default)": SmoothedNormSGD(params, lr=lr),
        "Adam(default)": torch.optim.Adam(params, lr=lr),
        "Adam(foreach=False)": torch.optim.Adam(params, lr=lr, foreach=False),
        "Adam(fused=True)": torch.optim.Adam(params, lr=lr, fused=True),
    }
    try:
        import pytorch_optimizer as po

        opts["pytorch_optimizer.SignSGD"] = po.SignSGD(params, lr=lr, momentum=0.9)
        opts["pytorch_optimizer.Lion"] = po.Lion(params, lr=lr)
    except ImportError:
        print("pytorch_optimizer not importable: skipping its SignSGD and Lion")
    if with_compile:
        opts["SmoothedSignSGD(fused=True)"] = SmoothedSignSGD(params, lr=lr, fused=True)
        opts["SmoothedNormSGD(global, fused=True)"] = SmoothedNormSGD(params, lr=lr, fused=True)
    return opts


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few repetitions (and fewer tensors)")
    parser.add_argument("--tensors", type=int, default=None, help="number of tensors (default 100, quick 40)")
    parser.add_argument("--size", type=int, default=400, help="each tensor is (size, size)")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions (default 30, quick 7)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd smoothed kernels")
    args = parser.parse_args(argv)

    n_tensors = args.tensors or (40 if args.quick else 100)
    reps = args.reps or (7 if args.quick else 30)
    device = torch.device(args.device)
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(args.size, args.size, device=device) * 0.02) for _ in range(n_tensors)]
    for p in params:
        p.grad = torch.randn_like(p)
    n_params = sum(p.numel() for p in params)
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    print(
        f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, "
        f"{n_tensors} x ({args.size}, {args.size}) = {n_params / 1e6:.1f}M params, {reps} interleaved reps"
    )

    opts = build(params, device, args.compile)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    # warm-up: state allocation, compilation
    for name, opt in opts.items():
        t0 = time.perf_counter()
        for _ in range(2):
            opt.step()  # type: ignore[attr-defined]
        sync()
        if "fused=True)" in name and "Smoothed" in name:
            print(f"  {name}: warm-up incl. compilation {time.perf_counter() - t0:.1f} s")

    times: Dict[str, List[float]] = {name: [] for name in opts}
    names = list(opts)
    for r in range(reps):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            sync()
            t0 = time.perf_counter()
            opts[name].step()  # type: ignore[attr-defined]
            sync()
            times[name].append(time.perf_counter() - t0)

    med = {name: statistics.median(ts) for name, ts in times.items()}
    base_name = min(("SGD(momentum=0.9, foreach=False)", "SGD(momentum=0.9, foreach=True)"), key=med.__getitem__)
    base = med[base_name]
    print(f"baseline: {base_name} (its fastest setting here), {base * 1e3:.2f} ms/step")
    print("(ratios use medians; on a shared machine compare runs only within one invocation)\n")
    header = f"{'optimizer':44s} {'median ms':>10s} {'min ms':>8s} {'vs SGD-m':>9s} {'state/params':>13s}"
    print(header)
    print("-" * len(header))
    rows: List[Tuple[str, float, float, float]] = []
    for name in names:
        opt = opts[name]
        inner = opt
        mem = state_bytes(inner) / param_bytes  # type: ignore[arg-type]
        rows.append((name, med[name] * 1e3, med[name] / base, mem))
        print(f"{name:44s} {med[name] * 1e3:10.2f} {min(times[name]) * 1e3:8.2f} {med[name] / base:8.2f}x {mem:12.2f}x")

    def ratio(a: str, b: str) -> str:
        return f"{med[a] / med[b]:.2f}" if a in med and b in med else "n/a"

    print("\nchecks (default kernels):")
    sign, norm = "SmoothedSignSGD(default)", "SmoothedNormSGD(global, default)"
    print(f"  SmoothedSignSGD / SGD-momentum = {med[sign] / base:.2f}  (target <= 1.0)")
    print(f"  SmoothedSignSGD / Adam(default) = {ratio(sign, 'Adam(default)')}  (target < 1)")
    print(f"  SmoothedNormSGD(global) / SGD-momentum = {med[norm] / base:.2f}  (target <= 1.1)")
    for other in ("pytorch_optimizer.SignSGD", "pytorch_optimizer.Lion"):
        if other in med:
            print(
                f"  SmoothedSignSGD / {other} = {ratio(sign, other)}; SmoothedNormSGD / {other} = {ratio(norm, other)}"
            )
    if args.compile:
        print(
            "  compiled SmoothedSignSGD / Adam(fused) = "
            f"{ratio('SmoothedSignSGD(fused=True)', 'Adam(fused=True)')}; "
            "compiled SmoothedNormSGD / Adam(fused) = "
            f"{ratio('SmoothedNormSGD(global, fused=True)', 'Adam(fused=True)')}"
        )
        print(
            "  fused SmoothedSignSGD / SGD-momentum = "
            f"{ratio('SmoothedSignSGD(fused=True)', base_name)}; "
            f"fused SmoothedNormSGD(global) / SGD-momentum = {ratio('SmoothedNormSGD(global, fused=True)', base_name)}"
            "  (targets <= 0.65 and <= 0.9)"
        )


if __name__ == "__main__":
    main()
