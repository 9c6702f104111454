"""The pure-torch rules against hand math, float64 references and torch's own clipping."""

import math

import pytest
import torch
from torch import nn

from lightning_clip._scaling import scale_grads_
from lightning_clip.functional import ClipState, clip_grads_, rule_from_settings
from lightning_clip.norms import global_grad_norm


def _grads_with_norm(norm: float, shapes=((3, 4), (5,), (2, 2, 2)), seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    grads = [torch.randn(s, generator=gen) for s in shapes]
    total = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads))
    return [g * (norm / total) for g in grads]


def _norm64(grads) -> float:
    return math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads))


def test_alpha_half_constant_gradient_clips_to_half_norm_from_step_two():
    rule, state = rule_from_settings(alpha=0.5, beta=0.9), ClipState.zeros()
    n = 3.0
    for step in range(1, 31):
        grads = _grads_with_norm(n)
        stats = clip_grads_(grads, state, rule)
        expected = n if step == 1 else 0.5 * n  # step 1 seeds the average and is not clipped
        assert _norm64(grads) == pytest.approx(expected, rel=1e-6)
        assert float(stats.norm) == pytest.approx(n, rel=1e-6)
        # the average takes the raw norm, so it stays at n instead of collapsing
        assert float(state.ema) == pytest.approx(n, rel=1e-6)


def test_spike_after_fifty_steps_is_held_to_alpha_times_average():
    alpha, beta = 2.0, 0.95
    rule, state = rule_from_settings(alpha=alpha, beta=beta), ClipState.zeros()
    gen = torch.Generator().manual_seed(1)
    ref = None
    for step in range(50):
        n = 1.0 + 0.05 * float(torch.rand((), generator=gen) - 0.5)
        grads = _grads_with_norm(n, seed=step)
        clip_grads_(grads, state, rule)
        ref = n if ref is None else beta * ref + (1 - beta) * n  # float64 reference average
        assert _norm64(grads) == pytest.approx(n, rel=1e-6)  # near-constant norms are never clipped
    spike = _grads_with_norm(1000.0, seed=99)
    stats = clip_grads_(spike, state, rule)
    assert float(stats.threshold) == pytest.approx(alpha * ref, rel=1e-5)
    assert _norm64(spike) <= alpha * ref * (1 + 1e-5)
    assert _norm64(spike) == pytest.approx(alpha * ref, rel=1e-5)
    assert bool(stats.clipped)
    # the spike enters the average as its raw norm, but only after its own threshold was fixed
    assert float(state.ema) == pytest.approx(beta * ref + (1 - beta) * 1000.0, rel=1e-5)


def test_huge_alpha_leaves_gradients_bit_for_bit():
    rule, state = rule_from_settings(alpha=1e30, beta=0.5), ClipState.zeros()
    for step in range(10):
        grads = _grads_with_norm(10.0 ** (step % 4), seed=step)
        before = [g.clone() for g in grads]
        clip_grads_(grads, state, rule)
        assert all(torch.equal(a, b) for a, b in zip(before, grads))


def test_average_matches_float64_reference_and_threshold_never_sees_current_norm():
    alpha, beta = 1.5, 0.8
    rule, state = rule_from_settings(alpha=alpha, beta=beta), ClipState.zeros()
    gen = torch.Generator().manual_seed(2)
    m = None
    for step in range(40):
        n = float(torch.rand((), generator=gen)) * 10 + 0.1
        grads = _grads_with_norm(n, seed=step)
        stats = clip_grads_(grads, state, rule)
        expected_threshold = math.inf if m is None else alpha * m
        assert float(stats.threshold) == pytest.approx(expected_threshold, rel=1e-5)
        assert _norm64(grads) == pytest.approx(min(n, expected_threshold), rel=1e-5)
        m = n if m is None else beta * m + (1 - beta) * n
        assert float(state.ema) == pytest.approx(m, rel=1e-5)
    assert int(state.seen) == 40


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_step_is_zeroed_and_never_enters_the_average(bad):
    rule, state = rule_from_settings(alpha=2.0, beta=0.9), ClipState.zeros()
    for step in range(5):
        clip_grads_(_grads_with_norm(1.0, seed=step), state, rule)
    ema, seen = state.ema.clone(), state.seen.clone()
    grads = _grads_with_norm(1.0, seed=7)
    grads[1][2] = bad
    grads[0][0, 0] = float("inf")
    stats = clip_grads_(grads, state, rule)
    assert not bool(stats.finite)
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)  # no nan left (inf * 0 would be nan)
    assert torch.equal(state.ema, ema) and torch.equal(state.seen, seen)
    assert int(state.nonfinite) == 1 and int(state.steps) == 5
    stats = clip_grads_(_grads_with_norm(5.0, seed=8), state, rule)
    assert math.isfinite(float(stats.threshold))
    assert float(stats.threshold) == pytest.approx(2.0 * float(ema), rel=1e-6)


