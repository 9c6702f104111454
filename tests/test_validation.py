"""Argument validation (``lightning_clip/_validation.py``), from the user's side: every public constructor names
the bad argument and its value, numpy numbers are accepted and stored as plain Python, fused and foreach exclude each
other."""

from __future__ import annotations

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
from lightning_clip.optim import weight_decay_param_groups
from lightning_clip.rule import rule_from_settings
from lightning_clip.sparsity import UpdateSparsityTracker


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
