"""Real 2-process runs under Lightning's ``ModelParallelStrategy`` on CPU/gloo (gradients arrive as DTensors).

Used by tests/test_sharded.py: ``python tests/sharded_run.py OUT_DIR``. Lightning's launcher starts the second
process. Everything one run of the test needs happens here, in one pair of processes:

* ``core``: the functional core on DTensors built with ``distribute_tensor`` (placements the strategy does not make:
  ``Shard(1)``, ``Replicate``, ``Partial``, a second 2-d mesh, plain tensors mixed in), against float64 norms of the
  full tensors;
* ``optimizers``: ``SmoothedSignSGD`` and ``SmoothedNormSGD`` (for-loop and multi-tensor kernels) stepping DTensor
  parameters (``Shard(0)``, ``Shard(1)``, ``Replicate``, and one larger than the for-loop kernels' chunk), against
  their float64 formulas on the full tensors;
* ``fsdp2``: FSDP2 (``fully_shard``) data parallel, dp=2, each rank half of every global batch;
* ``tp``: tensor parallel, tp=2, two layers parallelised (colwise, rowwise) and two left as plain tensors;
* ``fsdp2_resume``: the fsdp2 run resumed from its step-3 distributed checkpoint (the end of the first epoch);
* ``fsdp2_bf16-mixed``, ``fsdp2_bf16-true``, ``fsdp2_16-true``: the fsdp2 run under those precisions (bf16
  autocast over float32 DTensor parameters; bf16 or float16 DTensor parameters and gradients, float16 with SGD);
* ``fsdp2_16-mixed``, ``fsdp2_64-true``: the fsdp2 run with a precision plugin instance, as Lightning refuses these
  two ``precision=`` flags for ``ModelParallelStrategy``: ``MixedPrecision("16-mixed")`` with a real
  ``GradScaler`` whose large initial scale makes the first float16 steps overflow, and ``DoublePrecision()``.

Each writes ``OUT_DIR/{name}.rank{r}.json``: the float64 full-gradient norms before and after the callback at every
step, the state, and the full weights at the end.
"""

from __future__ import annotations

import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, Subset  # noqa: E402

from lightning_clip import AdaptiveGradientClipping  # noqa: E402
from tests.conftest import regression_loader  # noqa: E402
from tests.lightning_ns import pl  # noqa: E402

