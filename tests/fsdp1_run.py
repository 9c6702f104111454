"""FSDP1 (torch's ``FullyShardedDataParallel``, flat parameters) on 2 CPU processes over gloo.

Used by tests/test_sharded.py: ``python tests/fsdp1_run.py OUT_DIR``. Lightning's launcher starts the second process
(the first part is a Lightning fit); everything else reuses its process group:

* ``lightning``: a fit under Lightning's ``FSDPStrategy`` (FULL_SHARD, ``use_orig_params`` True, Lightning's default)
  on CPU. Lightning refuses ``FSDPStrategy`` without CUDA in the Trainer's argument check only (``type(strategy) is
  FSDPStrategy``); :class:`CPUFSDPStrategy` is the same class under another name, so the run is Lightning's own
  FSDP1 code path over gloo. The pre/post-clip norms are recorded with torch's ``clip_grad_norm_(inf)`` (which
  computes the norm and multiplies by exactly 1) and, as a reference, the float64 norm of the whole gradient;
* ``lightning_{precision}``: the same fit under each precision ``FSDPPrecision`` takes besides 32-true (bf16-mixed,
  16-mixed with a CPU ``ShardedGradScaler``, bf16-true, 16-true with SGD);
* ``lightning_offload``: the same fit with ``cpu_offload=True``, or, where torch refuses it (no accelerator to pin
  the offloaded memory with), the refusal;
* ``core``: torch's FSDP directly, every sharding strategy (FULL_SHARD with ``use_orig_params`` on and off,
  SHARD_GRAD_OP, NO_SHARD, HYBRID_SHARD on a 1x2 and a 2x1 mesh, NO_SHARD and FULL_SHARD units mixed), each with
  the norm, the clipped gradients and the non-finite policies compared with torch's own
  ``FullyShardedDataParallel.clip_grad_norm_`` on a twin model and with the float64 norm of an unsharded copy.
  (On a 2x1 mesh, 2 replicas of 1 shard, torch makes the units ``NO_SHARD`` over a 1-rank group and does not
  average the replicas' gradients: each rank keeps its own, and its norm is torch's norm of that rank.)

Each writes ``OUT_DIR/{name}.rank{r}.json``.
"""

from __future__ import annotations

import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from lightning_clip import AdaptiveGradientClipping  # noqa: E402
from tests.lightning_ns import pl  # noqa: E402
from tests.sharded_run import ACCELERATOR, ALPHA, BETA, INIT_SCALE, Net  # noqa: E402


class CPUFSDPStrategy(pl.strategies.FSDPStrategy):
    """Lightning's ``FSDPStrategy`` unchanged: a subclass passes the Trainer's CUDA-only argument check."""


class TorchNorm(pl.Callback):
    """Records torch's own FSDP norm (``clip_grad_norm_(inf)``: the norm, the gradients multiplied by 1) and, with
    ``reference``, the float64 norm of the whole gradient: the squares of every rank's local gradient shards summed
    in float64 over the ranks (each entry of a sharded gradient lies on one rank); ``kinds``: the local gradients'
    dtypes; ``scales``: under a ``GradScaler``, its scale after each batch."""

    def __init__(self, reference: bool = False) -> None:
        self.norms: list[float] = []
        self.reference = reference
        self.norms64: list[float] = []
        self.kinds: set[str] = set()
        self.scales: list[float] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self.reference:
            import torch.distributed as dist

            grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
            self.kinds |= {str(g.dtype) for g in grads}
            sq = torch.tensor(sum(float((g.detach().double() ** 2).sum()) for g in grads), dtype=torch.float64)
            sq = sq.to(pl_module.device)
            dist.all_reduce(sq)
            self.norms64.append(math.sqrt(float(sq)))
        self.norms.append(float(pl_module.net.clip_grad_norm_(math.inf)))  # the root FSDP unit

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None:
            self.scales.append(float(scaler.get_scale()))


