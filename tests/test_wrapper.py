"""AdaptiveClippingOptimizer: the callback's rule as a torch optimizer wrapper, in plain PyTorch, DDP, AMP, Fabric and
Lightning, checked against float64 references, torch's own clipping and the callback's own run."""

from __future__ import annotations

import copy
import json
import math
import os
import pickle
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

from lightning_clip import (
    AdaptiveClippingOptimizer,
    AdaptiveGradientClipping,
    SmoothedNormSGD,
    SmoothedSignSGD,
    log_clipping,
)
from lightning_clip._scaling import cpu_fast_path
from tests.conftest import (
    FSDP2_ON_CPU,
    FSDP2_SKIP_REASON,
    TinyRegressor,
    launch,
    no_host_sync,
    norm64,
    read_layout,
    read_scalars,
    regression_loader,
    trainer_kwargs,
)
from tests.lightning_ns import NS, pl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))


def _batches(n: int = 64, batch_size: int = 8):
    return list(regression_loader(n=n, batch_size=batch_size))


def _train(model, opt, batches, *, spike=(), poison=(), scaler=None, closure=False):
    """A plain loop: step ``s`` multiplies its loss by 100 when in ``spike``, puts a nan in a gradient in ``poison``."""
    grads = []
    for step, (x, y) in enumerate(batches):

        def compute():
            loss = nn.functional.mse_loss(model(x), y) * (100.0 if step in spike else 1.0)
            (scaler.scale(loss) if scaler is not None else loss).backward()
            if step in poison:
                model[-1].weight.grad[0, 0] = float("nan")
            return loss

        if closure:
            opt.step(compute)
        else:
            compute()
            grads.append(norm64([p.grad for p in model.parameters()]))
            if scaler is not None:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
        opt.zero_grad()
    return grads


def _same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


# ------------------------------------------------------------------------------------------------------ the rule
def test_follows_the_rule_against_float64_and_clip_grad_norm():
    alpha, beta = 1.05, 0.7
    model = _net()
    opt = AdaptiveClippingOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), alpha=alpha, beta=beta)
    m = None
    clipped = []
    for step, (x, y) in enumerate(_batches()):
        nn.functional.mse_loss(model(x), y).backward()
        n = norm64([p.grad for p in model.parameters()])
        reference = [p.grad.detach().clone() for p in model.parameters()]
        before = [p.detach().clone() for p in model.parameters()]
        opt.step()
        stats = opt.last_stats
        assert float(stats.norm) == pytest.approx(n, rel=1e-6)
        if m is None:
            assert math.isinf(float(stats.threshold))
            m = n
        else:
            assert float(stats.threshold) == pytest.approx(alpha * m, rel=1e-6)
            holders = [nn.Parameter(torch.zeros_like(r)) for r in reference]
            for h, r in zip(holders, reference):
                h.grad = r
            torch.nn.utils.clip_grad_norm_(holders, alpha * m)  # torch's clipping at the same bound
            m = beta * m + (1 - beta) * n
        clipped.append(bool(stats.clipped))
        applied = [(b.double() - p.detach().double()) / 0.1 for b, p in zip(before, model.parameters())]  # SGD's g
        for g, r in zip(applied, reference):
            torch.testing.assert_close(g, r.double(), rtol=1e-3, atol=1e-5)
        assert float(opt.clip_state().ema) == pytest.approx(m, rel=1e-5)
        opt.zero_grad()
    assert set(clipped) == {True, False}
    assert opt.steps == 8


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"alpha": 0.0}, ValueError, "Invalid alpha: 0.0"),
        ({"beta": 1.5}, ValueError, "Invalid beta: 1.5"),
        ({"max_norm": -1.0}, ValueError, "Invalid max_norm: -1.0"),
        ({"mode": "zclip"}, ValueError, "Invalid mode: 'zclip'"),
        ({"nonfinite": "ignore"}, ValueError, "Invalid nonfinite: 'ignore'"),
        ({"clip_val": 1.0}, ValueError, "Invalid clip_val: 1.0"),
        ({"alpha": True}, TypeError, "Invalid alpha: True"),
        ({"fused": True, "foreach": True}, ValueError, "Invalid"),
    ],
)
def test_bad_arguments_raise_as_the_callbacks_do(kwargs, error, match):
    with pytest.raises(error, match=match):
        AdaptiveGradientClipping(**kwargs)
    with pytest.raises(error, match=match):
        AdaptiveClippingOptimizer(torch.optim.SGD(_net().parameters(), lr=0.1), **kwargs)


def test_refuses_what_is_not_an_optimizer_and_double_wrapping():
    model = _net()
    with pytest.raises(TypeError, match="Invalid optimizer: .*expected a torch.optim.Optimizer"):
        AdaptiveClippingOptimizer(list(model.parameters()))
    inner = AdaptiveClippingOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="Invalid optimizer: AdaptiveClippingOptimizer.*twice"):
        AdaptiveClippingOptimizer(inner)


