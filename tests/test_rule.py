"""The rule module: the built-in rules against the flat arguments, read-only settings, a new rule as one class
(through the callback in a real Trainer, the wrapper, and a LightningCLI YAML), the refusals, and degenerate first
steps (zero norms, a constant loss, the warm-up) that must not poison the average."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import pytest
import torch
import yaml
from torch import Tensor

from lightning_clip import AdaptiveClippingOptimizer, AdaptiveGradientClipping, AdaptiveNorm, FixedNorm, FixedValue
from lightning_clip.functional import ClipState, clip_grads_
from lightning_clip.rule import ClipRule, rule_from_settings
from tests.conftest import Probe, TinyRegressor, fit_regression, norm64, regression_loader, trainer_kwargs
from tests.lightning_ns import pl


class HalfOfLast(ClipRule):
    """A rule of one's own, as a user writes it: the bound is ``ratio`` times the previous informative norm."""

    mode = "half_of_last"

    def __init__(self, ratio: float = 0.5) -> None:
        self._set(ratio=float(ratio))

    def settings(self) -> dict[str, Any]:
        return {"ratio": self.ratio}

    def init_state(self, device: torch.device | str | None = None) -> dict[str, Tensor]:
        return {"last": torch.full((), math.inf, device=device)}

    def threshold(self, state: Mapping[str, Tensor]) -> Tensor:
        return state["last"] * self.ratio

    def update(self, state: dict[str, Tensor], norm: Tensor, finite: Tensor) -> None:
        state["last"].copy_(torch.where(finite & (norm > 0), norm.float(), state["last"]))

    def metrics(self, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {"last_norm": state["last"]}


def test_the_flat_arguments_build_the_built_in_rules():
    assert rule_from_settings() == AdaptiveNorm()
    assert rule_from_settings(alpha=2.0, beta=0.5, max_norm=3.0, warmup_steps=4) == AdaptiveNorm(2.0, 0.5, 3.0, 4)
    assert rule_from_settings("norm", clip_val=0.5, beta=0.7) == FixedNorm(0.5, beta=0.7)
    assert rule_from_settings("value", clip_val=0.5) == FixedValue(0.5)
    assert AdaptiveGradientClipping(mode="norm", clip_val=0.5).rule == FixedNorm(0.5)
    assert AdaptiveGradientClipping(rule=FixedValue(0.3)).rule == FixedValue(0.3)
    assert AdaptiveNorm().identity() == {"mode": "adaptive", "beta": 0.918}
    assert FixedValue(0.3).action == "clamp" and FixedNorm(0.3).action == "scale"


def test_settings_are_read_only_with_one_source():
    cb = AdaptiveGradientClipping(alpha=2.0)
    with pytest.raises(AttributeError):
        cb.alpha = 3.0  # type: ignore[misc]
    with pytest.raises(AttributeError, match="read-only"):
        cb.rule.alpha = 3.0  # type: ignore[misc]
    assert cb.alpha == cb.rule.alpha == 2.0
    opt = AdaptiveClippingOptimizer(torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1), beta=0.5)
    with pytest.raises(AttributeError):
        opt.beta = 0.9  # type: ignore[misc]
    assert opt.beta == opt.rule.beta == 0.5


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: AdaptiveGradientClipping(rule=FixedNorm(1.0), alpha=2.0), ValueError, r"Invalid rule: FixedNorm\("),
        (lambda: AdaptiveGradientClipping(rule="adaptive"), TypeError, "Invalid rule: 'adaptive'"),
        (lambda: AdaptiveNorm(alpha=0.0), ValueError, "Invalid alpha: 0.0"),
        (lambda: FixedNorm(clip_val=-1.0), ValueError, "Invalid clip_val: -1.0"),
        (lambda: FixedValue(clip_val=1.0, beta=1.0), ValueError, "Invalid beta: 1.0"),
    ],
)
def test_bad_rules_are_refused_at_construction(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_a_new_rule_is_one_class_and_runs_in_the_step():
    rule, grads = HalfOfLast(0.5), [torch.tensor([3.0, 4.0])]
    state = ClipState.zeros(rule=rule)
    norms = [5.0, 8.0, 2.0, 10.0]
    last = math.inf
    for n in norms:
        grads = [torch.tensor([0.6, 0.8]) * n]
        stats = clip_grads_(grads, state, rule)
        assert float(stats.threshold) == 0.5 * last
        assert norm64(grads) == pytest.approx(min(n, 0.5 * last), rel=1e-6)
        last = n
    assert float(state.last) == 10.0 and int(state.steps) == 4 and int(state.clipped) == 2


def test_a_new_rule_clips_a_real_trainer_run_and_logs_its_own_metric(tmp_path):
    model = TinyRegressor(optimizer="sgd", lr=0.05)
    cb = AdaptiveGradientClipping(rule=HalfOfLast(0.5), log_sparsity=False)
    logger = pl.loggers.CSVLogger(tmp_path)
    pl.Trainer(callbacks=[cb], **trainer_kwargs(tmp_path, logger=logger, max_steps=5)).fit(model, regression_loader())
    assert cb.last_metrics["clip/last_norm"] == pytest.approx(model.backward_norms[-1], rel=1e-5)
    assert cb.last_metrics["clip/threshold"] == pytest.approx(0.5 * model.backward_norms[-2], rel=1e-5)
    # a resume with another rule of the same class and settings continues; its state is in the checkpoint
    saved = cb.state_dict()
    assert saved["identity"] == {"mode": "half_of_last"} and saved["states"][0]["last"].item() > 0


def test_the_rule_from_a_lightningcli_yaml(tmp_path):
    from lightning_clip.cli import build_cli

    config = {
        "trainer": {
            "max_steps": 3,
            "limit_val_batches": 1,
            "enable_progress_bar": False,
            "default_root_dir": str(tmp_path),
            "log_every_n_steps": 1,
            "logger": {"class_path": "CSVLogger", "init_args": {"save_dir": str(tmp_path)}},
            "callbacks": [
                {
                    "class_path": "lightning_clip.AdaptiveGradientClipping",
                    "init_args": {"rule": {"class_path": "lightning_clip.FixedNorm", "init_args": {"clip_val": 0.25}}},
                }
            ],
        }
    }
    path = os.path.join(tmp_path, "rule.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(config, f)
    cli = build_cli(["fit", "--config", path])
    (cb,) = [c for c in cli.trainer.callbacks if isinstance(c, AdaptiveGradientClipping)]
    assert cb.rule == FixedNorm(0.25)
    assert cb.last_metrics["clip/threshold"] == 0.25


# a degenerate first step must not poison the average
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
    fit_regression(tmp_path, model, [cb])
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
    fit_regression(tmp_path, model, [cb], max_steps=12)
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
