"""The GPU check: one CUDA device (and two for the sharded strategies). Skipped without CUDA.

Run on a CUDA machine::

    python -m pytest -q -p no:cacheprovider -rs -s tests/gpu       # prints the benchmark ratios

What it checks: the callback in every mode on CUDA with ``torch.cuda.set_sync_debug_mode("error")`` around every
non-logging step (adaptive, norm, value, sparsity on, foreach and ``fused=True`` kernels); ``bf16-mixed`` and
``16-mixed`` with a real ``GradScaler`` (fused Adam too), ``16-true`` and ``bf16-true``; the norm kernels and the
optimizers against float64 references; the clipping and optimizer benchmarks on CUDA (ratios against
``clip_grad_norm_(foreach=True)`` and ``Adam(fused=True)``, printed); with two GPUs, the FSDP2 / tensor-parallel runs
of ``tests/sharded_run.py`` and the FSDP1 runs of ``tests/fsdp1_run.py`` (Lightning's ``FSDPStrategy`` itself) over
NCCL (else skipped, saying so).
"""

from __future__ import annotations

import contextlib
import math
import os
import subprocess
import sys
import time

import pytest
import torch

from lightning_clip import AdaptiveGradientClipping
from lightning_clip.norms import global_grad_norm
from tests.conftest import TinyRegressor, regression_loader, trainer_kwargs
from tests.lightning_ns import pl

CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(not CUDA, reason="the GPU check needs a CUDA device")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@contextlib.contextmanager
def sync_debug(mode: str):
    """``torch.cuda.set_sync_debug_mode(mode)`` for the block (a no-op without CUDA), restored afterwards."""
    if not torch.cuda.is_available():
        yield
        return
    old = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(mode)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(old)