def test_import_and_dashboard_logging_do_not_load_lightning(tmp_path):
    code = (
        "import sys, torch, tempfile\n"
        "from torch.utils.tensorboard import SummaryWriter\n"
        "from lightning_clip.wrapper import AdaptiveClippingOptimizer, log_clipping\n"
        "p = torch.nn.Parameter(torch.ones(3)); opt = AdaptiveClippingOptimizer(torch.optim.SGD([p], lr=0.1))\n"
        "p.sum().backward(); opt.step()\n"
        f"log_clipping(SummaryWriter({str(tmp_path)!r}), opt, 0)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"
    assert "clip/grad_norm" in read_scalars(tmp_path)


# ------------------------------------------------------------------------------------------- a torch optimizer
def test_is_a_torch_optimizer_to_schedulers_groups_hooks_and_closures():
    model = _net()
    base = torch.optim.SGD([{"params": model[0].parameters()}], lr=0.1, momentum=0.9)
    opt = AdaptiveClippingOptimizer(base, alpha=2.0)
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.param_groups is base.param_groups and opt.state is base.state and opt.defaults is base.defaults
    opt.add_param_group({"params": model[2].parameters(), "lr": 0.01})  # a second group, its own lr
    assert len(base.param_groups) == 2
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append("post"))
    batches = _batches()
    _train(model, opt, batches[:4], closure=True)  # step(closure): the closure's backward is clipped
    for _ in range(4):
        sched.step()
    assert [g["lr"] for g in base.param_groups] == [pytest.approx(0.1 / 4), pytest.approx(0.01 / 4)]
    assert calls == ["pre", "post"] * 4
    assert len(base.state) == 4 and all("momentum_buffer" in s for s in base.state.values())
    # both groups count in the norm: the one of the last step is the float64 norm over the four tensors
    x, y = batches[4]
    nn.functional.mse_loss(model(x), y).backward()
    n = norm64([p.grad for p in model.parameters()])
    opt.step()
    assert float(opt.last_stats.norm) == pytest.approx(n, rel=1e-6)
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    assert int(opt.clip_state().seen) == 5 and opt.steps == 5


def test_resume_from_a_weights_only_checkpoint_is_bit_exact(tmp_path):
    batches = _batches(n=96)

    def fresh():
        model = _net()
        return model, AdaptiveClippingOptimizer(torch.optim.Adam(model.parameters(), lr=0.05), alpha=1.1, beta=0.7)

    model_a, opt_a = fresh()
    _train(model_a, opt_a, batches, spike={3}, poison={8})

    model_b, opt_b = fresh()
    _train(model_b, opt_b, batches[:6], spike={3})
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model_b.state_dict(), "optimizer": opt_b.state_dict()}, path)
    checkpoint = torch.load(path, weights_only=True)
    model_c, opt_c = fresh()
    model_c.load_state_dict(checkpoint["model"])
    opt_c.load_state_dict(checkpoint["optimizer"])
    assert opt_c.steps == 6 and opt_c.clip_state() is None  # materialised on the gradients' device at the next step
    _train(model_c, opt_c, batches[6:], spike={-3}, poison={2})  # step 8 of the run is the poisoned one

    assert _same(model_a.parameters(), model_c.parameters())
    for key, value in opt_a.clip_state().state_dict().items():
        assert torch.equal(value, opt_c.clip_state().state_dict()[key]), key
    assert int(opt_a.clip_state().nonfinite) == 1 and opt_c.steps == opt_a.steps == 12
    for p_a, p_c in zip(model_a.parameters(), model_c.parameters()):
        assert torch.equal(opt_a.state[p_a]["exp_avg_sq"], opt_c.state[p_c]["exp_avg_sq"])


def test_a_state_saved_with_another_beta_warns_and_starts_fresh():
    model = _net()
    opt = AdaptiveClippingOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), beta=0.7)
    _train(model, opt, _batches()[:2])
    saved = opt.state_dict()
    other = AdaptiveClippingOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), beta=0.9)
    with pytest.warns(
        UserWarning, match=r"beta=0\.9, but its clipping state was saved with mode='adaptive', beta=0\.7"
    ):
        other.load_state_dict(saved)
    assert other.clip_state() is None and other.state_dict()["clipping"]["state"] == {}
    plain = AdaptiveClippingOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    plain.load_state_dict(torch.optim.SGD(model.parameters(), lr=0.2).state_dict())  # a plain optimizer's state
    assert plain.param_groups[0]["lr"] == 0.2


# ------------------------------------------------------------------------------------------------ non-finite
def test_nonfinite_policies():
    batches = _batches()
    model = _net()
    opt = AdaptiveClippingOptimizer(torch.optim.Adam(model.parameters(), lr=0.1), nonfinite="skip")
    _train(model, opt, batches[:6], poison={2})
    assert {int(opt.state[p]["step"]) for p in model.parameters()} == {5}  # Adam did not count the skipped step
    assert all(bool(p.isfinite().all()) for p in model.parameters())
    assert int(opt.clip_state().seen) == 5 and int(opt.clip_state().nonfinite) == 1

    model = _net()
    named = torch.optim.SGD(model.named_parameters(), lr=0.1)  # torch >= 2.6 keeps the names in the groups
    opt = AdaptiveClippingOptimizer(named, nonfinite="error")
    with pytest.raises(RuntimeError, match=r"at step 3 in: 2\.weight \(AdaptiveClippingOptimizer\(nonfinite='error'\)"):
        _train(model, opt, batches[:6], poison={3})

    model = _net()
    opt = AdaptiveClippingOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))  # default: zero, no sync
    _train(model, opt, batches[:3], poison={1})
    assert all(bool(p.isfinite().all()) for p in model.parameters()) and int(opt.clip_state().seen) == 2