def test_keep_policy_leaves_nonfinite_gradients_untouched():
    rule, state = rule_from_settings(alpha=2.0), ClipState.zeros()
    clip_grads_(_grads_with_norm(1.0), state, rule)
    grads = _grads_with_norm(1.0, seed=3)
    grads[0][1, 1] = float("nan")
    before = [g.clone() for g in grads]
    clip_grads_(grads, state, rule, nonfinite="keep")
    for a, b in zip(before, grads):
        torch.testing.assert_close(a, b, equal_nan=True, rtol=0, atol=0)


def test_first_finite_step_seeds_the_average_when_step_one_is_not_finite():
    rule, state = rule_from_settings(alpha=0.5, beta=0.9), ClipState.zeros()
    grads = _grads_with_norm(1.0)
    grads[0][0, 0] = float("nan")
    clip_grads_(grads, state, rule)
    assert int(state.seen) == 0
    grads = _grads_with_norm(4.0)
    stats = clip_grads_(grads, state, rule)
    assert float(state.ema) == pytest.approx(4.0, rel=1e-6)
    assert _norm64(grads) == pytest.approx(4.0, rel=1e-6)  # the seeding step is not clipped by the rule
    assert float(stats.threshold) == math.inf


def test_max_norm_applies_from_the_first_step():
    rule, state = rule_from_settings(alpha=3.0, beta=0.9, max_norm=2.0), ClipState.zeros()
    grads = _grads_with_norm(50.0)
    stats = clip_grads_(grads, state, rule)
    assert float(stats.threshold) == 2.0
    assert _norm64(grads) == pytest.approx(2.0, rel=1e-6)
    assert float(state.ema) == pytest.approx(50.0, rel=1e-6)  # the raw norm seeds the average


def test_warmup_delays_the_adaptive_threshold():
    rule, state = rule_from_settings(alpha=0.5, beta=0.9, warmup_steps=3), ClipState.zeros()
    norms = []
    for step in range(6):
        grads = _grads_with_norm(2.0, seed=step)
        clip_grads_(grads, state, rule)
        norms.append(_norm64(grads))
    assert norms[:4] == pytest.approx([2.0] * 4, rel=1e-6)
    assert norms[4:] == pytest.approx([1.0] * 2, rel=1e-6)


@pytest.mark.parametrize("i", range(1, 51))
def test_norm_mode_reaches_the_bound_like_torch(i):
    grads = _grads_with_norm(7.0, seed=i)
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    torch.nn.utils.clip_grad_norm_(params, 1.0 / i, foreach=True)
    stats = clip_grads_(grads, ClipState.zeros(), rule_from_settings(mode="norm", clip_val=1.0 / i))
    assert _norm64(grads) == pytest.approx(1.0 / i, rel=1e-6)
    for p, g in zip(params, grads):
        torch.testing.assert_close(g, p.grad, rtol=1e-6, atol=1e-9)
    assert float(stats.coef) == pytest.approx(1.0 / i / 7.0, rel=1e-5)


def test_repeated_clipping_stays_finite_and_bf16_accumulates_in_float32():
    grads = [g.to(torch.bfloat16) for g in _grads_with_norm(300.0, shapes=((64, 64), (4096,)))]
    state, rule = ClipState.zeros(), rule_from_settings(alpha=0.5, beta=0.5)
    for _ in range(100):
        stats = clip_grads_(grads, state, rule)
        assert stats.norm.dtype == torch.float32 and bool(stats.finite)
        ref = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads))  # after clipping
    assert all(g.dtype == torch.bfloat16 and bool(g.isfinite().all()) for g in grads)
    assert float(global_grad_norm(grads)) == pytest.approx(ref, rel=1e-6)


