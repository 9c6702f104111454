"""Sharded gradients for real: Lightning's ``ModelParallelStrategy`` on 2 CPU processes over gloo (FSDP2 data
parallel and tensor parallel, gradients as DTensors, mixed with plain tensors), the functional core on hand-built
DTensors, and the strategies the callback refuses. One pair of processes runs every check (tests/sharded_run.py);
each assertion compares with an independent value: float64 norms of the full tensors, the rule recomputed from
them, and a one-process run of the same model on the same global batches."""

from __future__ import annotations

import json
import math
import os

import pytest

from tests.conftest import FSDP2_ON_CPU, FSDP2_SKIP_REASON, launch
from tests.lightning_ns import pl

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sharded_run.py")
FSDP1_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fsdp1_run.py")
pytestmark = pytest.mark.skipif(
    not hasattr(pl.strategies, "ModelParallelStrategy"), reason="this Lightning has no ModelParallelStrategy"
)


def _run_two_processes(script: str, out, names: tuple[str, ...]) -> dict[str, list[dict]]:
    launch([script, str(out)])
    records = {}
    for name in names:
        records[name] = []
        for rank in range(2):
            with open(out / f"{name}.rank{rank}.json") as f:
                records[name].append(json.load(f))
    return records


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, list[dict]]:
    from tests.sharded_run import PRECISIONS

    if not FSDP2_ON_CPU:
        pytest.skip(FSDP2_SKIP_REASON)
    names = ("core", "optimizers", "fsdp2", "tp", "fsdp2_resume", *(f"fsdp2_{p}" for p in PRECISIONS))
    return _run_two_processes(SCRIPT, tmp_path_factory.mktemp("sharded"), names)


@pytest.fixture(scope="module")
def fsdp1_runs(tmp_path_factory) -> dict[str, list[dict]]:
    from tests.fsdp1_run import PRECISIONS

    names = ("lightning_orig", "lightning_flat", "core", *(f"lightning_{p}" for p in PRECISIONS), "lightning_offload")
    return _run_two_processes(FSDP1_SCRIPT, tmp_path_factory.mktemp("fsdp1"), names)


@pytest.fixture(scope="module")
def one_process():
    """The one-process run of the sharded_run model at a precision (each run once per module)."""
    from tests import sharded_run

    cache: dict[str, dict] = {}

    def run(precision: str = "32-true") -> dict:
        if precision not in cache:
            pl.seed_everything(0, verbose=False)
            cache[precision] = sharded_run.fit("single", None, precision=precision)
        return cache[precision]

    return run


@pytest.fixture(scope="module")
def single(one_process) -> dict:
    return one_process()


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


def test_nonfinite_skip_and_error_with_distributed_tensors(runs):
    """A nan in rank 1's shard only: every rank skips the step, or every rank raises the same error naming that
    parameter (counted over the shards, not on the local shard); an overflow names rank 1's largest entry on both."""
    a, b = runs["core"]
    assert a["policy_skip"] == b["policy_skip"] == [True] * 5
    assert a["policy_error"] == b["policy_error"]
    assert a["policy_error"].startswith("Non-finite gradients at step 0 in: w1 (")
    assert a["policy_overflow"] == b["policy_overflow"]
    assert a["policy_overflow"].startswith("Gradient norm overflow at step 0")
    assert "w0 (max |g| = 3e+38)" in a["policy_overflow"]


@pytest.mark.parametrize("case", ["sign_foreach=False", "sign_foreach=True", "norm_foreach=False", "norm_foreach=True"])
def test_smoothed_optimizers_step_dtensor_parameters_like_float64(runs, case):
    """SmoothedSignSGD / SmoothedNormSGD with DTensor parameters (as under FSDP2 and tensor parallel), the for-loop
    kernel (the CPU default) and the multi-tensor one: every parameter, the one larger than a chunk included, ends
    where the float64 formula on the full tensors puts it, the same on both ranks."""
    a, b = runs["optimizers"]
    assert a["large"]
    assert "error" not in a[case], a[case]
    assert a[case]["types"] == ["DTensor"]
    assert a[case]["moved"] > 1e-4 and a[case]["err"] < 1e-3 * a[case]["moved"]
    assert a[case]["sums"] == b[case]["sums"]


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


