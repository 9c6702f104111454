"""Tests of lightning_clip.optim: SmoothedSignSGD, SmoothedNormSGD and the grouped optimizers."""

import inspect
import io
import math
import warnings
from typing import Callable, Dict, List, Sequence

import pytest
import torch
from torch import nn

from lightning_clip.optim import (
    NORM_KINDS,
    GroupedSmoothedNormSGD,
    GroupedSmoothedSignSGD,
    SmoothedNormSGD,
    SmoothedSignSGD,
    weight_decay_param_groups,
)

F64 = torch.float64
SHAPES = [(3, 4), (5,), (2, 3, 2), (1,)]


# --------------------------------------------------------------------------- #
# independent float64 reference
# --------------------------------------------------------------------------- #
def _sign(x: torch.Tensor) -> torch.Tensor:
    return (x > 0).to(x.dtype) - (x < 0).to(x.dtype)


def reference_run(
    kind: str,
    groups: List[Dict],
    grad_fn: Callable[[int, List[torch.Tensor]], List[torch.Tensor]],
    steps: int,
) -> List[List[torch.Tensor]]:
    """Plain float64 implementation of Definitions 1 and 2 (+ options).

    ``groups``: dicts with ``params`` (float64 tensors) and every hyper-parameter
    spelled out.  Returns the parameters after every step.
    """
    weights = [[p.detach().clone().to(F64) for p in g["params"]] for g in groups]
    moms = [[torch.zeros_like(w) for w in ws] for ws in weights]
    counts = [[0 for _ in ws] for ws in weights]
    history = []
    for t in range(steps):
        flat = [w for ws in weights for w in ws]
        grads_flat = grad_fn(t, flat)
        grads, k = [], 0
        for ws in weights:
            grads.append(grads_flat[k : k + len(ws)])
            k += len(ws)
        total = math.sqrt(sum(float((g * g).sum()) for gs in grads for g in gs))
        for gi, group in enumerate(groups):
            for i, w in enumerate(weights[gi]):
                g = grads[gi][i].clone()
                if group["maximize"]:
                    g = -g
                if kind == "sign":
                    d = _sign(g)
                else:
                    if group["norm"] == "global":
                        n = total
                    elif group["norm"] == "tensor":
                        n = math.sqrt(float((g * g).sum()))
                    else:  # rms
                        n = math.sqrt(float((g * g).sum()) / g.numel())
                    d = g / max(n, group["eps"])
                w = w * (1.0 - group["lr"] * group["weight_decay"])
                moms[gi][i] = group["beta"] * moms[gi][i] + (1.0 - group["beta"]) * d
                counts[gi][i] += 1
                m_hat = moms[gi][i]
                if group["bias_correction"]:
                    m_hat = m_hat / (1.0 - group["beta"] ** counts[gi][i])
                weights[gi][i] = w - group["lr"] * m_hat
        history.append([w.clone() for ws in weights for w in ws])
    return history


def make_grad_fn(n_params_shapes: Sequence[Sequence[int]], seed: int = 0, steps: int = 60):
    gen = torch.Generator().manual_seed(seed)
    targets = [torch.randn(*s, generator=gen, dtype=F64) for s in n_params_shapes]
    noise = [[torch.randn(*s, generator=gen, dtype=F64) for s in n_params_shapes] for _ in range(steps)]

    def grad_fn(t: int, weights: List[torch.Tensor]) -> List[torch.Tensor]:
        return [(w - tg) + 0.5 * nz for w, tg, nz in zip(weights, targets, noise[t])]

    return grad_fn


def run_optimizer(
    opt_cls, group_specs: List[Dict], defaults: Dict, grad_fn, steps: int, init: List[torch.Tensor]
) -> List[List[torch.Tensor]]:
    params = [nn.Parameter(x.clone()) for x in init]
    groups, k = [], 0
    for spec in group_specs:
        n = spec["n"]
        g = {key: v for key, v in spec.items() if key != "n"}
        g["params"] = params[k : k + n]
        groups.append(g)
        k += n
    opt = opt_cls(groups, **defaults)
    history = []
    for t in range(steps):
        grads = grad_fn(t, [p.detach() for p in params])
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        history.append([p.detach().clone() for p in params])
    return history


def full_groups(kind: str, group_specs: List[Dict], defaults: Dict, init: List[torch.Tensor]) -> List[Dict]:
    base = dict(lr=1e-3, beta=0.9, weight_decay=0.0, bias_correction=False, maximize=False)
    if kind == "norm":
        base.update(norm="global", eps=1e-12)
    base.update({k: v for k, v in defaults.items() if k != "foreach"})
    out, k = [], 0
    for spec in group_specs:
        g = dict(base)
        g.update({key: v for key, v in spec.items() if key != "n"})
        g["params"] = init[k : k + spec["n"]]
        out.append(g)
        k += spec["n"]
    return out


def initial(seed: int = 1) -> List[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=gen, dtype=F64) for s in SHAPES]


def assert_histories_close(a, b, rtol=1e-12, atol=1e-13):
    assert len(a) == len(b)
    for t, (xa, xb) in enumerate(zip(a, b)):
        for pa, pb in zip(xa, xb):
            torch.testing.assert_close(pa, pb, rtol=rtol, atol=atol, msg=lambda m: f"step {t}: {m}")


SIGN_CASES = [
    ("definition", [{"n": 4}], dict(lr=0.05, beta=0.9)),
    ("beta0", [{"n": 4}], dict(lr=0.05, beta=0.0)),
    ("weight_decay", [{"n": 4}], dict(lr=0.05, beta=0.8, weight_decay=0.3)),
    ("bias_correction", [{"n": 4}], dict(lr=0.05, beta=0.95, bias_correction=True)),
    ("maximize", [{"n": 4}], dict(lr=0.02, beta=0.9, maximize=True)),
    (
        "groups",
        [{"n": 2, "lr": 0.1, "beta": 0.5}, {"n": 2, "weight_decay": 0.1, "bias_correction": True}],
        dict(lr=0.03, beta=0.9),
    ),
]