def test_value_mode_matches_torch_clip_grad_value():
    grads = _grads_with_norm(10.0, seed=4)
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    torch.nn.utils.clip_grad_value_(params, 0.3)
    pre = _norm64(grads)
    stats = clip_grads_(grads, ClipState.zeros(), rule_from_settings(mode="value", clip_val=0.3))
    for p, g in zip(params, grads):
        assert torch.equal(g, p.grad)
    assert float(stats.coef) == pytest.approx(_norm64(grads) / pre, rel=1e-5)
    assert bool(stats.clipped)


def test_global_norm_equals_torch_total_norm():
    grads = _grads_with_norm(3.3, seed=5)
    torch.testing.assert_close(global_grad_norm(grads), torch.nn.utils.get_total_norm(grads))


@pytest.mark.parametrize("zero", [True, False])
def test_foreach_and_loop_kernels_agree(zero):
    a = _grads_with_norm(2.0, seed=6)
    a[0][0, 1] = float("inf")
    b = [g.clone() for g in a]
    coef = torch.tensor(0.0 if zero else 0.25)
    scale_grads_(a, coef, zero_nonfinite=zero, foreach=True)
    scale_grads_(b, coef, zero_nonfinite=zero, foreach=False)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, equal_nan=True, rtol=0, atol=0)


def test_state_round_trip_is_exact():
    state, rule = ClipState.zeros(), rule_from_settings(alpha=1.1, beta=0.37)
    for step in range(7):
        clip_grads_(_grads_with_norm(1.0 + step, seed=step), state, rule)
    again = ClipState.from_state_dict(state.state_dict())
    for k, v in state.tensors().items():
        assert torch.equal(v, getattr(again, k))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"alpha": 0.0}, "alpha: 0.0"),
        ({"alpha": -1.0}, "alpha: -1.0"),
        ({"beta": 1.0}, "beta: 1.0"),
        ({"beta": -0.1}, "beta: -0.1"),
        ({"max_norm": 0.0}, "max_norm: 0.0"),
        ({"max_norm": -2.0}, "max_norm: -2.0"),
        ({"mode": "median"}, "mode: 'median'"),
        ({"mode": "norm"}, "clip_val: None"),
        ({"mode": "value", "clip_val": -1.0}, "clip_val: -1.0"),
        ({"clip_val": 1.0}, "clip_val: 1.0"),
        ({"mode": "norm", "clip_val": 1.0, "max_norm": 2.0}, "max_norm: 2.0"),
        ({"warmup_steps": -1}, "warmup_steps: -1"),
    ],
)
def test_bad_settings_raise_naming_argument_and_value(kwargs, match):
    with pytest.raises(ValueError, match=match.replace("(", r"\(").replace(")", r"\)")):
        rule_from_settings(**kwargs)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("foreach", [True, False])
def test_zeroing_works_bitwise_in_every_float_dtype(dtype, foreach):
    grads = [
        torch.tensor([1.5, -2.0, float("nan")], dtype=dtype),
        torch.tensor([float("inf"), -float("inf")], dtype=dtype),
    ]
    scale_grads_(grads, torch.tensor(0.0), zero_nonfinite=True, foreach=foreach)
    assert all(torch.equal(g, torch.zeros_like(g)) and not torch.signbit(g).any() for g in grads)
    finite = [torch.tensor([1.5, -2.0, 3.0], dtype=dtype)]
    scale_grads_(finite, torch.tensor(0.5), zero_nonfinite=True, foreach=foreach)
    assert torch.equal(finite[0], torch.tensor([0.75, -1.0, 1.5], dtype=dtype))