@pytest.mark.parametrize(
    ("precision", "grads", "post_rel", "one_rel"),
    [
        ("bf16-mixed", "DTensor torch.float32", 1e-5, 3e-2),
        ("bf16-true", "DTensor torch.bfloat16", 4e-3, 3e-2),
        ("16-true", "DTensor torch.float16", 1e-3, 5e-3),
    ],
    ids=["bf16-mixed", "bf16-true", "16-true"],
)
def test_fsdp2_low_precision_norm_accumulated_in_float32_like_one_process(
    runs, one_process, precision, grads, post_rel, one_rel
):
    """FSDP2 under bf16-mixed (float32 gradients of a bf16-autocast forward), bf16-true and 16-true (bf16 / float16
    DTensor gradients; 16-true with SGD, as Adam in pure float16 diverges by itself): the callback's norm is the
    float64 norm of the gradients it saw to float32 rounding (a bf16 or float16 sum would be off by ~1e-3, or
    overflow), every rank agrees, and the run follows the one-process run of the same precision. That comparison is
    loose: the two runs reduce the batch in a different order in low precision (unit roundoff 2^-9 = 2e-3 per
    operation for bf16, 2^-11 = 5e-4 for float16, a few operations deep, compounded by 6 steps), far below the
    steps' own spread."""
    from tests.sharded_run import ALPHA, BETA

    a, b = ({k: v for k, v in r.items() if k != "rank"} for r in runs[f"fsdp2_{precision}"])
    assert a == b and a["seen"] == 6
    assert a["grads"] == [grads]
    m = a["pre"][0]
    for n in a["pre"][1:]:
        m = BETA * m + (1 - BETA) * n
    assert a["ema"] == pytest.approx(m, rel=1e-5)  # the callback's norms are the float64 ones to float32 rounding
    # true half precision: the scaled entries are rounded back to bf16 / float16 (2^-9 / 2^-11 relative each), so
    # the post-clip norm is the threshold to that rounding only
    expected = _rule(a["pre"], ALPHA, BETA)
    assert a["post"] == pytest.approx(expected, rel=post_rel)
    assert any(p < n * 0.99 for p, n in zip(expected, a["pre"]))  # some steps clipped
    one = one_process(precision)
    assert one["grads"] == [grads.replace("DTensor", "Tensor")]
    assert a["pre"] == pytest.approx(one["pre"], rel=one_rel)
    assert a["ema"] == pytest.approx(one["ema"], rel=one_rel)


@pytest.mark.parametrize("precision", ["16-mixed", "64-true"])
def test_model_parallel_strategy_refuses_the_16_mixed_and_64_true_flags(precision):
    """Lightning's own check of the ``precision=`` flag, at the Trainer's construction (a precision plugin instance
    passes it: see the next test)."""
    strategy = pl.strategies.ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    with pytest.raises(ValueError, match=rf"`ModelParallelStrategy` does not support .*precision='{precision}'"):
        pl.Trainer(accelerator="cpu", devices=2, strategy=strategy, precision=precision, logger=False)


def _finite_rule(pre: list[float], alpha: float, beta: float) -> list[float]:
    """:func:`_rule` over the finite steps only (the others leave the average alone)."""
    finite = [n for n in pre if math.isfinite(n)]
    post = iter(_rule(finite, alpha, beta))
    return [next(post) if math.isfinite(n) else n for n in pre]


