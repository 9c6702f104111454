"""The mnist1d MLP trained in a plain PyTorch loop with AdaptiveClippingOptimizer (no Lightning Trainer).

Adam (lr 0.01) + adaptive clipping at its defaults; every 100th step back-propagates 100x the loss, as an outlier
batch would (the built-in demo's spikes). The clipping dashboard (the callback's names and custom-scalars layout) and
the losses go to TensorBoard under ``runs/plain_pytorch/``: ``tensorboard --logdir runs``, tab CUSTOM SCALARS.

Run: ``python examples/plain_pytorch.py`` (10 epochs, about 9 s on 2 CPU cores) or ``--quick`` (1 epoch).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from lightning_clip import AdaptiveClippingOptimizer, log_clipping
from lightning_clip.demo import mnist1d_arrays


def mlp(hidden: int = 100) -> nn.Module:
    return nn.Sequential(nn.Linear(40, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="1 epoch")
    parser.add_argument("--logdir", default=os.path.join("runs", "plain_pytorch"))
    parser.add_argument("--spike-every", type=int, default=100)
    args = parser.parse_args()
    epochs = 1 if args.quick else args.epochs

    torch.manual_seed(0)
    data = mnist1d_arrays()
    x, y = torch.as_tensor(data["x"], dtype=torch.float32), torch.as_tensor(data["y"], dtype=torch.long)
    x_val, y_val = torch.as_tensor(data["x_test"], dtype=torch.float32), torch.as_tensor(data["y_test"])
    model = mlp()
    optimizer = AdaptiveClippingOptimizer(torch.optim.Adam(model.parameters(), lr=0.01), alpha=3.8, beta=0.918)
    writer = SummaryWriter(args.logdir)
    step, start = 0, time.perf_counter()
    for epoch in range(epochs):
        model.train()
        for batch in torch.randperm(len(x)).split(100):
            loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
            spike = args.spike_every and (step + 1) % args.spike_every == 0
            (loss * 100.0 if spike else loss).backward()
            optimizer.step()
            optimizer.zero_grad()
            if (step + 1) % 10 == 0 or spike:  # one host sync per logging step
                log_clipping(writer, optimizer, step)
                writer.add_scalar("train/loss", loss.item(), step)
            step += 1
        model.eval()
        with torch.no_grad():
            logits = model(x_val)
            val = {
                "val/loss": nn.functional.cross_entropy(logits, y_val).item(),
                "val/acc": (logits.argmax(1) == y_val).float().mean().item(),
            }
        for key, value in val.items():
            writer.add_scalar(key, value, step)
        print(f"epoch {epoch}: val loss {val['val/loss']:.3f}, val acc {val['val/acc']:.3f}")
    writer.close()
    state = optimizer.clip_state()
    result = {**val, "steps": step, "seconds": time.perf_counter() - start, "grad_norm_ema": float(state.ema)}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
