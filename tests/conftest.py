"""Small real models and readers shared by the Lightning tests."""

from __future__ import annotations

import contextlib
import glob
import math
import os
import socket
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_clip._scaling import cpu_fast_path
from lightning_clip.dashboard import CONFIG_TAG
from tests.lightning_ns import pl

os.environ.setdefault("PL_DISABLE_FORK", "1")

#: FSDP2 (``fully_shard``) runs on CPU only where torch's CPU stream can record events (newer than torch 2.6).
FSDP2_ON_CPU = hasattr(torch.cpu.Stream, "record_event")
FSDP2_SKIP_REASON = f"FSDP2 fully_shard on CPU needs torch.cpu.Stream.record_event (torch {torch.__version__} lacks it)"


#: What a Trainer earlier in this process may leave in the environment: a child process must start without it.
_RANK_VARIABLES = {
    "LOCAL_RANK",
    "NODE_RANK",
    "WORLD_SIZE",
    "GLOBAL_RANK",
    "GROUP_RANK",
    "RANK",
    "MASTER_PORT",
    "LOCAL_WORLD_SIZE",
    "PL_GLOBAL_SEED",
}


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``python *args`` as the launcher of a multi-process run over gloo: a clean environment (no rank variables
    of this process), a free ``MASTER_PORT`` (tried again when another process took it before the bind), one thread
    per process. Asserts that it succeeded."""
    for _attempt in range(3):
        base = {k: v for k, v in os.environ.items() if k not in _RANK_VARIABLES}
        env = {
            **base,
            "PL_DISABLE_FORK": "1",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(free_port()),
            "OMP_NUM_THREADS": "1",
        }
        proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=env)
        if "EADDRINUSE" not in proc.stderr and "address already in use" not in proc.stderr:
            break
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def norm64(tensors) -> float:
    """Float64 reference of the global L2 norm."""
    return math.sqrt(sum(float((t.detach().double() ** 2).sum()) for t in tensors))


class TinyRegressor(pl.LightningModule):
    """A two-layer MLP on fixed random data; records the pre-clip gradient norm of every backward."""

    def __init__(self, lr: float = 0.05, optimizer: str = "adam", freeze_first: bool = False, fused: bool = False):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
        if freeze_first:
            self.net[0].requires_grad_(False)
        self.lr, self.optimizer_name, self.fused = lr, optimizer, fused
        self.backward_norms: list[float] = []
        self.poison_steps: set[int] = set()  # optimizer steps whose gradients get a nan entry

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("train/loss", loss)
        return loss

    def on_after_backward(self) -> None:
        if self.trainer.global_step in self.poison_steps:
            self.net[-1].weight.grad[0, 0] = float("nan")
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        self.backward_norms.append(norm64(grads))

    def configure_optimizers(self):
        if self.optimizer_name == "sgd":
            return torch.optim.SGD(self.parameters(), lr=self.lr)
        return torch.optim.Adam(self.parameters(), lr=self.lr, fused=self.fused or None)


def regression_loader(n: int = 64, batch_size: int = 8, seed: int = 0) -> DataLoader:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=gen)
    y = (x[:, :1] * 3 - x[:, 1:2] ** 2) + 0.1 * torch.randn(n, 1, generator=gen)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def trainer_kwargs(tmp_path, **overrides) -> dict:
    kwargs = dict(
        accelerator="cpu",
        devices=1,
        max_steps=8,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        log_every_n_steps=1,
    )
    kwargs.update(overrides)
    return kwargs


class Probe(pl.LightningModule):
    """A small MLP on the regression data, trained with SGD, with a per-step loss weight (``0``: a constant loss,
    exactly zero gradients; ``1e3``: a spike). Records the gradient norm before the callback (``pre``) and after it
    (``post``, the module's ``on_before_optimizer_step`` runs after the callbacks')."""

    def __init__(self, lr: float = 0.02, loss_weight: dict[int, float] | None = None):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
        self.lr = lr
        self.loss_weight = dict(loss_weight or {})
        self.pre: list[float] = []
        self.post: list[float] = []
        self.max_abs: list[dict[str, float]] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y) * self.loss_weight.get(self.trainer.global_step, 1.0)

    def on_after_backward(self) -> None:
        self.pre.append(norm64(p.grad for p in self.parameters()))
        self.max_abs.append({n: float(p.grad.double().abs().max()) for n, p in self.named_parameters()})

    def on_before_optimizer_step(self, optimizer) -> None:
        self.post.append(norm64(p.grad for p in self.parameters() if p.grad is not None))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def fit_regression(tmp_path, model, callbacks, ckpt_path=None, **overrides):
    """Fit ``model`` on ``regression_loader()`` in a Trainer of ``trainer_kwargs(tmp_path, **overrides)`` with
    ``callbacks`` (resuming from ``ckpt_path`` when given); returns the Trainer."""
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=callbacks, **overrides))
    trainer.fit(model, regression_loader(), ckpt_path=ckpt_path)
    return trainer


def read_scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series of the TensorBoard event files under ``log_dir``, read with tensorboard's API."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(glob.glob(os.path.join(str(log_dir), "**", "events.out.tfevents.*"), recursive=True)):
        acc = EventAccumulator(path, size_guidance={"scalars": 0, "tensors": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return out


@pytest.fixture(autouse=True)
def _quiet_and_seeded():
    pl.seed_everything(0, verbose=False)
    yield


class TwoOptimizers(pl.LightningModule):
    """Manual optimization: ``a`` steps every batch, ``b`` every second one."""

    def __init__(self, step_without_backward: bool = False):
        super().__init__()
        self.automatic_optimization = False
        self.a = nn.Linear(8, 1)
        self.b = nn.Linear(8, 1)
        self.norms = {"a": [], "b": []}
        self.step_without_backward = step_without_backward

    def training_step(self, batch, batch_idx):
        opt_a, opt_b = self.optimizers()
        x, y = batch
        if self.step_without_backward:
            opt_a.step()
            return
        loss_a = nn.functional.mse_loss(self.a(x), y)
        opt_a.zero_grad()
        self.manual_backward(loss_a)
        self.norms["a"].append(norm64(p.grad for p in self.a.parameters()))
        opt_a.step()
        if batch_idx % 2 == 1:
            loss_b = nn.functional.mse_loss(self.b(x) * 5, y)
            opt_b.zero_grad()
            self.manual_backward(loss_b)
            self.norms["b"].append(norm64(p.grad for p in self.b.parameters()))
            opt_b.step()

    def configure_optimizers(self):
        return torch.optim.Adam(self.a.parameters(), lr=0.01), torch.optim.SGD(self.b.parameters(), lr=0.01)


@contextlib.contextmanager
def no_host_sync():
    """Any read back to the host raises in the block, which runs with the CPU fast path off: the path that CUDA,
    MPS and XLA take (on CPU tensors the fast path reads the clip coefficient, a free memory read there, through
    ``_scaling.cpu_read``; ``test_cpu_fast_path_is_bit_identical_to_the_sync_free_path`` checks both agree)."""

    def boom(*_args, **_kwargs):
        raise AssertionError("host synchronisation in the per-step path")

    names = ("item", "__float__", "__bool__", "__int__", "tolist")
    saved = {n: getattr(torch.Tensor, n) for n in names}
    try:
        for n in names:
            setattr(torch.Tensor, n, boom)
        with cpu_fast_path(False):
            yield
    finally:
        for n, f in saved.items():
            setattr(torch.Tensor, n, f)


def read_layout(log_dir):
    """The custom-scalars layout of the run in ``log_dir`` (the first one written, as TensorBoard reads it)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.custom_scalar import layout_pb2

    layouts = []
    for path in sorted(glob.glob(os.path.join(str(log_dir), "events.out.tfevents.*"))):
        acc = EventAccumulator(path, size_guidance={"tensors": 0})
        acc.Reload()
        if CONFIG_TAG in acc.Tags()["tensors"]:
            for event in acc.Tensors(CONFIG_TAG):
                layout = layout_pb2.Layout()
                layout.ParseFromString(event.tensor_proto.string_val[0])
                layouts.append(layout)
    return layouts
