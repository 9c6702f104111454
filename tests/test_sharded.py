"""Sharded gradients for real: Lightning's ``ModelParallelStrategy`` on 2 CPU processes over gloo (FSDP2 data
parallel and tensor parallel, gradients as DTensors, mixed with plain tensors), the functional core on hand-built
DTensors, and the strategies the callback refuses. One pair of processes runs every check (tests/sharded_run.py);
each assertion compares with an independent value: float64 norms of the full tensors, the rule recomputed from
them, and a one-process run of the same model on the same global batches."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from tests.lightning_ns import pl
from tests.test_ddp import _RANK_VARIABLES, _free_port

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sharded_run.py")
pytestmark = pytest.mark.skipif(
    not hasattr(pl.strategies, "ModelParallelStrategy"), reason="this Lightning has no ModelParallelStrategy"
)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, list[dict]]:
    out = tmp_path_factory.mktemp("sharded")
    for _attempt in range(3):  # another process may grab the free port between the check and the bind
        base = {k: v for k, v in os.environ.items() if k not in _RANK_VARIABLES}
        env = {**base, "PL_DISABLE_FORK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
               "OMP_NUM_THREADS": "1"}
        proc = subprocess.run([sys.executable, SCRIPT, str(out)], capture_output=True, text=True, timeout=300, env=env)
        if "EADDRINUSE" not in proc.stderr:
            break
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = {}
    for name in ("core", "fsdp2", "tp", "fsdp2_resume"):
        records[name] = []
        for rank in range(2):
            with open(out / f"{name}.rank{rank}.json") as f:
                records[name].append(json.load(f))
    return records


@pytest.fixture(scope="module")
def single() -> dict:
    from tests import sharded_run

    pl.seed_everything(0, verbose=False)
    return sharded_run.fit("single", None)


def _rule(pre: list[float], alpha: float, beta: float) -> list[float]:
    """The post-clip norms the adaptive rule gives for these pre-clip norms (float64, from the full norms)."""
    post, m = [], None
    for n in pre:
        post.append(n if m is None else min(n, alpha * m))
        m = n if m is None else beta * m + (1 - beta) * n
    return post


def test_functional_core_on_distributed_tensors(runs):
    a, b = runs["core"]
    assert a == b  # every rank computes the same values
    assert a["norm_False"] == pytest.approx(a["ref"], rel=1e-6)  # Shard(0), Shard(1), Replicate, plain, 2-d mesh,
    assert a["norm_True"] == pytest.approx(a["ref"], rel=1e-6)  # and a Partial (pending-sum) gradient
    assert a["per_False"] == pytest.approx(a["ref_per"], rel=1e-6)
    assert a["per_True"] == pytest.approx(a["ref_per"], rel=1e-6)
    pre5 = math.sqrt(sum(n * n for n in a["ref_per"][:5]))
    assert a["clip_pre"] == pytest.approx(pre5, rel=1e-6)
    assert a["clip_post"] == pytest.approx(2.0, rel=1e-6)  # threshold alpha * m = 2: the local shards were scaled
    assert a["value_max"] == pytest.approx(0.5) and a["value_clipped"]
    assert a["value_post"] == pytest.approx(a["value_post_ref"], rel=1e-6)
    # a nan on rank 1's shard only: nan norm, zeroed step and untouched average on both ranks
    assert not a["nan_norm_finite"] and a["nan_zeroed"] and a["nan_seen"] == 0


@pytest.mark.parametrize("layout", ["fsdp2", "tp"])
def test_sharded_fit_clips_the_whole_model_norm_like_one_process(runs, single, layout):
    from tests.sharded_run import ALPHA, BETA

    a, b = runs[layout]
    assert a["pre"] == b["pre"] and a["post"] == b["post"] and a["ema"] == b["ema"] and a["seen"] == b["seen"] == 6
    assert a["weights"] == b["weights"]
    expected = _rule(a["pre"], ALPHA, BETA)
    assert a["post"] == pytest.approx(expected, rel=1e-5)
    assert any(p < n * 0.99 for p, n in zip(a["post"], a["pre"]))  # some steps clipped ...
    assert any(p == n for p, n in zip(a["post"], a["pre"]))  # ... and some not
    assert a["pre"] == pytest.approx(single["pre"], rel=1e-5)
    assert a["post"] == pytest.approx(single["post"], rel=1e-5)
    assert a["ema"] == pytest.approx(single["ema"], rel=1e-5)
    assert a["weights"] == pytest.approx(single["weights"], rel=1e-4, abs=1e-6)
    assert a["sparsity"] == b["sparsity"] == pytest.approx(single["sparsity"], abs=0.02)


def test_resume_from_a_sharded_checkpoint_is_exact(runs):
    full, resumed = runs["fsdp2"], runs["fsdp2_resume"]
    for rank in range(2):
        assert resumed[rank]["pre"] == full[rank]["pre"][3:]
        assert resumed[rank]["post"] == full[rank]["post"][3:]
        assert resumed[rank]["ema"] == full[rank]["ema"] and resumed[rank]["seen"] == full[rank]["seen"]
        assert resumed[rank]["weights"] == full[rank]["weights"]


def _with_strategy(tmp_path, strategy_class):
    """A Trainer whose strategy is a bare instance of ``strategy_class`` (DeepSpeed needs its package to build)."""
    from tests.conftest import trainer_kwargs

    trainer = pl.Trainer(**trainer_kwargs(tmp_path))
    bare = type(strategy_class.__name__, (strategy_class,), {"is_global_zero": True})  # no process group needed
    trainer._accelerator_connector.strategy = object.__new__(bare)
    return trainer


def test_deepspeed_is_refused_at_setup_naming_what_to_use(tmp_path):
    from lightning_clip import AdaptiveGradientClipping
    from lightning_clip._lightning import strategy_kind

    trainer = _with_strategy(tmp_path, pl.strategies.DeepSpeedStrategy)
    assert strategy_kind(trainer) == "deepspeed"
    with pytest.raises(ValueError, match=r"^Invalid strategy: DeepSpeedStrategy; .*'ddp'.*ModelParallelStrategy"):
        AdaptiveGradientClipping().setup(trainer, None, "fit")


def test_model_parallel_is_accepted_and_fsdp1_refused_at_setup(tmp_path):
    from lightning_clip import AdaptiveGradientClipping
    from lightning_clip._lightning import strategy_kind

    trainer = _with_strategy(tmp_path, pl.strategies.ModelParallelStrategy)
    assert strategy_kind(trainer) == "model_parallel"
    AdaptiveGradientClipping().setup(trainer, None, "fit")
    trainer = _with_strategy(tmp_path, pl.strategies.FSDPStrategy)
    with pytest.raises(ValueError, match=r"^Invalid strategy: FSDPStrategy; .*ModelParallelStrategy\(\) with"):
        AdaptiveGradientClipping().setup(trainer, None, "fit")