class SyncGuarded(AdaptiveGradientClipping):
    """Errors on any host synchronisation in the hook of a non-logging step (logging steps sync once, by design)."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        logging = trainer._logger_connector.should_update_logs
        with contextlib.nullcontext() if logging else sync_debug("error"):
            super().on_before_optimizer_step(trainer, pl_module, optimizer)


SETTINGS = [
    dict(),
    dict(mode="norm", clip_val=0.5),
    dict(mode="value", clip_val=0.05),
    dict(alpha=0.8, sparsity_cumulative=True),
    dict(alpha=0.8, foreach=True),
    dict(alpha=0.8, foreach=False),
    dict(alpha=0.8, fused=True),
]


@pytest.mark.parametrize("settings", SETTINGS, ids=[str(s) or "default" for s in SETTINGS])
def test_every_mode_on_cuda_without_host_sync(tmp_path, settings):
    model = TinyRegressor(lr=0.05)
    cb = SyncGuarded(**settings)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, accelerator="cuda", max_steps=12, log_every_n_steps=4,
                                          callbacks=[cb]))
    trainer.fit(model, regression_loader(n=96))
    state = cb.clip_state()
    assert state.ema.is_cuda and int(state.seen) == 12
    assert all(math.isfinite(v) for v in cb.last_metrics.values())


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed", "16-true", "bf16-true", "64-true"])
@pytest.mark.parametrize("fused", [False, True])
def test_precisions_on_cuda(tmp_path, precision, fused):
    model = TinyRegressor(lr=0.01, fused=fused)
    model.poison_steps = {5}  # a nan step: a GradScaler skips it and the callback does not count it
    cb = SyncGuarded(alpha=1.5)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, accelerator="cuda", precision=precision, max_steps=10,
                                          callbacks=[cb]))
    trainer.fit(model, regression_loader(n=96))
    state = cb.clip_state()
    assert state.ema.dtype == torch.float32 and math.isfinite(float(state.ema))
    assert int(state.seen) == 9  # the poisoned step is never counted, whatever the precision
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if precision == "16-mixed":
        assert isinstance(scaler, torch.amp.GradScaler)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("foreach", [False, True])
def test_norm_kernels_against_float64(dtype, foreach):
    gen = torch.Generator(device="cuda").manual_seed(0)
    sizes = ((10, 1e-3), (4096, 1.0), (77, 30.0))
    grads = [torch.randn(n, device="cuda", generator=gen).to(dtype) * s for n, s in sizes]
    ref = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads))
    with sync_debug("error"):
        norm = global_grad_norm(grads, foreach=foreach)
    assert norm.dtype == torch.float32 and float(norm) == pytest.approx(ref, rel=1e-6)


def test_optimizers_against_their_float64_reference():
    from lightning_clip import SmoothedNormSGD, SmoothedSignSGD

    for cls in (SmoothedSignSGD, SmoothedNormSGD):
        gen = torch.Generator().manual_seed(0)
        w0 = torch.randn(64, 32, generator=gen)
        grads = [torch.randn(64, 32, generator=gen) for _ in range(5)]
        out = {}
        for device, dtype in (("cuda", torch.float32), ("cpu", torch.float64)):
            w = torch.nn.Parameter(w0.to(device, dtype))
            opt = cls([w], lr=0.01)
            for g in grads:
                w.grad = g.to(device, dtype)
                opt.step()
            out[device] = w.detach().double().cpu()
        torch.testing.assert_close(out["cuda"], out["cpu"], rtol=1e-5, atol=1e-6)


def test_clipping_benchmark_against_clip_grad_norm_foreach():
    from lightning_clip.functional import ClipState, clip_grads_, rule_from_settings

    params = [torch.nn.Parameter(torch.randn(1024, 1024, device="cuda")) for _ in range(64)]
    for p in params:
        p.grad = torch.randn_like(p)
    grads = [p.grad for p in params]

    def timed(fn, reps=20):
        fn()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - start) / reps

    state, rule = ClipState.zeros("cuda"), rule_from_settings(alpha=3.8)
    ours = timed(lambda: clip_grads_(grads, state, rule))
    ref = timed(lambda: torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True))
    print(f"\nclipping on CUDA: callback core {ours * 1e3:.3f} ms, clip_grad_norm_(foreach=True) {ref * 1e3:.3f} ms,"
          f" ratio {ours / ref:.2f}")
    assert ours / ref < 3.0


def test_optimizer_benchmark_on_cuda():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_optimizers.py"), "--device", "cuda",
                           "--quick", "--compile"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    print(proc.stdout)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="FSDP2 / tensor parallel on CUDA need two GPUs")
def test_sharded_runs_on_two_gpus(tmp_path):
    from tests.test_ddp import _RANK_VARIABLES, _free_port

    env = {k: v for k, v in os.environ.items() if k not in _RANK_VARIABLES}
    env.update(PL_DISABLE_FORK="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
               LIGHTNING_CLIP_ACCELERATOR="cuda")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "sharded_run.py"), str(tmp_path)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="FSDPStrategy (FSDP1) on CUDA needs two GPUs")
def test_fsdp1_strategy_on_two_gpus(tmp_path):
    """Lightning's own ``FSDPStrategy`` over NCCL (tests/fsdp1_run.py): the callback's norm is torch's FSDP norm on
    every rank, and torch's FSDP directly under every sharding strategy matches ``clip_grad_norm_``."""
    import json

    from tests.sharded_run import ALPHA, BETA
    from tests.test_ddp import _RANK_VARIABLES, _free_port

    env = {k: v for k, v in os.environ.items() if k not in _RANK_VARIABLES}
    env.update(PL_DISABLE_FORK="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
               LIGHTNING_CLIP_ACCELERATOR="cuda")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "fsdp1_run.py"), str(tmp_path)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]

    def load(name):
        return [json.loads((tmp_path / f"{name}.rank{r}.json").read_text()) for r in range(2)]

    for name in ("lightning_orig", "lightning_flat"):
        a, b = load(name)
        assert a == b and a["seen"] == 6
        post, m = [], None
        for n in a["pre"]:
            post.append(n if m is None else min(n, ALPHA * m))
            m = n if m is None else BETA * m + (1 - BETA) * n
        assert a["post"] == pytest.approx(post, rel=1e-5)
    for record in load("core"):
        for config, r in record.items():
            if config != "ref":
                assert r["norm"] == pytest.approx(r["torch_norm"], rel=1e-5), config