@pytest.mark.parametrize("precision", ["16-mixed", "64-true"])
def test_fsdp2_16_mixed_and_64_true_through_precision_plugins(runs, one_process, precision):
    """FSDP2 with ``MixedPrecision("16-mixed")`` and a real ``GradScaler`` (float16 autocast, float32 DTensor
    gradients), or with ``DoublePrecision()`` (float64 DTensor gradients): the post-clip norm follows the rule
    recomputed from the float64 full norms, every rank agrees, and the run follows the one-process run with the same
    plugin. Under the scaler, the steps it skipped (float16 overflow, forced by a large initial scale: as many as it
    halved its scale) keep their non-finite gradients for it and are not counted."""
    from tests.sharded_run import ALPHA, BETA, INIT_SCALE

    a, b = ({k: v for k, v in r.items() if k != "rank"} for r in runs[f"fsdp2_{precision}"])
    assert a == b
    dtype = "float32" if precision == "16-mixed" else "float64"
    assert a["grads"] == [f"DTensor torch.{dtype}"]
    assert a["precision_plugin"] == ("MixedPrecision" if precision == "16-mixed" else "DoublePrecision")
    if precision == "16-mixed":
        skipped = [after < before for before, after in zip([INIT_SCALE, *a["scales"][:-1]], a["scales"])]
        assert [not math.isfinite(n) for n in a["pre"]] == skipped and 1 <= sum(skipped) <= 3
    finite = [n for n in a["pre"] if math.isfinite(n)]
    assert a["seen"] == len(finite)
    m = finite[0]
    for n in finite[1:]:
        m = BETA * m + (1 - BETA) * n
    assert a["ema"] == pytest.approx(m, rel=1e-5)
    expected = _finite_rule(a["pre"], ALPHA, BETA)
    assert a["post"] == pytest.approx(expected, rel=1e-5, nan_ok=True)
    assert any(p < n * 0.99 for p, n in zip(expected, a["pre"]))  # some steps clipped
    one = one_process(precision)
    assert one["precision_plugin"] == a["precision_plugin"]
    # float16 autocast of half batches against whole ones: float16 rounding (2^-11) a few operations deep
    rel = 1e-3 if precision == "16-mixed" else 1e-6
    assert [math.isfinite(n) for n in one["pre"]] == [math.isfinite(n) for n in a["pre"]]
    assert a["pre"] == pytest.approx(one["pre"], rel=rel, nan_ok=True)
    assert a["post"] == pytest.approx(one["post"], rel=rel, nan_ok=True)
    assert a["ema"] == pytest.approx(one["ema"], rel=rel)


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


def test_model_parallel_and_fsdp1_are_accepted_at_setup(tmp_path):
    from lightning_clip import AdaptiveGradientClipping
    from lightning_clip._lightning import strategy_kind

    trainer = _with_strategy(tmp_path, pl.strategies.ModelParallelStrategy)
    assert strategy_kind(trainer) == "model_parallel"
    AdaptiveGradientClipping().setup(trainer, None, "fit")
    trainer = _with_strategy(tmp_path, pl.strategies.FSDPStrategy)
    assert strategy_kind(trainer) == "fsdp"
    AdaptiveGradientClipping().setup(trainer, None, "fit")


@pytest.mark.parametrize("orig", [True, False], ids=["use_orig_params", "flat_params"])
def test_fsdp1_strategy_fit_clips_the_whole_model_norm_like_one_process(fsdp1_runs, single, orig):
    """Lightning's FSDPStrategy (FSDP1, FULL_SHARD), 2 processes: the norm the callback clips is torch's own FSDP
    norm, and equals a one-process run on the same global batches."""
    from tests.sharded_run import ALPHA, BETA

    a, b = fsdp1_runs["lightning_orig" if orig else "lightning_flat"]
    assert a == b and a["seen"] == 6  # every rank: the same norms and state
    assert a["post"] == pytest.approx(_rule(a["pre"], ALPHA, BETA), rel=1e-5)  # pre and post: torch's clip_grad_norm_
    assert a["pre"] == pytest.approx(a["ref"], rel=1e-6)  # torch's norm is the float64 norm of the whole gradient
    assert any(p < n * 0.99 for p, n in zip(a["post"], a["pre"]))
    assert a["pre"] == pytest.approx(single["pre"], rel=1e-5)
    assert a["post"] == pytest.approx(single["post"], rel=1e-5)
    assert a["ema"] == pytest.approx(single["ema"], rel=1e-5)