ALPHA, BETA, STEPS, LR = 1.05, 0.7, 6, 0.05
#: the initial loss scale of the 16-mixed runs: the first steps' float16 gradients overflow
INIT_SCALE = 2.0**15
#: ``cpu`` (gloo) here; the GPU check (tests/gpu) sets ``cuda`` (NCCL, two GPUs)
ACCELERATOR = os.environ.get("LIGHTNING_CLIP_ACCELERATOR", "cpu")


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor a DTensor stands for (a plain tensor as it is), detached."""
    t = t.detach()
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def full_norm64(tensors) -> float:
    return math.sqrt(sum(float((full(t).double() ** 2).sum()) for t in tensors))


class Net(pl.LightningModule):
    """A 4-layer MLP. ``layout``: ``"single"`` (plain), ``"fsdp2"`` (every layer ``fully_shard``-ed over dp),
    ``"fsdp1"`` (layers 0-2 and the whole in FSDP1 units, ``use_orig_params=self.orig``) or ``"tp"`` (layers 1 and 2
    colwise / rowwise parallel over tp; layers 0 and 3 plain tensors)."""

    def __init__(self, layout: str = "single", dp: int = 1, optimizer: str = "adam") -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 16), nn.Tanh(), nn.Linear(16, 1)
        )
        self.layout, self.dp, self.optimizer = layout, dp, optimizer
        self.orig = True  # FSDP1's use_orig_params

    def configure_model(self) -> None:
        if self.layout == "fsdp2":
            from torch.distributed.fsdp import fully_shard

            mesh = self.device_mesh["data_parallel"]
            for layer in (self.net[0], self.net[2], self.net[4], self.net[6]):
                fully_shard(layer, mesh=mesh)
            fully_shard(self.net, mesh=mesh)
        elif self.layout == "fsdp1":  # FSDP1 wrapped here (Lightning's FSDPStrategy then wraps nothing itself)
            from torch.distributed.fsdp.wrap import wrap

            # Lightning's manual wrapping: inside configure_model, ``wrap`` takes the strategy's settings (sharding
            # strategy, its precision plugin's mixed precision, CPU offload); ``device_id`` is given here, as
            # Lightning passes ``None`` on CPU, which torch's FSDP refuses
            for i in (0, 2, 4):
                self.net[i] = wrap(self.net[i], device_id=self.device, use_orig_params=self.orig)
            self.net = wrap(self.net, device_id=self.device, use_orig_params=self.orig)
        elif self.layout == "tp":
            from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

            parallelize_module(
                self.net, self.device_mesh["tensor_parallel"], {"2": ColwiseParallel(), "4": RowwiseParallel()}
            )

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def train_dataloader(self):
        data = regression_loader(n=48).dataset  # 3 global batches of 16: an epoch ends at the step-3 checkpoint
        rank = self.global_rank if self.layout in ("fsdp2", "fsdp1") else 0
        indices = list(range(rank, len(data), self.dp))  # dp ranks read interleaved halves of each global batch
        return DataLoader(Subset(data, indices), batch_size=16 // self.dp, shuffle=False)

    def configure_optimizers(self):
        if self.optimizer == "sgd":
            return torch.optim.SGD(self.parameters(), lr=LR)
        return torch.optim.Adam(self.parameters(), lr=LR)


class Recorder(pl.Callback):
    """Appends the float64 norm of the whole gradient (full tensors) to ``norms`` at ``on_before_optimizer_step``;
    ``kinds``: the gradients' types and dtypes seen there (``"DTensor torch.float16"``); ``scales``: under a
    ``GradScaler``, its scale after each batch."""

    def __init__(self) -> None:
        self.norms: list[float] = []
        self.kinds: set[str] = set()
        self.scales: list[float] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        self.kinds |= {f"{type(g).__name__} {g.dtype}" for g in grads}
        self.norms.append(full_norm64(grads))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None:
            self.scales.append(float(scaler.get_scale()))


def fit(
    layout: str,
    out: str | None,
    *,
    dp: int = 1,
    tp: int = 1,
    max_steps: int = STEPS,
    ckpt_dir: str | None = None,
    ckpt_path: str | None = None,
    precision: str = "32-true",
) -> dict:
    """One fit; returns (and with ``out`` writes, per rank) the record."""
    pre, post = Recorder(), Recorder()
    clip = AdaptiveGradientClipping(alpha=ALPHA, beta=BETA, histogram_every_n_steps=2)
    callbacks = [pre, clip, post]
    if ckpt_dir:
        callbacks.append(
            pl.callbacks.ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=3, save_top_k=-1, filename="{step}")
        )
    if layout == "single":
        strategy, devices = "auto", 1
    else:
        strategy, devices = pl.strategies.ModelParallelStrategy(data_parallel_size=dp, tensor_parallel_size=tp), 2
    accelerator = "cpu" if layout == "single" else ACCELERATOR
    if precision == "16-mixed":  # a real float16 GradScaler: Lightning's flag means bf16 on CPU (and is refused here)
        scaler = torch.amp.GradScaler(accelerator, init_scale=INIT_SCALE)
        precision_kwargs = {"plugins": [pl.plugins.precision.MixedPrecision("16-mixed", accelerator, scaler)]}
    elif precision == "64-true" and layout != "single":  # ModelParallelStrategy refuses the flag, not the plugin
        precision_kwargs = {"plugins": [pl.plugins.precision.DoublePrecision()]}
    else:
        precision_kwargs = {"precision": precision}
    trainer = pl.Trainer(
        accelerator=accelerator,
        devices=devices,
        strategy=strategy,
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=bool(ckpt_dir),
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        use_distributed_sampler=False,
        log_every_n_steps=2,
        **precision_kwargs,
    )
    # Adam in pure float16 underflows its eps and diverges whatever the clipping: SGD for 16-true
    model = Net(layout, dp, optimizer="sgd" if precision == "16-true" else "adam")
    trainer.fit(model, ckpt_path=ckpt_path)
    state = clip.clip_state()
    record = {
        "rank": trainer.global_rank,
        "pre": pre.norms,
        "post": post.norms,
        "ema": float(state.ema),
        "seen": int(state.seen),
        "grads": sorted(pre.kinds),
        "scales": pre.scales,
        "precision_plugin": type(trainer.precision_plugin).__name__,
        "sparsity": clip.last_metrics.get("clip/update_sparsity"),
        "weights": [float(v) for p in model.parameters() for v in full(p).flatten()],
    }
    if out:
        with open(f"{out}.rank{trainer.global_rank}.json", "w") as f:
            json.dump(record, f)
    return record


def core(out: str) -> None:
    """The functional core on hand-built DTensors, against float64 norms of the full tensors."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Partial, Replicate, Shard, distribute_tensor

    from lightning_clip.functional import ClipState, clip_grads_, rule_from_settings
    from lightning_clip.norms import global_grad_norm, per_tensor_norms

    rank = dist.get_rank()
    mesh = init_device_mesh(ACCELERATOR, (2,))
    mesh2 = init_device_mesh(ACCELERATOR, (1, 2), mesh_dim_names=("a", "b"))  # another mesh, 2-d
    gen = torch.Generator().manual_seed(1)
    fulls = [
        torch.randn(6, 4, generator=gen),
        torch.randn(5, 3, generator=gen),
        torch.randn(7, generator=gen),
        torch.randn(3, 3, generator=gen),
        torch.randn(4, 2, generator=gen),
        torch.randn(3, 5, generator=gen),
    ]

    def build():
        partial = distribute_tensor(fulls[5] / 2, mesh, [Replicate()])  # each rank holds half: a pending sum
        partial = type(partial).from_local(partial.to_local(), mesh, [Partial()], run_check=False)
        return [
            distribute_tensor(fulls[0], mesh, [Shard(0)]),
            distribute_tensor(fulls[1], mesh, [Shard(1)]),
            distribute_tensor(fulls[2], mesh, [Replicate()]),
            fulls[3].clone(),
            distribute_tensor(fulls[4], mesh2, [Replicate(), Shard(0)]),
            partial,
        ]

    ref = math.sqrt(sum(float((t.double() ** 2).sum()) for t in fulls))
    record = {"ref": ref, "ref_per": [float(t.double().norm()) for t in fulls]}
    for foreach in (False, True):
        g = build()
        record[f"norm_{foreach}"] = float(global_grad_norm(g, foreach=foreach))
        record[f"per_{foreach}"] = per_tensor_norms(g, foreach=foreach).tolist()
    # clipping scales the local shards: the post-clip full norm is the threshold
    g = build()[:5]  # (a Partial gradient cannot be scaled in place: only the layouts gradients arrive in)
    state = ClipState.zeros()
    state.ema.fill_(1.0)
    state.seen.fill_(3)
    stats = clip_grads_(g, state, rule_from_settings(alpha=2.0, beta=0.5))
    record["clip_pre"], record["clip_post"] = float(stats.norm), full_norm64(g)
    # value mode: every entry clamped, the "clipped" decision the same on every rank
    g = build()[:5]
    stats = clip_grads_(g, ClipState.zeros(), rule_from_settings(mode="value", clip_val=0.5))
    record["value_max"] = max(float(full(t).abs().max()) for t in g)
    record["value_clipped"] = bool(stats.clipped)
    record["value_post"] = float(stats.coef * stats.norm)
    record["value_post_ref"] = full_norm64(g)
    # a nan on one rank's shard only: the norm is nan everywhere, and the step is zeroed everywhere
    g = build()[:5]
    if rank == 1:
        g[0].to_local()[0, 0] = float("nan")
    state = ClipState.zeros()
    stats = clip_grads_(g, state, rule_from_settings())
    record["nan_norm_finite"] = bool(torch.isfinite(stats.norm))
    record["nan_zeroed"] = all(float(full(t).abs().sum()) == 0.0 for t in g)
    record["nan_seen"] = int(state.seen)
    # nonfinite="skip" / "error" with DTensor gradients: a nan in rank 1's shard of the Shard(1) gradient only, then
    # an overflow (every entry finite, the float32 norm inf): every rank skips, or raises the same message
    from lightning_clip.functional import clip_step_

    for case in ("skip", "error", "overflow"):
        g = build()[:5]
        if case == "overflow":
            g[0].to_local().mul_(1e30)
            g[0].to_local()[0, 0] = 3e38 if rank == 1 else 1.0  # the largest entry, on rank 1's shard
        elif rank == 1:
            g[1].to_local()[0, 0] = float("nan")
        params = []
        for t in g:
            p = torch.nn.Parameter(torch.zeros_like(t))
            p.grad = t
            params.append(p)
        names = {id(p): f"w{i}" for i, p in enumerate(params)}
        try:
            clip_step_(
                params,
                ClipState.zeros(),
                rule_from_settings(),
                nonfinite="error" if case == "overflow" else case,
                names=lambda: names,
            )
            record[f"policy_{case}"] = [p.grad is None for p in params]
        except RuntimeError as e:
            record[f"policy_{case}"] = str(e)
    with open(f"{out}.rank{rank}.json", "w") as f:
        json.dump(record, f)


