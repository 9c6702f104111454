"""Shared pieces of the result scripts: the mnist1d MLP trained in a plain PyTorch loop, optimizers by name, output.

The loop trains ``MNIST1DClassifier``'s network (40 -> 100 -> 100 -> 10, ReLU, the same initialisation under the
same seed) on the in-memory mnist1d tensors, batches of 100 reshuffled each epoch from a seeded generator (40 steps an
epoch), and evaluates the whole validation set after every epoch. Clipping goes through ``AdaptiveClippingOptimizer``,
whose rule is the callback's (bit-identical on the same gradients), so the results hold for the callback too; the
loop is about 20x faster than a Trainer on 2 CPU cores.
"""

from __future__ import annotations

import math
import os
import platform
import time

import torch
from torch import nn

from lightning_clip import AdaptiveClippingOptimizer, SmoothedNormSGD, SmoothedSignSGD
from lightning_clip.demo import MNIST1DClassifier, mnist1d_arrays

_DATA: dict = {}


def data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """mnist1d (seed 42, the published set) as float32 / int64 tensors: x, y, x_val, y_val."""
    if not _DATA:
        d = mnist1d_arrays(42)
        _DATA["t"] = (
            torch.as_tensor(d["x"], dtype=torch.float32),
            torch.as_tensor(d["y"]).long(),
            torch.as_tensor(d["x_test"], dtype=torch.float32),
            torch.as_tensor(d["y_test"]).long(),
        )
    return _DATA["t"]


def mlp(seed: int) -> nn.Module:
    """The demo classifier's network, initialised under ``seed``."""
    torch.manual_seed(seed)
    return MNIST1DClassifier().net


def make_optimizer(method: str, params, lr: float, **hp) -> torch.optim.Optimizer:
    """``method``: ``adam``, ``fixed`` (Adam + norm clipping at ``clip_val``), ``value`` (Adam + value clipping at
    ``clip_val``), ``adaptive`` (Adam + adaptive clipping, ``alpha``, ``beta``, optional ``max_norm``), ``sign``
    (SmoothedSignSGD, ``beta``, ``bias_correction``) or ``norm`` (SmoothedNormSGD, global norm)."""
    params = list(params)
    if method == "adam":
        return torch.optim.Adam(params, lr=lr)
    if method in ("fixed", "value"):
        mode = "norm" if method == "fixed" else "value"
        return AdaptiveClippingOptimizer(torch.optim.Adam(params, lr=lr), mode=mode, clip_val=hp["clip_val"])
    if method == "adaptive":
        kw = {k: hp[k] for k in ("alpha", "beta", "max_norm", "warmup_steps") if k in hp}
        return AdaptiveClippingOptimizer(torch.optim.Adam(params, lr=lr), **kw)
    if method == "sign":
        return SmoothedSignSGD(
            params, lr=lr, beta=hp.get("beta", 0.9), bias_correction=hp.get("bias_correction", False)
        )
    if method == "norm":
        return SmoothedNormSGD(
            params, lr=lr, beta=hp.get("beta", 0.9), bias_correction=hp.get("bias_correction", False)
        )
    raise ValueError(f"Invalid method: {method!r}")


def train(method: str, lr: float, epochs: int, seed: int = 0, hook=None, **hp) -> dict:
    """Train the MLP; returns ``val_loss`` and ``val_acc`` per epoch (``nan`` once the weights are not finite).

    ``hook(opt, model, loss)``, when given, is called after every optimizer step (before ``zero_grad``)."""
    torch.set_num_threads(1)  # a 100-wide MLP: one thread is the fastest on a shared 2-core machine
    x, y, x_val, y_val = data()
    model = mlp(seed)
    opt = make_optimizer(method, model.parameters(), lr, **hp)
    gen = torch.Generator().manual_seed(seed)
    losses, accs = [], []
    for _ in range(epochs):
        model.train()
        for batch in torch.randperm(len(x), generator=gen).split(100):
            loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
            loss.backward()
            opt.step()
            if hook is not None:
                hook(opt, model, loss)
            opt.zero_grad(set_to_none=True)
        model.eval()
        with torch.no_grad():
            logits = model(x_val)
            val = nn.functional.cross_entropy(logits, y_val).item()
        losses.append(val if math.isfinite(val) else float("nan"))
        accs.append((logits.argmax(1) == y_val).float().mean().item())
    return {"val_loss": losses, "val_acc": accs}


def machine() -> str:
    return f"{os.cpu_count()} CPU cores ({platform.machine()}), torch {torch.__version__.split('+')[0]} CPU build"


class Timer:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    def seconds(self) -> float:
        return time.perf_counter() - self.start


def md_table(header: list[str], rows: list[list]) -> str:
    def cell(v) -> str:
        if isinstance(v, float):
            return "nan" if v != v else (f"{v:.3g}" if (abs(v) < 1e-3 or abs(v) >= 1e4) and v != 0 else f"{v:.3f}")
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_md(out: str, name: str, title: str, body: str, command: str, seconds: float) -> str:
    """``<out>/<name>.md``: the title, the body (tables, findings), the command, the run time and the machine."""
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, f"{name}.md")
    with open(path, "w") as f:
        f.write(f"# {title}\n\n{body.strip()}\n\n")
        f.write(f"Command: `{command}`  \nRun time: {seconds:.0f} s on {machine()}.\n")
    return path


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def add_common_args(parser) -> None:
    parser.add_argument(
        "--out", default=None, help="output folder (default docs/results, or a temporary one with --quick)"
    )
    parser.add_argument("--seed", type=int, default=0, help="base seed: every run's seed is derived from it")
    parser.add_argument("--quick", action="store_true", help="a few seconds: tiny grids, 1 seed, 1-2 epochs")


def resolve_out(args) -> str:
    if args.out is None:
        import tempfile

        args.out = tempfile.mkdtemp(prefix="lightning-clip-") if args.quick else os.path.join("docs", "results")
    os.makedirs(args.out, exist_ok=True)
    return args.out


def command() -> str:
    import sys

    script = os.path.relpath(sys.argv[0]) if os.path.exists(sys.argv[0]) else sys.argv[0]
    if not script.startswith("examples"):
        script = os.path.join("examples", os.path.basename(script))
    return " ".join(["python", script, *sys.argv[1:]])
