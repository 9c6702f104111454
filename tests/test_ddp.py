"""Real DDP over gloo on CPU: every rank sees the all-reduced gradient, so the state is the same everywhere and
equals the single-process run over the same global batches."""

import json
import math
import os

import pytest

from tests.conftest import launch

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ddp_run.py")


PRECISIONS = ("32-true", "bf16-mixed", "bf16-true", "64-true", "16-true", "16-mixed")


def _run(tmp_path, devices: int, batch_size: int) -> dict[str, list[dict]]:
    out = str(tmp_path / f"d{devices}")
    launch([SCRIPT, out, str(devices), str(batch_size), *PRECISIONS])
    records: dict[str, list[dict]] = {}
    for precision in PRECISIONS:
        records[precision] = []
        for rank in range(devices):
            with open(f"{out}.{precision}.rank{rank}") as f:
                records[precision].append(json.load(f))
    return records


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[dict[str, list[dict]], dict[str, list[dict]]]:
    tmp = tmp_path_factory.mktemp("ddp")
    return _run(tmp, devices=2, batch_size=8), _run(tmp, devices=1, batch_size=16)  # the same global batches of 16


def test_ddp_ranks_agree_and_match_one_process(runs):
    ddp, single = runs[0]["32-true"], runs[1]["32-true"][0]
    assert ddp[0]["seen"] == ddp[1]["seen"] == single["seen"] == 6
    assert ddp[0]["ema"] == ddp[1]["ema"]
    assert ddp[0]["weights"] == ddp[1]["weights"]
    assert ddp[0]["ema"] == pytest.approx(single["ema"], rel=1e-5)
    assert ddp[0]["weights"] == pytest.approx(single["weights"], rel=1e-4, abs=1e-6)


def _ema(norms: list[float], beta: float = 0.7) -> float:
    m = norms[0]
    for n in norms[1:]:
        m = beta * m + (1 - beta) * n
    return m


@pytest.mark.parametrize(
    ("precision", "dtype", "rel"),
    [
        ("bf16-mixed", "torch.float32", 3e-2),
        ("bf16-true", "torch.bfloat16", 3e-2),
        ("16-true", "torch.float16", 1e-2),
        ("64-true", "torch.float64", 1e-5),
    ],
)
def test_ddp_precisions_norm_accumulated_in_float32_at_least(runs, precision, dtype, rel):
    """Under DDP the hook sees the all-reduced gradients: the average follows the float64 norms of exactly those
    gradients to float32 rounding, on both ranks alike; against one process only the precision's own rounding (the
    ranks reduce the batch in another order) separates the runs."""
    ddp, single = runs[0][precision], runs[1][precision][0]
    assert ddp[0]["grad_dtype"] == dtype
    assert ddp[0]["ema"] == ddp[1]["ema"] and ddp[0]["weights"] == ddp[1]["weights"]
    assert ddp[0]["seen"] == single["seen"] == 6
    for record in (*ddp, single):
        assert record["ema"] == pytest.approx(_ema(record["norms"]), rel=1e-5)  # the state is kept in float32
    assert ddp[0]["ema"] == pytest.approx(single["ema"], rel=rel)


def test_ddp_16_mixed_with_a_real_grad_scaler(runs):
    """float16 autocast with a real CPU ``GradScaler`` (Lightning's ``MixedPrecision`` plugin) under DDP: the hook
    sees the unscaled, all-reduced gradients; the average is the float64 reference of exactly those norms to float32
    rounding; the steps the scaler skipped (float16 overflow, forced by a large initial scale) are not counted, as
    many as the scaler halved its scale and as the optimizer did not step; every rank alike."""
    from tests.ddp_run import INIT_SCALE

    ddp, single = runs[0]["16-mixed"], runs[1]["16-mixed"][0]
    a, b = ddp
    assert a["precision_plugin"] == "MixedPrecision" and a["grad_dtype"] == "torch.float32"
    assert {k: v for k, v in a.items() if k != "rank"} == {k: v for k, v in b.items() if k != "rank"}
    for record in (a, single):
        scales_before = [INIT_SCALE, *record["scales"][:-1]]
        skipped = [after < before for before, after in zip(scales_before, record["scales"])]  # the scaler's skips
        finite = [math.isfinite(n) for n in record["hook_norms"]]
        assert finite == [not s for s in skipped]
        assert 1 <= sum(skipped) <= 3  # some steps overflowed, enough were taken
        assert record["adam_steps"][-1] == 6 - sum(skipped)  # the optimizer's own count of the steps it took
        assert record["seen"] == record["steps"] == 6 - sum(skipped)  # the skipped steps are not counted ...
        assert record["nonfinite"] == sum(skipped)  # ... as steps: as non-finite ones
        norms = [n for n in record["hook_norms"] if math.isfinite(n)]
        assert record["ema"] == pytest.approx(_ema(norms), rel=1e-5)  # float64 reference of the hook's gradients
        for scaled, unscaled, scale in zip(record["norms"], record["hook_norms"], scales_before):
            if math.isfinite(unscaled):  # the backward's gradients were loss-scaled; the hook's are not
                assert scaled / scale == pytest.approx(unscaled, rel=1e-6)
    # the all-reduced gradient is the one-process gradient of the global batch: equal while both runs took the same
    # steps (float16 rounding of the per-rank halves apart)
    same = 0
    while same < 6 and math.isfinite(a["hook_norms"][same]) == math.isfinite(single["hook_norms"][same]):
        same += 1
    compared = [(x, y) for x, y in zip(a["hook_norms"][:same], single["hook_norms"][:same]) if math.isfinite(x)]
    assert compared
    for x, y in compared:
        assert x == pytest.approx(y, rel=1e-3)