def test_fused_kernel_matches_the_eager_one_bit_for_bit():
    from lightning_clip._scaling import fused_scale_grads_

    for coef_value in (0.37, 1.0, 0.0):
        a = _grads_with_norm(3.0, seed=11)
        a[1][0] = float("nan")
        a[2][0, 0, 1] = -float("inf")
        b = [g.clone() for g in a]
        coef = torch.tensor(coef_value)
        fused_scale_grads_(a, coef)
        scale_grads_(b, coef, zero_nonfinite=True, foreach=False)
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, equal_nan=True, rtol=0, atol=0)
    # through the rule: the same state and gradients as the eager path
    s1, s2, rule = ClipState.zeros(), ClipState.zeros(), rule_from_settings(alpha=0.7, beta=0.5)
    for step in range(4):
        g1 = _grads_with_norm(1.0 + step, seed=step)
        g2 = [g.clone() for g in g1]
        clip_grads_(g1, s1, rule, fused=True)
        clip_grads_(g2, s2, rule)
        assert all(torch.equal(x, y) for x, y in zip(g1, g2))
    assert torch.equal(s1.ema, s2.ema)


# ------------------------------------------------------------------------------------------- CPU fast path
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("nonfinite", ["zero", "keep"])
@pytest.mark.parametrize("kernel", [{"foreach": False}, {"foreach": True}])
def test_cpu_fast_path_is_bit_identical_to_the_sync_free_path(dtype, nonfinite, kernel):
    """On CPU, reading ``c_t`` back and skipping the passes that change nothing gives the same bits as the
    sync-free path of accelerators, over steps with no clipping, a spike, a ``nan`` step, an ``inf`` step, a zero
    step, and the grads, norms, coefficients and every state tensor agree."""
    from lightning_clip._scaling import cpu_fast_path, cpu_read

    torch.manual_seed(0)
    shapes = [(7, 5), (33,), (4, 4, 3), (1,)]
    rules = [rule_from_settings(alpha=1.5, beta=0.8, warmup_steps=1), rule_from_settings(mode="norm", clip_val=0.9)]
    for rule in rules:
        states = {True: ClipState.zeros(), False: ClipState.zeros()}
        for step in range(12):
            base = [torch.randn(s, dtype=torch.float64) * (20.0 if step in (5, 9) else 1.0) for s in shapes]
            if step == 3:
                base[1][2] = float("nan")
            if step == 7:
                base[0][1, 1] = float("inf")
            if step == 8:
                base = [torch.zeros_like(g) for g in base]
            base = [g.to(dtype) for g in base]
            out = {}
            for fast in (True, False):
                grads = [g.clone() for g in base]
                with cpu_fast_path(fast):
                    assert (cpu_read(torch.ones(()), grads) is not None) == fast
                    stats = clip_grads_(grads, states[fast], rule, nonfinite=nonfinite, **kernel)
                out[fast] = (grads, stats)
            for a, b in zip(out[True][0], out[False][0]):
                bits = {torch.float32: torch.int32, torch.float64: torch.int64, torch.bfloat16: torch.int16}[dtype]
                assert torch.equal(a.view(bits), b.view(bits)), step  # bit for bit: nan payloads and +0.0 too
            for field in ("norm", "threshold", "coef", "clipped", "finite"):
                x, y = getattr(out[True][1], field), getattr(out[False][1], field)
                assert torch.equal(x, y) or (x.isnan() & y.isnan()).all(), (step, field)
            for field, value in states[True].tensors().items():
                assert torch.equal(value, getattr(states[False], field)), (step, field)
        assert int(states[True].clipped) > 0 and int(states[True].nonfinite) == 2


@pytest.mark.parametrize("coef", [0.0, 0.37, 1.0])
def test_chunked_scale_and_zero_matches_the_two_passes(coef):
    """A tensor larger than a chunk is multiplied and masked chunk by chunk: the same bits as the two whole passes."""
    from lightning_clip._scaling import _CHUNK, _keep_mask

    g = torch.randn(3 * _CHUNK + 5)
    g[7], g[_CHUNK + 1], g[-1] = float("nan"), float("inf"), -0.5
    c = torch.tensor(coef)
    expected = g.clone().mul_(c)
    expected.view(torch.int32).bitwise_and_(_keep_mask(c, torch.float32, g.device))
    scale_grads_([g], c, zero_nonfinite=True, foreach=False)
    assert torch.equal(g.view(torch.int32), expected.view(torch.int32))


