"""Plain-PyTorch training with AdaptiveClippingOptimizer, on one process, or on several over gloo with
DistributedDataParallel (whole gradients) or FSDP2 ``fully_shard`` (DTensor gradient shards).

Used by tests/test_wrapper.py: ``python tests/wrapper_ddp_run.py OUT WORLD_SIZE [ddp|fsdp2]``. Rank ``r`` of ``W``
reads samples ``r, r + W, ...`` of each global batch of 16, so the ranks together read the one-process batches;
step 3's loss is multiplied by 100 (a spike). Each rank writes ``OUT.rank{r}`` (JSON: the clipping state, the
norms, the weights).
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402

from lightning_clip import AdaptiveClippingOptimizer  # noqa: E402

STEPS, GLOBAL_BATCH, SPIKE = 6, 16, 3


def data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(STEPS * GLOBAL_BATCH, 8, generator=gen)
    y = (x[:, :1] * 3 - x[:, 1:2] ** 2) + 0.1 * torch.randn(len(x), 1, generator=gen)
    return x, y


def worker(rank: int, world: int, out: str, mode: str = "ddp") -> None:
    if world > 1:
        dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    if world > 1 and mode == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        fully_shard(net[0], mesh=mesh)
        fully_shard(net, mesh=mesh)  # the last layer's parameters: sharded by the root
        model = net
    else:
        model = nn.parallel.DistributedDataParallel(net) if world > 1 else net
    opt = AdaptiveClippingOptimizer(torch.optim.Adam(model.parameters(), lr=0.05), alpha=1.1, beta=0.7)
    x, y = data()
    norms, clipped = [], []
    for step in range(STEPS):
        rows = slice(step * GLOBAL_BATCH + rank, (step + 1) * GLOBAL_BATCH, world)
        loss = nn.functional.mse_loss(model(x[rows]), y[rows]) * (100.0 if step == SPIKE else 1.0)
        loss.backward()
        opt.step()
        opt.zero_grad()
        norms.append(float(opt.last_stats.norm))
        clipped.append(bool(opt.last_stats.clipped))
    state = opt.clip_state()
    record = {
        "rank": rank,
        "ema": float(state.ema),
        "seen": int(state.seen),
        "norms": norms,
        "clipped": clipped,
        "weights": [float(v) for p in net.parameters() for v in _full(p.detach()).flatten()],
        "sharded": any(_full(p) is not p for p in net.parameters()),
    }
    with open(f"{out}.rank{rank}", "w") as f:
        json.dump(record, f)
    if world > 1:
        del opt, model  # DDP's reducer and the optimizer hold the process group: release them first
        dist.barrier()  # both ranks are done before either tears the group down
        dist.destroy_process_group()


def _full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's whole value (one all-gather), a plain tensor as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def main(out: str, world: int, mode: str = "ddp") -> None:
    if world == 1:
        worker(0, 1, out)
    else:
        torch.multiprocessing.start_processes(worker, args=(world, out, mode), nprocs=world, start_method="spawn")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), *(sys.argv[3:4]))