def lightning(out: str, orig: bool, precision: str = "32-true", **strategy_kwargs) -> None:
    """One fit of the sharded_run model under ``FSDPStrategy``, dp=2 (each rank half of every global batch), the
    FSDP1 units made in ``configure_model`` (Lightning's manual wrapping: torch's FSDP needs ``device_id`` on CPU,
    which Lightning's own wrapping passes as ``None`` there).

    ``precision``: a Trainer flag (Lightning's ``FSDPPrecision``), except ``16-mixed``: ``FSDPPrecision("16-mixed")``
    whose scaler is replaced with a ``ShardedGradScaler`` on the run's device, as the one Lightning makes is a CUDA
    one (disabled without CUDA) and ``FSDPPrecision`` refuses a ``scaler`` argument (its check reads the class's
    default precision, ``32-true``, before setting its own); the large initial scale makes the first float16 steps
    overflow."""
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

    pre, post = TorchNorm(reference=True), TorchNorm()
    clip = AdaptiveGradientClipping(alpha=ALPHA, beta=BETA, histogram_every_n_steps=2)
    strategy = (
        CPUFSDPStrategy(**strategy_kwargs) if ACCELERATOR == "cpu" else pl.strategies.FSDPStrategy(**strategy_kwargs)
    )
    if precision == "16-mixed":
        plugin = pl.plugins.precision.FSDPPrecision("16-mixed")
        plugin.scaler = ShardedGradScaler(device=ACCELERATOR, init_scale=INIT_SCALE)
        precision_kwargs = {"plugins": [plugin]}
    else:
        precision_kwargs = {"precision": precision}
    trainer = pl.Trainer(
        accelerator=ACCELERATOR,
        devices=2,
        strategy=strategy,
        max_steps=6,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[pre, clip, post],
        use_distributed_sampler=False,
        log_every_n_steps=2,
        **precision_kwargs,
    )
    # Adam in pure float16 underflows its eps and diverges whatever the clipping: SGD for 16-true
    model = Net("fsdp1", dp=2, optimizer="sgd" if precision == "16-true" else "adam")
    model.orig = orig
    trainer.fit(model)
    state = clip.clip_state()
    record = {
        "pre": pre.norms,
        "post": post.norms,
        "ema": float(state.ema),
        "seen": int(state.seen),
        "ref": pre.norms64,
        "grads": sorted(pre.kinds),
        "scales": pre.scales,
        "offload": bool(getattr(model.net.cpu_offload, "offload_params", False)),
        "mixed_precision": str(getattr(model.net.mixed_precision, "param_dtype", None)),
        "reduce_dtype": str(getattr(model.net.mixed_precision, "reduce_dtype", None)),
    }
    with open(f"{out}.rank{trainer.global_rank}.json", "w") as f:
        json.dump(record, f)


CONFIGS = {
    "full_flat": dict(sharding_strategy="FULL_SHARD", use_orig_params=False),
    "full_orig": dict(sharding_strategy="FULL_SHARD", use_orig_params=True),
    "grad_op": dict(sharding_strategy="SHARD_GRAD_OP", use_orig_params=False),
    "no_shard": dict(sharding_strategy="NO_SHARD", use_orig_params=False),
    "hybrid_1x2": dict(sharding_strategy="HYBRID_SHARD", use_orig_params=True, mesh=(1, 2)),
    "hybrid_2x1": dict(sharding_strategy="HYBRID_SHARD", use_orig_params=False, mesh=(2, 1)),
    "mixed": dict(sharding_strategy="FULL_SHARD", use_orig_params=False, inner="NO_SHARD"),
}


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 9), nn.Tanh(), nn.Linear(9, 3))


def _wrap(config: dict, device: torch.device):
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import ShardingStrategy

    kwargs = dict(device_id=device, use_orig_params=config["use_orig_params"])
    if "mesh" in config:
        from torch.distributed.device_mesh import init_device_mesh

        kwargs["device_mesh"] = init_device_mesh(device.type, config["mesh"])
    model = _model().to(device)
    inner = ShardingStrategy[config.get("inner", config["sharding_strategy"])]
    for i in (0, 2):  # two units of their own, the root holds the last layer
        model[i] = FSDP(model[i], sharding_strategy=inner, **kwargs)
    return FSDP(model, sharding_strategy=ShardingStrategy[config["sharding_strategy"]], **kwargs)


def _backward(model: nn.Module, rank: int, device: torch.device, scale: float = 1.0) -> None:
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(rank)).to(device)
    (model(x).pow(2).mean() * scale).backward()


def _reference_norm64(world: int, scale: float = 1.0) -> float:
    """The float64 norm of the gradient FSDP holds: the mean over the ranks of each rank's gradient."""
    model = _model().double()
    for rank in range(world):
        x = torch.randn(4, 5, generator=torch.Generator().manual_seed(rank)).double()
        (model(x).pow(2).mean() * scale / world).backward()
    return math.sqrt(sum(float((p.grad**2).sum()) for p in model.parameters()))


