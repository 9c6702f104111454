"""Bounded memory of the update-sparsity measurement: above ``max_entries`` it measures a fixed stratified random
sample, whose copy does not grow with the model, and whose estimate agrees with the exact measurement within the
stated standard error ``1 / (2 sqrt(max_entries))``."""

from __future__ import annotations

import torch
from torch import nn

from lightning_clip.sparsity import DEFAULT_MAX_ENTRIES, UpdateSparsityTracker


def _step(params, max_entries, relative_to="lr"):
    """One Adam-like step whose per-entry moves are known: exact and sampled trackers on identical copies."""
    results = []
    for limit in (None, max_entries):
        torch.manual_seed(0)
        ps = [nn.Parameter(p.detach().clone()) for p in params]
        opt = torch.optim.SGD(ps, lr=0.01)
        tracker = UpdateSparsityTracker(opt, relative_to=relative_to, max_entries=limit)
        for p in ps:
            gen = torch.Generator().manual_seed(p.numel())
            g = torch.randn(p.shape, generator=gen)
            p.grad = g * (torch.rand(p.shape, generator=gen) < 0.3)  # ~70 % of the entries do not move
        tracker.arm()
        held = tracker.held_bytes
        opt.step()
        results.append((float(tracker.pop()), held, tracker.index_bytes))
    return results


def test_sampled_sparsity_is_within_the_stated_error_and_its_copy_is_bounded():
    params = [torch.randn(300, 400), torch.randn(1000), torch.randn(50, 2000), torch.randn(7)]
    total = sum(p.numel() for p in params)  # 221007 entries, over the bound
    budget = 4096
    (exact, held_exact, idx_exact), (sampled, held, idx) = _step(params, budget)
    assert held_exact == 4 * total and idx_exact == 0
    assert held <= 4 * (budget + len(params)) and idx <= 8 * (budget + len(params))
    assert abs(sampled - exact) <= 4 * 0.5 / budget**0.5  # four standard errors
    for relative_to in ("rms",):
        (exact, _, _), (sampled, _, _) = _step(params, budget, relative_to)
        assert abs(sampled - exact) <= 4 * 0.5 / budget**0.5


def test_below_the_bound_every_entry_is_measured():
    params = [torch.randn(30, 40), torch.randn(100)]
    (exact, held_exact, _), (bounded, held, idx) = _step(params, DEFAULT_MAX_ENTRIES)
    assert bounded == exact and held == held_exact and idx == 0


def test_the_copy_does_not_grow_with_the_model():
    helds = [_step([torch.randn(n, 256)], 1024)[1][1] for n in (64, 512, 2048)]
    assert helds[0] == helds[1] == helds[2] == 4 * 1024
