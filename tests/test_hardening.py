"""Hardening, from the user's side: real Trainers, real checkpoints loaded the way Lightning loads them (weights
only), bad values, degenerate first steps, reused callbacks, complex parameters and the errors a user reads.

Each section names the class of case it covers.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from lightning_clip import (
    AdaptiveGradientClipping,
    GroupedSmoothedNormSGD,
    GroupedSmoothedSignSGD,
    SmoothedNormSGD,
    SmoothedSignSGD,
    UpdateSparsityMonitor,
)
from lightning_clip.functional import ClipState, clip_grads_
from lightning_clip.norms import global_grad_norm
from lightning_clip.optim import weight_decay_param_groups
from lightning_clip.rule import rule_from_settings
from lightning_clip.sparsity import UpdateSparsityTracker, update_sparsity
from tests.conftest import norm64, regression_loader, trainer_kwargs
from tests.lightning_ns import pl

CSVLogger = pl.loggers.CSVLogger


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


def _fit(tmp_path, model, callbacks, ckpt_path=None, **overrides):
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=callbacks, **overrides))
    trainer.fit(model, regression_loader(), ckpt_path=ckpt_path)
    return trainer


def _our_warnings(record) -> list[str]:
    return [str(w.message) for w in record if "AdaptiveGradientClipping(log_prefix=" in str(w.message)]


def _only_plain(value) -> bool:
    """Whether ``value`` is made of plain Python values and tensors only."""
    if isinstance(value, dict):
        return all(type(k) in (str, int) and _only_plain(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(_only_plain(v) for v in value)
    return value is None or type(value) in (bool, int, float, str) or type(value) is torch.Tensor


# ======================================================================================================================
# 1. State lost or unloadable on resume
# ======================================================================================================================
def test_numpy_settings_give_a_weights_only_checkpoint_and_an_exact_resume(tmp_path):
    alphas, betas = np.linspace(1.5, 3.5, 3), np.logspace(-1, -0.05, 4)  # a sweep's values: numpy scalars
    settings = dict(
        alpha=alphas[1],
        beta=betas[2],
        warmup_steps=np.int64(1),
        max_norm=np.float32(50.0),
        sparsity_tol=np.float64(0.1),
        dashboard=np.bool_(False),
    )
    cb = AdaptiveGradientClipping(**settings)
    assert type(cb.alpha) is float and type(cb.warmup_steps) is int and type(cb.dashboard) is bool
    trainer = _fit(tmp_path, Probe(), [cb])
    path = str(tmp_path / "numpy.ckpt")
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=True)["callbacks"][cb.state_key]  # Lightning's default way of loading
    assert _only_plain(saved)
    assert saved["rule"]["alpha"] == float(alphas[1]) and saved["rule"]["beta"] == float(betas[2])
    for key, value in cb.clip_state().state_dict().items():
        assert torch.equal(saved["states"][0][key], value), key

    resumed = AdaptiveGradientClipping(**settings)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        _fit(tmp_path, Probe(), [resumed], ckpt_path=path, max_steps=9)
    assert not _our_warnings(record)
    assert int(resumed.clip_state().seen) == 9  # 8 saved + 1


@pytest.mark.parametrize(
    ("saved_settings", "resumed_settings"),
    [
        (dict(alpha=2, beta=0.5), dict(alpha=2.0, beta=np.float64(0.5))),  # the same settings, spelt differently
        (dict(alpha=3.0, beta=0.5), dict(alpha=1.5, beta=0.5, max_norm=100.0)),  # retuned on purpose
        (dict(alpha=3.0, beta=0.5), dict(alpha=1.5, beta=0.5, warmup_steps=3, nonfinite="skip")),
    ],
    ids=["spelt-differently", "alpha-and-max_norm-changed", "warmup-and-policy-changed"],
)
def test_resume_keeps_the_average_and_clips_a_spike_right_after_resume(tmp_path, saved_settings, resumed_settings):
    first = AdaptiveGradientClipping(**saved_settings)
    trainer = _fit(tmp_path, Probe(), [first])
    path = str(tmp_path / "saved.ckpt")
    trainer.save_checkpoint(path)
    saved_ema = float(torch.load(path, weights_only=True)["callbacks"][first.state_key]["states"][0]["ema"])

    model = Probe(loss_weight={8: 1e3})  # the first step after resume is a spike
    cb = AdaptiveGradientClipping(**resumed_settings)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        _fit(tmp_path, model, [cb], ckpt_path=path, max_steps=10)
    assert not _our_warnings(record)
    threshold = float(cb.alpha) * saved_ema  # the saved average, the new alpha
    if "max_norm" in resumed_settings:
        threshold = min(threshold, resumed_settings["max_norm"])
    assert model.pre[0] > 10 * threshold
    assert model.post[0] == pytest.approx(threshold, rel=1e-5)
    assert int(cb.clip_state().seen) == 10


def test_resume_with_another_beta_warns_once_naming_the_settings_and_starts_fresh(tmp_path):
    first = AdaptiveGradientClipping(alpha=2.0, beta=0.9)
    trainer = _fit(tmp_path, Probe(), [first])
    path = str(tmp_path / "beta.ckpt")
    trainer.save_checkpoint(path)

    model = Probe()
    cb = AdaptiveGradientClipping(alpha=2.0, beta=0.5)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        _fit(tmp_path, model, [cb], ckpt_path=path, max_steps=11)
    ours = _our_warnings(record)
    assert len(ours) == 1
    assert "beta=0.5" in ours[0] and "beta=0.9" in ours[0] and "fresh state" in ours[0]
    assert int(cb.clip_state().seen) == 3  # fresh: only the 3 steps after the resume
    m = model.pre[0]
    for n in model.pre[1:]:
        m = 0.5 * m + 0.5 * n
    assert float(cb.clip_state().ema) == pytest.approx(m, rel=1e-5)


def test_a_state_under_a_key_no_callback_has_is_reported_once_and_the_callback_starts_fresh(tmp_path):
    """A checkpoint whose clipping state is under another key (a renamed ``log_prefix``, another version's key):
    nothing is taken silently, one warning names the key and its settings, and the callback starts fresh."""
    first = AdaptiveGradientClipping(alpha=3.0, beta=0.5)
    trainer = _fit(tmp_path, Probe(), [first])
    path, moved_path = str(tmp_path / "new.ckpt"), str(tmp_path / "moved.ckpt")
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    state = checkpoint["callbacks"].pop(first.state_key)
    checkpoint["callbacks"]["AdaptiveGradientClipping{'log_prefix': 'old'}"] = state
    torch.save(checkpoint, moved_path)

    other = AdaptiveGradientClipping(alpha=1.5, beta=0.8)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        _fit(tmp_path, Probe(), [other], ckpt_path=moved_path, max_steps=9)
    ours = _our_warnings(record)
    assert len(ours) == 1 and "beta=0.5" in ours[0] and "beta=0.8" in ours[0] and "'old'" in ours[0]
    assert int(other.clip_state().seen) == 1


# ======================================================================================================================
# 2. A degenerate first step must not poison the average
# ======================================================================================================================
def test_zero_norm_neither_seeds_nor_drags_the_average():
    rule, state = rule_from_settings(alpha=2.0, beta=0.9), ClipState.zeros()
    zeros = [torch.zeros(3, 4), torch.zeros(5)]
    stats = clip_grads_(zeros, state, rule)
    assert float(stats.norm) == 0.0 and int(state.seen) == 0 and float(state.ema) == 0.0
    assert all(torch.equal(g, torch.zeros_like(g)) for g in zeros)
    grads = [torch.full((3, 4), 0.5), torch.full((5,), -1.0)]
    n = math.sqrt(12 * 0.25 + 5)
    stats = clip_grads_(grads, state, rule)  # the first informative step seeds, unclipped
    assert float(stats.threshold) == math.inf and float(state.ema) == pytest.approx(n, rel=1e-6)
    for _ in range(3):  # zero steps in the middle leave the average and the count alone
        clip_grads_([torch.zeros(3, 4), torch.zeros(5)], state, rule)
    assert float(state.ema) == pytest.approx(n, rel=1e-6) and int(state.seen) == 1
    again = [torch.full((3, 4), 0.5), torch.full((5,), -1.0)]
    stats = clip_grads_(again, state, rule)
    assert float(stats.threshold) == pytest.approx(2.0 * n, rel=1e-6) and not bool(stats.clipped)
    assert int(state.steps) == 6 and int(state.clipped) == 0  # zero steps are finite steps, never clipped


def test_constant_loss_at_the_start_does_not_throttle_the_next_steps(tmp_path):
    model = Probe(loss_weight={0: 0.0})  # step 0: a loss weight of 0 (a ramp), exactly zero gradients
    cb = AdaptiveGradientClipping(alpha=2.0, beta=0.9)
    _fit(tmp_path, model, [cb])
    assert model.pre[0] == 0.0
    assert model.post[1:] == pytest.approx(model.pre[1:], rel=1e-6)  # nothing zeroed, nothing throttled
    assert int(cb.clip_state().seen) == 7
    m = model.pre[1]
    for n in model.pre[2:]:
        m = 0.9 * m + 0.1 * n
    assert float(cb.clip_state().ema) == pytest.approx(m, rel=1e-5)


def test_warmup_is_not_spent_on_zero_steps_nor_set_by_a_tiny_first_step(tmp_path):
    # three zero steps, then an informative step 1000x smaller than the others, then ordinary steps
    model = Probe(loss_weight={0: 0.0, 1: 0.0, 2: 0.0, 3: 1e-3})
    cb = AdaptiveGradientClipping(alpha=1.5, beta=0.9, warmup_steps=3)
    _fit(tmp_path, model, [cb], max_steps=12)
    norms = model.pre[3:]  # the informative steps
    beta, k_warm = 0.9, 3
    m = norms[0]
    for k, n in enumerate(norms[1:], start=2):  # float64 reference: bias-corrected during the warm-up
        w = (1 - beta) / (1 - beta**k) if k <= k_warm + 1 else 1 - beta
        threshold = math.inf if k <= k_warm + 1 else 1.5 * m
        assert model.post[2 + k] == pytest.approx(min(n, threshold), rel=1e-5)
        m = m + w * (n - m)
    assert float(cb.clip_state().ema) == pytest.approx(m, rel=1e-5)
    # what the warm-up is for: after it, the ordinary steps pass; the tiny first step weighs 0.21 in the average, not
    # beta^3 = 0.73 as a plain seeded average would give it (which puts the threshold below the ordinary norms)
    assert model.post[3:] == pytest.approx(model.pre[3:], rel=1e-6)
    plain = norms[0]
    for n in norms[1:4]:
        plain = 0.9 * plain + 0.1 * n
    assert 1.5 * plain < norms[4]  # the first adaptive step (k = 5) would have been clipped


# ======================================================================================================================
# 3. A callback reused for a second fit starts fresh
# ======================================================================================================================
def test_second_fit_with_the_same_callback_starts_from_a_fresh_state(tmp_path):
    cb = AdaptiveGradientClipping(alpha=1.2, beta=0.6)
    _fit(tmp_path, Probe(), [cb])
    first = {k: v.clone() for k, v in cb.clip_state().tensors().items()}
    assert int(first["seen"]) == 8

    pl.seed_everything(1, verbose=False)
    second_model = Probe(lr=0.05)  # a seed / learning-rate loop: a fresh model, the same callback object
    _fit(tmp_path, second_model, [cb])
    pl.seed_everything(1, verbose=False)
    reference_model, reference = Probe(lr=0.05), AdaptiveGradientClipping(alpha=1.2, beta=0.6)
    _fit(tmp_path, reference_model, [reference])
    for key, value in reference.clip_state().tensors().items():
        assert torch.equal(value, getattr(cb.clip_state(), key)), key
    for a, b in zip(second_model.parameters(), reference_model.parameters()):
        assert torch.equal(a, b)
    assert second_model.post[0] == second_model.pre[0]  # the first step of the new fit seeds: no bound yet


def test_same_callback_object_resumes_its_own_checkpoint_exactly(tmp_path):
    def run(epochs, cb, ckpt=None, save=None):
        pl.seed_everything(0, verbose=False)
        model = Probe(lr=0.05)
        trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=-1, max_epochs=epochs, callbacks=[cb]))
        trainer.fit(model, regression_loader(), ckpt_path=ckpt)
        if save:
            trainer.save_checkpoint(save)
        return model

    straight_cb = AdaptiveGradientClipping(alpha=0.9, beta=0.8)
    straight = run(2, straight_cb)
    cb, ckpt = AdaptiveGradientClipping(alpha=0.9, beta=0.8), str(tmp_path / "half.ckpt")
    run(1, cb, save=ckpt)
    resumed = run(2, cb, ckpt=ckpt)  # the same object resumes: restored, not reset
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    for key, value in straight_cb.clip_state().tensors().items():
        assert torch.equal(value, getattr(cb.clip_state(), key)), key


# ======================================================================================================================
# 4. Settings that are not what they say
# ======================================================================================================================
def _param():
    return [nn.Parameter(torch.zeros(2))]


BAD = [
    # (constructor, kwargs, exception, message start)
    (AdaptiveGradientClipping, dict(alpha=True), TypeError, "Invalid alpha: True; expected a finite number > 0"),
    (AdaptiveGradientClipping, dict(beta="0.9"), TypeError, "Invalid beta: '0.9'; expected"),
    (AdaptiveGradientClipping, dict(alpha=float("inf")), ValueError, "Invalid alpha: inf;"),
    (AdaptiveGradientClipping, dict(max_norm=float("nan")), ValueError, "Invalid max_norm: nan;"),
    (AdaptiveGradientClipping, dict(warmup_steps=2.0), TypeError, "Invalid warmup_steps: 2.0; expected an integer"),
    (AdaptiveGradientClipping, dict(warmup_steps=True), TypeError, "Invalid warmup_steps: True;"),
    (AdaptiveGradientClipping, dict(fused="no"), TypeError, "Invalid fused: 'no'; expected True or False"),
    (AdaptiveGradientClipping, dict(foreach=1), TypeError, "Invalid foreach: 1; expected None, True or False"),
    (AdaptiveGradientClipping, dict(fused=True, foreach=True), ValueError, "Invalid fused: True; expected fused=False"),
    (AdaptiveGradientClipping, dict(log_sparsity="yes"), TypeError, "Invalid log_sparsity: 'yes';"),
    (AdaptiveGradientClipping, dict(sparsity_tol=False), TypeError, "Invalid sparsity_tol: False;"),
    (AdaptiveGradientClipping, dict(mode=1), TypeError, "Invalid mode: 1; expected one of"),
    (AdaptiveGradientClipping, dict(log_prefix=3), TypeError, "Invalid log_prefix: 3; expected a non-empty string"),
    (AdaptiveGradientClipping, dict(histogram_every_n_steps=True), TypeError, "Invalid histogram_every_n_steps: True;"),
    (rule_from_settings, dict(alpha=False), TypeError, "Invalid alpha: False;"),
    (rule_from_settings, dict(mode="norm", clip_val=float("inf")), ValueError, "Invalid clip_val: inf;"),
    (UpdateSparsityMonitor, dict(tol=True), TypeError, "Invalid tol: True;"),
    (UpdateSparsityMonitor, dict(cumulative="no"), TypeError, "Invalid cumulative: 'no';"),
    (UpdateSparsityMonitor, dict(relative_to=None), TypeError, "Invalid relative_to: None;"),
    (UpdateSparsityMonitor, dict(dashboard=0), TypeError, "Invalid dashboard: 0;"),
    (SmoothedSignSGD, dict(params=_param(), lr="0.1"), TypeError, "Invalid lr: '0.1'; expected a finite number >= 0"),
    (SmoothedSignSGD, dict(params=_param(), lr=float("inf")), ValueError, "Invalid lr: inf;"),
    (SmoothedSignSGD, dict(params=_param(), weight_decay=float("inf")), ValueError, "Invalid weight_decay: inf;"),
    (SmoothedSignSGD, dict(params=_param(), beta=True), TypeError, "Invalid beta: True;"),
    (SmoothedSignSGD, dict(params=_param(), bias_correction="no"), TypeError, "Invalid bias_correction: 'no';"),
    (SmoothedSignSGD, dict(params=_param(), maximize=1), TypeError, "Invalid maximize: 1;"),
    (SmoothedSignSGD, dict(params=_param(), fused="no"), TypeError, "Invalid fused: 'no';"),
    (SmoothedNormSGD, dict(params=_param(), eps=float("inf")), ValueError, "Invalid eps: inf;"),
    (SmoothedNormSGD, dict(params=_param(), eps=np.float64("nan")), ValueError, "Invalid eps: "),
    (SmoothedNormSGD, dict(params=_param(), norm=None), TypeError, "Invalid norm: None;"),
    (SmoothedNormSGD, dict(params=[{"params": _param(), "lr": "x"}]), TypeError, "Invalid lr of param group 0: 'x';"),
    (GroupedSmoothedSignSGD, dict(params=_param(), lr=float("inf")), ValueError, "Invalid lr: inf;"),
    (
        GroupedSmoothedSignSGD,
        dict(params=_param(), no_decay="bias"),
        TypeError,
        "Invalid no_decay: 'bias'; expected a sequence",
    ),
    (GroupedSmoothedNormSGD, dict(params=_param(), fused=True, foreach=True), ValueError, "Invalid fused: True;"),
    (GroupedSmoothedNormSGD, dict(params=_param(), exclude_1d="no"), TypeError, "Invalid exclude_1d: 'no';"),
    (GroupedSmoothedSignSGD, dict(params=_param(), weight_decay="0.1"), TypeError, "Invalid weight_decay: '0.1';"),
    (GroupedSmoothedNormSGD, dict(params=_param(), lr=-1.0), ValueError, "Invalid lr: -1.0;"),
    (weight_decay_param_groups, dict(model_or_params=_param(), weight_decay=True), TypeError, "Invalid weight_decay:"),
    (
        weight_decay_param_groups,
        dict(model_or_params=_param(), weight_decay=0.1, no_decay="bias"),
        TypeError,
        "Invalid no_decay: 'bias'; expected a sequence",
    ),
    (
        weight_decay_param_groups,
        dict(model_or_params=_param(), weight_decay=0.1, exclude_1d="no"),
        TypeError,
        "Invalid exclude_1d: 'no';",
    ),
]


@pytest.mark.parametrize(("make", "kwargs", "error", "message"), BAD, ids=[f"{b[0].__name__}-{b[3]}" for b in BAD])
def test_every_public_constructor_names_the_bad_argument_and_value(make, kwargs, error, message):
    with pytest.raises(error) as info:
        make(**kwargs)
    assert str(info.value).startswith(message), str(info.value)


def test_tracker_validates_its_arguments():
    opt = torch.optim.SGD(_param(), lr=0.1)
    with pytest.raises(TypeError, match=r"^Invalid tol: '0\.1';"):
        UpdateSparsityTracker(opt, tol="0.1")
    with pytest.raises(TypeError, match=r"^Invalid cumulative: 1;"):
        UpdateSparsityTracker(opt, cumulative=1)
    with pytest.raises(TypeError, match=r"^Invalid optimizer: "):
        UpdateSparsityTracker([torch.zeros(2)])


def test_numpy_values_are_accepted_and_stored_as_plain_python():
    cb = AdaptiveGradientClipping(
        alpha=np.float32(2.5), beta=np.float64(0.5), warmup_steps=np.int32(2), fused=np.bool_(False)
    )
    assert (cb.alpha, cb.beta, cb.warmup_steps, cb.fused) == (2.5, 0.5, 2, False)
    assert [type(v) for v in (cb.alpha, cb.beta, cb.warmup_steps, cb.fused)] == [float, float, int, bool]
    assert type(cb.rule.alpha) is float and type(cb.rule.warmup_steps) is int
    opt = SmoothedSignSGD(_param(), lr=np.float64(0.1), beta=np.float32(0.5), maximize=np.bool_(True))
    group = opt.param_groups[0]
    assert (type(group["lr"]), type(group["beta"]), type(group["maximize"])) == (float, float, bool)
    # the optimizer steps with them like with Python values
    p = opt.param_groups[0]["params"][0]
    p.grad = torch.tensor([1.0, -2.0])
    opt.step()
    assert torch.equal(p.detach(), torch.tensor([0.1 * 0.5, -0.1 * 0.5]))


def test_callback_refuses_fused_with_foreach_like_the_optimizers():
    for make in (
        lambda: AdaptiveGradientClipping(fused=True, foreach=True),
        lambda: SmoothedSignSGD(_param(), fused=True, foreach=True),
    ):
        with pytest.raises(ValueError, match="fused=True and foreach=True are mutually exclusive"):
            make()


# ======================================================================================================================
# 5. Complex parameters
# ======================================================================================================================
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
    _fit(tmp_path, model, [cb], max_steps=6, logger=logger)
    assert model.pre == pytest.approx(model.pre_torch, rel=1e-6)  # torch's norm of complex gradients
    m = model.pre[0]
    assert model.post[0] == pytest.approx(model.pre[0], rel=1e-6)
    for t in range(1, 6):
        assert model.post[t] == pytest.approx(min(model.pre[t], 0.5 * m), rel=1e-5)  # clipped to 0.5 x average
        m = 0.5 * m + 0.5 * model.pre[t]
    assert float(cb.clip_state().ema) == pytest.approx(m, rel=1e-5)
    assert math.isfinite(cb.last_metrics["clip/update_sparsity"])
    assert all(bool(p.isfinite().all()) for p in model.parameters())


def test_complex_norm_and_clipping_match_torch_clip_grad_norm():
    gen = torch.Generator().manual_seed(4)
    make = [
        lambda: torch.randn(4, 3, dtype=torch.complex64, generator=gen),
        lambda: torch.randn(6, generator=gen),
        lambda: torch.randn(2, 5, dtype=torch.complex64, generator=gen).t(),  # not contiguous
    ]
    grads = [f() * 3 for f in make]
    params = [nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    reference = math.sqrt(sum(float(g.to(torch.complex128).abs().square().sum()) for g in grads))
    for foreach in (True, False):
        assert float(global_grad_norm(grads, foreach=foreach)) == pytest.approx(reference, rel=1e-6)
    torch_norm = torch.nn.utils.clip_grad_norm_(params, 1.5, foreach=True)
    stats = clip_grads_(grads, ClipState.zeros(), rule_from_settings(mode="norm", clip_val=1.5))
    assert float(stats.norm) == pytest.approx(float(torch_norm), rel=1e-6)
    for p, g in zip(params, grads):
        torch.testing.assert_close(g, p.grad, rtol=1e-6, atol=1e-7)


def test_complex_value_clipping_clamps_the_modulus_and_keeps_the_phase():
    z = torch.tensor([3 + 4j, 0.3 - 0.4j, -6j, 0j], dtype=torch.complex64)
    real = torch.tensor([2.0, -0.5, -7.0])
    grads = [z.clone(), real.clone()]
    clip_grads_(grads, ClipState.zeros(), rule_from_settings(mode="value", clip_val=1.0))
    expected = torch.tensor([0.6 + 0.8j, 0.3 - 0.4j, -1j, 0j], dtype=torch.complex64)
    torch.testing.assert_close(grads[0], expected)
    assert torch.equal(grads[1], torch.tensor([1.0, -0.5, -1.0]))


def _reference_smoothed(params, grads_seq, *, kind, lr, beta, weight_decay=0.0, bias_correction=False, norm="global"):
    """Complex128 reference of both optimizers, written from their definitions."""
    ws = [p.detach().to(torch.complex128).clone() for p in params]
    ms = [torch.zeros_like(w) for w in ws]
    for t, grads in enumerate(grads_seq, start=1):
        gs = [g.to(torch.complex128) for g in grads]
        if kind == "sign":
            ds = [torch.where(g.abs() > 0, g / g.abs().clamp_min(1e-300), 0) for g in gs]  # z / |z|, 0 at 0
        elif norm == "global":
            total = math.sqrt(sum(float(g.abs().square().sum()) for g in gs))
            ds = [g / max(total, 1e-12) for g in gs]
        else:
            ds = [g / max(math.sqrt(float(g.abs().square().sum())), 1e-12) for g in gs]
        step = lr / (1 - beta**t) if bias_correction else lr
        for i, (w, m, d) in enumerate(zip(ws, ms, ds)):
            w.mul_(1 - lr * weight_decay)
            m.mul_(beta).add_(d * (1 - beta))
            w.sub_(m * step)
    return ws


@pytest.mark.parametrize("kind", ["sign", "norm-global", "norm-tensor"])
@pytest.mark.parametrize("kernel", ["loop", "foreach", "fused"])
def test_optimizers_on_complex_parameters_match_a_complex128_reference(kind, kernel):
    gen = torch.Generator().manual_seed(7)

    def tensors():  # two complex parameters and a real one, in one optimizer
        out = [
            torch.randn(3, 2, dtype=torch.complex128, generator=gen),
            torch.randn(4, dtype=torch.complex128, generator=gen),
            torch.randn(5, dtype=torch.float64, generator=gen),
        ]
        out[1][0] = 0  # an entry whose gradient is 0
        return out

    init = tensors()
    grads_seq = [tensors() for _ in range(6)]
    params = [nn.Parameter(t.clone()) for t in init]
    kernel_kwargs = {"loop": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}[kernel]
    settings = dict(lr=0.1, beta=0.8, weight_decay=0.05, bias_correction=True)
    if kind == "sign":
        opt = SmoothedSignSGD(params, **settings, **kernel_kwargs)
        ref = _reference_smoothed(init, grads_seq, kind="sign", **settings)
    else:
        norm = kind.split("-")[1]
        opt = SmoothedNormSGD(params, norm=norm, **settings, **kernel_kwargs)
        ref = _reference_smoothed(init, grads_seq, kind="norm", norm=norm, **settings)
    for grads in grads_seq:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
    for p, r in zip(params, ref):
        torch.testing.assert_close(p.detach().to(torch.complex128), r, rtol=1e-12, atol=1e-13)
    assert [p.dtype for p in params] == [torch.complex128, torch.complex128, torch.float64]


def test_complex_sign_is_the_real_sign_on_the_real_axis():
    """With imaginary parts 0, sgn(z) = sign(Re z): the complex optimizer moves like the real one."""
    gen = torch.Generator().manual_seed(9)
    real = nn.Parameter(torch.randn(5, generator=gen))
    cplx = nn.Parameter(real.detach().to(torch.complex64))
    opt_r, opt_c = SmoothedSignSGD([real], lr=0.1, beta=0.7), SmoothedSignSGD([cplx], lr=0.1, beta=0.7)
    for _ in range(4):
        g = torch.randn(5, generator=gen)
        real.grad, cplx.grad = g.clone(), g.to(torch.complex64)
        opt_r.step()
        opt_c.step()
    assert torch.equal(cplx.detach().real, real.detach()) and torch.equal(cplx.detach().imag, torch.zeros(5))


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


# ======================================================================================================================
# 6. Errors that explain
# ======================================================================================================================
def test_error_policy_explains_a_norm_that_overflowed_with_finite_entries(tmp_path):
    model = Probe(loss_weight={2: 1e30})  # every entry finite in float32, the sum of their squares is not
    cb = AdaptiveGradientClipping(nonfinite="error")
    with pytest.raises(RuntimeError) as info:
        _fit(tmp_path, model, [cb])
    message = str(info.value)
    assert message.startswith("Gradient norm overflow at global step 2: every gradient entry is finite")
    assert math.isfinite(model.pre[2]) and model.pre[2] > 1e19
    largest = sorted(model.max_abs[2], key=model.max_abs[2].get, reverse=True)[:3]
    listed = message.split("The largest entries are in: ")[1]
    assert [part.split(" (max")[0] for part in listed.split(", ")[:3]] == largest


def test_two_callbacks_that_differ_only_in_log_prefix_log_save_and_resume_apart(tmp_path):
    fast, slow = (
        AdaptiveGradientClipping(beta=0.5, log_prefix="fast"),
        AdaptiveGradientClipping(beta=0.5, log_prefix="slow"),
    )
    assert fast.state_key != slow.state_key
    logger = CSVLogger(str(tmp_path))
    model = Probe()
    trainer = _fit(tmp_path, model, [fast, slow], logger=logger)
    assert fast.last_metrics["fast/grad_norm"] == pytest.approx(model.pre[-1], rel=1e-5)
    assert slow.last_metrics["slow/grad_norm"] == pytest.approx(model.pre[-1], rel=1e-5)
    path = str(tmp_path / "two.ckpt")
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=True)["callbacks"]
    a, b = AdaptiveGradientClipping(beta=0.5, log_prefix="fast"), AdaptiveGradientClipping(beta=0.5, log_prefix="slow")
    _fit(tmp_path, Probe(), [a, b], ckpt_path=path, max_steps=8)  # restores, takes no step
    for cb in (a, b):
        for key, value in saved[cb.state_key]["states"][0].items():
            assert torch.equal(cb.state_dict()["states"][0][key], value)
    with pytest.raises(RuntimeError, match="state_key"):  # the same prefix twice is refused before any step
        pl.Trainer(
            **trainer_kwargs(tmp_path, callbacks=[AdaptiveGradientClipping(), AdaptiveGradientClipping(alpha=2.0)])
        )