NORM_CASES = SIGN_CASES + [
    ("tensor", [{"n": 4}], dict(lr=0.05, beta=0.9, norm="tensor")),
    ("rms", [{"n": 4}], dict(lr=0.05, beta=0.9, norm="rms", weight_decay=0.1)),
    (
        "mixed_norm_groups",
        [{"n": 1, "norm": "tensor", "lr": 0.2}, {"n": 2, "norm": "global"}, {"n": 1, "norm": "rms", "beta": 0.3}],
        dict(lr=0.05, beta=0.9, bias_correction=True),
    ),
]


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("name,group_specs,defaults", SIGN_CASES, ids=[c[0] for c in SIGN_CASES])
def test_smoothed_sign_matches_reference(name, group_specs, defaults, foreach):
    steps = 50
    init = initial()
    grad_fn = make_grad_fn(SHAPES, steps=steps)
    ref = reference_run("sign", full_groups("sign", group_specs, defaults, init), grad_fn, steps)
    got = run_optimizer(SmoothedSignSGD, group_specs, dict(defaults, foreach=foreach), grad_fn, steps, init)
    assert_histories_close(got, ref)
    # the run moved the parameters
    assert not torch.allclose(got[-1][0], init[0])


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("name,group_specs,defaults", NORM_CASES, ids=[c[0] for c in NORM_CASES])
def test_smoothed_norm_matches_reference(name, group_specs, defaults, foreach):
    steps = 50
    init = initial()
    grad_fn = make_grad_fn(SHAPES, steps=steps)
    ref = reference_run("norm", full_groups("norm", group_specs, defaults, init), grad_fn, steps)
    got = run_optimizer(SmoothedNormSGD, group_specs, dict(defaults, foreach=foreach), grad_fn, steps, init)
    assert_histories_close(got, ref)
    assert not torch.allclose(got[-1][0], init[0])


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize(
    "kind,defaults",
    [
        ("sign", dict(lr=0.05, beta=0.8, weight_decay=0.3, bias_correction=True, maximize=True)),
        ("norm", dict(lr=0.05, beta=0.8, weight_decay=0.3, bias_correction=True, maximize=True)),
        ("norm", dict(lr=0.05, beta=0.7, norm="tensor")),
    ],
)
def test_large_and_strided_parameters_match_reference(kind, defaults, foreach):
    """A tensor larger than the for-loop kernels' chunk (cut into chunks, the last one short), a transposed
    (non-contiguous) one and a small one, against the float64 reference."""
    from lightning_clip.optim._base import CHUNK as _CHUNK

    steps = 4
    shapes = [(_CHUNK // 500 + 7, 500), (6, 9), (3,)]
    assert shapes[0][0] * shapes[0][1] > _CHUNK and (shapes[0][0] * shapes[0][1]) % _CHUNK
    gen = torch.Generator().manual_seed(3)
    init = [torch.randn(*s, generator=gen, dtype=F64) for s in shapes]
    init[1] = init[1].t()  # (9, 6) with strides (1, 9)
    assert not init[1].is_contiguous()
    grad_fn = make_grad_fn([tuple(x.shape) for x in init], steps=steps)
    specs = [{"n": len(init)}]
    ref = reference_run(kind, full_groups(kind, specs, defaults, init), grad_fn, steps)
    opt_cls = SmoothedSignSGD if kind == "sign" else SmoothedNormSGD
    got = run_optimizer(opt_cls, specs, dict(defaults, foreach=foreach), grad_fn, steps, init)
    assert_histories_close(got, ref)
    assert not torch.allclose(got[-1][0], init[0])


def test_loop_kernel_scratch_is_shared_by_shapes_and_dtypes():
    """One call of the for-loop SignSGD kernel over repeated shapes, two dtypes, an empty tensor and a tensor
    larger than one chunk: ``sign(g)`` of each goes through the shared scratch space, and every tensor ends where
    the float64 formula puts it (a view handed to the wrong tensor would corrupt the next one)."""
    from lightning_clip.optim._base import CHUNK as _CHUNK
    from lightning_clip.optim.sign_sgd import _single_tensor_smoothed_sign

    gen = torch.Generator().manual_seed(11)
    specs = [((4, 5), torch.float32), ((4, 5), torch.float32), ((4, 5), F64), ((20,), torch.float32),
             ((0,), torch.float32), ((_CHUNK + 3,), torch.float32), ((5, 4), torch.float32)]
    params = [torch.randn(s, generator=gen, dtype=d) for s, d in specs]
    grads = [torch.randn(s, generator=gen, dtype=d) for s, d in specs]
    grads[3][::2] = 0.0  # sign(0) = 0
    bufs = [torch.randn(s, generator=gen, dtype=d) for s, d in specs]
    lr, beta = 0.1, 0.75
    want_bufs = [beta * b.double() + (1 - beta) * torch.sign(g.double()) for g, b in zip(grads, bufs)]
    want_params = [p.double() - lr * b for p, b in zip(params, want_bufs)]
    _single_tensor_smoothed_sign(
        params, grads, bufs, [0] * len(params), lr=lr, beta=beta, weight_decay=0.0, bias_correction=False,
        maximize=False,
    )
    for got, want in zip(bufs + params, want_bufs + want_params):
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- #
# kernel parity
# --------------------------------------------------------------------------- #
def _parity_run(opt_cls, foreach: bool, kwargs: Dict, steps: int = 30) -> List[torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    params = [nn.Parameter(torch.randn(*s, generator=gen, dtype=F64)) for s in [(8, 3), (5,), (4, 4), (2,)]]
    late = params[-1]  # starts receiving gradients later: different step counts
    opt = opt_cls(params, foreach=foreach, **kwargs)
    for t in range(steps):
        for p in params:
            p.grad = None if (p is late and t < 5) else torch.randn(p.shape, generator=gen, dtype=F64)
        opt.step()
    return [p.detach().clone() for p in params] + [opt.state[p]["momentum_buffer"].clone() for p in params]


@pytest.mark.parametrize(
    "opt_cls,kwargs",
    [
        (SmoothedSignSGD, dict(lr=0.01, beta=0.9)),
        (SmoothedSignSGD, dict(lr=0.01, beta=0.7, weight_decay=0.2, bias_correction=True, maximize=True)),
        (SmoothedNormSGD, dict(lr=0.01, beta=0.9)),
        (SmoothedNormSGD, dict(lr=0.01, beta=0.9, norm="tensor", bias_correction=True)),
        (SmoothedNormSGD, dict(lr=0.01, beta=0.6, norm="rms", weight_decay=0.1, maximize=True)),
        (SmoothedNormSGD, dict(lr=0.01, beta=0.8, norm="global", bias_correction=True, maximize=True)),
    ],
)
def test_foreach_matches_single_tensor(opt_cls, kwargs):
    a = _parity_run(opt_cls, False, kwargs)
    b = _parity_run(opt_cls, True, kwargs)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-13, atol=1e-14)


def test_default_kernel_on_cpu_is_single_tensor(monkeypatch):
    import lightning_clip.optim.sign_sgd as sign_sgd

    calls = []
    monkeypatch.setattr(sign_sgd, "_single_tensor_smoothed_sign", lambda *a, **k: calls.append("single"))
    monkeypatch.setattr(sign_sgd, "_multi_tensor_smoothed_sign", lambda *a, **k: calls.append("multi"))
    p = nn.Parameter(torch.zeros(3))
    p.grad = torch.ones(3)
    SmoothedSignSGD([p]).step()
    SmoothedSignSGD([p], foreach=True).step()
    assert calls == ["single", "multi"]


# --------------------------------------------------------------------------- #
# Adam with aggressive clipping
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("betas,eps", [((0.9, 0.999), 0.0), ((0.8, 0.99), 1e-30), ((0.0, 0.9), 0.0)])
def test_adam_on_value_clipped_grads_is_smoothed_sign(betas, eps):
    """Adam(beta1, beta2, eps ~ 0) on grads value-clipped at alpha < min |g| takes, at every
    step, exactly SmoothedSignSGD(beta=beta1, bias_correction=True)'s step."""
    steps, alpha, lr = 200, 1e-3, 1e-2
    gen = torch.Generator().manual_seed(3)
    shapes = [(6, 5), (7,)]
    init = [torch.randn(*s, generator=gen, dtype=F64) for s in shapes]
    pa = [nn.Parameter(x.clone()) for x in init]
    ps = [nn.Parameter(x.clone()) for x in init]
    adam = torch.optim.Adam(pa, lr=lr, betas=betas, eps=eps)
    ssgd = SmoothedSignSGD(ps, lr=lr, beta=betas[0], bias_correction=True)
    worst = 0.0
    for _ in range(steps):
        # |g| >= 0.1 > alpha for every entry, random signs
        grads = [
            (0.1 + torch.rand(*s, generator=gen, dtype=F64)) * _sign(torch.randn(*s, generator=gen, dtype=F64))
            for s in shapes
        ]
        before_a = [p.detach().clone() for p in pa]
        before_s = [p.detach().clone() for p in ps]
        for p, g in zip(pa, grads):
            p.grad = g.clamp(-alpha, alpha)  # value clipping
        for p, g in zip(ps, grads):
            p.grad = g.clone()
        adam.step()
        ssgd.step()
        for a0, a1, s0, s1 in zip(before_a, pa, before_s, ps):
            da, ds = a1.detach() - a0, s1.detach() - s0
            rel = float((da - ds).abs().max() / ds.abs().max())
            worst = max(worst, rel)
    assert worst < 1e-12, worst


def _cosine(a: List[torch.Tensor], b: List[torch.Tensor]) -> float:
    va, vb = torch.cat([x.flatten() for x in a]), torch.cat([x.flatten() for x in b])
    return float(va @ vb / (va.norm() * vb.norm()))


def _adam_vs_snsgd_cosines(grad_source, shapes, steps: int = 200, betas=(0.9, 0.999)) -> List[float]:
    gen = torch.Generator().manual_seed(11)
    init = [torch.randn(*s, generator=gen, dtype=F64) for s in shapes]
    pa = [nn.Parameter(x.clone()) for x in init]
    pn = [nn.Parameter(x.clone()) for x in init]
    adam = torch.optim.Adam(pa, lr=1e-3, betas=betas, eps=1e-16)
    snsgd = SmoothedNormSGD(pn, lr=1e-3, beta=betas[0], norm="global", bias_correction=True)
    cos = []
    for t in range(steps):
        grads = grad_source(t, gen, [p.detach() for p in pn])
        before_a = [p.detach().clone() for p in pa]
        before_n = [p.detach().clone() for p in pn]
        for p, g in zip(pa, grads):
            p.grad = g.clone()
        torch.nn.utils.clip_grad_norm_(pa, max_norm=1e-4)  # aggressive norm clipping
        for p, g in zip(pn, grads):
            p.grad = g.clone()
        adam.step()
        snsgd.step()
        cos.append(
            _cosine([p.detach() - b for p, b in zip(pa, before_a)], [p.detach() - b for p, b in zip(pn, before_n)])
        )
    return cos


def test_adam_on_norm_clipped_grads_vs_smoothed_norm_isotropic():
    """Adam on norm-clipped gradients is only *approximately* Smoothed NormSGD.

    Per-step cosine similarity of the updates of Adam(0.9, 0.999) on gradients
    norm-clipped to 1e-4 and of SmoothedNormSGD(beta=0.9, global norm), fed the
    same i.i.d. isotropic Gaussian gradients (2 tensors, 1000 entries, 200
    steps).  Adam's first step is lr * sign(g) (v_hat = g^2), so step 1 has the
    cosine of sign(g) with g, about sqrt(2/pi) ~ 0.80; afterwards v_hat
    averages over many steps, the denominator becomes nearly constant across
    coordinates and the updates align.

    Measured (torch 2.13, float64, seed 11): step 1 = 0.793, min over steps
    11-200 = 0.976, mean over steps 1-20 = 0.958, over steps 101-200 = 0.998,
    over all 200 = 0.993.
    Asserted: step 1 within 0.03 of sqrt(2/pi), min over steps 11-200 > 0.95,
    mean > 0.98.
    """
    shapes = [(20, 25), (500,)]
    cos = _adam_vs_snsgd_cosines(lambda t, gen, w: [torch.randn(*s, generator=gen, dtype=F64) for s in shapes], shapes)
    assert cos[0] == pytest.approx(math.sqrt(2 / math.pi), abs=0.03)
    assert min(cos[10:]) > 0.95, min(cos[10:])
    assert sum(cos) / len(cos) > 0.98


def test_adam_on_norm_clipped_grads_vs_smoothed_norm_anisotropic():
    """Not isotropic: per-coordinate gradient scales spread over two decades
    (logspace(-1, 1), 1000 entries).  Adam's denominator rescales coordinates
    (towards sign-like steps) and the updates stay apart: the "≈ constant x
    M_snsgd" claim does not hold here.

    Measured (seed 11): step 1 = 0.517, min over steps 11-200 = 0.634,
    mean over steps 101-200 = 0.657, over all 200 = 0.652.
    Asserted: 0.5 < mean < 0.8 and every step > 0.45 (positive but far from 1).
    """
    shapes = [(1000,)]
    scale = torch.logspace(-1, 1, 1000, dtype=F64)
    cos = _adam_vs_snsgd_cosines(lambda t, gen, w: [scale * torch.randn(1000, generator=gen, dtype=F64)], shapes)
    mean = sum(cos) / len(cos)
    assert 0.5 < mean < 0.8, mean
    assert min(cos) > 0.45, min(cos)


def test_adam_on_norm_clipped_grads_vs_smoothed_norm_regression():
    """Least-squares regression y = X w* + noise (d = 20, n = 256), minibatches of
    32, 200 steps, same protocol as above.

    Measured (seed 11): step 1 = 0.865, min = 0.849, mean over steps 1-20 =
    0.908, over steps 101-200 = 0.952, over all 200 = 0.946.
    Asserted: min > 0.8, mean > 0.92.
    """
    gen0 = torch.Generator().manual_seed(5)
    d, n = 20, 256
    x = torch.randn(n, d, generator=gen0, dtype=F64)
    w_star = torch.randn(d, generator=gen0, dtype=F64)
    y = x @ w_star + 0.1 * torch.randn(n, generator=gen0, dtype=F64)

    def grads(t, gen, w):
        idx = torch.randint(0, n, (32,), generator=gen)
        xb, yb = x[idx], y[idx]
        return [2.0 * xb.T @ (xb @ w[0] - yb) / 32]

    cos = _adam_vs_snsgd_cosines(grads, [(d,)])
    assert min(cos) > 0.8, min(cos)
    assert sum(cos) / len(cos) > 0.92, sum(cos) / len(cos)


# --------------------------------------------------------------------------- #
# hand-computed cases
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("foreach", [False, True])
def test_hand_computed_sign(foreach):
    p = nn.Parameter(torch.tensor([2.0], dtype=F64))
    opt = SmoothedSignSGD([p], lr=0.1, beta=0.9, foreach=foreach)
    p.grad = torch.tensor([3.0], dtype=F64)
    opt.step()
    assert p.item() == pytest.approx(1.99, abs=1e-15)  # 2 - 0.1 * (0.1 * 1)
    p.grad = torch.tensor([-3.0], dtype=F64)
    opt.step()  # M = 0.9 * 0.1 - 0.1 = -0.01
    assert p.item() == pytest.approx(1.991, abs=1e-15)
    assert opt.state[p]["momentum_buffer"].item() == pytest.approx(-0.01, abs=1e-15)


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize(
    "kwargs,expected",
    [
        (dict(bias_correction=True), 1.9),  # M_hat = sign = 1
        (dict(weight_decay=0.5), 2.0 * (1 - 0.05) - 0.01),
        (dict(maximize=True), 2.01),
        (dict(beta=0.0), 1.9),
    ],
)
def test_hand_computed_sign_options(foreach, kwargs, expected):
    p = nn.Parameter(torch.tensor([2.0], dtype=F64))
    opt = SmoothedSignSGD([p], **dict(dict(lr=0.1, beta=0.9, foreach=foreach), **kwargs))
    p.grad = torch.tensor([3.0], dtype=F64)
    opt.step()
    assert p.item() == pytest.approx(expected, abs=1e-15)


@pytest.mark.parametrize("foreach", [False, True])
def test_hand_computed_norm(foreach):
    a = nn.Parameter(torch.tensor([1.0, 1.0], dtype=F64))
    b = nn.Parameter(torch.tensor([1.0], dtype=F64))
    # global: G = (3, 0 | 4), ||G|| = 5
    opt = SmoothedNormSGD([a, b], lr=0.1, beta=0.9, foreach=foreach)
    a.grad = torch.tensor([3.0, 0.0], dtype=F64)
    b.grad = torch.tensor([4.0], dtype=F64)
    opt.step()
    torch.testing.assert_close(a.detach(), torch.tensor([1 - 0.1 * 0.1 * 0.6, 1.0], dtype=F64))
    torch.testing.assert_close(b.detach(), torch.tensor([1 - 0.1 * 0.1 * 0.8], dtype=F64))
    # per tensor: each gradient normalised on its own
    a2 = nn.Parameter(torch.tensor([1.0, 1.0], dtype=F64))
    b2 = nn.Parameter(torch.tensor([1.0], dtype=F64))
    opt = SmoothedNormSGD([a2, b2], lr=0.1, beta=0.9, norm="tensor", foreach=foreach)
    a2.grad = torch.tensor([3.0, 0.0], dtype=F64)
    b2.grad = torch.tensor([4.0], dtype=F64)
    opt.step()
    torch.testing.assert_close(a2.detach(), torch.tensor([0.99, 1.0], dtype=F64))
    torch.testing.assert_close(b2.detach(), torch.tensor([0.99], dtype=F64))
    # rms: (3, 4) has RMS 5 / sqrt(2): direction (3, 4) * sqrt(2) / 5
    c = nn.Parameter(torch.tensor([0.0, 0.0], dtype=F64))
    opt = SmoothedNormSGD([c], lr=1.0, beta=0.0, norm="rms", foreach=foreach)
    c.grad = torch.tensor([3.0, 4.0], dtype=F64)
    opt.step()
    torch.testing.assert_close(c.detach(), -torch.tensor([0.6, 0.8], dtype=F64) * math.sqrt(2))


def test_global_norm_spans_all_groups_like_clip_grad_norm():
    gen = torch.Generator().manual_seed(0)
    ps = [nn.Parameter(torch.zeros(4, 3, dtype=F64)), nn.Parameter(torch.zeros(7, dtype=F64))]
    grads = [torch.randn(p.shape, generator=gen, dtype=F64) for p in ps]
    for p, g in zip(ps, grads):
        p.grad = g.clone()
    total = torch.nn.utils.clip_grad_norm_(ps, max_norm=float("inf"))
    opt = SmoothedNormSGD([{"params": [ps[0]]}, {"params": [ps[1]], "lr": 2.0}], lr=1.0, beta=0.0)
    opt.step()
    torch.testing.assert_close(ps[0].detach(), -grads[0] / total)
    torch.testing.assert_close(ps[1].detach(), -2.0 * grads[1] / total)


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("opt_cls", [SmoothedSignSGD, SmoothedNormSGD])
def test_positive_gradient_rescaling_changes_nothing(opt_cls, foreach):
    """sign(cG) = sign(G) and cG/||cG|| = G/||G||: norm clipping in front is a no-op."""
    gen = torch.Generator().manual_seed(2)
    init = [torch.randn(5, 4, generator=gen, dtype=F64), torch.randn(3, generator=gen, dtype=F64)]
    grads = [[torch.randn(x.shape, generator=gen, dtype=F64) for x in init] for _ in range(10)]
    out = []
    for scale in (1.0, 1e-3):
        ps = [nn.Parameter(x.clone()) for x in init]
        opt = opt_cls(ps, lr=0.1, foreach=foreach)
        for gs in grads:
            for p, g in zip(ps, gs):
                p.grad = g * scale
            opt.step()
        out.append([p.detach() for p in ps])
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)


# --------------------------------------------------------------------------- #
# edge cases and torch.optim conventions
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("norm", ["global", "tensor", "rms"])
def test_zero_gradient_norm_gives_zero_direction(norm, foreach):
    p = nn.Parameter(torch.ones(4))
    q = nn.Parameter(torch.ones(2))
    opt = SmoothedNormSGD([p, q], lr=0.1, beta=0.5, norm=norm, foreach=foreach)
    p.grad, q.grad = torch.full((4,), 2.0), torch.zeros(2)
    opt.step()
    buf = opt.state[p]["momentum_buffer"].clone()
    assert torch.equal(opt.state[q]["momentum_buffer"], torch.zeros(2))
    assert torch.equal(q.detach(), torch.ones(2))
    before = p.detach().clone()
    p.grad, q.grad = torch.zeros(4), torch.zeros(2)  # ||G|| = 0 everywhere
    opt.step()
    assert torch.isfinite(p).all() and torch.isfinite(q).all()
    torch.testing.assert_close(opt.state[p]["momentum_buffer"], 0.5 * buf)  # momentum decays
    torch.testing.assert_close(p.detach(), before - 0.1 * 0.5 * buf)


def test_zero_gradient_sign_only_decays():
    p = nn.Parameter(torch.zeros(3))
    opt = SmoothedSignSGD([p], lr=1.0, beta=0.5)
    p.grad = torch.tensor([1.0, -1.0, 0.0])
    opt.step()
    torch.testing.assert_close(opt.state[p]["momentum_buffer"], torch.tensor([0.5, -0.5, 0.0]))
    p.grad = torch.zeros(3)
    opt.step()
    torch.testing.assert_close(opt.state[p]["momentum_buffer"], torch.tensor([0.25, -0.25, 0.0]))


def test_tiny_norm_below_eps_is_floored():
    p = nn.Parameter(torch.zeros(2, dtype=F64))
    opt = SmoothedNormSGD([p], lr=1.0, beta=0.0, eps=1e-6)
    p.grad = torch.tensor([3e-9, 4e-9], dtype=F64)
    opt.step()
    torch.testing.assert_close(p.detach(), -torch.tensor([3e-3, 4e-3], dtype=F64))


@pytest.mark.parametrize("opt_cls", [SmoothedSignSGD, SmoothedNormSGD])
def test_sparse_gradients_raise(opt_cls):
    emb = nn.Embedding(10, 3, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    opt = opt_cls(emb.parameters())
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


@pytest.mark.parametrize(
    "opt_cls,kwargs,match",
    [
        (SmoothedSignSGD, dict(lr=-1.0), r"^Invalid lr: -1\.0; expected a finite number >= 0$"),
        (SmoothedSignSGD, dict(beta=1.0), r"^Invalid beta: 1\.0; expected a finite number in \[0, 1\)$"),
        (SmoothedSignSGD, dict(beta=-0.1), r"^Invalid beta: -0\.1;"),
        (SmoothedSignSGD, dict(weight_decay=-0.5), r"^Invalid weight_decay: -0\.5;"),
        (SmoothedNormSGD, dict(lr=-1e-3), r"^Invalid lr: -0\.001;"),
        (SmoothedNormSGD, dict(beta=1.5), r"^Invalid beta: 1\.5;"),
        (SmoothedNormSGD, dict(eps=0.0), r"^Invalid eps: 0\.0; expected a finite number > 0$"),
        (SmoothedNormSGD, dict(eps=-1e-8), r"^Invalid eps: -1e-08;"),
        (SmoothedNormSGD, dict(weight_decay=-1.0), r"^Invalid weight_decay: -1\.0;"),
        (
            SmoothedNormSGD,
            dict(norm="spectral"),
            r"^Invalid norm: 'spectral'; expected one of \('global', 'tensor', 'rms'\)$",
        ),
    ],
)
def test_invalid_arguments(opt_cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        opt_cls([nn.Parameter(torch.zeros(2))], **kwargs)


@pytest.mark.parametrize("opt_cls", [SmoothedSignSGD, SmoothedNormSGD])
def test_closure(opt_cls):
    p = nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = opt_cls([p], lr=0.1)

    def closure():
        opt.zero_grad()
        loss = (p**2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss.item() == pytest.approx(5.0)
    assert p.grad is not None and p[0].item() < 1.0 and p[1].item() > -2.0


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize(
    "opt_cls,kwargs",
    [
        (SmoothedSignSGD, dict(lr=0.01, beta=0.9, bias_correction=True, weight_decay=0.1)),
        (SmoothedNormSGD, dict(lr=0.01, beta=0.9, bias_correction=True, norm="global")),
        (SmoothedNormSGD, dict(lr=0.01, beta=0.8, norm="rms")),
    ],
)
def test_state_dict_round_trip(opt_cls, kwargs, foreach):
    gen = torch.Generator().manual_seed(4)
    init = [torch.randn(6, 3, generator=gen), torch.randn(4, generator=gen)]
    grads = [[torch.randn(x.shape, generator=gen) for x in init] for _ in range(20)]

    def feed(ps, gs):
        for p, g in zip(ps, gs):
            p.grad = g.clone()

    ref = [nn.Parameter(x.clone()) for x in init]
    opt_ref = opt_cls(ref, foreach=foreach, **kwargs)
    for gs in grads:
        feed(ref, gs)
        opt_ref.step()

    first = [nn.Parameter(x.clone()) for x in init]
    opt1 = opt_cls(first, foreach=foreach, **kwargs)
    for gs in grads[:8]:
        feed(first, gs)
        opt1.step()
    blob = io.BytesIO()
    torch.save({"params": [p.detach() for p in first], "opt": opt1.state_dict()}, blob)
    blob.seek(0)
    saved = torch.load(blob, weights_only=True)
    second = [nn.Parameter(x.clone()) for x in saved["params"]]
    opt2 = opt_cls(second, foreach=foreach, **kwargs)
    opt2.load_state_dict(saved["opt"])
    for gs in grads[8:]:
        feed(second, gs)
        opt2.step()
    for a, b in zip(second, ref):
        assert torch.equal(a, b)
    for a, b in zip(second, ref):
        assert torch.equal(opt2.state[a]["momentum_buffer"], opt_ref.state[b]["momentum_buffer"])
        if kwargs.get("bias_correction"):
            assert opt2.state[a]["step"] == opt_ref.state[b]["step"] == 20


def test_param_groups_own_lr_and_beta():
    a, b = nn.Parameter(torch.zeros(1, dtype=F64)), nn.Parameter(torch.zeros(1, dtype=F64))
    opt = SmoothedSignSGD([{"params": [a]}, {"params": [b], "lr": 1.0, "beta": 0.0}], lr=0.1, beta=0.5)
    for _ in range(2):
        a.grad, b.grad = torch.ones(1, dtype=F64), torch.ones(1, dtype=F64)
        opt.step()
    # a: M = 0.5, 0.75 -> a = -0.1 * 1.25; b: M = 1, 1 -> b = -2
    assert a.item() == pytest.approx(-0.125, abs=1e-15)
    assert b.item() == pytest.approx(-2.0, abs=1e-15)


@pytest.mark.parametrize("opt_cls", [SmoothedSignSGD, SmoothedNormSGD])
def test_lr_scheduler_changes_step_size(opt_cls):
    p = nn.Parameter(torch.zeros(1, dtype=F64))
    opt = opt_cls([p], lr=1.0, beta=0.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    deltas = []
    for _ in range(6):
        before = p.item()
        p.grad = torch.tensor([-2.0], dtype=F64)  # direction -1 -> p increases by lr
        opt.step()
        sched.step()
        deltas.append(p.item() - before)
    assert deltas == pytest.approx([1.0, 1.0, 0.5, 0.5, 0.25, 0.25], abs=1e-15)


@pytest.mark.parametrize("bias_correction", [False, True])
@pytest.mark.parametrize("opt_cls", [SmoothedSignSGD, SmoothedNormSGD])
def test_one_state_buffer_per_parameter(opt_cls, bias_correction):
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4))
    opt = opt_cls(model.parameters(), bias_correction=bias_correction)
    model(torch.randn(5, 8)).sum().backward()
    opt.step()
    opt.step()
    params = list(model.parameters())
    assert len(opt.state) == len(params)
    state_bytes, param_bytes = 0, 0
    for p in params:
        st = opt.state[p]
        tensors = {k: v for k, v in st.items() if torch.is_tensor(v) and k != "step"}  # as Adam's, below
        assert list(tensors) == ["momentum_buffer"]
        assert tensors["momentum_buffer"].shape == p.shape and tensors["momentum_buffer"].dtype == p.dtype
        assert set(st) == ({"momentum_buffer", "step"} if bias_correction else {"momentum_buffer"})
        if bias_correction:  # the step count as torch.optim keeps it: a 0-d float32 tensor on the CPU
            step = st["step"]
            assert torch.is_tensor(step) and step.shape == () and step.dtype == torch.float32 and step.is_cpu
            assert step.item() == 2.0
        state_bytes += sum(v.numel() * v.element_size() for v in tensors.values())
        param_bytes += p.numel() * p.element_size()
    assert state_bytes == param_bytes  # half of Adam's state
    adam = torch.optim.Adam(model.parameters())
    adam.step()
    adam_bytes = sum(v.numel() * v.element_size() for st in adam.state.values() for k, v in st.items() if k != "step")
    assert adam_bytes == 2 * param_bytes


def test_bfloat16_parameters():
    p = nn.Parameter(torch.ones(64, dtype=torch.bfloat16))
    opt = SmoothedNormSGD([p], lr=0.5, beta=0.0, norm="tensor")
    p.grad = torch.full((64,), 1e-3, dtype=torch.bfloat16)
    opt.step()
    # direction = 1/8 per entry
    torch.testing.assert_close(p.detach().float(), torch.full((64,), 1 - 0.5 / 8), atol=1e-2, rtol=0)


def test_signatures_are_explicit_and_typed():
    for cls in (
        SmoothedSignSGD,
        SmoothedNormSGD,
        GroupedSmoothedSignSGD,
        GroupedSmoothedNormSGD,
    ):
        sig = inspect.signature(cls.__init__)
        for name, par in sig.parameters.items():
            if name == "self":
                continue
            assert par.kind not in (par.VAR_KEYWORD, par.VAR_POSITIONAL), (cls, name)
            assert par.annotation is not inspect.Parameter.empty, (cls, name)


# --------------------------------------------------------------------------- #
# decay / no-decay groups
# --------------------------------------------------------------------------- #
def _model() -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))


def _ids(ps) -> set:
    return {id(p) for p in ps}


def test_weight_decay_groups_module_named_and_bare():
    model = _model()
    decay = _ids([model[0].weight, model[2].weight])
    no_decay = _ids([model[0].bias, model[1].weight, model[1].bias, model[2].bias])
    for source in (model, list(model.named_parameters()), list(model.parameters())):
        groups = weight_decay_param_groups(source, weight_decay=0.1)
        assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
        assert _ids(groups[0]["params"]) == decay
        assert _ids(groups[1]["params"]) == no_decay


def test_weight_decay_groups_norm_layer_by_type_and_frozen_and_dicts():
    model = _model()
    model[0].bias.requires_grad_(False)
    groups = weight_decay_param_groups(model, weight_decay=0.1, exclude_1d=False)
    # LayerNorm recognised by type, bias by name; frozen parameter left out
    assert _ids(groups[0]["params"]) == _ids([model[0].weight, model[2].weight])
    assert _ids(groups[1]["params"]) == _ids([model[1].weight, model[1].bias, model[2].bias])
    user_groups = [{"params": list(model.parameters()), "lr": 0.5}]
    assert weight_decay_param_groups(user_groups, weight_decay=0.1)[0]["lr"] == 0.5


@pytest.mark.parametrize(
    "make,cls",
    [
        (GroupedSmoothedSignSGD, SmoothedSignSGD),
        (GroupedSmoothedNormSGD, SmoothedNormSGD),
        # weight_decay_param_groups for any optimizer
        *(
            (lambda m, lr, weight_decay, c=c: c(weight_decay_param_groups(m, weight_decay), lr=lr), c)
            for c in (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD)
        ),
    ],
)
def test_grouped_optimizers_from_a_module(make, cls):
    model = _model()
    opt = make(model, lr=0.01, weight_decay=0.05)
    assert isinstance(opt, cls)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]
    assert all(g["lr"] == 0.01 for g in opt.param_groups)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()


