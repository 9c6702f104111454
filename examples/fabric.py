"""The mnist1d MLP trained with Lightning Fabric and AdaptiveClippingOptimizer, in bf16 mixed precision on CPU.

``fabric.setup(model, AdaptiveClippingOptimizer(Adam(...)))``: Fabric's precision plugin runs the forward pass under
bf16 autocast, and ``optimizer.step()`` (Fabric's wrapper, then ours) clips the float32 gradients before Adam steps.
Every 100th step back-propagates 100x the loss (the built-in demo's spikes). The clipping dashboard goes to
TensorBoard under ``runs/fabric/`` through Fabric's TensorBoardLogger (rank 0 only).

Run: ``python examples/fabric.py`` (10 epochs, about 8 s on 2 CPU cores) or ``--quick`` (1 epoch);
``--precision 32-true`` for float32.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch import nn

from lightning_clip import AdaptiveClippingOptimizer, log_clipping
from lightning_clip.demo import mnist1d_arrays

try:
    from lightning.fabric import Fabric
    from lightning.fabric.loggers import TensorBoardLogger
except ImportError:  # the standalone package
    from lightning_fabric import Fabric
    from lightning_fabric.loggers import TensorBoardLogger


def mlp(hidden: int = 100) -> nn.Module:
    return nn.Sequential(nn.Linear(40, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="1 epoch")
    parser.add_argument("--logdir", default="runs")
    parser.add_argument("--precision", default="bf16-mixed")
    parser.add_argument("--spike-every", type=int, default=100)
    args = parser.parse_args()
    epochs = 1 if args.quick else args.epochs

    logger = TensorBoardLogger(args.logdir, name="fabric")
    fabric = Fabric(accelerator="cpu", devices=1, precision=args.precision, loggers=[logger])
    fabric.seed_everything(0)
    data = mnist1d_arrays()
    x, y = torch.as_tensor(data["x"], dtype=torch.float32), torch.as_tensor(data["y"], dtype=torch.long)
    x_val, y_val = torch.as_tensor(data["x_test"], dtype=torch.float32), torch.as_tensor(data["y_test"])
    model = mlp()
    optimizer = AdaptiveClippingOptimizer(torch.optim.Adam(model.parameters(), lr=0.01), alpha=3.8, beta=0.918)
    model, optimizer = fabric.setup(model, optimizer)
    step, start = 0, time.perf_counter()
    for epoch in range(epochs):
        model.train()
        for batch in torch.randperm(len(x)).split(100):
            loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
            spike = args.spike_every and (step + 1) % args.spike_every == 0
            fabric.backward(loss * 100.0 if spike else loss)
            optimizer.step()
            optimizer.zero_grad()
            if ((step + 1) % 10 == 0 or spike) and fabric.is_global_zero:
                log_clipping(logger, optimizer, step)  # the logger's SummaryWriter
                fabric.log("train/loss", loss.item(), step=step)
            step += 1
        model.eval()
        with torch.no_grad():
            logits = model(x_val)
            val = {
                "val/loss": nn.functional.cross_entropy(logits, y_val).item(),
                "val/acc": (logits.argmax(1) == y_val).float().mean().item(),
            }
        fabric.log_dict(val, step=step)
        fabric.print(f"epoch {epoch}: val loss {val['val/loss']:.3f}, val acc {val['val/acc']:.3f}")
    logger.finalize("success")
    state = optimizer.clip_state()
    result = {**val, "steps": step, "seconds": time.perf_counter() - start, "grad_norm_ema": float(state.ema)}
    fabric.print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
