"""The TensorBoard artefacts: event files read with tensorboard's API, and a real ``tensorboard`` server."""

from __future__ import annotations

import glob
import json
import math
import os
import re
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest

from lightning_clip import AdaptiveGradientClipping
from lightning_clip.monitor import UpdateSparsityMonitor
from tests.conftest import TinyRegressor, TwoOptimizers, read_layout, read_scalars, regression_loader, trainer_kwargs
from tests.lightning_ns import pl

CSVLogger, TensorBoardLogger = pl.loggers.CSVLogger, pl.loggers.TensorBoardLogger

CLIP_TAGS = [
    "grad_norm",
    "threshold",
    "grad_norm_ema",
    "clip_coef",
    "clip_coef_min",
    "clipped_frac",
    "nonfinite_steps",
    "update_sparsity",
]


BAND = "grad_norm (line) vs band [grad_norm_ema, threshold] (shaded): above the band = clipped step"
NORM = "grad_norm (spiky) vs threshold (smooth): a spike above the threshold is clipped"
COEF = "clip_coef_min, clip_coef: post/pre-clip norm (1 = untouched, a dip = clipped)"
FRAC = "clipped_frac: fraction of the steps since the last log that were clipped"
NONFINITE = "nonfinite_steps: inf/nan steps since the last log (0 = none)"
SPARSITY = "update_sparsity: fraction of entries whose update was negligible"
SPARSITY_CUMULATIVE = "update_sparsity (this step), update_sparsity_cumulative (since the last log): negligible updates"




def charts(layout):
    return {(c.title, ch.title): ch for c in layout.category for ch in c.chart}


def test_event_files_hold_the_series_and_the_layout(tmp_path):
    alpha, beta = 1.05, 0.7
    logger = TensorBoardLogger(str(tmp_path), name="run")
    cb = AdaptiveGradientClipping(alpha=alpha, beta=beta, sparsity_cumulative=True, histogram_every_n_steps=4)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=16, logger=logger, callbacks=[cb]))
    trainer.fit(TinyRegressor(lr=0.1), regression_loader())
    s = read_scalars(logger.log_dir)
    for key in CLIP_TAGS + ["update_sparsity_cumulative"]:
        assert f"clip/{key}" in s, key
    # every series at every step; the first step has no bound: its threshold is inf (not drawn), all else finite
    assert all(len(vals) == 16 for key, vals in s.items() if key.startswith("clip/"))
    assert dict(s["clip/threshold"])[0] == math.inf
    assert all(math.isfinite(v) for key, vals in s.items() for step, v in vals if (key, step) != ("clip/threshold", 0))
    # log_every_n_steps=1: threshold_t = alpha * m_(t-1), with m recomputed from the logged norms alone
    norms = [v for _, v in s["clip/grad_norm"]]
    thresholds = dict(s["clip/threshold"])
    m = norms[0]
    for t in range(1, 16):
        assert thresholds[t] == pytest.approx(alpha * m, rel=1e-5)
        m = beta * m + (1 - beta) * norms[t]
    assert [step for step, _ in s["clip/update_sparsity"]] == list(range(16))
    # the layout: written once; the key (margin) chart alone in the first section, the other charts in the second
    (layout,) = read_layout(logger.log_dir)
    assert [c.title for c in layout.category] == ["clip: norm vs its clipping band", "clip"]
    c = charts(layout)
    assert [title for section, title in c if section == "clip: norm vs its clipping band"] == [BAND]
    series = c[("clip: norm vs its clipping band", BAND)].margin.series[0]
    assert (series.value, series.lower, series.upper) == ("clip/grad_norm", "clip/grad_norm_ema", "clip/threshold")
    assert [(title, list(c[section, title].multiline.tag)) for section, title in c if section == "clip"] == [
        (NORM, ["^clip/grad_norm$", "^clip/threshold$"]),
        (COEF, ["^clip/clip_coef_min$", "^clip/clip_coef$"]),
        (FRAC, ["^clip/clipped_frac$"]),
        (NONFINITE, ["^clip/nonfinite_steps$"]),
        (SPARSITY_CUMULATIVE, ["^clip/update_sparsity$", "^clip/update_sparsity_cumulative$"]),
    ]
    # every pattern of the layout matches a logged tag
    for chart in c.values():
        for pattern in chart.multiline.tag:
            assert any(re.match(pattern, tag) for tag in s), pattern
    # the per-layer gradient-norm histograms, at their own cadence (steps 3, 7, 11, 15), over the 4 tensors
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (path,) = glob.glob(os.path.join(logger.log_dir, "events.out.tfevents.*"))
    acc = EventAccumulator(path, size_guidance={"histograms": 0})
    acc.Reload()
    hist = acc.Histograms("clip/grad_norm_per_layer")
    assert [h.step for h in hist] == [3, 7, 11, 15] and all(h.histogram_value.num == 4 for h in hist)