def test_grouped_optimizer_settings_reach_every_group():
    opt = GroupedSmoothedNormSGD(_model(), lr=0.1, norm="rms", beta=0.5)
    assert isinstance(opt, SmoothedNormSGD)
    assert len(opt.param_groups) == 2
    assert all(g["norm"] == "rms" and g["beta"] == 0.5 for g in opt.param_groups)


@pytest.mark.parametrize(
    "make,cls",
    [
        (lambda p: GroupedSmoothedSignSGD(p, lr=0.05, beta=0.8, weight_decay=0.01), SmoothedSignSGD),
        (lambda p: GroupedSmoothedNormSGD(p, lr=0.05, beta=0.8, norm="tensor", weight_decay=0.01), SmoothedNormSGD),
    ],
)
def test_grouped_optimizers_from_bare_parameters(make, cls):
    model = _model()
    opt = make(model.parameters())  # what LightningCLI passes: bare parameters
    assert isinstance(opt, cls)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.0]
    assert all(g["lr"] == 0.05 and g["beta"] == 0.8 for g in opt.param_groups)
    assert _ids(opt.param_groups[0]["params"]) == _ids([model[0].weight, model[2].weight])
    model(torch.randn(3, 4)).sum().backward()
    opt.step()


def test_pure_core_imports_no_lightning():
    """The math (functional, sparsity, optim, and the argument checks they share) imports torch and the standard
    library, never Lightning; so do the lightning_clip modules it imports (followed transitively: private helpers
    such as ``_compile`` or ``norms`` are held to the same rule)."""
    import ast
    import pathlib
    import sys

    import lightning_clip

    root = pathlib.Path(lightning_clip.__file__).parent

    def module_file(name: str) -> pathlib.Path:
        parts = name.split(".")[1:]
        path = root.joinpath(*parts)
        return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")

    pending = [
        root / "functional.py",
        root / "sparsity.py",
        root / "_validation.py",
        *sorted((root / "optim").glob("*.py")),
    ]
    checked = set()
    stdlib = set(sys.stdlib_module_names)
    while pending:
        path = pending.pop()
        if path in checked:
            continue
        checked.add(path)
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top == "lightning_clip" and name != "lightning_clip":
                    assert module_file(name).is_file(), (path.name, name)
                    pending.append(module_file(name))
                    continue
                assert top in stdlib or top == "torch", (path.name, name)
    assert root / "_compile.py" in checked and root / "norms.py" in checked


