"""One benchmark command for the README's table: every variant side by side in one process, like with like.

Parts (``--part``, repeatable; default all):

* ``clipping``: the clipping work alone against ``torch.nn.utils.clip_grad_norm_(foreach=True)`` on the same
  gradients, in the steady state (nothing to clip) and on a spike (every call clips), with the CPU fast path (the
  default on CPU tensors) and with the sync-free path of accelerators (``cpu_fast_path(False)``), and the peers at
  their best paths: ZClip (``ZClip.step``) and smartclip (``ZScoreClip``, global scope), steady state.
* ``optimizers``: one ``step()`` of ``SmoothedSignSGD`` / ``SmoothedNormSGD`` (default, foreach and, without
  ``--quick``, ``fused=True``) against SGD-momentum's fastest CPU kernel (the faster of ``foreach=False/True``, per
  shape set), with ``Adam(fused=True)`` and pytorch_optimizer's ``SignSGD`` / ``Lion`` (foreach against foreach,
  when importable).
* ``step``: a whole Trainer step with the callback at its defaults (sparsity logging on, logging every 50 steps)
  against the same step with ``gradient_clip_val=1.0``.
* ``wrapper``: ``AdaptiveClippingOptimizer.step`` against its wrapped optimizer's step plus
  ``clip_grad_norm_(foreach=True)``.

Shape sets: ``grid`` (16M float32 parameters in 100 tensors of 400 x 400) and ``gpt`` (54M float32 parameters shaped
as a 12-layer GPT of width 512 with a 32000 x 512 embedding: 65.5 MB, much larger than the cache).

Every variant is timed in interleaved rounds (each round times every variant once, ``inner`` calls each, so a drift
of the machine hits all alike). A ratio is the median of the per-round ratios (each round's variant against the same
round's baseline), given with its 95% confidence interval (distribution-free: order statistics of the per-round
ratios, from the binomial law of the median) and the range of the per-round ratios; a target is met when the whole
interval is on its side. Writes ``benchmarks/out/<name>.json`` (git-ignored) and ``benchmarks/results.md``.

Run: ``python benchmarks/bench_all.py`` (about 3 minutes on 2 CPU cores), ``--quick`` for a smoke run (seconds).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

from lightning_clip._scaling import cpu_fast_path, scale_grads_
from lightning_clip.functional import ClipState, clip_grads_, rule_from_settings
from lightning_clip.norms import global_grad_norm

HERE = os.path.dirname(os.path.abspath(__file__))
PARTS = ("clipping", "optimizers", "step", "wrapper")


# --------------------------------------------------------------------------- shapes and timing
def grid_shapes(quick: bool) -> list[tuple[int, ...]]:
    """100 tensors of 400 x 400 (16M parameters); 20 with ``quick``."""
    return [(400, 400)] * (4 if quick else 100)


def gpt_shapes(quick: bool) -> list[tuple[int, ...]]:
    """A GPT-like set: a ``vocab x d`` embedding and ``layers`` blocks (qkv, projection, 4x MLP, two layer norms,
    with biases): 54.2M parameters at ``vocab = 32000, d = 512, layers = 12``; a small one with ``quick``."""
    vocab, d, layers = (1000, 64, 1) if quick else (32000, 512, 12)
    shapes: list[tuple[int, ...]] = [(vocab, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,)]
    return shapes + [(d,), (d,)]


def make_params(shapes: Sequence[tuple[int, ...]], seed: int = 0) -> list[nn.Parameter]:
    """Parameters with gradients ``N(0, 0.01^2)`` (the same for every variant)."""
    gen = torch.Generator().manual_seed(seed)
    params = [nn.Parameter(torch.randn(s, generator=gen) * 0.1) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * 0.01
    return params


def interleaved(fns: dict[str, Callable[[], object]], rounds: int, inner: int) -> dict[str, list[float]]:
    """Per-round milliseconds per call of each function, the functions taking turns within each round."""
    for fn in fns.values():  # warm-up: allocations, first-call paths
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            times[name].append((time.perf_counter() - start) / inner * 1e3)
    return times


def median_ci(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """A distribution-free confidence interval of the median: ``(x_(k), x_(n+1-k))`` of the sorted values, with the
    largest ``k`` for which ``P(x_(k) <= median <= x_(n+1-k)) = 1 - 2 P(Binomial(n, 1/2) < k) >= level`` (the
    whole range when ``n`` is too small for ``level``)."""
    xs = sorted(values)
    n = len(xs)

    def coverage(k: int) -> float:
        return 1 - 2 * sum(math.comb(n, i) for i in range(k)) / 2**n

    k = 1
    while k + 1 <= (n + 1) // 2 and coverage(k + 1) >= level:
        k += 1
    return xs[k - 1], xs[n - k]


def ratio_row(times: dict[str, list[float]], name: str, base: str | Sequence[str]) -> dict[str, float]:
    """``name`` against ``base`` (or the fastest of several bases, per round): median ms, the median of the per-round
    ratios with its 95% confidence interval (:func:`median_ci`), and the range of the per-round ratios."""
    bases = [base] if isinstance(base, str) else list(base)
    base_rounds = [min(times[b][i] for b in bases) for i in range(len(times[name]))]
    per_round = [a / b for a, b in zip(times[name], base_rounds)]
    ms, base_ms = statistics.median(times[name]), statistics.median(base_rounds)
    ci_lo, ci_hi = median_ci(per_round)
    return {"ms": ms, "base_ms": base_ms, "ratio": statistics.median(per_round), "ci_lo": ci_lo, "ci_hi": ci_hi,
            "lo": min(per_round), "hi": max(per_round), "rounds": len(per_round)}


# --------------------------------------------------------------------------- part 1: clipping
class _Holder(nn.Module):
    """An ``nn.Module`` owning the parameters, for the peers that take a model."""

    def __init__(self, params: list[nn.Parameter]) -> None:
        super().__init__()
        self.ps = nn.ParameterList(params)


def bench_clipping(sets: dict[str, list[tuple[int, ...]]], rounds: int, inner: int, fused: bool) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for set_name, shapes in sets.items():
        params = make_params(shapes)
        grads = [p.grad for p in params]
        one = torch.ones((), dtype=torch.float32)
        norm0 = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
        rule = rule_from_settings()  # alpha 3.8, beta 0.918
        steady = {fast: ClipState.zeros() for fast in (True, False)}
        for state in steady.values():  # a seeded average: the steady state clips nothing
            state.ema.fill_(norm0)
            state.seen.fill_(100)
        spike = {fast: ClipState.zeros() for fast in (True, False)}
        target = {"t": norm0, "torch": norm0}

        steady["fused"] = ClipState.zeros()
        steady["fused"].ema.fill_(norm0)
        steady["fused"].seen.fill_(100)

        def ours_steady(fast: bool, fused: bool = False) -> Callable[[], object]:
            state = steady["fused" if fused else fast]

            def run() -> object:
                with cpu_fast_path(fast):
                    return clip_grads_(grads, state, rule, fused=fused)

            return run

        def ours_spike(fast: bool) -> Callable[[], object]:
            state = spike[fast]

            def run() -> object:  # the threshold falls 0.1 % a call: every call clips by 0.999, the scale stays sane
                target["t"] *= 0.999
                state.ema.fill_(target["t"] / rule.alpha)
                state.seen.fill_(100)
                with cpu_fast_path(fast):
                    return clip_grads_(grads, state, rule)

            return run

        def torch_steady() -> object:
            return torch.nn.utils.clip_grad_norm_(params, 1e9, foreach=True)

        def torch_spike() -> object:
            target["torch"] *= 0.999
            return torch.nn.utils.clip_grad_norm_(params, target["torch"], foreach=True)

        fns: dict[str, Callable[[], object]] = {
            "torch clip_grad_norm_(foreach=True)": torch_steady,
            "ours steady (CPU fast path)": ours_steady(True),
            "ours steady (sync-free path)": ours_steady(False),
            "torch clip_grad_norm_(foreach=True), clipping": torch_spike,
            "ours spike (CPU fast path)": ours_spike(True),
            "ours spike (sync-free path)": ours_spike(False),
            # where the time goes: the one pass over the gradients that no clipping can skip, and the two passes of
            # the sync-free path (the multiplication, then the mask that makes a non-finite step's entries 0)
            "norm pass alone (global_grad_norm, read back)": lambda: global_grad_norm(grads).item(),
            "scale pass alone (sync-free, no mask)": lambda: scale_grads_(grads, one, zero_nonfinite=False),
            "scale and mask passes (sync-free)": lambda: scale_grads_(grads, one, zero_nonfinite=True),
        }
        if fused:  # compiled on first use (tens of seconds on CPU): one pass for the multiplication and the mask
            start = time.perf_counter()
            ours_steady(False, fused=True)()
            print(f"  [{set_name}] compiled the fused scaling in {time.perf_counter() - start:.1f} s", flush=True)
            fns["ours steady (sync-free path, fused=True)"] = ours_steady(False, fused=True)
        model = _Holder(params)
        with contextlib.suppress(ImportError):
            from zclip import ZClip

            zclip = ZClip(max_grad_norm=None, warmup_steps=5)
            for _ in range(6):
                zclip.step(model)
            fns["ZClip.step (steady)"] = lambda: zclip.step(model)
        with contextlib.suppress(ImportError):
            import smartclip

            clipper = smartclip.ZScoreClip()
            for _ in range(30):
                smartclip.apply(model, clipper)
            fns["smartclip ZScoreClip (steady)"] = lambda: smartclip.apply(model, clipper)
        times = interleaved(fns, rounds, inner)
        rows = {}
        for name in fns:
            base = "torch clip_grad_norm_(foreach=True)"
            if "spike" in name or name.endswith("clipping"):
                base = "torch clip_grad_norm_(foreach=True), clipping"
            rows[name] = ratio_row(times, name, base)
        for peer in ("ZClip.step (steady)", "smartclip ZScoreClip (steady)"):
            if peer in fns:
                rows[f"ours steady / {peer}"] = ratio_row(times, "ours steady (CPU fast path)", peer)
        out[set_name] = rows
    return out


# --------------------------------------------------------------------------- part 2: optimizers
def bench_optimizers(sets: dict[str, list[tuple[int, ...]]], rounds: int, inner: int, fused: bool) -> dict[str, dict]:
    from lightning_clip.optim import SmoothedNormSGD, SmoothedSignSGD

    out: dict[str, dict] = {}
    lr = 1e-6
    for set_name, shapes in sets.items():
        params = make_params(shapes)
        opts: dict[str, torch.optim.Optimizer] = {
            "SGD(momentum=0.9, foreach=False)": torch.optim.SGD(params, lr=lr, momentum=0.9, foreach=False),
            "SGD(momentum=0.9, foreach=True)": torch.optim.SGD(params, lr=lr, momentum=0.9, foreach=True),
            "SmoothedSignSGD (default)": SmoothedSignSGD(params, lr=lr),
            "SmoothedSignSGD(foreach=True)": SmoothedSignSGD(params, lr=lr, foreach=True),
            "SmoothedNormSGD (default)": SmoothedNormSGD(params, lr=lr),
            "SmoothedNormSGD(foreach=True)": SmoothedNormSGD(params, lr=lr, foreach=True),
            "Adam(fused=True)": torch.optim.Adam(params, lr=lr, fused=True),
        }
        with contextlib.suppress(ImportError):
            import pytorch_optimizer as po

            opts["pytorch_optimizer SignSGD(foreach)"] = po.SignSGD(params, lr=lr, momentum=0.9, foreach=True)
            opts["pytorch_optimizer Lion(foreach)"] = po.Lion(params, lr=lr, foreach=True)
        if fused:
            opts["SmoothedSignSGD(fused=True)"] = SmoothedSignSGD(params, lr=lr, fused=True)
            opts["SmoothedNormSGD(fused=True)"] = SmoothedNormSGD(params, lr=lr, fused=True)
            for name in ("SmoothedSignSGD(fused=True)", "SmoothedNormSGD(fused=True)"):
                start = time.perf_counter()
                opts[name].step()
                print(f"  [{set_name}] compiled {name} in {time.perf_counter() - start:.1f} s", flush=True)
        grads = [p.grad for p in params]
        fns: dict[str, Callable[[], object]] = {k: o.step for k, o in opts.items()}
        # where the time goes: SmoothedNormSGD's one extra read of the gradients, the global norm
        fns["global norm pass alone (global_grad_norm)"] = lambda: global_grad_norm(grads)
        # and the floor of any momentum update: it reads the gradient, the buffer and the parameter and writes the
        # buffer and the parameter; two in-place adds per tensor move exactly those bytes, with nothing computed
        weights = [p.detach() for p in params]
        floor_bufs = [torch.zeros_like(p) for p in params]

        def memory_floor() -> None:
            for w, g, b in zip(weights, grads, floor_bufs):
                b.add_(g, alpha=1e-9)
                w.add_(b, alpha=-1e-9)

        fns["memory floor (b += g; p += b per tensor)"] = memory_floor
        cached: dict[str, str] = {}
        if set_name == "grid":  # the arithmetic alone: the same chains on one 640 KB tensor that stays in the cache
            w0, g0, b0, tmp0 = weights[0], grads[0], floor_bufs[0], torch.empty_like(grads[0])
            count = len(weights)

            def sgd_chain() -> None:
                for _ in range(count):
                    b0.mul_(0.9).add_(g0, alpha=1e-9)
                    w0.add_(b0, alpha=-1e-9)

            def sign_chain() -> None:
                for _ in range(count):
                    b0.lerp_(torch.sign(g0, out=tmp0), 0.1)
                    w0.add_(b0, alpha=-1e-9)

            cached = {"cached tensor, SGD-momentum's ops (mul_, add_, add_)": "sgd",
                      "cached tensor, SmoothedSignSGD's ops (sign, lerp_, add_)": "sign"}
            fns.update(zip(cached, (sgd_chain, sign_chain)))
        times = interleaved(fns, rounds, inner)
        sgd = ("SGD(momentum=0.9, foreach=False)", "SGD(momentum=0.9, foreach=True)")
        rows = {name: ratio_row(times, name, sgd) for name in fns}
        if cached:
            sgd_name, sign_name = list(cached)
            rows["cached tensor, SmoothedSignSGD's ops / SGD-momentum's ops"] = ratio_row(times, sign_name, sgd_name)
        for name in opts:
            if name.startswith("Smoothed") and "fused" in name:
                rows[f"{name} / Adam(fused=True)"] = ratio_row(times, name, "Adam(fused=True)")
        for ours, peer in (
            ("SmoothedSignSGD(foreach=True)", "pytorch_optimizer SignSGD(foreach)"),
            ("SmoothedSignSGD(foreach=True)", "pytorch_optimizer Lion(foreach)"),
        ):
            if peer in opts:
                rows[f"{ours} / {peer}"] = ratio_row(times, ours, peer)
        out[set_name] = rows
        del opts, params
    return out


# --------------------------------------------------------------------------- part 3: the whole Trainer step
def bench_step(rounds: int, steps: int, width: int) -> dict[str, dict]:
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import CSVLogger
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_clip import AdaptiveGradientClipping

    class Timer(pl.Callback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # noqa: ANN001
            self._start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # noqa: ANN001
            self.times.append(time.perf_counter() - self._start)

    class Wide(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(256, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                                     nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10))

        def training_step(self, batch, batch_idx):  # noqa: ANN001
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):  # noqa: ANN201
            return torch.optim.Adam(self.parameters(), lr=1e-5)

    torch.manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(32 * steps, 256), torch.randint(0, 10, (32 * steps,))), batch_size=32)
    names = ("Trainer(gradient_clip_val=1.0)", "AdaptiveGradientClipping() defaults")
    per_round: dict[str, list[float]] = {k: [] for k in names}
    n = 0
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            for name in names if r % 2 == 0 else names[::-1]:  # either goes first in half of the rounds
                pl.seed_everything(0, verbose=False)
                model = Wide()
                n = sum(p.numel() for p in model.parameters())
                timer = Timer()
                theirs = name.startswith("Trainer")
                trainer = pl.Trainer(
                    accelerator="cpu",
                    max_steps=steps,
                    logger=CSVLogger(tmp),
                    log_every_n_steps=50,
                    enable_checkpointing=False,
                    enable_progress_bar=False,
                    enable_model_summary=False,
                    callbacks=[timer] if theirs else [timer, AdaptiveGradientClipping()],
                    gradient_clip_val=1.0 if theirs else None,
                )
                trainer.fit(model, data)
                # the mean over the steps (logging steps included, as a run pays them), the first two excluded
                per_round[name].append(statistics.fmean(timer.times[2:]) * 1e3)
    row = ratio_row(per_round, names[1], names[0])
    return {f"mlp {n / 1e6:.1f}M, Adam, batch 32, {steps} steps x {rounds} rounds": {names[1]: row}}


# --------------------------------------------------------------------------- part 4: the wrapper
def bench_wrapper(sets: dict[str, list[tuple[int, ...]]], rounds: int, inner: int) -> dict[str, dict]:
    from lightning_clip import AdaptiveClippingOptimizer

    out: dict[str, dict] = {}
    for set_name, shapes in sets.items():
        params = make_params(shapes)
        rows = {}
        for opt_name, make in (
            ("SGD", lambda ps: torch.optim.SGD(ps, lr=1e-7)),
            ("Adam", lambda ps: torch.optim.Adam(ps, lr=1e-7)),
        ):
            plain = make(params)
            wrapped = AdaptiveClippingOptimizer(make(params))

            def theirs(plain: torch.optim.Optimizer = plain, params: list[nn.Parameter] = params) -> None:
                torch.nn.utils.clip_grad_norm_(params, 1e9, foreach=True)
                plain.step()

            times = interleaved({"theirs": theirs, "wrapper": wrapped.step}, rounds, inner)
            rows[f"AdaptiveClippingOptimizer({opt_name}) / {opt_name} + clip_grad_norm_"] = ratio_row(
                times, "wrapper", "theirs"
            )
        out[set_name] = rows
        del params
    return out


# --------------------------------------------------------------------------- report
def machine() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    build = "CUDA build" if torch.version.cuda else "CPU build"
    return (
        f"{os.cpu_count()} CPU cores ({cpu}), {torch.get_num_threads()} torch threads, torch {torch.__version__}"
        f" {build}, Python {platform.python_version()}"
    )


def table(results: dict[str, dict]) -> list[str]:
    lines = ["| part | set | variant | ms | ratio | 95% CI | range |", "| --- | --- | --- | ---: | ---: | --- | --- |"]
    for part, sets in results.items():
        for set_name, rows in sets.items():
            for name, r in rows.items():
                ci, spread = f"{r['ci_lo']:.3f}-{r['ci_hi']:.3f}", f"{r['lo']:.2f}-{r['hi']:.2f}"
                lines.append(
                    f"| {part} | {set_name} | {name} | {r['ms']:.2f} | {r['ratio']:.3f}x | {ci} | {spread} |"
                )
    return lines


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", action="append", choices=PARTS, help="repeatable; default: all")
    parser.add_argument("--quick", action="store_true", help="small shapes, few rounds: a smoke run")
    parser.add_argument("--name", default=None, help="JSON name under benchmarks/out (default: all, or quick)")
    parser.add_argument("--no-markdown", action="store_true", help="do not write benchmarks/results.md")
    args = parser.parse_args(argv)
    parts = args.part or list(PARTS)
    quick = args.quick
    sets = {"grid": grid_shapes(quick), "gpt": gpt_shapes(quick)}
    head = machine()
    print(head, flush=True)
    results: dict[str, dict] = {}
    start = time.perf_counter()
    if "clipping" in parts:
        results["clipping"] = bench_clipping(sets, rounds=2 if quick else 15, inner=1 if quick else 3, fused=not quick)
    if "optimizers" in parts:
        results["optimizers"] = bench_optimizers(sets, rounds=2 if quick else 15, inner=1 if quick else 2,
                                                 fused=not quick)
    if "step" in parts:
        results["step"] = bench_step(rounds=1 if quick else 15, steps=4 if quick else 101, width=64 if quick else 2048)
    if "wrapper" in parts:
        results["wrapper"] = bench_wrapper(sets, rounds=2 if quick else 15, inner=1 if quick else 3)
    elapsed = time.perf_counter() - start
    lines = table(results)
    print("\n".join(lines))
    print(f"({elapsed:.0f} s)")
    for r in (r for sets_ in results.values() for rows in sets_.values() for r in rows.values()):
        assert math.isfinite(r["ratio"]), r
    name = args.name or ("quick" if quick else "all")
    os.makedirs(os.path.join(HERE, "out"), exist_ok=True)
    path = os.path.join(HERE, "out", f"{name}.json")
    payload = {"machine": head, "torch": torch.__version__, "quick": quick, "parts": parts,
               "seconds": elapsed, "results": results}
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
    print(f"written: {path}")
    if not args.no_markdown and not quick:
        md = os.path.join(HERE, "results.md")
        with open(md, "w") as f:
            f.write("# Benchmark results\n\n")
            f.write(f"`python benchmarks/bench_all.py` ({', '.join(parts)}), {elapsed:.0f} s. Machine: {head}.\n\n")
            f.write("Ratio: the median over the rounds of the variant's time / its baseline's time in the same round"
                    " (the baseline: the first row of its group, `clip_grad_norm_(foreach=True)`; the faster"
                    " SGD-momentum kernel; the Trainer step with `gradient_clip_val`; the wrapped optimizer plus"
                    " `clip_grad_norm_`; or the pair named). 95% CI: the distribution-free confidence interval of"
                    " that median (order statistics of the per-round ratios). Range: the smallest and largest"
                    " per-round ratio. ms: the variant's median time.\n\n")
            f.write("\n".join(lines) + "\n")
        print(f"written: {md}")
    return payload


if __name__ == "__main__":
    main()