def test_no_host_sync_per_step_at_the_defaults():
    model = _net()
    sgd = AdaptiveClippingOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), alpha=0.8, max_norm=10.0, warmup_steps=1
    )
    adam_model = _net(1)
    adam = AdaptiveClippingOptimizer(torch.optim.Adam(adam_model.parameters(), lr=0.1))
    for step, (x, y) in enumerate(_batches()):
        for net, opt in ((model, sgd), (adam_model, adam)):
            loss = nn.functional.mse_loss(net(x), y) * (0.0 if step == 4 else 1.0)  # a zero-norm step
            loss.backward()
            if step == 5:
                net[-1].weight.grad[0, 0] = float("nan")  # a non-finite step
        with no_host_sync():
            sgd.step()  # the whole step: the clipping and SGD's own update
            # the clipping of a wrapped Adam (Adam's own CPU step reads its step count)
            adam._clip.count(adam._clip_grads())
        adam.optimizer.step()
        sgd.zero_grad()
        adam.zero_grad()
    assert int(sgd.clip_state().seen) == int(adam.clip_state().seen) == 6
    assert all(bool(p.isfinite().all()) for p in [*model.parameters(), *adam_model.parameters()])


# ----------------------------------------------------------------------------------------------------- AMP
def test_grad_scaler_unscaled_norms_skipped_steps_not_counted_and_explicit_unscale():
    batches = _batches(n=96)

    def run(scaler, unscale_first=False, poison=()):
        model = _net()
        opt = AdaptiveClippingOptimizer(torch.optim.Adam(model.parameters(), lr=0.05), alpha=1.1, beta=0.7)
        norms = []
        for step, (x, y) in enumerate(batches):
            loss = nn.functional.mse_loss(model(x), y) * (100.0 if step == 3 else 1.0)
            (scaler.scale(loss) if scaler else loss).backward()
            if step in poison:
                model[-1].weight.grad[0, 0] = float("inf")
            if scaler is None:
                opt.step()
            else:
                if unscale_first:
                    scaler.unscale_(opt)  # as for torch's clip_grad_norm_: the wrapper then measures the same
                scaler.step(opt)
                scaler.update()
            norms.append(float(opt.last_stats.norm) if opt.last_stats is not None else None)
            opt.zero_grad()
        return model, opt, norms

    plain_model, plain, plain_norms = run(None)
    # a power-of-two scale unscales exactly: the norm is measured unscaled, so the run is bit for bit the plain one
    for unscale_first in (False, True):
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=1000)
        model, opt, norms = run(scaler, unscale_first)
        assert norms == plain_norms
        assert _same(model.parameters(), plain_model.parameters())
        assert torch.equal(opt.clip_state().ema, plain.clip_state().ema)
    # an inf gradient: the scaler skips the step and halves its scale; the wrapper never ran, nothing is counted
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=1000)
    model, opt, norms = run(scaler, poison={5})
    assert scaler.get_scale() == 2.0**11
    assert opt.steps == len(batches) - 1 and int(opt.clip_state().seen) == len(batches) - 1
    assert int(opt.clip_state().nonfinite) == 0 and norms[5] == norms[4]  # last_stats still the previous step's
    assert {int(opt.state[p]["step"]) for p in model.parameters()} == {len(batches) - 1}