def optimizers(out: str) -> None:
    """The smoothed optimizers on DTensor parameters, both kernels, three steps, against float64 on full tensors."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from lightning_clip.optim import SmoothedNormSGD, SmoothedSignSGD
    from lightning_clip.optim._base import CHUNK as _CHUNK

    rank = dist.get_rank()
    mesh = init_device_mesh(ACCELERATOR, (2,))
    gen = torch.Generator().manual_seed(2)
    shapes = [(6, 4), (5, 3), (7,), (_CHUNK // 1000 + 50, 1000)]
    placements = [[Shard(0)], [Shard(1)], [Replicate()], [Shard(0)]]
    init = [torch.randn(s, generator=gen) for s in shapes]
    steps = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(3)]
    steps[0][0][1] = 0.0  # sign(0) = 0
    beta = 0.8
    record: dict = {"rank": rank, "large": shapes[3][0] * shapes[3][1] > _CHUNK}
    # NormSGD's steps are lr * (1 - beta) * g / ||g||, about 1e-3 * lr per entry over a million entries
    for name, cls, lr in (("sign", SmoothedSignSGD, 0.01), ("norm", SmoothedNormSGD, 1.0)):
        for foreach in (False, True):
            key = f"{name}_foreach={foreach}"
            params = [nn.Parameter(distribute_tensor(t.clone(), mesh, pl)) for t, pl in zip(init, placements)]
            opt = cls(params, lr=lr, beta=beta, foreach=foreach)
            try:
                for grads in steps:
                    for p, g, pl in zip(params, grads, placements):
                        p.grad = distribute_tensor(g.clone(), mesh, pl)
                    opt.step()
            except Exception as e:  # noqa: BLE001 (recorded: the test names the failing case)
                record[key] = {"error": f"{type(e).__name__}: {e}"}
                continue
            w = [t.double() for t in init]
            m = [torch.zeros_like(t) for t in w]
            for grads in steps:
                g64 = [g.double() for g in grads]
                if name == "sign":
                    d = [torch.sign(g) for g in g64]
                else:
                    total = torch.sqrt(sum((g**2).sum() for g in g64))
                    d = [g / total for g in g64]
                m = [beta * mi + (1 - beta) * di for mi, di in zip(m, d)]
                w = [wi - lr * mi for wi, mi in zip(w, m)]
            got = [full(p).double() for p in params]
            record[key] = {
                "err": max(float((a - b).abs().max()) for a, b in zip(got, w)),
                "moved": min(float((a - b.double()).abs().max()) for a, b in zip(got, init)),
                "sums": [float(a.sum()) for a in got],
                "types": sorted({type(p.data).__name__ for p in params}),
            }
    with open(f"{out}.rank{rank}.json", "w") as f:
        json.dump(record, f)


def main(out_dir: str) -> None:
    fit("fsdp2", os.path.join(out_dir, "fsdp2"), dp=2, ckpt_dir=os.path.join(out_dir, "ckpt"))
    core(os.path.join(out_dir, "core"))
    optimizers(os.path.join(out_dir, "optimizers"))
    fit("tp", os.path.join(out_dir, "tp"), tp=2)
    ckpt = os.path.join(out_dir, "ckpt", "step=3.ckpt")
    fit("fsdp2", os.path.join(out_dir, "fsdp2_resume"), dp=2, ckpt_path=ckpt)
    for precision in PRECISIONS:
        fit("fsdp2", os.path.join(out_dir, f"fsdp2_{precision}"), dp=2, precision=precision)


#: the precisions of the fsdp2 runs besides 32-true: the flags ModelParallelStrategy takes, then the two it refuses
#: (Lightning's own check of the ``precision=`` flag), given as precision plugin instances
PRECISIONS = ("bf16-mixed", "bf16-true", "16-true", "16-mixed", "64-true")


if __name__ == "__main__":
    main(sys.argv[1])
