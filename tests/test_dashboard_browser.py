"""The dashboard as a browser shows it: a real run, a real ``tensorboard`` server, headless Chromium.

Drives Chromium with ``examples/screenshot_dashboard.py`` (the DevTools protocol on a pipe, standard library only)
and reads the CUSTOM SCALARS tab from the page's DOM. Skipped when no Chromium binary is found (Debian:
``apt-get install --no-install-recommends chromium``; or ``$CHROMIUM=/path/to/chrome``).
"""

from __future__ import annotations

import os
import re
import sys

import pytest

from lightning_clip import AdaptiveGradientClipping
from tests.conftest import TinyRegressor, regression_loader, trainer_kwargs
from tests.lightning_ns import pl

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
import screenshot_dashboard as shot  # noqa: E402

CHROMIUM = shot.find_chromium()
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no Chromium binary (Debian: apt-get install --no-install-recommends chromium; or set $CHROMIUM)",
)

SPIKE_STEP = 29  # a logging step with log_every_n_steps=5: (29 + 1) % 5 == 0
BAND = "grad_norm (line) vs band [grad_norm_ema, threshold] (shaded): above the band = clipped step"
NORM = "grad_norm (spiky) vs threshold (smooth): a spike above the threshold is clipped"
CHARTS = {  # title -> the tags it lists under "Matches", in the page's order
    BAND: ["clip/grad_norm"],
    NORM: ["clip/grad_norm", "clip/threshold"],
    "clip_coef_min, clip_coef: post/pre-clip norm (1 = untouched, a dip = clipped)": [
        "clip/clip_coef",
        "clip/clip_coef_min",
    ],
    "clipped_frac: fraction of the steps since the last log that were clipped": ["clip/clipped_frac"],
    "nonfinite_steps: inf/nan steps since the last log (0 = none)": ["clip/nonfinite_steps"],
    "update_sparsity (this step), update_sparsity_cumulative (since the last log): negligible updates": [
        "clip/update_sparsity",
        "clip/update_sparsity_cumulative",
    ],
}

# The points the key (margin) chart was given to draw: [step, value, lower, upper] of its one series.
_MARGIN_POINTS_JS = r"""
(() => {
  const deepAll = (s, root) => {
    let found = [...root.querySelectorAll(s)];
    for (const el of root.querySelectorAll('*')) if (el.shadowRoot) found = found.concat(deepAll(s, el.shadowRoot));
    return found;
  };
  const card = deepAll('tf-custom-scalar-margin-chart-card', document)[0];
  return Object.values(card._nameToDataSeries).map(
    (series) => series.getData().map((p) => [p.step, p.scalar, p.lower, p.upper]))[0];
})()
"""


class SpikyRegressor(TinyRegressor):
    """The tiny regressor with the loss (and so the gradient) multiplied by 1000 at one step."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * 1000 if self.trainer.global_step == SPIKE_STEP else loss


def _tags(series: list[str]) -> list[str]:
    """``"◼ clip/grad_norm (run/version_0)"`` -> ``"clip/grad_norm"``."""
    return [re.sub(r"^\W\s*|\s*\([^()]*\)$", "", s) for s in series]


def test_custom_scalars_tab_shows_the_key_chart_first_with_named_series_and_the_spike_above_the_band(tmp_path):
    logger = pl.loggers.TensorBoardLogger(str(tmp_path / "logs"), name="run", version=0)
    cb = AdaptiveGradientClipping(sparsity_cumulative=True)
    kwargs = trainer_kwargs(tmp_path, max_steps=40, logger=logger, callbacks=[cb], log_every_n_steps=5)
    pl.Trainer(**kwargs).fit(SpikyRegressor(), regression_loader())

    with (
        shot.TensorBoard(str(tmp_path / "logs"), ready_timeout=60) as server,
        shot.Chromium(CHROMIUM, width=1200) as browser,
    ):
        state = shot.open_dashboard(browser, server, smoothing=0, ignore_outliers=False, log_scale=[BAND, NORM])
        points = browser.evaluate(_MARGIN_POINTS_JS)
        out = str(tmp_path / "dashboard.png")
        size = browser.screenshot(out)

    # the sections and charts as the page shows them: the key chart alone in the first section, then the rest
    assert state["sections"] == ["clip: norm vs its clipping band", "clip"]
    cards = state["cards"]
    assert [c["title"] for c in cards] == list(CHARTS)
    assert cards[0]["kind"] == "margin" and all(c["kind"] == "multiline" for c in cards[1:])
    # every chart names its series (the "Matches" list, from the DOM) and has drawn them, without an error
    for card in cards:
        assert sorted(_tags(card["series"])) == sorted(CHARTS[card["title"]]), card
        assert card["matches"] == f"Matches ({len(CHARTS[card['title']])})"
        assert card["drawn"] >= 1 and not card["loading"] and not card["errors"], card
    # the settings the page runs with: smoothing 0 from the URL, outliers kept, log scale on the norm charts
    assert state["smoothing"] == 0 and state["ignore_outliers"] is False
    assert [c["log_scale"] for c in cards] == [True, True, False, False, False, False]
    # the key chart's points: every logged step; the spike's norm above the band's upper edge (the threshold)
    assert [p[0] for p in points] == list(range(4, 40, 5))
    above = [step for step, value, lower, upper in points if value > upper]
    assert above == [SPIKE_STEP]
    with open(out, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n" and size > 20_000


def test_key_chart_draws_when_step_zero_is_logged(tmp_path):
    logger = pl.loggers.TensorBoardLogger(str(tmp_path / "logs"), name="run", version=0)
    kwargs = trainer_kwargs(tmp_path, max_steps=6, logger=logger, callbacks=[AdaptiveGradientClipping()])
    pl.Trainer(**kwargs).fit(TinyRegressor(), regression_loader())  # log_every_n_steps=1: step 0 is logged
    with shot.TensorBoard(str(tmp_path / "logs"), ready_timeout=60) as server, shot.Chromium(CHROMIUM) as browser:
        browser.navigate(f"{server.url}/#custom_scalars&_smoothingWeight=0")
        card = browser.wait_for(
            f"(() => {{ const s = {shot._STATE_JS}; const c = s && s.cards.find((c) => c.kind === 'margin');"
            " return c && !c.loading && (c.errors.length || c.drawn) ? c : null; })()",
            60,
            "the margin chart",
        )
    assert not card["errors"] and card["drawn"] >= 1, card