@pytest.mark.parametrize(
    ("precision", "one_rel"),
    [("bf16-mixed", 3e-2), ("16-mixed", 1e-3), ("bf16-true", 3e-2), ("16-true", 5e-3)],
    ids=["bf16-mixed", "16-mixed", "bf16-true", "16-true"],
)
def test_fsdp1_strategy_precisions_norm_is_torchs_and_float64_like_one_process(
    fsdp1_runs, one_process, precision, one_rel
):
    """Lightning's FSDPStrategy under each precision its ``FSDPPrecision`` takes, with FSDP's own mixed precision
    as the plugin configures it (bf16 / float16 reduction, and parameters: Lightning versions differ on which, and on
    whether the true precisions convert the sharded parameters; on CPU the plugin's autocast is CUDA's, so FSDP's
    dtypes make the precision), 16-mixed with a CPU ``ShardedGradScaler``, 16-true with SGD: the callback's average
    is the float64 norm of the whole gradient (local shards summed over the ranks) to float32 rounding; torch's
    ``clip_grad_norm_`` gives that norm (returned in the gradients' dtype: rounded for bf16 / float16) and, after the
    callback, the threshold; every rank agrees; the run follows the one-process run of the same precision. Under
    the scaler, the steps it skipped (float16 overflow: as many as it halved its scale) are not counted."""
    import warnings

    from torch import nn

    from tests.sharded_run import ALPHA, BETA, INIT_SCALE

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 16-mixed: Lightning's scaler is a CUDA one, disabled here
        plugin = pl.plugins.precision.FSDPPrecision(precision)
    grads = str(plugin.convert_module(nn.Linear(1, 1)).weight.dtype)
    # torch returns its norm in the gradients' dtype, and the clipped entries are rounded back to it
    torch_rel, post_rel = {
        "torch.float32": (1e-6, 1e-5),
        "torch.bfloat16": (4e-3, 8e-3),
        "torch.float16": (1e-3, 2e-3),
    }[grads]
    a, b = fsdp1_runs[f"lightning_{precision}"]
    assert a == b
    assert a["grads"] == [grads] and a["mixed_precision"] == str(plugin.mixed_precision_config.param_dtype)
    assert a["reduce_dtype"] == str(plugin.mixed_precision_config.reduce_dtype) != "torch.float32"
    finite = [math.isfinite(n) for n in a["ref"]]
    if precision == "16-mixed":
        skipped = [after < before for before, after in zip([INIT_SCALE, *a["scales"][:-1]], a["scales"])]
        assert [not f for f in finite] == skipped and 1 <= sum(skipped) <= 3
    else:
        assert all(finite)
    ref = [n for n in a["ref"] if math.isfinite(n)]
    assert a["seen"] == len(ref)
    m = ref[0]
    for n in ref[1:]:
        m = BETA * m + (1 - BETA) * n
    assert a["ema"] == pytest.approx(m, rel=1e-5)  # accumulated in float32 at least, whatever the gradients' dtype
    kept = [i for i, f in enumerate(finite) if f]
    assert [a["pre"][i] for i in kept] == pytest.approx(ref, rel=torch_rel)
    expected = [e for e, f in zip(_finite_rule(a["ref"], ALPHA, BETA), finite) if f]
    assert [a["post"][i] for i in kept] == pytest.approx(expected, rel=post_rel)
    assert any(e < n * 0.99 for e, n in zip(expected, ref))  # some steps clipped
    one = one_process(precision)
    assert [math.isfinite(n) for n in one["pre"]] == finite
    assert a["ref"] == pytest.approx(one["pre"], rel=one_rel)
    assert a["ema"] == pytest.approx(one["ema"], rel=one_rel)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"precision": "64-true"}, ValueError, r"^`precision='64-true'\)` is not supported in FSDP"),
        (
            {"plugins": "DoublePrecision"},
            TypeError,
            r"^The FSDP strategy can only work with the `FSDPPrecision` plugin",
        ),
    ],
    ids=["flag", "plugin"],
)
def test_fsdp1_strategy_refuses_64_true(kwargs, error, message):
    """Lightning's own checks, at the Trainer's construction: ``FSDPPrecision`` has no 64-true, and
    ``FSDPStrategy`` takes no other precision plugin."""
    from tests.fsdp1_run import CPUFSDPStrategy

    if "plugins" in kwargs:
        kwargs = {"plugins": [pl.plugins.precision.DoublePrecision()]}
    with pytest.raises(error, match=message):
        pl.Trainer(accelerator="cpu", devices=2, strategy=CPUFSDPStrategy(), logger=False, **kwargs)


