"""Smoke test of the committed benchmark command (``benchmarks/bench_all.py --quick``)."""

from __future__ import annotations

import importlib.util
import json
import math
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench():
    spec = importlib.util.spec_from_file_location("bench_all", os.path.join(ROOT, "benchmarks", "bench_all.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_median_ci_is_the_binomial_order_statistic_interval():
    """By hand: P(x_(k) <= median <= x_(n+1-k)) = 1 - 2 P(Bin(n, 1/2) <= k - 1). n = 9: k = 2 covers
    1 - 2 * 10/512 = 0.961, k = 3 only 1 - 2 * 46/512 = 0.820; n = 11: k = 2 gives 0.988, k = 3 0.935 (< 0.95);
    n = 15: k = 4 gives 1 - 2 * 576/32768 = 0.965, k = 5 0.882; n = 5: even k = 1 covers only 0.9375 (the range)."""
    median_ci = _bench().median_ci
    shuffled = [7.0, 3.0, 9.0, 1.0, 5.0, 8.0, 2.0, 6.0, 4.0]
    assert median_ci(shuffled) == (2.0, 8.0)
    assert median_ci([float(x) for x in range(11)]) == (1.0, 9.0)
    assert median_ci([float(x) for x in range(1, 16)]) == (4.0, 12.0)
    assert median_ci([1.0, 2.0, 3.0, 4.0, 5.0]) == (1.0, 5.0)
    assert median_ci([float(x) for x in range(1, 16)], level=0.85) == (5.0, 11.0)


def test_bench_all_quick_writes_finite_ratios():
    bench = _bench()
    parts = ["clipping", "optimizers", "wrapper"]  # the Trainer step part is the slow one to start; same code path
    argv = ["--quick", "--name", "smoke", "--no-markdown"] + [a for p in parts for a in ("--part", p)]
    payload = bench.main(argv)
    with open(os.path.join(ROOT, "benchmarks", "out", "smoke.json")) as f:
        saved = json.load(f)
    assert saved["results"].keys() == payload["results"].keys() == set(parts)
    assert "torch" in saved and "CPU cores" in saved["machine"]
    for part in parts:
        assert set(saved["results"][part]) == {"grid", "gpt"}
    clipping = saved["results"]["clipping"]["gpt"]
    for key in ("torch clip_grad_norm_(foreach=True)", "ours steady (CPU fast path)", "ours spike (CPU fast path)",
                "ours steady (sync-free path)", "ours spike (sync-free path)"):
        assert key in clipping
    assert "SmoothedSignSGD (default)" in saved["results"]["optimizers"]["grid"]
    rows = [r for sets in saved["results"].values() for rows in sets.values() for r in rows.values()]
    assert rows and all(math.isfinite(r[k]) and r[k] > 0 for r in rows for k in ("ms", "ratio", "lo", "hi"))
    assert all(r["lo"] <= r["ci_lo"] <= r["ratio"] <= r["ci_hi"] <= r["hi"] for r in rows)
