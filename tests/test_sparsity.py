"""Update sparsity: the pure-torch rule, the tracker's hooks, and the values both callbacks log in real Trainers."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_clip import AdaptiveGradientClipping
from lightning_clip.monitor import UpdateSparsityMonitor
from lightning_clip.optim import SmoothedSignSGD
from lightning_clip.sparsity import UpdateSparsityTracker, negligible_count, update_sparsity
from tests.conftest import TinyRegressor, TwoOptimizers, no_host_sync, read_scalars, regression_loader, trainer_kwargs
from tests.lightning_ns import pl

CSVLogger, TensorBoardLogger = pl.loggers.CSVLogger, pl.loggers.TensorBoardLogger

N = 1000
LR = 0.01


# ------------------------------------------------------------------ the rule
def test_update_sparsity_matches_a_direct_count():
    gen = torch.Generator().manual_seed(1)
    before = [torch.randn(30, 7, generator=gen), torch.randn(11, generator=gen)]
    deltas = [torch.randn(30, 7, generator=gen) * 1e-3, torch.randn(11, generator=gen) * 1e-2]
    after = [b + d for b, d in zip(before, deltas)]
    lrs = [0.01, 0.05]
    got = float(update_sparsity(before, after, lrs, tol=0.1))
    exact = [(a.double() - b.double()).abs() for a, b in zip(after, before)]
    expected = sum(int((e <= 0.1 * lr).sum()) for e, lr in zip(exact, lrs)) / (210 + 11)
    assert got == pytest.approx(expected, abs=1.5 / 221)  # float32 rounding may flip an entry at the boundary
    # the scale-free rule: |d| <= tol * rms(d) over all entries
    flat = torch.cat([e.flatten() for e in exact])
    rms = math.sqrt(float((flat**2).mean()))
    got = float(update_sparsity(before, after, tol=0.5, relative_to="rms"))
    assert got == pytest.approx(float((flat <= 0.5 * rms).double().mean()), abs=1.5 / 221)
    # the rms rule does not depend on the scale of the update
    scaled = [b + 1000 * d for b, d in zip(before, deltas)]
    assert float(update_sparsity(before, scaled, tol=0.5, relative_to="rms")) == pytest.approx(got, abs=2 / 221)


def test_lr_zero_counts_exactly_the_entries_that_did_not_move():
    count, total = negligible_count([torch.tensor([0.0, 1e-30, -2.0, 0.0])], [0.0], tol=0.1)
    assert (int(count), total) == (2, 4)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sparsity_tol": -0.1}, "sparsity_tol: -0.1"),
        ({"sparsity_tol": float("nan")}, "sparsity_tol: nan"),
        ({"sparsity_relative_to": "max"}, "sparsity_relative_to: 'max'"),
        ({"histogram_every_n_steps": 0}, "histogram_every_n_steps: 0"),
    ],
)
def test_bad_sparsity_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdaptiveGradientClipping(**kwargs)


def test_bad_monitor_arguments_raise():
    with pytest.raises(ValueError, match="^Invalid tol: -1; expected a finite number >= 0$"):
        UpdateSparsityMonitor(tol=-1)
    with pytest.raises(ValueError, match="log_prefix: ''"):
        UpdateSparsityMonitor(log_prefix="")


def test_tracker_copies_only_when_armed_and_frees_after_the_step():
    w = nn.Parameter(torch.zeros(N))
    opt = SmoothedSignSGD([w], lr=LR, beta=0.9)
    tracker = UpdateSparsityTracker(opt)
    w.grad = torch.ones(N)
    opt.step()
    assert tracker.held_bytes == 0 and tracker.pop() is None and not opt._optimizer_step_post_hooks
    tracker.arm()
    assert tracker.held_bytes == 4 * N and len(opt._optimizer_step_post_hooks) == 1
    opt.step()
    assert tracker.held_bytes == 0
    assert float(tracker.pop()) == 0.0  # |M_2| = 0.19 > 0.1 everywhere
    tracker.disarm()
    assert not opt._optimizer_step_post_hooks


def test_update_sparsity_of_complex_updates_counts_the_modulus():
    before = [torch.zeros(4, dtype=torch.complex64)]
    after = [torch.tensor([0.03 + 0.04j, 0.09 + 0.12j, 0.001j, 1.0], dtype=torch.complex64)]
    # |dw| = 0.05, 0.15, 0.001, 1.0 against tol * lr = 0.1: the first and third are negligible (their real and
    # imaginary parts alone would not tell: 0.09 and 0.12 are both below 0.15)
    assert float(update_sparsity(before, after, [1.0], tol=0.1)) == 0.5
    assert float(update_sparsity(before, after, [1.0], tol=0.13)) == 0.5  # |0.09 + 0.12j| = 0.15 > 0.13
    moduli = (after[0] - before[0]).abs()
    rms = update_sparsity(before, after, tol=0.5, relative_to="rms")
    limit = 0.5 * math.sqrt(float(moduli.double().square().mean()))
    assert float(rms) == pytest.approx(float((moduli.double() <= limit).double().mean()))


# ------------------------------------------------- Smoothed SignSGD in a Trainer
class SignProblem(pl.LightningModule):
    """``loss = <w, g_t>``: the gradient is ``g_t``, chosen per step; the first ``alternating`` entries flip sign."""

    def __init__(self, alternating: int):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(N))
        gen = torch.Generator().manual_seed(3)
        self.register_buffer("magnitude", torch.rand(N, generator=gen) + 0.05)  # signs matter, magnitudes do not
        self.alternating = alternating

    def signs(self, t: int) -> torch.Tensor:
        s = torch.ones(N)
        s[: self.alternating] = (-1.0) ** t
        return s

    def training_step(self, batch, batch_idx):
        t = self.trainer.global_step + 1
        return (self.w * (self.signs(t) * self.magnitude)).sum()

    def configure_optimizers(self):
        return SmoothedSignSGD(self.parameters(), lr=LR, beta=0.9)


def _definition1_sparsity(alternating: int, steps: int, every: int, tol: float = 0.1):
    """Expected logged values from Definition 1 in float64: per step and cumulative (window = log to log)."""
    m = torch.zeros(N, dtype=torch.float64)
    w = torch.zeros(N, dtype=torch.float64)
    start = w.clone()
    per_step, cumulative = [], []
    for t in range(1, steps + 1):
        s = torch.ones(N, dtype=torch.float64)
        s[:alternating] = (-1.0) ** t
        m = 0.9 * m + 0.1 * s
        dw = -LR * m
        w = w + dw
        if t % every == 0:
            per_step.append(float((dw.abs() <= tol * LR).double().mean()))
            cumulative.append(float(((w - start).abs() <= tol * LR * every).double().mean()))
            start = w.clone()
    return per_step, cumulative


def _fit(tmp_path, module, callbacks, steps=40, every=5, logger=None):
    logger = logger or TensorBoardLogger(str(tmp_path), name="run")
    loader = DataLoader(TensorDataset(torch.zeros(steps, 1)), batch_size=1)
    trainer = pl.Trainer(
        **trainer_kwargs(tmp_path, max_steps=steps, log_every_n_steps=every, logger=logger, callbacks=callbacks)
    )
    trainer.fit(module, loader)
    return logger, trainer


def test_smoothed_signsgd_half_alternating_signs_is_half_sparse(tmp_path):
    monitor = UpdateSparsityMonitor(cumulative=True)
    logger, _ = _fit(tmp_path, SignProblem(alternating=N // 2), [monitor])
    s = read_scalars(logger.log_dir)
    steps = [step for step, _ in s["sparsity/update_sparsity"]]
    values = [v for _, v in s["sparsity/update_sparsity"]]
    cumulative = [v for _, v in s["sparsity/update_sparsity_cumulative"]]
    assert steps == [4, 9, 14, 19, 24, 29, 34, 39]
    expected, expected_cum = _definition1_sparsity(N // 2, 40, 5)
    assert values == pytest.approx(expected, abs=1e-6)
    assert cumulative == pytest.approx(expected_cum, abs=1e-6)
    assert all(0.4 <= v <= 0.6 for v in values + cumulative)


def test_smoothed_signsgd_constant_signs_is_dense(tmp_path):
    cb = AdaptiveGradientClipping(alpha=1e6, sparsity_cumulative=True)  # logged by the clipping callback
    logger, _ = _fit(tmp_path, SignProblem(alternating=0), [cb])
    s = read_scalars(logger.log_dir)
    values = [v for _, v in s["clip/update_sparsity"]]
    assert len(values) == 8 and max(values) <= 0.05
    assert max(v for _, v in s["clip/update_sparsity_cumulative"]) <= 0.05
    assert values == pytest.approx(_definition1_sparsity(0, 40, 5)[0], abs=1e-6)


# ---------------------------------------------------- the callbacks' mechanics
def test_sparsity_logging_can_be_turned_off(tmp_path):
    logger = TensorBoardLogger(str(tmp_path), name="off")
    cb = AdaptiveGradientClipping(log_sparsity=False)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, logger=logger, callbacks=[cb]))
    trainer.fit(TinyRegressor(), regression_loader())
    tags = read_scalars(logger.log_dir)
    assert "clip/grad_norm" in tags and not any("sparsity" in t for t in tags)
    assert not trainer.optimizers[0]._optimizer_step_post_hooks


def test_no_copy_no_hook_no_host_sync_on_non_logging_steps(tmp_path):
    observed = {}

    class Guarded(AdaptiveGradientClipping):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if trainer._logger_connector.should_update_logs:
                return super().on_before_optimizer_step(trainer, pl_module, optimizer)
            with no_host_sync():
                super().on_before_optimizer_step(trainer, pl_module, optimizer)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            tracker = self._sparsity.trackers[0]
            opt = trainer.optimizers[0]
            observed[trainer.global_step] = (tracker.held_bytes, len(opt._optimizer_step_post_hooks))

    class Peek(pl.Callback):  # runs inside the step, after Guarded armed (or not)
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            observed[("in", trainer.global_step)] = cb._sparsity.trackers[0].held_bytes

    model = TinyRegressor()
    cb = Guarded(alpha=0.8, beta=0.9, sparsity_cumulative=True)
    logger = CSVLogger(str(tmp_path))
    trainer = pl.Trainer(
        **trainer_kwargs(tmp_path, max_steps=12, log_every_n_steps=4, logger=logger, callbacks=[cb, Peek()])
    )
    trainer.fit(model, regression_loader(n=96))
    window = sum(p.numel() * 4 for p in model.parameters())
    for step in range(1, 13):
        assert observed[step] == (window, 0)  # only the window's copy is held between steps, and no hook
        logging = step % 4 == 0
        assert observed[("in", step - 1)] == window * (2 if logging else 1)
    assert 0.0 <= cb.last_metrics["clip/update_sparsity"] <= 1.0
    assert "clip/update_sparsity_cumulative" in cb.last_metrics


def test_monitor_has_a_series_per_optimizer(tmp_path):
    logger = TensorBoardLogger(str(tmp_path), name="two")
    monitor = UpdateSparsityMonitor()
    trainer = pl.Trainer(
        **trainer_kwargs(tmp_path, max_epochs=1, max_steps=-1, log_every_n_steps=2, logger=logger, callbacks=[monitor])
    )
    trainer.fit(TwoOptimizers(), regression_loader())
    tags = read_scalars(logger.log_dir)
    # 8 batches, logging at batches 2, 4, 6, 8: Adam steps on each, SGD on every second batch
    assert [s for s, _ in tags["sparsity/Adam/update_sparsity"]] == [1, 3, 5, 7]
    assert [s for s, _ in tags["sparsity/SGD/update_sparsity"]] == [1, 3, 5, 7]
    assert all(0.0 <= v <= 1.0 for vals in tags.values() for _, v in vals)


def test_cumulative_window_keeps_its_summed_lrs_when_a_group_is_added_mid_window():
    """Gradual unfreezing: a param group added in the middle of a window does not restart the other groups' sums
    of learning rates; the window's sparsity equals a direct count against the lr summed over the whole window."""
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(200))
    late = nn.Parameter(torch.randn(50))
    opt = torch.optim.SGD([w], lr=0.01)
    tracker = UpdateSparsityTracker(opt, tol=0.5, cumulative=True, max_entries=None)
    tracker.start_window()
    start = w.detach().clone()
    lrs = [0.01, 0.01, 0.02, 0.02]
    for step, lr in enumerate(lrs):
        if step == 2:
            opt.add_param_group({"params": [late], "lr": lr})
        for g in opt.param_groups:
            g["lr"] = lr
        w.grad = torch.randn(200, generator=torch.Generator().manual_seed(step)) * 3.0
        late.grad = torch.ones(50) if step >= 2 else None
        opt.step()
        tracker.count_step()
    got = float(tracker.measure_window())
    moved = (w.detach().double() - start.double()).abs()
    expected = float((moved <= 0.5 * sum(lrs)).double().mean())
    assert 0.05 < expected < 0.95  # the bound matters: restarting the sum at step 2 gives another count
    restarted = float((moved <= 0.5 * sum(lrs[2:])).double().mean())
    assert abs(restarted - expected) > 2 / 200
    assert got == pytest.approx(expected, abs=1.5 / 200)
    tracker.close()
