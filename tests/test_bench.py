"""Smoke test of the committed benchmark command (``benchmarks/bench_all.py --quick``)."""

from __future__ import annotations

import importlib.util
import json
import math
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_all_quick_writes_finite_ratios():
    spec = importlib.util.spec_from_file_location("bench_all", os.path.join(ROOT, "benchmarks", "bench_all.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
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
