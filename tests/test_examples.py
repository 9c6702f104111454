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


def test_plot_dashboard_draws_a_real_run_with_units_legends_off_the_data_and_the_caption(tmp_path):
    from matplotlib.text import Text

    from lightning_clip import AdaptiveGradientClipping
    from tests.conftest import TinyRegressor, regression_loader, trainer_kwargs
    from tests.lightning_ns import pl

    spike = 20

    class Spiky(TinyRegressor):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            return loss * 1000 if self.trainer.global_step == spike else loss

    logger = pl.loggers.TensorBoardLogger(str(tmp_path), name="run", version=0)
    cb = AdaptiveGradientClipping(sparsity_cumulative=True)
    pl.Trainer(**trainer_kwargs(tmp_path, max_steps=30, logger=logger, callbacks=[cb])).fit(
        Spiky(), regression_loader()
    )
    # the command line, on the run's event files
    png = tmp_path / "dashboard.png"
    out = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "examples", "plot_dashboard.py"),
            "--logdir",
            logger.log_dir,
            "--out",
            str(png),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "MPLBACKEND": "Agg"},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 30_000
    # the figure: labels with units, the spike marked as the one clipped step, legends under their panels, caption
    from plot_dashboard import CAPTION, plot

    fig = plot(logger.log_dir, str(tmp_path / "again.png"))
    norm, coef, sparsity = fig.axes
    assert norm.get_yscale() == "log" and norm.get_ylabel() == "gradient L2 norm (log scale)"
    assert coef.get_ylabel() == "coefficient, fraction (dimensionless)"
    assert sparsity.get_ylabel() == "fraction of entries (dimensionless)"
    assert all(ax.get_xlabel() == "optimizer step" for ax in fig.axes)
    (marks,) = norm.collections[1:]  # after the band: the clipped steps
    assert [int(x) for x, _ in marks.get_offsets()] == [spike]
    assert [t.get_text() for t in norm.get_legend().get_texts()] == [
        "band [grad_norm_ema, threshold]",
        "threshold",
        "grad_norm_ema",
        "grad_norm",
        "clipped step (above band)",
    ]
    assert [t.get_text() for t in sparsity.get_legend().get_texts()] == [
        "update_sparsity",
        "update_sparsity_cumulative",
    ]
    renderer = fig.canvas.get_renderer()
    legends = [ax.get_legend().get_window_extent(renderer) for ax in fig.axes]
    for ax, legend in zip(fig.axes, legends):
        assert legend.y1 < ax.get_window_extent(renderer).y0  # under the axes: hides no data
    (caption,) = [t for t in fig.findobj(Text) if t.get_text() == CAPTION]
    assert caption.get_window_extent(renderer).y1 < min(legend.y0 for legend in legends)


@pytest.mark.parametrize(("script", "run_dir"), [("plain_pytorch.py", "plain"), ("fabric.py", "fabric")])
def test_wrapper_examples_train_quickly_and_write_the_dashboard(tmp_path, monkeypatch, script, run_dir):
    import runpy

    from tests.conftest import read_scalars

    logdir = str(tmp_path / "plain") if script == "plain_pytorch.py" else str(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [script, "--quick", "--logdir", logdir])
    result = runpy.run_path(os.path.join(ROOT, "examples", script))["main"]()  # in this process: mnist1d is cached
    assert result["steps"] == 40 and result["val/acc"] > 0.2
    scalars = read_scalars(tmp_path / run_dir)
    assert len(scalars["clip/grad_norm"]) == 4 and len(scalars["clip/threshold"]) == 4