@pytest.mark.parametrize(
    "class_path,init_args,cls",
    [
        ("lightning_clip.optim.SmoothedSignSGD", {"lr": 0.05, "beta": 0.9}, SmoothedSignSGD),
        ("lightning_clip.optim.SmoothedNormSGD", {"lr": 0.05, "norm": "rms"}, SmoothedNormSGD),
        ("lightning_clip.optim.GroupedSmoothedSignSGD", {"lr": 0.05, "weight_decay": 0.1}, SmoothedSignSGD),
        ("lightning_clip.optim.GroupedSmoothedNormSGD", {"lr": 0.05, "weight_decay": 0.1}, SmoothedNormSGD),
    ],
)
def test_jsonargparse_optimizer_callable(class_path, init_args, cls):
    """What LightningCLI does with ``optimizer: {class_path: ..., init_args: ...}``."""
    jsonargparse = pytest.importorskip("jsonargparse")
    from typing import Iterable

    parser = jsonargparse.ArgumentParser(exit_on_error=False)
    parser.add_argument("--optimizer", type=Callable[[Iterable], torch.optim.Optimizer])
    cfg = parser.parse_args(["--optimizer", str({"class_path": class_path, "init_args": init_args}).replace("'", '"')])
    make = (
        parser.instantiate(cfg).optimizer
        if hasattr(parser, "instantiate")
        else parser.instantiate_classes(cfg).optimizer
    )
    model = _model()
    opt = make(model.parameters())
    assert isinstance(opt, cls)
    assert opt.param_groups[0]["lr"] == 0.05
    if "weight_decay" in init_args:
        assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
        assert _ids(opt.param_groups[1]["params"]) == _ids(
            [model[0].bias, model[1].weight, model[1].bias, model[2].bias]
        )


