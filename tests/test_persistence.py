"""Checkpoints and resume, from the user's side: the states the callback keeps (``lightning_clip/_persist.py``) in
real checkpoints loaded the way Lightning loads them (weights only), a resume with other settings or under another key,
a callback reused for a second fit, two callbacks apart; and checkpoints written by an earlier version resume bit for
bit: the fixtures in ``tests/fixtures`` (written by ``tests/fixtures/make_checkpoints.py`` with lightning-clip 0.1.0 as
of commit 20beebe) against an uninterrupted run of today's code."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import torch

from lightning_clip import AdaptiveGradientClipping
from tests.conftest import Probe, TinyRegressor, fit_regression, regression_loader, trainer_kwargs
from tests.fixtures.make_checkpoints import callbacks, wrapper_run
from tests.lightning_ns import pl

CSVLogger = pl.loggers.CSVLogger
FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")


def _fit(tmp_path, epochs: int, ckpt: str | None = None):
    pl.seed_everything(0, verbose=False)
    model, cbs = TinyRegressor(lr=0.05), callbacks()
    kwargs = trainer_kwargs(tmp_path, max_steps=-1, max_epochs=epochs, callbacks=cbs, log_every_n_steps=50)
    pl.Trainer(**kwargs).fit(model, regression_loader(), ckpt_path=ckpt)
    return model, cbs


def test_a_callback_checkpoint_of_the_earlier_version_resumes_bit_for_bit(tmp_path):
    ckpt = os.path.join(FIXTURES, "callbacks_epoch1.ckpt")
    torch.load(ckpt, weights_only=True)  # plain values and tensors only
    straight, cbs_straight = _fit(tmp_path / "a", 2)
    resumed, cbs_resumed = _fit(tmp_path / "b", 2, ckpt=ckpt)
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    for cb_a, cb_b in zip(cbs_straight, cbs_resumed):
        saved_a, saved_b = cb_a.state_dict(), cb_b.state_dict()
        assert saved_a.keys() == saved_b.keys()
        for key, value in saved_a["states"][0].items():
            assert torch.equal(value, saved_b["states"][0][key]), (cb_a.log_prefix, key)
        assert int(saved_b["states"][0]["seen"]) == 16


def test_a_wrapper_state_dict_of_the_earlier_version_resumes_bit_for_bit():
    saved = torch.load(os.path.join(FIXTURES, "wrapper_step5.pt"), weights_only=True)
    straight_model, straight = wrapper_run(8)
    model, opt = wrapper_run(0)
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["optimizer"])
    for x, y in list(regression_loader())[5:8]:
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    for a, b in zip(straight_model.parameters(), model.parameters()):
        assert torch.equal(a, b)
    a, b = straight.state_dict()["clipping"], opt.state_dict()["clipping"]
    assert a["steps"] == b["steps"] == 8
    for key, value in a["state"].items():
        assert torch.equal(value, b["state"][key]), key


def _our_warnings(record) -> list[str]:
    """The warnings of ``AdaptiveGradientClipping`` among ``record``."""
    return [str(w.message) for w in record if "AdaptiveGradientClipping(log_prefix=" in str(w.message)]


def _only_plain(value) -> bool:
    """Whether ``value`` is made of plain Python values and tensors only."""
    if isinstance(value, dict):
        return all(type(k) in (str, int) and _only_plain(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(_only_plain(v) for v in value)
    return value is None or type(value) in (bool, int, float, str) or type(value) is torch.Tensor


# state lost or unloadable on resume
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
    trainer = fit_regression(tmp_path, Probe(), [cb])
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
        fit_regression(tmp_path, Probe(), [resumed], ckpt_path=path, max_steps=9)
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
    trainer = fit_regression(tmp_path, Probe(), [first])
    path = str(tmp_path / "saved.ckpt")
    trainer.save_checkpoint(path)
    saved_ema = float(torch.load(path, weights_only=True)["callbacks"][first.state_key]["states"][0]["ema"])

    model = Probe(loss_weight={8: 1e3})  # the first step after resume is a spike
    cb = AdaptiveGradientClipping(**resumed_settings)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fit_regression(tmp_path, model, [cb], ckpt_path=path, max_steps=10)
    assert not _our_warnings(record)
    threshold = float(cb.alpha) * saved_ema  # the saved average, the new alpha
    if "max_norm" in resumed_settings:
        threshold = min(threshold, resumed_settings["max_norm"])
    assert model.pre[0] > 10 * threshold
    assert model.post[0] == pytest.approx(threshold, rel=1e-5)
    assert int(cb.clip_state().seen) == 10


def test_resume_with_another_beta_warns_once_naming_the_settings_and_starts_fresh(tmp_path):
    first = AdaptiveGradientClipping(alpha=2.0, beta=0.9)
    trainer = fit_regression(tmp_path, Probe(), [first])
    path = str(tmp_path / "beta.ckpt")
    trainer.save_checkpoint(path)

    model = Probe()
    cb = AdaptiveGradientClipping(alpha=2.0, beta=0.5)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fit_regression(tmp_path, model, [cb], ckpt_path=path, max_steps=11)
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
    trainer = fit_regression(tmp_path, Probe(), [first])
    path, moved_path = str(tmp_path / "new.ckpt"), str(tmp_path / "moved.ckpt")
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    state = checkpoint["callbacks"].pop(first.state_key)
    checkpoint["callbacks"]["AdaptiveGradientClipping{'log_prefix': 'old'}"] = state
    torch.save(checkpoint, moved_path)

    other = AdaptiveGradientClipping(alpha=1.5, beta=0.8)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fit_regression(tmp_path, Probe(), [other], ckpt_path=moved_path, max_steps=9)
    ours = _our_warnings(record)
    assert len(ours) == 1 and "beta=0.5" in ours[0] and "beta=0.8" in ours[0] and "'old'" in ours[0]
    assert int(other.clip_state().seen) == 1


# a callback reused for a second fit starts fresh
def test_second_fit_with_the_same_callback_starts_from_a_fresh_state(tmp_path):
    cb = AdaptiveGradientClipping(alpha=1.2, beta=0.6)
    fit_regression(tmp_path, Probe(), [cb])
    first = {k: v.clone() for k, v in cb.clip_state().tensors().items()}
    assert int(first["seen"]) == 8

    pl.seed_everything(1, verbose=False)
    second_model = Probe(lr=0.05)  # a seed / learning-rate loop: a fresh model, the same callback object
    fit_regression(tmp_path, second_model, [cb])
    pl.seed_everything(1, verbose=False)
    reference_model, reference = Probe(lr=0.05), AdaptiveGradientClipping(alpha=1.2, beta=0.6)
    fit_regression(tmp_path, reference_model, [reference])
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


# two callbacks in one Trainer
def test_two_callbacks_that_differ_only_in_log_prefix_log_save_and_resume_apart(tmp_path):
    fast, slow = (
        AdaptiveGradientClipping(beta=0.5, log_prefix="fast"),
        AdaptiveGradientClipping(beta=0.5, log_prefix="slow"),
    )
    assert fast.state_key != slow.state_key
    logger = CSVLogger(str(tmp_path))
    model = Probe()
    trainer = fit_regression(tmp_path, model, [fast, slow], logger=logger)
    assert fast.last_metrics["fast/grad_norm"] == pytest.approx(model.pre[-1], rel=1e-5)
    assert slow.last_metrics["slow/grad_norm"] == pytest.approx(model.pre[-1], rel=1e-5)
    path = str(tmp_path / "two.ckpt")
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=True)["callbacks"]
    a, b = AdaptiveGradientClipping(beta=0.5, log_prefix="fast"), AdaptiveGradientClipping(beta=0.5, log_prefix="slow")
    fit_regression(tmp_path, Probe(), [a, b], ckpt_path=path, max_steps=8)  # restores, takes no step
    for cb in (a, b):
        for key, value in saved[cb.state_key]["states"][0].items():
            assert torch.equal(cb.state_dict()["states"][0][key], value)
    with pytest.raises(RuntimeError, match="state_key"):  # the same prefix twice is refused before any step
        pl.Trainer(
            **trainer_kwargs(tmp_path, callbacks=[AdaptiveGradientClipping(), AdaptiveGradientClipping(alpha=2.0)])
        )