def test_one_layout_per_run_merges_both_callbacks_and_optimizers(tmp_path):
    logger = TensorBoardLogger(str(tmp_path), name="two")
    callbacks = [AdaptiveGradientClipping(alpha=1.5), UpdateSparsityMonitor(cumulative=True)]
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=1, max_steps=-1, logger=logger, callbacks=callbacks))
    trainer.fit(TwoOptimizers(), regression_loader())
    (layout,) = read_layout(logger.log_dir)
    sections = [c.title for c in layout.category]
    assert sections == [
        "clip/Adam: norm vs its clipping band",
        "clip/Adam",
        "clip/SGD: norm vs its clipping band",
        "clip/SGD",
        "sparsity/Adam",
        "sparsity/SGD",
    ]
    c = charts(layout)
    assert list(c[("clip/SGD", NORM)].multiline.tag) == ["^clip/SGD/grad_norm$", "^clip/SGD/threshold$"]
    assert c[("clip/SGD: norm vs its clipping band", BAND)].margin.series[0].upper == "clip/SGD/threshold"
    assert (
        list(c[("sparsity/SGD", SPARSITY_CUMULATIVE)].multiline.tag)[1] == "^sparsity/SGD/update_sparsity_cumulative$"
    )
    tags = read_scalars(logger.log_dir)
    for name in ("clip/Adam/update_sparsity", "clip/SGD/threshold", "sparsity/SGD/update_sparsity_cumulative"):
        assert name in tags


@pytest.mark.parametrize("mode", ["norm", "value"])
def test_the_layout_follows_the_mode(tmp_path, mode):
    logger = TensorBoardLogger(str(tmp_path), name=mode)
    cb = AdaptiveGradientClipping(mode=mode, clip_val=0.5, log_sparsity=False)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=3, logger=logger, callbacks=[cb]))
    trainer.fit(TinyRegressor(), regression_loader())
    (layout,) = read_layout(logger.log_dir)
    c = charts(layout)
    if mode == "norm":  # a fixed bound: the threshold is the flat line, and the band chart comes first
        assert [cat.title for cat in layout.category] == ["clip: norm vs its clipping band", "clip"]
        flat = "grad_norm (spiky) vs threshold (flat): a spike above the threshold is clipped"
        assert list(c[("clip", flat)].multiline.tag) == ["^clip/grad_norm$", "^clip/threshold$"]
    else:  # a per-entry bound: no band, the norm with its average, the bound on its own chart
        assert [cat.title for cat in layout.category] == ["clip"]
        assert not any(chart.HasField("margin") for chart in c.values())
        assert [title for _, title in c][:2] == [
            "grad_norm (spiky) and its moving average grad_norm_ema (smooth); value mode: no norm bound",
            "threshold: the per-entry bound clip_val (value mode)",
        ]
    s = read_scalars(logger.log_dir)
    for chart in c.values():
        for pattern in chart.multiline.tag:
            assert any(re.match(pattern, tag) for tag in s), pattern


def test_other_loggers_get_the_scalars_and_no_layout(tmp_path):
    csv = CSVLogger(str(tmp_path), name="csv")
    tb = TensorBoardLogger(str(tmp_path), name="tb")
    cb = AdaptiveGradientClipping(alpha=1.5, histogram_every_n_steps=2)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=6, logger=[csv, tb], callbacks=[cb]))
    trainer.fit(TinyRegressor(), regression_loader())
    import csv as csvlib

    with open(os.path.join(csv.log_dir, "metrics.csv")) as f:
        rows = list(csvlib.DictReader(f))
    for key in CLIP_TAGS:
        assert any(r.get(f"clip/{key}") for r in rows), key
    assert len(read_layout(tb.log_dir)) == 1
    assert "clip/update_sparsity" in read_scalars(tb.log_dir)
    # CSV alone: no error, scalars only
    only = CSVLogger(str(tmp_path), name="only")
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=4, logger=only, callbacks=[UpdateSparsityMonitor()]))
    trainer.fit(TinyRegressor(), regression_loader())
    with open(os.path.join(only.log_dir, "metrics.csv")) as f:
        assert sum(1 for r in csvlib.DictReader(f) if r.get("sparsity/update_sparsity")) == 4


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str):
    with urllib.request.urlopen(url, timeout=5) as r:  # noqa: S310 - loopback only
        return json.loads(r.read().decode())


def test_tensorboard_server_serves_the_tags_and_the_layout(tmp_path):
    logger = TensorBoardLogger(str(tmp_path / "logs"), name="run", version=0)
    cb = AdaptiveGradientClipping(alpha=1.5)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=6, logger=logger, callbacks=[cb]))
    trainer.fit(TinyRegressor(), regression_loader())
    port = _free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tensorboard.main",
            "--logdir",
            str(tmp_path / "logs"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--reload_interval",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        tags, layout = {}, {}
        while time.monotonic() < deadline:
            try:
                tags = _get(f"{base}/data/plugin/scalars/tags")
                layout = _get(f"{base}/data/plugin/custom_scalars/layout")
                if tags.get("run/version_0") and layout.get("category"):
                    break
            except OSError:
                pass
            assert proc.poll() is None, "tensorboard exited"
            time.sleep(0.5)
        run_tags = tags["run/version_0"]
        for key in CLIP_TAGS:
            assert f"clip/{key}" in run_tags, key
        titles = {c["title"]: [ch["title"] for ch in c["chart"]] for c in layout["category"]}
        assert titles == {"clip: norm vs its clipping band": [BAND], "clip": [NORM, COEF, FRAC, NONFINITE, SPARSITY]}
        query = urllib.parse.urlencode({"tag": "clip/grad_norm", "run": "run/version_0"})
        points = _get(f"{base}/data/plugin/scalars/scalars?{query}")
        assert len(points) == 6 and all(math.isfinite(p[2]) for p in points)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
