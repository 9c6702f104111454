"""AdaptiveGradientClipping inside a real Trainer: the rule, Lightning's semantics, checkpoints, logs."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_clip import AdaptiveGradientClipping, SmoothedNormSGD, SmoothedSignSGD
from tests.conftest import (
    Probe,
    TinyRegressor,
    TwoOptimizers,
    fit_regression,
    no_host_sync,
    norm64,
    read_scalars,
    regression_loader,
    trainer_kwargs,
)
from tests.lightning_ns import pl

CSVLogger, TensorBoardLogger = pl.loggers.CSVLogger, pl.loggers.TensorBoardLogger
MixedPrecision = pl.plugins.precision.MixedPrecision


def test_logged_series_follow_the_rule(tmp_path):
    alpha, beta = 1.05, 0.7
    model = TinyRegressor(lr=0.1)
    cb = AdaptiveGradientClipping(alpha=alpha, beta=beta)
    logger = TensorBoardLogger(str(tmp_path), name="run")
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=16, logger=logger, callbacks=[cb]))
    trainer.fit(model, regression_loader())
    s = {k: [v for _, v in vals] for k, vals in read_scalars(logger.log_dir).items()}
    norms, ema, thr = s["clip/grad_norm"], s["clip/grad_norm_ema"], s["clip/threshold"]
    assert len(norms) == 16 and len(ema) == 16
    # the logged pre-clip norms are the norms the model saw after backward
    assert norms == pytest.approx(model.backward_norms, rel=1e-5)
    # step 1 has no bound: threshold inf (TensorBoard draws no point, the series stay aligned for the margin chart);
    # from step 2, threshold_t = alpha * m_(t-1)
    assert len(thr) == 16 and thr[0] == math.inf
    m = norms[0]
    assert ema[0] == pytest.approx(m, rel=1e-6)
    for t in range(1, 16):
        assert thr[t] == pytest.approx(alpha * m, rel=1e-5)
        m = beta * m + (1 - beta) * norms[t]
        assert ema[t] == pytest.approx(m, rel=1e-5)
        expected_coef = min(1.0, alpha * ema[t - 1] / norms[t])
        assert s["clip/clip_coef"][t] == pytest.approx(expected_coef, rel=1e-5)
    assert all(math.isfinite(v) for k, vals in s.items() for v in (vals[1:] if k == "clip/threshold" else vals))
    # some steps clipped, some did not: the test exercises both branches
    fracs = s["clip/clipped_frac"]
    assert set(fracs) == {0.0, 1.0}


def test_once_per_real_step_under_gradient_accumulation(tmp_path):
    calls = []

    class Counting(AdaptiveGradientClipping):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            calls.append(trainer.global_step)
            super().on_before_optimizer_step(trainer, pl_module, optimizer)

    model = TinyRegressor()
    cb = Counting(alpha=2.0, beta=0.5)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=4, accumulate_grad_batches=3, callbacks=[cb]))
    trainer.fit(model, regression_loader(n=96))
    assert calls == [0, 1, 2, 3]
    # the average is seeded with the norm of the accumulated gradient (after the 3rd backward)
    n = model.backward_norms
    m = n[2]
    for k in (5, 8, 11):
        m = 0.5 * m + 0.5 * n[k]
    assert float(cb.clip_state().ema) == pytest.approx(m, rel=1e-5)
    assert int(cb.clip_state().seen) == 4


def test_huge_alpha_training_equals_training_without_callback(tmp_path):
    def run(callbacks):
        pl.seed_everything(0, verbose=False)
        model = TinyRegressor()
        pl.Trainer(**trainer_kwargs(tmp_path, callbacks=callbacks)).fit(model, regression_loader())
        return [p.detach().clone() for p in model.parameters()]

    for a, b in zip(run([]), run([AdaptiveGradientClipping(alpha=1e30)])):
        assert torch.equal(a, b)


def test_gradient_clip_val_is_refused_before_any_step(tmp_path):
    model = TinyRegressor()
    before = [p.detach().clone() for p in model.parameters()]
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, gradient_clip_val=1.0, callbacks=[AdaptiveGradientClipping()]))
    with pytest.raises(ValueError, match=r"gradient_clip_val: 1\.0"):
        trainer.fit(model, regression_loader())
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_fsdp1_strategy_is_accepted_at_setup(tmp_path):
    """FSDPStrategy (FSDP1) passes setup: its flat-parameter shards are reduced over the shard group
    (tests/test_sharded.py runs it on 2 processes); DeepSpeed is still refused there."""
    from lightning_clip._lightning import strategy_kind

    class CPUFSDP(pl.strategies.FSDPStrategy):  # Lightning only builds FSDP on CUDA; the subclass lets setup run here
        pass

    trainer = pl.Trainer(**trainer_kwargs(tmp_path, strategy=CPUFSDP(), callbacks=[AdaptiveGradientClipping()]))
    assert strategy_kind(trainer) == "fsdp"
    AdaptiveGradientClipping().setup(trainer, TinyRegressor(), "fit")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"alpha": 0.0}, "alpha: 0.0"),
        ({"beta": 1.5}, "beta: 1.5"),
        ({"max_norm": -1.0}, "max_norm: -1.0"),
        ({"mode": "zclip"}, "mode: 'zclip'"),
        ({"nonfinite": "ignore"}, "nonfinite: 'ignore'"),
        ({"log_prefix": ""}, "log_prefix: ''"),
    ],
)
def test_bad_arguments_raise_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdaptiveGradientClipping(**kwargs)


def test_resume_is_bit_exact(tmp_path):
    def fit(epochs, ckpt=None, save=None):  # 8 steps an epoch; Lightning resumes loaders exactly at epoch ends
        pl.seed_everything(0, verbose=False)
        model = TinyRegressor(lr=0.05)
        cb = AdaptiveGradientClipping(alpha=0.9, beta=0.8)
        trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=-1, max_epochs=epochs, callbacks=[cb]))
        trainer.fit(model, regression_loader(), ckpt_path=ckpt)
        if save:
            trainer.save_checkpoint(save)
        return model, cb

    straight, cb_straight = fit(2)
    ckpt = str(tmp_path / "half.ckpt")
    fit(1, save=ckpt)
    resumed, cb_resumed = fit(2, ckpt=ckpt)
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    for key, value in cb_straight.clip_state().tensors().items():
        assert torch.equal(value, getattr(cb_resumed.clip_state(), key)), key
    assert int(cb_resumed.clip_state().seen) == 16


def test_two_instances_share_a_checkpoint(tmp_path):
    a = AdaptiveGradientClipping(alpha=3.0)
    b = AdaptiveGradientClipping(mode="norm", clip_val=0.5, log_prefix="clip_fixed")
    assert a.state_key != b.state_key
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=3, callbacks=[a, b]))
    trainer.fit(TinyRegressor(), regression_loader())
    path = str(tmp_path / "two.ckpt")
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=True)["callbacks"]
    assert saved[a.state_key]["rule"]["alpha"] == 3.0
    assert saved[b.state_key]["rule"]["mode"] == "norm"
    assert int(saved[b.state_key]["states"][0]["seen"]) == 3




def test_no_host_sync_on_non_logging_steps(tmp_path):
    guarded = []

    class Guarded(AdaptiveGradientClipping):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if trainer._logger_connector.should_update_logs:
                return super().on_before_optimizer_step(trainer, pl_module, optimizer)
            guarded.append(trainer.global_step)
            with no_host_sync():
                return super().on_before_optimizer_step(trainer, pl_module, optimizer)

    class WithZeroSteps(TinyRegressor):
        zero_steps = {0, 6}  # exactly zero gradients (a constant loss): the zero-norm rule runs on the device too

        def on_after_backward(self) -> None:
            if self.trainer.global_step in self.zero_steps:
                for p in self.parameters():
                    p.grad.zero_()
            super().on_after_backward()

    model = WithZeroSteps()
    model.poison_steps = {5}  # a non-finite step too: the default policy handles it without a sync
    logger = CSVLogger(str(tmp_path))
    cb = Guarded(alpha=0.8, beta=0.9, max_norm=10.0, warmup_steps=1)  # the warm-up's bias-corrected average too
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=12, log_every_n_steps=4, logger=logger, callbacks=[cb]))
    trainer.fit(model, regression_loader())
    assert len(guarded) == 9 and {0, 5, 6} <= set(guarded)
    assert model.backward_norms[0] == model.backward_norms[6] == 0.0
    assert int(cb.clip_state().seen) == 9  # 12 steps, less the non-finite one and the two zero ones
    with pytest.raises(AssertionError, match="host synchronisation"), no_host_sync():
        bool(torch.tensor(True))  # the guard itself bites


def test_default_nonfinite_policy_zeroes_the_step(tmp_path):
    model = TinyRegressor(optimizer="sgd", lr=0.1)
    model.poison_steps = {3}
    snapshots = {}

    class Snap(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            snapshots[trainer.global_step] = [p.detach().clone() for p in pl_module.parameters()]

    cb = AdaptiveGradientClipping(alpha=2.0)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=6, callbacks=[cb, Snap()]))
    trainer.fit(model, regression_loader())
    # plain SGD with zero gradients does not move on the poisoned step
    assert all(torch.equal(a, b) for a, b in zip(snapshots[3], snapshots[4]))
    assert not all(torch.equal(a, b) for a, b in zip(snapshots[2], snapshots[3]))
    assert all(bool(p.isfinite().all()) for p in model.parameters())
    assert int(cb.clip_state().seen) == 5 and math.isfinite(float(cb.clip_state().ema))


def test_skip_policy_leaves_adam_state_untouched(tmp_path):
    model = TinyRegressor(lr=0.1)
    model.poison_steps = {2}
    cb = AdaptiveGradientClipping(alpha=2.0, nonfinite="skip")
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=6, callbacks=[cb]))
    trainer.fit(model, regression_loader())
    opt = trainer.optimizers[0]
    steps = {int(opt.state[p]["step"]) for p in model.parameters()}
    assert steps == {5}  # Adam did not count (nor move on) the skipped step
    assert all(bool(p.isfinite().all()) for p in model.parameters())


def test_error_policy_names_step_and_parameters(tmp_path):
    model = TinyRegressor()
    model.poison_steps = {3}
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[AdaptiveGradientClipping(nonfinite="error")]))
    with pytest.raises(RuntimeError, match=r"global step 3 in: net\.2\.weight"):
        trainer.fit(model, regression_loader())


def test_frozen_parameters_are_skipped(tmp_path):
    model = TinyRegressor(freeze_first=True)
    cb = AdaptiveGradientClipping(alpha=2.0, beta=0.0)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=3, callbacks=[cb]))
    trainer.fit(model, regression_loader())
    # beta = 0: the average is the last norm, over the trainable parameters only
    assert float(cb.clip_state().ema) == pytest.approx(model.backward_norms[-1], rel=1e-5)
    assert model.net[0].weight.grad is None




def test_several_optimizers_have_their_own_state_and_series(tmp_path):
    model = TwoOptimizers()
    cb = AdaptiveGradientClipping(alpha=1.5, beta=0.6)
    logger = TensorBoardLogger(str(tmp_path), name="two")
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=1, max_steps=-1, logger=logger, callbacks=[cb]))
    trainer.fit(model, regression_loader())
    for index, key in ((0, "a"), (1, "b")):
        norms = model.norms[key]
        m = norms[0]
        for n in norms[1:]:
            m = 0.6 * m + 0.4 * n
        assert float(cb.clip_state(index).ema) == pytest.approx(m, rel=1e-5)
        assert int(cb.clip_state(index).seen) == len(norms)
    tags = read_scalars(logger.log_dir)
    assert len(tags["clip/Adam/grad_norm"]) == 8
    assert [v for _, v in tags["clip/SGD/grad_norm"]] == pytest.approx(model.norms["b"], rel=1e-5)
    assert "clip/grad_norm" not in tags


def test_optimizer_without_gradients_does_nothing(tmp_path):
    cb = AdaptiveGradientClipping()
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=3, callbacks=[cb]))
    trainer.fit(TwoOptimizers(step_without_backward=True), regression_loader())
    assert cb.clip_state(0) is None


def test_16_mixed_with_grad_scaler_leaves_nonfinite_steps_to_the_scaler(tmp_path):
    model = TinyRegressor(lr=0.05)
    model.poison_steps = {2}
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    cb = AdaptiveGradientClipping(alpha=1.5, beta=0.5, nonfinite="error")  # the scaler's case never raises
    trainer = pl.Trainer(
        **trainer_kwargs(tmp_path, max_steps=6, plugins=[MixedPrecision("16-mixed", "cpu", scaler)], callbacks=[cb])
    )
    trainer.fit(model, regression_loader())
    state = cb.clip_state()
    assert int(state.seen) == 5  # the step the scaler skipped is not counted
    assert scaler.get_scale() == 512.0  # ... and the scaler did see the nan and back off
    unscaled = [n / (1024.0 if i <= 2 else 512.0) for i, n in enumerate(model.backward_norms)]
    m = unscaled[0]
    for n in unscaled[1:2] + unscaled[3:]:
        m = 0.5 * m + 0.5 * n
    assert float(state.ema) == pytest.approx(m, rel=1e-3)


def test_fused_adam_under_grad_scaler_sees_unscaled_norms(tmp_path):
    model = TinyRegressor(lr=0.05, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    cb = AdaptiveGradientClipping(alpha=1.1, beta=0.5)
    trainer = pl.Trainer(
        **trainer_kwargs(tmp_path, max_steps=4, plugins=[MixedPrecision("16-mixed", "cpu", scaler)], callbacks=[cb])
    )
    trainer.fit(model, regression_loader())
    unscaled = [n / 256.0 for n in model.backward_norms]
    m = unscaled[0]
    for n in unscaled[1:]:
        m = 0.5 * m + 0.5 * n
    assert float(cb.clip_state().ema) == pytest.approx(m, rel=1e-3)


def test_bf16_mixed_runs_and_logs_finite_values(tmp_path):
    logger = CSVLogger(str(tmp_path))
    cb = AdaptiveGradientClipping(alpha=1.0)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, precision="bf16-mixed", logger=logger, callbacks=[cb]))
    model = TinyRegressor()
    trainer.fit(model, regression_loader())
    assert math.isfinite(cb.last_metrics["clip/grad_norm"])
    assert int(cb.clip_state().seen) == 8


class _RecordingLBFGS(torch.optim.LBFGS):
    """LBFGS that records the norm of the gradients it receives from every evaluation of its closure (after the
    callback clipped them: Lightning runs the hook inside the closure)."""

    def __init__(self, params, received: list[float]):
        super().__init__(params, lr=0.5, max_iter=4)
        self.received = received

    def step(self, closure):
        def recorded():
            loss = closure()
            self.received.append(norm64([p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]))
            return loss

        return super().step(recorded)


def test_closure_optimizer_clips_every_evaluation_and_counts_each_real_step_once(tmp_path):
    class Model(TinyRegressor):
        received: list[float] = []

        def configure_optimizers(self):
            self.received = []
            return _RecordingLBFGS(self.parameters(), self.received)

    alpha, beta, steps, evals = 0.5, 0.9, 3, 4
    model = Model()
    cb = AdaptiveGradientClipping(alpha=alpha, beta=beta, log_sparsity=False)
    pl.Trainer(callbacks=[cb], **trainer_kwargs(tmp_path, max_steps=steps)).fit(model, regression_loader())
    pre, post = model.backward_norms, model.received
    assert len(pre) == len(post) == steps * evals  # LBFGS evaluated its closure max_iter times per step
    assert int(cb.clip_state().seen) == steps  # counted once per real step, not once per evaluation
    # float64 reference: the bound of step t comes from the average over the first evaluations of steps < t
    ema = None
    for t in range(steps):
        first = pre[t * evals]
        bound = math.inf if ema is None else alpha * ema
        for i in range(t * evals, (t + 1) * evals):
            assert post[i] == pytest.approx(min(pre[i], bound), rel=1e-5)
        ema = first if ema is None else beta * ema + (1 - beta) * first
    assert float(cb.clip_state().ema) == pytest.approx(ema, rel=1e-5)


def test_value_mode_and_adaptive_mode_train_with_an_empty_parameter(tmp_path):
    class WithEmpty(TinyRegressor):
        def __init__(self):
            super().__init__(optimizer="sgd")
            self.empty = nn.Parameter(torch.zeros(0, 3))

        def training_step(self, batch, batch_idx):
            return super().training_step(batch, batch_idx) + self.empty.sum()

    for kwargs in ({"mode": "value", "clip_val": 0.05}, {"alpha": 0.5}):
        model = WithEmpty()
        reference = WithEmpty()
        reference.load_state_dict(model.state_dict())
        cb = AdaptiveGradientClipping(log_sparsity=False, **kwargs)
        pl.Trainer(callbacks=[cb], **trainer_kwargs(tmp_path, max_steps=1)).fit(model, regression_loader())
        assert model.empty.grad is not None and model.empty.grad.numel() == 0
        # one step by hand: torch's clipping of the same gradients, then SGD
        x, y = next(iter(regression_loader()))
        (nn.functional.mse_loss(reference.net(x), y) + reference.empty.sum()).backward()
        params = [p for p in reference.parameters()]
        if kwargs.get("mode") == "value":
            torch.nn.utils.clip_grad_value_(params, 0.05)
        with torch.no_grad():
            for p in params:
                p -= reference.lr * p.grad
        for a, b in zip(model.parameters(), reference.parameters()):
            torch.testing.assert_close(a, b)


# complex parameters: a spectral layer
class Spectral(pl.LightningModule):
    """A spectral layer (a learned complex weight per Fourier mode, as in Fourier neural operators) and a head."""

    def __init__(self, optimizer: str = "norm"):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.modes = nn.Parameter(torch.randn(5, dtype=torch.complex64, generator=gen))
        self.head = nn.Linear(8, 1)
        self.optimizer_name = optimizer
        self.pre: list[float] = []
        self.pre_torch: list[float] = []
        self.post: list[float] = []
        self.grads_after: list[list[torch.Tensor]] = []

    def forward(self, x):
        return self.head(torch.fft.irfft(torch.fft.rfft(x) * self.modes, n=8))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self(x), y) * 10

    def on_after_backward(self) -> None:
        grads = [p.grad for p in self.parameters()]
        self.pre.append(math.sqrt(sum(float(g.to(torch.complex128).abs().square().sum()) for g in grads)))
        self.pre_torch.append(float(torch.nn.utils.get_total_norm([g.clone() for g in grads])))

    def on_before_optimizer_step(self, optimizer) -> None:
        self.post.append(
            math.sqrt(sum(float(p.grad.to(torch.complex128).abs().square().sum()) for p in self.parameters()))
        )
        self.grads_after.append([p.grad.clone() for p in self.parameters()])

    def configure_optimizers(self):
        cls = SmoothedNormSGD if self.optimizer_name == "norm" else SmoothedSignSGD
        return cls(self.parameters(), lr=0.01, beta=0.9)


@pytest.mark.parametrize("optimizer", ["norm", "sign"])
def test_spectral_model_trains_with_the_callback_and_both_optimizers(tmp_path, optimizer):
    model = Spectral(optimizer)
    cb = AdaptiveGradientClipping(alpha=0.5, beta=0.5, histogram_every_n_steps=2)
    logger = CSVLogger(str(tmp_path))
    fit_regression(tmp_path, model, [cb], max_steps=6, logger=logger)
    assert model.pre == pytest.approx(model.pre_torch, rel=1e-6)  # torch's norm of complex gradients
    m = model.pre[0]
    assert model.post[0] == pytest.approx(model.pre[0], rel=1e-6)
    for t in range(1, 6):
        assert model.post[t] == pytest.approx(min(model.pre[t], 0.5 * m), rel=1e-5)  # clipped to 0.5 x average
        m = 0.5 * m + 0.5 * model.pre[t]
    assert float(cb.clip_state().ema) == pytest.approx(m, rel=1e-5)
    assert math.isfinite(cb.last_metrics["clip/update_sparsity"])
    assert all(bool(p.isfinite().all()) for p in model.parameters())


# errors that explain
def test_error_policy_explains_a_norm_that_overflowed_with_finite_entries(tmp_path):
    model = Probe(loss_weight={2: 1e30})  # every entry finite in float32, the sum of their squares is not
    cb = AdaptiveGradientClipping(nonfinite="error")
    with pytest.raises(RuntimeError) as info:
        fit_regression(tmp_path, model, [cb])
    message = str(info.value)
    assert message.startswith("Gradient norm overflow at global step 2: every gradient entry is finite")
    assert math.isfinite(model.pre[2]) and model.pre[2] > 1e19
    largest = sorted(model.max_abs[2], key=model.max_abs[2].get, reverse=True)[:3]
    listed = message.split("The largest entries are in: ")[1]
    assert [part.split(" (max")[0] for part in listed.split(", ")[:3]] == largest