# ------------------------------------------------------------------------------------------------ TensorBoard
def test_log_clipping_writes_the_callbacks_names_and_layout(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    # the callback's run, without sparsity (the wrapper does not measure it)
    cb = AdaptiveGradientClipping(alpha=1.05, beta=0.7, log_sparsity=False)
    logger = pl.loggers.TensorBoardLogger(str(tmp_path), name="callback")
    pl.Trainer(**trainer_kwargs(tmp_path, max_steps=8, logger=logger, callbacks=[cb])).fit(
        TinyRegressor(lr=0.1), regression_loader()
    )
    callback_scalars = read_scalars(logger.log_dir)

    model = _net()
    opt = AdaptiveClippingOptimizer(torch.optim.Adam(model.parameters(), lr=0.1), alpha=1.05, beta=0.7)
    writer = SummaryWriter(str(tmp_path / "wrapper"))
    written = []
    for step, (x, y) in enumerate(_batches()):
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        written.append(log_clipping(writer, opt, step))
    writer.close()
    scalars = read_scalars(tmp_path / "wrapper")
    clip_tags = {t for t in callback_scalars if t.startswith("clip/")}
    assert set(scalars) == clip_tags == set(written[0])
    assert [s for s, _ in scalars["clip/grad_norm"]] == list(range(8))
    assert [v for _, v in scalars["clip/grad_norm"]] == pytest.approx([w["clip/grad_norm"] for w in written])
    assert math.isinf(written[0]["clip/threshold"])  # no bound on the seeding step, as the callback logs it
    assert read_layout(tmp_path / "wrapper") == read_layout(logger.log_dir)  # the callback's layout, one written
    assert len(read_layout(tmp_path / "wrapper")) == 1


# ----------------------------------------------------------------------------------- the callback's numbers
class _Spiky(TinyRegressor):
    def __init__(self, wrapper: bool = False) -> None:
        super().__init__(lr=0.05)
        self.wrapper = wrapper
        self.poison_steps = {7}

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * 100.0 if self.trainer.global_step == 4 else loss

    def configure_optimizers(self):
        adam = super().configure_optimizers()
        return AdaptiveClippingOptimizer(adam, alpha=1.1, beta=0.7) if self.wrapper else adam


def test_callback_and_wrapper_give_bit_identical_weights_and_states(tmp_path):
    batches = _batches(n=96)
    # 1. the callback in a Trainer
    pl.seed_everything(0, verbose=False)
    with_callback = _Spiky()
    cb = AdaptiveGradientClipping(alpha=1.1, beta=0.7)
    pl.Trainer(**trainer_kwargs(tmp_path, max_steps=12, log_every_n_steps=50, callbacks=[cb])).fit(
        with_callback, regression_loader(n=96)
    )
    # 2. the wrapper returned from configure_optimizers, in a Trainer
    pl.seed_everything(0, verbose=False)
    with_wrapper = _Spiky(wrapper=True)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=12, log_every_n_steps=50))
    trainer.fit(with_wrapper, regression_loader(n=96))
    wrapper = trainer.optimizers[0]
    # 3. the wrapper in a plain loop
    pl.seed_everything(0, verbose=False)
    plain = TinyRegressor(lr=0.05).net
    opt = AdaptiveClippingOptimizer(torch.optim.Adam(plain.parameters(), lr=0.05), alpha=1.1, beta=0.7)
    _train(plain, opt, batches, spike={4}, poison={7})

    state = cb.clip_state().state_dict()
    assert int(state["clipped"]) >= 1 and int(state["nonfinite"]) == 1 and int(state["seen"]) == 11
    for other in (wrapper.clip_state(), opt.clip_state()):
        assert all(torch.equal(v, other.state_dict()[k]) for k, v in state.items())
    assert _same(with_callback.parameters(), with_wrapper.parameters())
    assert _same(with_callback.parameters(), plain.parameters())


def test_the_callback_refuses_a_wrapped_optimizer(tmp_path):
    model = _Spiky(wrapper=True)
    before = [p.detach().clone() for p in model.parameters()]
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[AdaptiveGradientClipping()]))
    with pytest.raises(ValueError, match="Invalid optimizer: AdaptiveClippingOptimizer with the AdaptiveGradientClip"):
        trainer.fit(model, regression_loader())
    assert _same(before, model.parameters())


# ------------------------------------------------------------------------------------------------------ Fabric
def test_fabric_bf16_mixed_matches_a_plain_autocast_loop():
    Fabric = NS.fabric.Fabric
    batches = _batches()

    def run(fabric):
        model = _net()
        opt = AdaptiveClippingOptimizer(torch.optim.Adam(model.parameters(), lr=0.05), alpha=1.1, beta=0.7)
        if fabric is not None:
            model, opt = fabric.setup(model, opt)
        for step, (x, y) in enumerate(batches):
            if fabric is not None:
                out = model(x)
            else:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    out = model(x)
                out = out.float()
            loss = nn.functional.mse_loss(out, y) * (100.0 if step == 4 else 1.0)
            fabric.backward(loss) if fabric is not None else loss.backward()
            opt.step()
            opt.zero_grad()
        return model, opt

    fabric_model, fabric_opt = run(Fabric(accelerator="cpu", devices=1, precision="bf16-mixed"))
    plain_model, plain_opt = run(None)
    assert isinstance(fabric_opt, AdaptiveClippingOptimizer) and fabric_opt.steps == 8
    assert int(fabric_opt.clip_state().clipped) >= 1
    assert torch.equal(fabric_opt.clip_state().ema, plain_opt.clip_state().ema)
    assert _same(fabric_model.parameters(), plain_model.parameters())
    assert "clipping" in fabric_opt.state_dict()


# --------------------------------------------------------------------------------------------------------- DDP
@pytest.mark.parametrize(
    "mode", ["ddp", pytest.param("fsdp2", marks=pytest.mark.skipif(not FSDP2_ON_CPU, reason=FSDP2_SKIP_REASON))]
)
def test_distributed_over_gloo_ranks_agree_and_match_one_process(mode, tmp_path):
    """DDP (whole, averaged gradients) and FSDP2 ``fully_shard`` (DTensor shards): the wrapper clips by the whole
    model's norm, identically on both ranks, as one process does on the same global batches."""
    script = os.path.join(ROOT, "tests", "wrapper_ddp_run.py")
    records = {}
    for world in (2, 1):
        out = str(tmp_path / f"w{world}")
        launch([script, out, str(world), mode])
        records[world] = []
        for rank in range(world):
            with open(f"{out}.rank{rank}") as f:
                records[world].append(json.load(f))
    (r0, r1), (single,) = records[2], records[1]
    assert r0["sharded"] == r1["sharded"] == (mode == "fsdp2") and not single["sharded"]
    assert r0["norms"] == r1["norms"] and r0["ema"] == r1["ema"] and r0["weights"] == r1["weights"]
    assert r0["clipped"] == single["clipped"] and r0["clipped"][3]  # the spike is clipped on every rank
    assert r0["seen"] == single["seen"] == 6
    assert r0["norms"] == pytest.approx(single["norms"], rel=1e-5)
    assert r0["weights"] == pytest.approx(single["weights"], rel=1e-4, abs=1e-6)


