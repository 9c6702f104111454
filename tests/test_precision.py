"""Every Trainer precision on CPU: the callback sees the gradients the optimizer will use, measures their norm in
float32 at least (no overflow, no lost small terms), and follows the rule against a float64 reference."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_clip import AdaptiveGradientClipping
from lightning_clip.norms import global_grad_norm
from tests.conftest import TinyRegressor, norm64, regression_loader, trainer_kwargs
from tests.lightning_ns import pl


class Probe(pl.Callback):
    """Placed before the clipping callback: records the float64 norm of the gradients the hook receives."""

    def __init__(self) -> None:
        self.norms: list[float] = []
        self.dtypes: set[torch.dtype] = set()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        self.dtypes |= {g.dtype for g in grads}
        self.norms.append(norm64(grads))


@pytest.mark.parametrize(
    ("precision", "grad_dtype"),
    [
        ("32-true", torch.float32),
        ("64-true", torch.float64),
        ("16-true", torch.float16),
        ("bf16-true", torch.bfloat16),
        ("bf16-mixed", torch.float32),
        ("16-mixed", torch.float32),  # float16 autocast with a real CPU GradScaler (Lightning picks bf16 on CPU)
    ],
)
def test_each_precision_follows_the_rule_against_float64(precision, grad_dtype, tmp_path):
    alpha, beta = 1.2, 0.6
    probe, cb = Probe(), AdaptiveGradientClipping(alpha=alpha, beta=beta)
    model = TinyRegressor(lr=0.05, optimizer="sgd")
    if precision == "16-mixed":
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**20)  # large: the first steps overflow and are skipped
        plugin = pl.plugins.precision.MixedPrecision("16-mixed", "cpu", scaler)
        kwargs = trainer_kwargs(tmp_path, max_steps=10, plugins=[plugin], callbacks=[probe, cb])
    else:
        kwargs = trainer_kwargs(tmp_path, max_steps=10, precision=precision, callbacks=[probe, cb])
    pl.Trainer(**kwargs).fit(model, regression_loader())
    assert probe.dtypes == {grad_dtype}
    state = cb.clip_state()
    finite = [n for n in probe.norms if 0 < n < math.inf]  # 16-mixed: the scaler's skipped steps are not counted
    assert int(state.seen) == len(finite) >= 3
    if precision == "16-mixed":  # some steps overflowed in float16: skipped by the scaler, not counted
        assert len(finite) < len(probe.norms)
    assert state.ema.dtype in (torch.float32, torch.float64)
    m = finite[0]
    for n in finite[1:]:
        m = beta * m + (1 - beta) * n
    # the norm of low-precision gradients is accumulated in float32: only float32 rounding separates it from float64
    assert float(state.ema) == pytest.approx(m, rel=1e-5)


def test_half_precision_norm_neither_overflows_nor_loses_small_terms():
    """Squares of 300 overflow float16 (max 65504) and squares of 1e-4 underflow it: accumulated in float32, the
    norm equals the float64 reference."""
    big = torch.full((1000,), 300.0, dtype=torch.float16)
    small = torch.full((100000,), 1e-4, dtype=torch.float16)
    for grads in ([big], [small], [big, small]):
        expected = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads))
        norm = global_grad_norm(grads)
        assert norm.dtype == torch.float32
        assert float(norm) == pytest.approx(expected, rel=1e-4)
    assert not torch.isfinite((big * big).sum())  # what a float16 accumulation would give
    bf = torch.full((4096,), 1e-3, dtype=torch.bfloat16)
    assert float(global_grad_norm([bf])) == pytest.approx(math.sqrt(4096 * float(bf[0].double()) ** 2), rel=1e-4)


@pytest.mark.parametrize("enabled", [True, False], ids=["scaler_enabled", "scaler_disabled"])
def test_a_nan_step_never_reaches_the_optimizer_with_an_enabled_or_a_disabled_scaler(enabled, tmp_path):
    """An enabled ``GradScaler`` skips the non-finite step itself; a disabled one (``enabled=use_amp``, or the CUDA
    scaler Lightning makes without CUDA) skips nothing, so the callback's own policy (``zero``) must apply: in both
    cases the weights stay finite and the step is counted as non-finite."""
    pl.seed_everything(0, verbose=False)
    model = TinyRegressor(lr=0.05, optimizer="sgd")
    model.poison_steps = {2}
    scaler = torch.amp.GradScaler("cpu", init_scale=1.0, enabled=enabled)
    plugin = pl.plugins.precision.MixedPrecision("16-mixed", "cpu", scaler)
    cb = AdaptiveGradientClipping()
    pl.Trainer(**trainer_kwargs(tmp_path, max_steps=4, plugins=[plugin], callbacks=[cb])).fit(
        model, regression_loader()
    )
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    assert int(cb.clip_state().seen) == 3  # the nan step entered neither the average nor its count