def test_fused_clipping_takes_any_number_of_configurations_in_one_process():
    """A sweep in one process (12 models of different shapes, each with ``fused=True``): every configuration clips
    like the eager kernel, bit for bit, and none crashes on torch.compile's recompile limit (8 per function)."""
    import warnings

    from lightning_clip import AdaptiveClippingOptimizer

    with warnings.catch_warnings():
        # neither a crash nor a silent fall-back to the eager kernel
        warnings.filterwarnings("error", message="lightning-clip", category=RuntimeWarning)
        for trial in range(12):
            shapes = [(trial + 2, 3)] + [(trial + 1,)] * (1 + trial % 3)
            runs = []
            for fused in (True, False):
                torch.manual_seed(trial)
                params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
                opt = AdaptiveClippingOptimizer(torch.optim.SGD(params, lr=0.1), alpha=0.5, beta=0.9, fused=fused)
                for step in range(3):
                    for i, p in enumerate(params):
                        p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(100 * step + i))
                    opt.step()
                runs.append(params)
            for a, b in zip(*runs):
                assert torch.equal(a, b)


def test_value_mode_accepts_empty_parameters_like_torch():
    """A zero-size parameter beside others: value clipping clamps the others as ``clip_grad_value_`` does."""
    grads = [torch.tensor([3.0, -0.1, -7.0]), torch.zeros(0, 4), torch.zeros(0, 2)]
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    torch.nn.utils.clip_grad_value_(params, 0.5)
    stats = clip_grads_(grads, ClipState.zeros(), rule_from_settings(mode="value", clip_val=0.5))
    for p, g in zip(params, grads):
        assert torch.equal(g, p.grad)
    assert float(stats.coef) == pytest.approx(math.sqrt(0.25 + 0.01 + 0.25) / math.sqrt(9 + 0.01 + 49), rel=1e-6)
    assert bool(stats.clipped)
    # only empty tensors: nothing to clamp, nothing clipped
    empty = [torch.zeros(0), torch.zeros(2, 0), torch.zeros(0, dtype=torch.complex64)]
    stats = clip_grads_(empty, ClipState.zeros(), rule_from_settings(mode="value", clip_val=0.5))
    assert not bool(stats.clipped) and float(stats.coef) == 1.0


@pytest.mark.parametrize("warmup", [0, 1, 4, 9])
def test_warmup_average_is_the_bias_corrected_closed_form(warmup):
    """During the warm-up ``m_k = sum_(i<=k) (1 - beta) beta^(k-i) n_i / (1 - beta^k)`` (float64, summed directly),
    then the plain moving average; the threshold applies from step ``warmup + 2`` on."""
    beta, alpha = 0.8, 1e6
    rule, state = rule_from_settings(alpha=alpha, beta=beta, warmup_steps=warmup), ClipState.zeros()
    norms = [5.0, 0.3, 2.0, 9.0, 1.0, 4.0, 0.7, 3.0, 6.0, 2.5, 1.5, 8.0, 0.9]
    m = None
    for k, n in enumerate(norms, start=1):
        stats = clip_grads_(_grads_with_norm(n, seed=k), state, rule)
        assert math.isinf(float(stats.threshold)) == (k <= warmup + 1)
        if k <= warmup + 1:
            m = sum((1 - beta) * beta ** (k - i) * norms[i - 1] for i in range(1, k + 1)) / (1 - beta**k)
        else:
            m = beta * m + (1 - beta) * n
        assert float(state.ema) == pytest.approx(m, rel=1e-6)


def test_the_docs_state_the_warmup_average_the_code_computes():
    """The README and the docstrings give the closed form above, and none says the warm-up steps weigh alike."""
    import inspect
    from pathlib import Path

    import lightning_clip.callback as callback
    import lightning_clip.rule as rule

    texts = {
        "README.md": (Path(__file__).parents[1] / "README.md").read_text(),
        "rule": inspect.getdoc(rule),
        "AdaptiveNorm": inspect.getdoc(rule.AdaptiveNorm),
        "AdaptiveGradientClipping": inspect.getdoc(callback.AdaptiveGradientClipping),
    }
    for where, text in texts.items():
        flat = " ".join(text.split())
        assert "weighs alike" not in flat and "counts alike" not in flat, where
        assert "(1 - beta) beta^(k-i) n_i / (1 - beta^k)" in flat, where


# -------------------------------------------------------------------------------------- complex parameters
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