# ------------------------------------------------------------------------------- copies, pickles (an lr scheduler)
def _params_of(opt):
    return [p for group in opt.param_groups for p in group["params"]]


def _clip_values(opt) -> dict:
    return {k: v.clone() for k, v in opt.clip_state().state_dict().items()}


def test_deepcopy_and_pickle_with_an_lr_scheduler_attached_step_the_copy_as_torch_optimizers_do():
    batches = _batches()
    # torch's own optimizer, the reference: its copies step themselves, and it pickles with a scheduler attached
    model = _net()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    torch.optim.lr_scheduler.StepLR(sgd, 1, gamma=0.5)
    for torch_copy in (copy.deepcopy(sgd), pickle.loads(pickle.dumps(sgd))):
        for p in _params_of(torch_copy):
            p.grad = torch.ones_like(p)
        before = [p.detach().clone() for p in model.parameters()]
        torch_copy.step()
        assert _same(before, model.parameters()) and not _same(before, _params_of(torch_copy))

    model = _net()
    opt = AdaptiveClippingOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), alpha=1.1, beta=0.7)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
    _train(model, opt, batches[:3], spike={2})
    sched.step()
    saved = _clip_values(opt)
    x, y = batches[3]
    for duplicate in (copy.deepcopy, lambda o: pickle.loads(pickle.dumps(o))):
        clone = duplicate(opt)
        assert isinstance(clone, AdaptiveClippingOptimizer) and clone.optimizer is not opt.optimizer
        assert clone.steps == 3 and clone.rule == opt.rule and clone.nonfinite == opt.nonfinite
        assert all(torch.equal(v, _clip_values(clone)[k]) for k, v in saved.items())  # the clip state carried over
        assert torch.equal(clone.last_stats.norm, opt.last_stats.norm)
        assert [g["lr"] for g in clone.param_groups] == [g["lr"] for g in opt.param_groups]
        calls = []
        clone.register_step_post_hook(lambda o, args, kwargs, calls=calls: calls.append(o))  # the class's hooked step
        params = _params_of(clone)
        assert not any(p is q for p in params for q in model.parameters())
        clone_net = copy.deepcopy(model)  # the network of the clone's parameters
        for p, q in zip(clone_net.parameters(), params):
            with torch.no_grad():
                p.copy_(q)
        nn.functional.mse_loss(clone_net(x), y).backward()
        for p, q in zip(clone_net.parameters(), params):
            q.grad = p.grad.clone()
        nn.functional.mse_loss(model(x), y).backward()  # the original has gradients too
        before_opt = [p.detach().clone() for p in model.parameters()]
        before_clone = [p.detach().clone() for p in params]
        clone.step()
        assert _same(before_opt, model.parameters())  # the original did not move
        assert not _same(before_clone, params)  # the copy did
        assert calls == [clone]  # the copy's own (hooked) step ran
        assert clone.steps == 4 and int(clone.clip_state().seen) == 4
        assert opt.steps == 3 and all(torch.equal(v, _clip_values(opt)[k]) for k, v in saved.items())
        assert all("momentum_buffer" in clone.state[p] for p in params)  # the state is keyed by the copy's
        opt.zero_grad()
    # the original still steps under its scheduler
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _train(model, opt, batches[3:4])
        sched.step()
    assert opt.steps == 4 and opt.param_groups[0]["lr"] == pytest.approx(0.1 / 4)


def test_a_pickled_wrapper_resumes_bit_for_bit():
    batches = _batches()
    model = _net()
    opt = AdaptiveClippingOptimizer(torch.optim.Adam(model.parameters(), lr=0.05), alpha=1.1, beta=0.7)
    torch.optim.lr_scheduler.StepLR(opt, 2)
    _train(model, opt, batches[:4], spike={2})
    blob = pickle.dumps({"model": model, "opt": opt})
    _train(model, opt, batches[4:])
    restored = pickle.loads(blob)
    model_b, opt_b = restored["model"], restored["opt"]
    assert opt_b.steps == 4 and {id(p) for p in _params_of(opt_b)} == {id(p) for p in model_b.parameters()}
    _train(model_b, opt_b, batches[4:])
    assert _same(model.parameters(), model_b.parameters())
    assert all(torch.equal(v, _clip_values(opt_b)[k]) for k, v in _clip_values(opt).items())
    assert opt_b.steps == opt.steps == 8