def _local(model: nn.Module) -> list[list[float]]:
    return [[] if p.grad is None else p.grad.flatten().tolist() for p in model.parameters()]


def core(out: str) -> None:
    import torch.distributed as dist

    from lightning_clip._fsdp import FlatShardLayout
    from lightning_clip.functional import ClipState, clip_step_, rule_from_settings
    from lightning_clip.norms import per_tensor_norms

    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if ACCELERATOR == "cuda" else torch.device("cpu")
    record: dict = {"ref": _reference_norm64(world)}
    for name, config in CONFIGS.items():
        ours, theirs = _wrap(config, device), _wrap(config, device)
        _backward(ours, rank, device)
        _backward(theirs, rank, device)
        params = list(ours.parameters())  # the optimizer's parameters: flat or original
        layout = FlatShardLayout(ours)
        stats = clip_step_(
            params, ClipState.zeros(device), rule_from_settings(mode="norm", clip_val=0.5), grads=layout.grads(params)
        )
        torch_norm = theirs.clip_grad_norm_(0.5)
        per = per_tensor_norms(layout.grads(params))
        record[name] = {
            "norm": float(stats.norm),
            "torch_norm": float(torch_norm),
            "sharded": any(layout.groups.values()),
            "grads": _local(ours),
            "torch_grads": _local(theirs),
            "per_sq_sum": float((per.double() ** 2).sum()),
        }
        # the non-finite policies: a nan in rank 1's shard only, every rank takes the same decision
        for policy in ("skip", "error"):
            model = _wrap(config, device)
            _backward(model, rank, device)
            params = list(model.parameters())
            layout = FlatShardLayout(model)
            # a sharded unit: rank 1's shard only; whole gradients (NO_SHARD) are the same on every rank, so all
            if rank == 1 or not any(layout.groups.values()):
                next(p for p in params if p.grad is not None and p.grad.numel()).grad.view(-1)[0] = float("nan")
            try:
                clip_step_(
                    params,
                    ClipState.zeros(device),
                    rule_from_settings(),
                    nonfinite=policy,
                    grads=layout.grads(params),
                    names=lambda m=model: {id(p): n for n, p in m.named_parameters()},
                )
                record[name][policy] = [p.grad is None for p in params]
            except RuntimeError as e:
                record[name][policy] = str(e)
        # an overflow: every entry finite, the float32 norm infinite; the largest entries named on every rank
        model = _wrap(config, device)
        _backward(model, rank, device, scale=1e36)
        params = list(model.parameters())
        try:
            clip_step_(
                params,
                ClipState.zeros(device),
                rule_from_settings(),
                nonfinite="error",
                grads=FlatShardLayout(model).grads(params),
                names=lambda m=model: {id(p): n for n, p in m.named_parameters()},
            )
            record[name]["overflow"] = None
        except RuntimeError as e:
            record[name]["overflow"] = str(e)
    with open(f"{out}.rank{rank}.json", "w") as f:
        json.dump(record, f)


#: the precisions of the FSDPStrategy runs besides 32-true (FSDPPrecision's; it refuses 64-true)
PRECISIONS = ("bf16-mixed", "16-mixed", "bf16-true", "16-true")


def main(out_dir: str) -> None:
    lightning(os.path.join(out_dir, "lightning_orig"), orig=True)
    lightning(os.path.join(out_dir, "lightning_flat"), orig=False)
    core(os.path.join(out_dir, "core"))
    for precision in PRECISIONS:
        lightning(os.path.join(out_dir, f"lightning_{precision}"), orig=True, precision=precision)
    offload(os.path.join(out_dir, "lightning_offload"))


def offload(out: str) -> None:
    """The 32-true fit with ``FSDPStrategy(cpu_offload=True)`` (``CPUOffload(offload_params=True)``); where torch
    refuses it (on CPU, FSDP pins the offloaded shards' memory, which needs an accelerator), the refusal: the
    exception, and the function and source line of torch's that raised it."""
    import traceback

    import torch.distributed as dist

    try:
        lightning(out, orig=True, cpu_offload=True)
    except RuntimeError as e:
        frame = traceback.extract_tb(e.__traceback__)[-1]
        record = {"error": f"{type(e).__name__}: {e}", "function": frame.name, "line": frame.line}
        with open(f"{out}.rank{dist.get_rank()}.json", "w") as f:
            json.dump(record, f)


if __name__ == "__main__":
    main(sys.argv[1])