@pytest.mark.parametrize(
    "cls,kwargs",
    [
        (SmoothedSignSGD, {"lr": 0.1, "beta": 0.9}),
        (SmoothedSignSGD, {"lr": 0.1, "beta": 0.8, "weight_decay": 0.1, "bias_correction": True, "maximize": True}),
        (SmoothedNormSGD, {"lr": 0.1, "beta": 0.9, "norm": "global"}),
        (SmoothedNormSGD, {"lr": 0.1, "beta": 0.7, "norm": "rms", "weight_decay": 0.05, "bias_correction": True}),
    ],
    ids=["sign", "sign-options", "norm-global", "norm-rms-options"],
)
def test_fused_kernel_matches_the_loop_in_float64(cls, kwargs):
    """The compiled kernel against the for-loop one, including an lr change (no recompilation needed)."""
    gen = torch.Generator().manual_seed(3)
    shapes = [(5, 3), (7,), (2, 2, 2)]
    init = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    loop = [torch.nn.Parameter(t.clone()) for t in init]
    fused = [torch.nn.Parameter(t.clone()) for t in init]
    opt_loop, opt_fused = cls(loop, foreach=False, **kwargs), cls(fused, fused=True, **kwargs)
    for step in range(12):
        if step == 6:
            for opt in (opt_loop, opt_fused):
                opt.param_groups[0]["lr"] *= 0.5
        for a, b in zip(loop, fused):
            g = torch.randn(a.shape, generator=gen, dtype=torch.float64)
            a.grad, b.grad = g.clone(), g.clone()
        opt_loop.step()
        opt_fused.step()
        for a, b in zip(loop, fused):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_fused_and_foreach_together_are_refused():
    with pytest.raises(ValueError, match="fused=True and foreach=True"):
        SmoothedSignSGD([torch.nn.Parameter(torch.zeros(2))], fused=True, foreach=True)