def _run_quick(script: str, tmp_path, monkeypatch) -> dict:
    """Run a result script's ``--quick`` mode in this process (mnist1d stays cached) into ``tmp_path``."""
    import runpy

    import torch

    threads = torch.get_num_threads()  # the scripts train on one thread: give the rest of the suite its threads back
    monkeypatch.setattr(sys, "argv", [script, "--quick", "--out", str(tmp_path)])
    try:
        result = runpy.run_path(os.path.join(ROOT, "examples", script))["main"]()
    finally:
        torch.set_num_threads(threads)
    name = script[: -len(".py")]
    with open(tmp_path / f"{name}.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    md = (tmp_path / f"{name}.md").read_text()
    assert f"Command: `python examples/{script} --quick --out {tmp_path}`" in md and "CPU build" in md
    assert "Run time: " in md
    return result, md


def _finite(*values) -> bool:
    import math

    return all(math.isfinite(v) for v in values)


def test_tuned_comparison_quick_tunes_four_methods_and_tables_every_setting(tmp_path, monkeypatch):
    result, md = _run_quick("tuned_comparison.py", tmp_path, monkeypatch)
    assert set(result["searches"]) == {"fixed", "adaptive", "sign", "norm"}
    assert len(result["summary"]) == 9  # 2 x original report, 2 x tune.py, 4 tuned here, Adam alone
    for name, s in result["summary"].items():
        assert name in md and _finite(s["final_loss"], s["final_acc"]) and 0.5 < s["final_loss"] < 3.0
    assert sum("tuned here" in name for name in result["summary"]) == 4


def test_sensitivity_quick_reports_the_spread_of_both_grids(tmp_path, monkeypatch):
    result, md = _run_quick("sensitivity.py", tmp_path, monkeypatch)
    for method, knob in (("fixed", "clip_val"), ("adaptive", "alpha")):
        grid = result[method]["grid"]
        assert [round(r[knob], 3) for r in grid] == [0.1, 1.0, 10.0]
        assert all(_finite(r["final_loss"], r["final_acc"]) for r in grid)
        loss = result[method]["loss"]
        assert loss["range"] == pytest.approx(loss["max"] - loss["min"]) and 0 <= loss["iqr"] <= loss["range"]
    assert result["fixed"]["grid"][0]["clipped_frac"] == 1.0  # clip_val 0.1 clips every step
    assert result["fixed"]["grid"][-1]["clipped_frac"] == 0.0  # 10 never does
    assert "Adam + fixed clipping (clip_val grid)" in md and "Adam + adaptive (alpha grid)" in md


def test_lr_tolerance_quick_has_five_methods_over_the_grid(tmp_path, monkeypatch):
    result, md = _run_quick("lr_tolerance.py", tmp_path, monkeypatch)
    assert len(result["curves"]) == 5
    for name, curve in result["curves"].items():
        assert len(curve) == 3 and all(0 < v <= 2.5 for v in curve) and name in md
        assert result["summary"][name]["best_lr"] in (1e-5, 1e-2, 10.0)


def test_equivalence_quick_value_clipping_matches_smoothed_signsgd(tmp_path, monkeypatch):
    result, md = _run_quick("equivalence.py", tmp_path, monkeypatch)
    value = result["value"]["0.0001"]["cos"]
    assert len(value) == 40 and min(value) > 0.98  # aggressive value clipping: Adam takes SmoothedSignSGD's step
    norm = result["norm"]["0.001"]["cos"]
    assert len(norm) == 40 and all(-1.0 <= c <= 1.0 for c in norm)
    assert "SmoothedSignSGD(bias_correction=True)" in md and "SmoothedNormSGD(global" in md


def test_natural_explosion_quick_clipping_trains_where_adam_alone_stalls(tmp_path, monkeypatch):
    result, md = _run_quick("natural_explosion.py", tmp_path, monkeypatch)
    s = result["summary"]
    assert result["runs"]["Adam, no clipping"][0]["norm"][0] > 1000  # the first gradients explode by themselves
    assert s["fixed norm clipping at 1"]["final_loss"] < s["Adam, no clipping"]["final_loss"] - 0.2
    assert s["adaptive + max_norm 1"]["final_loss"] < s["Adam, no clipping"]["final_loss"] - 0.2
    assert all(name in md for name in s)


def test_lm_spikes_quick_tables_every_method_with_finite_numbers(tmp_path, monkeypatch):
    import importlib.util

    result, md = _run_quick("lm_spikes.py", tmp_path, monkeypatch)
    s = result["summary"]
    assert len(s) == 6 and all(name in md for name in s)
    assert [name.split(" ")[0] for name in s] == ["no", "Lightning", "ZClip", "ZClip,", "adaptive,", "adaptive,"]
    for name, row in s.items():
        if name.startswith("ZClip") and importlib.util.find_spec("zclip") is None:
            assert row is None and "not installed" in name  # CI does not install zclip: the row says so
            continue
        assert _finite(row["final_val_loss"], row["spikes"], row["steps_lost"], row["ms_per_step"])
        assert 0 < row["final_val_loss"] < 5 and row["ms_per_step"] > 0
    assert len(result["search"]) == 2 and "The tuning grid" in md
