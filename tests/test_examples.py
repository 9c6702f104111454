"""The experiments of examples/, run short."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))


def test_adam_alone_is_thrown_off_by_an_early_explosion_and_clipping_prevents_it():
    from adam_first_steps import run

    spiked = run(False, 1, (3,), 1e4)
    clipped = run(True, 1, (3,), 1e4)
    calm = run(False, 1, (), 1.0)
    assert spiked["val/loss"] > calm["val/loss"] + 0.5  # Adam alone: the explosion at step 3 wrecks the epoch
    assert clipped["val/loss"] == pytest.approx(calm["val/loss"], abs=0.05)  # with the callback: as if it never came
    assert clipped["val/acc"] > spiked["val/acc"]


def test_fixed_vs_adaptive_comparison_writes_curves_and_a_plot(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "examples", "compare_fixed_adaptive.py"),
            "--epochs",
            "2",
            "--seeds",
            "1",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "MPLBACKEND": "Agg"},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    with open(tmp_path / "compare_fixed_adaptive.json") as f:
        curves = json.load(f)
    assert len(curves) == 2 and all(len(runs) == 1 and len(runs[0]) == 2 for runs in curves.values())
    assert all(0.5 < v < 3.0 for runs in curves.values() for v in runs[0])
    assert (tmp_path / "compare_fixed_adaptive.png").stat().st_size > 10_000