@pytest.mark.parametrize("cls", [SmoothedSignSGD, SmoothedNormSGD], ids=["sign", "norm"])
def test_fused_kernel_with_per_tensor_step_sizes_matches_the_loop(cls):
    """With ``bias_correction``, a parameter that receives its first gradient later has its own step count, so the
    step sizes differ per tensor (the compiled kernel then takes them as a list); per-tensor norms as well."""
    gen = torch.Generator().manual_seed(5)
    init = [torch.randn(s, generator=gen, dtype=torch.float64) for s in [(4, 3), (6,), (3,)]]
    loop = [torch.nn.Parameter(t.clone()) for t in init]
    fused = [torch.nn.Parameter(t.clone()) for t in init]
    kwargs = {"lr": 0.1, "beta": 0.8, "bias_correction": True}
    if cls is SmoothedNormSGD:
        kwargs["norm"] = "tensor"
    opt_loop, opt_fused = cls(loop, foreach=False, **kwargs), cls(fused, fused=True, **kwargs)
    for step in range(8):
        for i, (a, b) in enumerate(zip(loop, fused)):
            g = torch.randn(a.shape, generator=gen, dtype=torch.float64)
            a.grad, b.grad = (None, None) if i == 2 and step < 3 else (g.clone(), g.clone())
        opt_loop.step()
        opt_fused.step()
        for a, b in zip(loop, fused):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    assert opt_fused.state[fused[0]]["step"] == 8 and opt_fused.state[fused[2]]["step"] == 5