def test_global_step_hooks_run_once_per_step_as_for_a_torch_optimizer():
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    model = _net()
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = AdaptiveClippingOptimizer(inner)
    sgd = torch.optim.SGD(_net().parameters(), lr=0.1)
    calls = []
    handles = [
        register_optimizer_step_pre_hook(lambda o, args, kwargs: calls.append(("global pre", o))),
        register_optimizer_step_post_hook(lambda o, args, kwargs: calls.append(("global post", o))),
    ]
    try:
        for o in (opt, sgd):
            handles.append(o.register_step_pre_hook(lambda o, args, kwargs: calls.append(("pre", o))))
            handles.append(o.register_step_post_hook(lambda o, args, kwargs: calls.append(("post", o))))
        handles.append(inner.register_step_post_hook(lambda o, args, kwargs: calls.append(("inner post", o))))
        batches = _batches()
        _train(model, opt, batches[:1])
        assert calls == [("global pre", opt), ("pre", opt), ("inner post", inner), ("post", opt), ("global post", opt)]
        calls.clear()
        for p in sgd.param_groups[0]["params"]:
            p.grad = torch.ones_like(p)
        sgd.step()
        assert calls == [("global pre", sgd), ("pre", sgd), ("post", sgd), ("global post", sgd)]
        calls.clear()
        _train(model, opt, batches[1:2], closure=True)
        assert [c for c, _ in calls] == ["global pre", "pre", "inner post", "post", "global post"]
    finally:
        for handle in handles:
            handle.remove()
    import torch.optim.optimizer as torch_optimizer

    assert not torch_optimizer._global_optimizer_pre_hooks and not torch_optimizer._global_optimizer_post_hooks


# ------------------------------------------------------------------------------------------ checkpoint hooks
def _hooked_checkpoint_round_trip(opt):
    """Register the same state-dict hooks on ``opt``, save and load: what they saw, in the order they ran."""
    calls = []

    def sd_pre(name):
        return lambda o: calls.append((name, o is opt))

    opt.register_state_dict_pre_hook(sd_pre("sd_pre_a"))
    opt.register_state_dict_pre_hook(sd_pre("sd_pre_first"), prepend=True)

    def sd_post_a(o, sd):  # in place, returns None
        calls.append(("sd_post_a", o is opt, "replaced" in sd))
        sd["extra"] = 1

    def sd_post_first(o, sd):  # returns a new dict
        calls.append(("sd_post_first", o is opt, "extra" in sd))
        return {**sd, "replaced": True}

    opt.register_state_dict_post_hook(sd_post_a)
    opt.register_state_dict_post_hook(sd_post_first, prepend=True)

    def load_pre_a(o, sd):  # returns a new dict with another lr
        calls.append(("load_pre_a", o is opt, sd.get("seen_by_first", False), sd is passed))
        return {**sd, "param_groups": [dict(g, lr=0.5) for g in sd["param_groups"]]}

    def load_pre_first(o, sd):  # in place, on the shallow copy
        calls.append(("load_pre_first", o is opt, sd["replaced"], sd["extra"], sd is passed))
        sd["seen_by_first"] = True

    opt.register_load_state_dict_pre_hook(load_pre_a)
    opt.register_load_state_dict_pre_hook(load_pre_first, prepend=True)
    opt.register_load_state_dict_post_hook(lambda o: calls.append(("load_post_a", o is opt, o.param_groups[0]["lr"])))
    opt.register_load_state_dict_post_hook(lambda o: calls.append(("load_post_first", o is opt)), prepend=True)

    passed = opt.state_dict()
    keys = sorted(set(passed) - {"clipping"})
    opt.load_state_dict(passed)
    return calls, keys, passed


def test_checkpoint_hooks_run_as_on_a_torch_optimizer():
    batches = _batches()
    model = _net()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _train(model, sgd, batches[:2])
    expected, expected_keys, _ = _hooked_checkpoint_round_trip(sgd)
    assert [c[0] for c in expected] == [
        "sd_pre_first", "sd_pre_a", "sd_post_first", "sd_post_a",
        "load_pre_first", "load_pre_a", "load_post_first", "load_post_a",
    ]  # fmt: skip

    model = _net()
    opt = AdaptiveClippingOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), alpha=1.1)
    _train(model, opt, batches[:2])
    calls, keys, passed = _hooked_checkpoint_round_trip(opt)
    assert calls == expected and keys == expected_keys
    assert opt.param_groups[0]["lr"] == sgd.param_groups[0]["lr"] == 0.5  # the load pre hook's dict was loaded
    assert passed["clipping"]["steps"] == 2 and opt.steps == 2  # the post hooks saw and kept the whole dict

    # the wrapper's own key goes through the hooks too: a load pre hook may rewrite the clipping state
    opt.register_load_state_dict_pre_hook(lambda o, sd: {**sd, "clipping": {**sd["clipping"], "steps": 42}})
    opt.load_state_dict(opt.state_dict())
    assert opt.steps == 42