def test_fsdp1_strategy_16_mixed_flag_makes_a_cuda_scaler():
    """``precision="16-mixed"``: Lightning's ``FSDPPrecision`` makes a CUDA ``ShardedGradScaler``, disabled without
    CUDA (the fit then runs without loss scaling), and refuses a ``scaler`` argument (its check reads the class's
    default precision before setting its own): the runs above set a CPU scaler on the plugin instead."""
    import torch
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

    plugin = pl.plugins.precision.FSDPPrecision("16-mixed")
    assert isinstance(plugin.scaler, ShardedGradScaler) and plugin.scaler._device == "cuda"
    assert plugin.scaler.is_enabled() == torch.cuda.is_available()
    with pytest.raises(ValueError, match=r"^`precision='16-mixed'` does not use a scaler, found "):
        pl.plugins.precision.FSDPPrecision("16-mixed", scaler=ShardedGradScaler(device="cpu"))


def test_fsdp1_strategy_cpu_offload(fsdp1_runs, single):
    """``FSDPStrategy(cpu_offload=True)`` (``CPUOffload(offload_params=True)``): where an accelerator exists, the
    same checks as without; on a machine without one torch's FSDP refuses it at the first forward, pinning the
    offloaded shards' memory (``RuntimeError: Cannot access accelerator device when none is available.``; torch 2.6:
    ``CPU device type not an accelerator.``)."""
    import torch

    from tests.sharded_run import ALPHA, BETA

    a, b = fsdp1_runs["lightning_offload"]
    assert a == b
    if "error" in a:
        assert not torch.cuda.is_available()
        assert a["error"].startswith("RuntimeError: ") and "accelerator" in a["error"]
        assert a["function"] == "init_flat_param_attributes" and ".pin_memory(" in a["line"]
        return
    assert a["offload"] and a["seen"] == 6
    assert a["pre"] == pytest.approx(a["ref"], rel=1e-6)
    assert a["post"] == pytest.approx(_rule(a["pre"], ALPHA, BETA), rel=1e-5)
    assert a["pre"] == pytest.approx(single["pre"], rel=1e-5)
    assert a["ema"] == pytest.approx(single["ema"], rel=1e-5)


FSDP1_CONFIGS = ["full_flat", "full_orig", "grad_op", "no_shard", "hybrid_1x2", "hybrid_2x1", "mixed"]


@pytest.mark.parametrize("config", FSDP1_CONFIGS)
def test_fsdp1_norm_and_clip_equal_torchs_clip_grad_norm(fsdp1_runs, config):
    """torch's FSDP directly (flat parameters, every sharding strategy): the norm is
    ``FullyShardedDataParallel.clip_grad_norm_``'s and the float64 norm of an unsharded copy; the clipped local
    gradients are torch's; the per-tensor norms add up to the post-clip norm."""
    a, b = (run[config] for run in fsdp1_runs["core"])
    ref = fsdp1_runs["core"][0]["ref"]
    for r in (a, b):
        assert r["norm"] == pytest.approx(r["torch_norm"], rel=1e-6)
        for ours, theirs in zip(r["grads"], r["torch_grads"]):  # clip_val / n vs torch's max_norm / (n + 1e-6)
            assert ours == pytest.approx(theirs, rel=1e-5, abs=1e-7)
        if config != "hybrid_2x1":
            assert r["norm"] == pytest.approx(ref, rel=1e-6)
            assert math.sqrt(r["per_sq_sum"]) == pytest.approx(0.5, rel=1e-5)  # post-clip norm = clip_val
    if config == "hybrid_2x1":  # torch does not average the 2 replicas' gradients there (see tests/fsdp1_run.py)
        assert not a["sharded"] and a["norm"] != b["norm"]
    else:
        assert a["norm"] == b["norm"] and a["sharded"] == (config != "no_shard")


@pytest.mark.parametrize("config", FSDP1_CONFIGS)
def test_fsdp1_nonfinite_skip_and_error_on_every_rank(fsdp1_runs, config):
    """A nan in rank 1's shard only (in every rank's whole gradient for NO_SHARD): every rank skips the step (every
    grad None) and every rank raises the same error, naming the parameter; an overflow names the largest entries."""
    a, b = (run[config] for run in fsdp1_runs["core"])
    assert all(a["skip"]) and all(b["skip"])
    assert a["error"] == b["error"]
    assert a["error"].startswith("Non-finite gradients at step 0 in: ") and "_fsdp_wrapped_module" in a["error"]
    for r in (a, b):
        assert r["overflow"].startswith("Gradient norm overflow at step 0") and "max |g| =" in r["overflow"]
    if config != "hybrid_2x1":
        assert a["overflow"] == b["overflow"]