# --------------------------------------------------------------------------- #
# torch.compile(optimizer.step), step counts and checkpoints
# --------------------------------------------------------------------------- #
KERNELS = {"loop": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}


def _feed(params: List[nn.Parameter], grads: List) -> None:
    for p, g in zip(params, grads):
        p.grad = None if g is None else g.clone()


def _late_grads(gen: torch.Generator, init: List[torch.Tensor], t: int, late_until: int = 2) -> List:
    """Random gradients for every tensor; none for the last one before step ``late_until`` (its count lags)."""
    grads: List = [torch.randn(x.shape, generator=gen, dtype=x.dtype) for x in init]
    if t < late_until:
        grads[-1] = None
    return grads


def _fresh_dynamo():
    """Forget what dynamo compiled before: every instance of an optimizer class shares the code of its ``step``, and
    after 8 compilations of one code object dynamo runs it eagerly, which would leave nothing compiled to test."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    return counters


@pytest.mark.parametrize(
    "kernel,dtype",
    [("loop", F64), ("foreach", F64), ("fused", F64), ("loop", torch.float32)],
    ids=["loop-float64", "foreach-float64", "fused-float64", "loop-float32"],
)
@pytest.mark.parametrize("cls", [SmoothedSignSGD, SmoothedNormSGD], ids=["sign", "norm"])
def test_compiled_step_with_bias_correction_matches_eager(cls, kernel, dtype):
    """``step = torch.compile(opt.step)``, called every iteration (the recipe torch documents for optimizers): each
    compiled step applies the bias correction of its own step count, not the first step's, and equals the eager
    step, over six steps, with a parameter whose count lags (its first gradient arrives at step 3)."""
    counters = _fresh_dynamo()
    gen = torch.Generator().manual_seed(8)
    init = [torch.randn(s, generator=gen, dtype=dtype) for s in [(4, 3), (5,), (2,)]]
    kwargs = dict(lr=0.1, beta=0.8, bias_correction=True, weight_decay=0.1, maximize=True, **KERNELS[kernel])
    eager_params = [nn.Parameter(x.clone()) for x in init]
    compiled_params = [nn.Parameter(x.clone()) for x in init]
    eager, compiled = cls(eager_params, **kwargs), cls(compiled_params, **kwargs)
    compiled_step = torch.compile(compiled.step)
    tol = dict(rtol=1e-12, atol=1e-14) if dtype == F64 else dict(rtol=2e-6, atol=1e-6)
    for t in range(6):
        grads = _late_grads(gen, init, t)
        _feed(eager_params, grads)
        _feed(compiled_params, grads)
        eager.step()
        compiled_step()
        for a, b in zip(compiled_params, eager_params):
            torch.testing.assert_close(a, b, **tol, msg=lambda m, t=t: f"step {t + 1}: {m}")
    assert [float(compiled.state[p]["step"]) for p in compiled_params] == [6.0, 6.0, 4.0]
    assert counters["stats"]["unique_graphs"] >= 1  # it did run compiled


@pytest.mark.parametrize(
    "kernel,compiled",
    [("loop", False), ("foreach", False), ("fused", False), ("loop", True)],
    ids=["loop", "foreach", "fused", "loop-compiled"],
)
@pytest.mark.parametrize("cls", [SmoothedSignSGD, SmoothedNormSGD], ids=["sign", "norm"])
def test_checkpoint_with_int_step_counts_resumes_exactly(cls, kernel, compiled):
    """A state dict in the format lightning-clip 0.1 saved (``state["step"]`` a Python ``int``, built here by hand
    from a run's buffers) loads, through ``torch.save``/``torch.load(weights_only=True)``, and resumes exactly where
    the uninterrupted eager run goes: eagerly with every kernel, and under ``torch.compile(opt.step)``; its counts
    become tensors."""
    if compiled:
        _fresh_dynamo()
    gen = torch.Generator().manual_seed(12)
    init = [torch.randn(s, generator=gen, dtype=F64) for s in [(3, 4), (6,), (2, 2)]]
    grads = [_late_grads(gen, init, t) for t in range(10)]
    kwargs = dict(lr=0.05, beta=0.9, bias_correction=True, weight_decay=0.05, **KERNELS[kernel])

    ref = [nn.Parameter(x.clone()) for x in init]
    opt_ref = cls(ref, **kwargs)
    for gs in grads:
        _feed(ref, gs)
        opt_ref.step()

    first = [nn.Parameter(x.clone()) for x in init]
    opt1 = cls(first, **kwargs)
    for gs in grads[:4]:
        _feed(first, gs)
        opt1.step()
    counts = [4, 4, 2]
    old_format = {
        "state": {
            i: {"momentum_buffer": opt1.state[p]["momentum_buffer"].clone(), "step": n}
            for i, (p, n) in enumerate(zip(first, counts))
        },
        "param_groups": [
            {k: v for k, v in g.items() if k != "params"} | {"params": [0, 1, 2]} for g in opt1.param_groups
        ],
    }
    blob = io.BytesIO()
    torch.save({"params": [p.detach() for p in first], "opt": old_format}, blob)
    blob.seek(0)
    saved = torch.load(blob, weights_only=True)
    assert all(type(st["step"]) is int for st in saved["opt"]["state"].values())

    second = [nn.Parameter(x.clone()) for x in saved["params"]]
    opt2 = cls(second, **kwargs)
    opt2.load_state_dict(saved["opt"])
    step = torch.compile(opt2.step) if compiled else opt2.step
    for gs in grads[4:]:
        _feed(second, gs)
        step()
    for a, b in zip(second, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    assert [float(opt2.state[p]["step"]) for p in second] == [10.0, 10.0, 8.0]
    assert all(torch.is_tensor(opt2.state[p]["step"]) for p in second)


@pytest.mark.parametrize("cls", [SmoothedSignSGD, SmoothedNormSGD], ids=["sign", "norm"])
def test_fused_kernel_takes_any_number_of_configurations(cls):
    """A sweep in one process (Optuna trials, a notebook, gradual unfreezing): 12 configurations of the fused kernel
    (shapes, beta, maximize, weight decay, norm), more than the 8 that dynamo compiles of one function. Each one
    matches the for-loop kernel, none raises, and each is compiled (or, where TorchInductor cannot compile, runs
    eagerly after a single warning)."""
    from torch._dynamo.utils import counters

    graphs_before = counters["stats"]["unique_graphs"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(12):
            gen = torch.Generator().manual_seed(100 + i)
            init = [torch.randn(s, generator=gen, dtype=F64) for s in [(i + 1, 2), (3,)]]
            kwargs = dict(lr=0.05, beta=0.5 + 0.04 * i, maximize=i % 2 == 1, weight_decay=0.1 if i % 3 == 0 else 0.0)
            if cls is SmoothedNormSGD:
                kwargs["norm"] = NORM_KINDS[i % 3]
            loop = [nn.Parameter(x.clone()) for x in init]
            fused = [nn.Parameter(x.clone()) for x in init]
            opt_loop, opt_fused = cls(loop, foreach=False, **kwargs), cls(fused, fused=True, **kwargs)
            for _ in range(2):
                gs = [torch.randn(x.shape, generator=gen, dtype=F64) for x in init]
                _feed(loop, gs)
                _feed(fused, gs)
                opt_loop.step()
                opt_fused.step()
            for a, b in zip(fused, loop):
                torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14, msg=lambda m, i=i: f"configuration {i}: {m}")
    ours = [w for w in caught if "lightning-clip" in str(w.message)]
    assert len(ours) <= 1, [str(w.message) for w in ours]
    if not ours:  # the fused speed: every configuration got a graph of its own
        assert counters["stats"]["unique_graphs"] - graphs_before >= 12


# --------------------------------------------------------------------------- #
# float16 / bfloat16 parameters against the float64 formula
# --------------------------------------------------------------------------- #
def _scaled_to_norm(x: torch.Tensor, n: float) -> torch.Tensor:
    return x * (n / float(x.norm()))


HALF_CASES = [("sign", None), ("norm", "global"), ("norm", "tensor"), ("norm", "rms")]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("kernel", sorted(KERNELS))
@pytest.mark.parametrize("kind,norm", HALF_CASES, ids=[k if n is None else f"{k}-{n}" for k, n in HALF_CASES])
def test_half_precision_matches_the_float64_formula(kind, norm, kernel, dtype):
    """float16/bfloat16 parameters and gradients, every kernel: an ordinary step, then all-zero gradients, then
    gradients of norm 1e-7 and 1e-6 (per tensor, and over all of them), against the docstring formula computed in
    float64 from the same (rounded) inputs and rounded to the dtype. ``(1 - beta) / ||g||`` is far beyond float16's
    range there: taken in float16 it turned a zero gradient into ``nan`` and a tiny one into ``inf``."""
    gen = torch.Generator().manual_seed(21)
    shapes = [(4, 3), (5,)]
    init = [torch.randn(s, generator=gen, dtype=F64).to(dtype) for s in shapes]
    directions = [[torch.randn(s, generator=gen, dtype=F64) for s in shapes] for _ in range(4)]
    grads = [
        [d.to(dtype) for d in directions[0]],
        [torch.zeros(s, dtype=dtype) for s in shapes],
        [_scaled_to_norm(d, 1e-7).to(dtype) for d in directions[2]],
        [_scaled_to_norm(d, 1e-6).to(dtype) for d in directions[3]],
    ]
    settings = dict(lr=0.05, beta=0.9, weight_decay=0.1, bias_correction=True, maximize=False)
    if kind == "norm":
        settings.update(norm=norm, eps=1e-12)
    ref = reference_run(
        kind, [dict(settings, params=[x.to(F64) for x in init])], lambda t, w: [g.to(F64) for g in grads[t]], 4
    )
    opt_cls = SmoothedSignSGD if kind == "sign" else SmoothedNormSGD
    params = [nn.Parameter(x.clone()) for x in init]
    opt = opt_cls(params, **dict(settings, **KERNELS[kernel]))
    eps = torch.finfo(dtype).eps
    for t in range(4):
        _feed(params, grads[t])
        opt.step()
        for p, want in zip(params, ref[t]):
            assert torch.isfinite(p).all(), f"step {t + 1}: {p}"
            torch.testing.assert_close(
                p.detach().to(F64),
                want.to(dtype).to(F64),
                rtol=2 * eps,
                atol=eps,
                msg=lambda m, t=t: f"step {t + 1}: {m}",
            )


# --------------------------------------------------------------------------- #
# complex parameters
# --------------------------------------------------------------------------- #
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