# ------------------------------------------------------------------------------------------------ torch.compile
@pytest.mark.parametrize(
    ("inner", "nonfinite", "fast_path"),
    [
        ("sgd", "zero", True),
        ("adam", "zero", False),
        ("adam", "skip", True),
        ("smoothed_norm", "skip", True),
        ("smoothed_sign", "zero", False),
        ("lbfgs", "zero", True),
    ],
    ids=[
        "sgd-cpu_fast_path",
        "adam-sync_free_path",
        "adam-skip",
        "SmoothedNormSGD-skip",
        "SmoothedSignSGD-sync_free",
        "LBFGS-closure",
    ],
)
def test_compiled_step_equals_the_eager_step(inner, nonfinite, fast_path):
    """``torch.compile(opt.step)``, torch's recipe for compiled optimizers: over steps with a spike (clipped) and a nan
    (zeroed or skipped), the same clip state, step counts and parameters as the eager step (graph breaks allowed)."""
    batches = _batches(n=80)

    def run(compiled):
        model = _net()
        if inner == "sgd":
            base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        elif inner == "adam":
            base = torch.optim.Adam(model.parameters(), lr=0.05)
        elif inner == "smoothed_norm":
            base = SmoothedNormSGD(model.parameters(), lr=0.05, bias_correction=True)
        elif inner == "smoothed_sign":
            base = SmoothedSignSGD(model.parameters(), lr=0.01, bias_correction=True)
        else:
            base = torch.optim.LBFGS(model.parameters(), lr=1.0, max_iter=3, line_search_fn="strong_wolfe")
        opt = AdaptiveClippingOptimizer(base, alpha=1.1, beta=0.7, nonfinite=nonfinite)
        step = torch.compile(opt.step) if compiled else opt.step
        with cpu_fast_path(fast_path):
            for i, (x, y) in enumerate(batches):

                def closure():
                    opt.zero_grad()
                    loss = nn.functional.mse_loss(model(x), y) * (100.0 if i == 3 else 1.0)
                    loss.backward()
                    if i == 6:
                        model[-1].weight.grad[0, 0] = float("nan")
                    return loss

                if inner == "lbfgs":  # every evaluation clipped, the state advanced once
                    step(closure)
                else:
                    closure()
                    step()
                opt.zero_grad()
        return model, opt

    torch._dynamo.reset()
    try:
        eager_model, eager = run(False)
        compiled_model, compiled = run(True)
    finally:
        torch._dynamo.reset()
    assert compiled.steps == eager.steps == len(batches)
    a, b = eager.clip_state().state_dict(), compiled.clip_state().state_dict()
    for key in ("seen", "steps", "clipped", "nonfinite"):
        assert torch.equal(a[key], b[key]), key
    assert int(a["clipped"]) >= 1 and int(a["nonfinite"]) == 1 and int(a["seen"]) == len(batches) - 1
    for key in ("ema", "coef_min"):
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)
    for p, q in zip(eager_model.parameters(), compiled_model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5)
        if inner not in ("sgd", "lbfgs"):  # the wrapped optimizer's own step counts, the skipped step not counted
            assert torch.equal(torch.as_tensor(compiled.state[q]["step"]), torch.as_tensor(eager.state[p]["step"]))
            assert int(eager.state[p]["step"]) == len(batches) - (nonfinite == "skip")


# --------------------------------------------------------------------------------------- closure optimizers
def test_lbfgs_clips_every_evaluation_at_the_threshold_before_the_step_against_a_float64_reference():
    """LBFGS evaluates its closure several times per step: each evaluation is clipped at the threshold of the state
    before the step, the state advancing once per step with the first evaluation's norm. The reference: plain LBFGS
    with a closure that clips by ``torch.nn.utils.clip_grad_norm_`` at the threshold computed by hand in float64."""
    alpha, beta = 1.5, 0.7
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(16, 8, generator=gen), torch.randn(16, 1, generator=gen)) for _ in range(6)]
    spike = 3

    def lbfgs(model):
        return torch.optim.LBFGS(model.parameters(), lr=1.0, max_iter=3, line_search_fn="strong_wolfe")

    model = _net()
    opt = AdaptiveClippingOptimizer(lbfgs(model), alpha=alpha, beta=beta)
    evaluations = 0
    for step, (x, y) in enumerate(batches):

        def closure():
            nonlocal evaluations
            evaluations += 1
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y) * (10.0 if step == spike else 1.0)
            loss.backward()
            return loss

        loss = opt.step(closure)
        assert isinstance(loss, torch.Tensor)  # LBFGS's return value: the loss of the first evaluation
        assert opt.steps == step + 1 and int(opt.clip_state().seen) == step + 1

    ref_model = _net()
    ref = lbfgs(ref_model)
    m = None
    first_norms, decisions = [], []
    for step, (x, y) in enumerate(batches):
        threshold = math.inf if m is None else alpha * m  # from the state before the step, for every evaluation
        norms = []

        def ref_closure():
            ref.zero_grad()
            loss = nn.functional.mse_loss(ref_model(x), y) * (10.0 if step == spike else 1.0)
            loss.backward()
            n = norm64([p.grad for p in ref_model.parameters()])
            norms.append(n)
            decisions.append((len(norms), n > threshold))
            if n > threshold:
                torch.nn.utils.clip_grad_norm_(list(ref_model.parameters()), threshold)
            return loss

        ref.step(ref_closure)
        first_norms.append(norms[0])
        m = norms[0] if m is None else beta * m + (1 - beta) * norms[0]  # once per step, the first evaluation's norm

    assert evaluations == len(decisions) > len(batches)  # several evaluations per step
    assert any(clipped for _, clipped in decisions) and not all(clipped for _, clipped in decisions)
    assert any(clipped for k, clipped in decisions if k > 1)  # trial points clipped too
    assert opt.steps == len(batches) and int(opt.clip_state().seen) == len(batches)
    assert float(opt.clip_state().ema) == pytest.approx(m, rel=1e-5)
    assert float(opt.last_stats.norm) == pytest.approx(first_norms[-1], rel=1e-5)  # the first evaluation's
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


def test_a_closure_optimizer_without_a_closure_raises_a_clear_error_and_sgd_keeps_one_evaluation():
    model = _net()
    opt = AdaptiveClippingOptimizer(torch.optim.LBFGS(model.parameters()))
    x, y = _batches()[0]
    nn.functional.mse_loss(model(x), y).backward()
    with pytest.raises(TypeError, match=r"LBFGS\.step requires a closure"):
        opt.step()
    assert opt.steps == 0 and opt.clip_state() is None

    sgd = AdaptiveClippingOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    evaluations = []

    def closure():
        evaluations.append(1)
        sgd.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    assert isinstance(sgd.step(closure), torch.Tensor) and len(evaluations) == 1 and sgd.steps == 1


# ------------------------------------------------------------------------------------------------ failed steps
def _unchanged(opt, steps, values, stats):
    assert opt.steps == steps
    if values is None:
        assert opt.clip_state() is None
    else:
        assert all(torch.equal(v, _clip_values(opt)[k]) for k, v in values.items())
    assert opt.last_stats is stats


def test_a_step_that_raises_is_not_counted_and_leaves_the_clip_state_as_it_was():
    batches = _batches()
    # sparse gradients (nn.Embedding(sparse=True)): refused, on the first step and after dense ones
    embedding, head = nn.Embedding(10, 8, sparse=True), nn.Linear(8, 1)
    opt = AdaptiveClippingOptimizer(torch.optim.Adam([*embedding.parameters(), *head.parameters()], lr=0.1))
    tokens = torch.tensor([1, 2, 3])
    head(embedding(tokens)).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()
    _unchanged(opt, 0, None, None)
    opt.zero_grad()
    for x, _ in batches[:2]:  # dense steps: the head alone
        head(x).sum().backward()
        opt.step()
        opt.zero_grad()
    values, stats = _clip_values(opt), opt.last_stats
    head(embedding(tokens)).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()
    _unchanged(opt, 2, values, stats)

    # the clipping raising (nonfinite="error"): not counted, and the window's non-finite count is not advanced
    model = _net()
    opt = AdaptiveClippingOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), nonfinite="error")
    _train(model, opt, batches[:3])
    values, stats = _clip_values(opt), opt.last_stats
    with pytest.raises(RuntimeError, match="at step 3"):
        _train(model, opt, batches[3:4], poison={0})
    _unchanged(opt, 3, values, stats)
    opt.zero_grad()
    _train(model, opt, batches[4:5])  # the next step is step 3
    assert opt.steps == 4 and int(opt.clip_state().seen) == 4 and int(opt.clip_state().nonfinite) == 0

    # the wrapped optimizer raising after the clipping, with a live state (its step pre hook refuses)
    model = _net()
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = AdaptiveClippingOptimizer(inner, alpha=0.5, beta=0.7)
    _train(model, opt, batches[:2])
    values, stats = _clip_values(opt), opt.last_stats

    def refuse(optimizer, args, kwargs):
        raise RuntimeError("refused by the wrapped optimizer")

    handle = inner.register_step_pre_hook(refuse)
    with pytest.raises(RuntimeError, match="refused"):
        _train(model, opt, batches[2:3])
    _unchanged(opt, 2, values, stats)
    handle.remove()
    opt.zero_grad()
    _train(model, opt, batches[2:3])
    assert opt.steps == 3 and int(opt.clip_state().seen) == 3

    # ... and with a state loaded from a checkpoint, not materialised yet (SparseAdam refuses dense gradients)
    model = _net()
    opt = AdaptiveClippingOptimizer(torch.optim.SparseAdam(list(model.parameters()), lr=0.1), alpha=1.1, beta=0.7)
    clipping = {**opt.state_dict()["clipping"], "steps": 2, "state": values}  # the SGD wrapper's state above
    x, y = batches[0]
    for loaded in (False, True):
        if loaded:
            opt.load_state_dict({**opt.optimizer.state_dict(), "clipping": clipping})
        nn.functional.mse_loss(model(x), y).backward()
        with pytest.raises(RuntimeError, match="SparseAdam does not support dense gradients"):
            opt.step()
        _unchanged(opt, 2 if loaded else 0, None, None)
        opt.zero_grad()
    state = opt.state_dict()["clipping"]["state"]  # still the checkpoint's, to be used at the next step
    assert state.keys() == values.keys() and all(torch.equal(v, values[k]) for k, v in state.items())

    # a closure optimizer whose closure raises on its second evaluation of a step
    model = _net()
    opt = AdaptiveClippingOptimizer(torch.optim.LBFGS(model.parameters(), max_iter=4), alpha=1.1, beta=0.7)
    x, y = batches[0]
    evaluations = 0

    def closure(fail_at=None):
        nonlocal evaluations
        evaluations += 1
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        if evaluations == fail_at:
            raise RuntimeError("closure failed")
        return loss

    opt.step(closure)
    values, stats = _clip_values(opt), opt.last_stats
    second = evaluations + 2  # the second evaluation of the next step
    with pytest.raises(RuntimeError, match="closure failed"):
        opt.step(lambda: closure(fail_at=second))
    assert evaluations == second
    _unchanged(opt, 1, values, stats)
    opt.step(closure)
    assert opt.steps == 2 and int(opt.clip_state().seen) == 2
